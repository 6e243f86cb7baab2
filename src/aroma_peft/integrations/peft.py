"""AROMA as a PEFT method: ``peft.get_peft_model(model, AromaConfig(...))`` and ``PeftModel.from_pretrained``.

PEFT (>= 0.15) dispatches on its ``PeftType`` enum; an out-of-tree method adds a member to it and
registers its config and model classes (``register_peft_method``), as L1RA does. Importing
``aroma_peft`` does both, once.

``PeftModel.disable_adapter()`` is the one PeftModel method that cannot reach an out-of-tree tuner:
for every non-prompt method it asks ``get_model_status``, which refuses any tuner that is not a
``BaseTuner`` holding ``BaseTunerLayer`` modules (PEFT 0.21: "TypeError: get_model_status() got an
invalid PeftModel instance"). ``register`` wraps it so that a PeftModel whose tuner is an
``AromaModel`` uses ``AromaModel.disable_adapter`` (the reference output of DPO-style training);
every other PeftModel keeps PEFT's own.
"""

from __future__ import annotations

from contextlib import contextmanager

from aenum import extend_enum
from peft import PeftModel
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
    if not getattr(PeftModel.disable_adapter, "_aroma", False):
        PeftModel.disable_adapter = _disable_adapter(PeftModel.disable_adapter)


def _disable_adapter(peft_disable_adapter):
    @contextmanager
    def disable_adapter(self):
        if not isinstance(self.base_model, AromaModel):
            with peft_disable_adapter(self):
                yield
            return
        was_disabled = self._adapters_disabled
        try:
            with self.base_model.disable_adapter():
                self._adapters_disabled = True
                yield
        finally:
            self._adapters_disabled = was_disabled

    disable_adapter.__doc__ = peft_disable_adapter.__doc__
    disable_adapter._aroma = True
    return disable_adapter
