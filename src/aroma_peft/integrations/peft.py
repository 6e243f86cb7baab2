"""AROMA as a PEFT method: ``peft.get_peft_model(model, AromaConfig(...))`` and ``PeftModel.from_pretrained``.

PEFT (>= 0.15) dispatches on its ``PeftType`` enum; an out-of-tree method adds a member to it and
registers its config and model classes (``register_peft_method``), as L1RA does. Importing
``aroma_peft`` does both, once.
"""

from __future__ import annotations

from aenum import extend_enum
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from ..config import AromaConfig
from ..model import AromaModel

NAME = "aroma"


def register() -> None:
    """Add ``PeftType.AROMA`` and register ``AromaConfig`` / ``AromaModel`` with PEFT (idempotent)."""
    if NAME.upper() not in PeftType.__members__:
        extend_enum(PeftType, NAME.upper(), NAME.upper())
    if PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.AROMA) is not AromaModel:
        register_peft_method(name=NAME, config_cls=AromaConfig, model_cls=AromaModel, prefix=AromaModel.prefix)
