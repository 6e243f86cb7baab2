"""aroma-peft: AROMA (Autonomous Rank-one Matrix Adaptation) in the language of Hugging Face PEFT."""

from .analysis import effective_rank, module_effective_ranks
from .config import AromaConfig
from .controller import AromaController
from .dual_loop import Decision, DualLoop
from .io import export_lora, load_controller_state, save_adapter
from .layer import AromaLinear
from .model import AromaModel, get_aroma_model, load_adapter
from .reset import reset_optimizer_state
from .schedule import AromaLRSchedule, lr_factor
from .integrations.peft import register as _register_with_peft

_register_with_peft()

__all__ = [
    "AromaConfig", "AromaController", "AromaLRSchedule", "AromaLinear", "AromaModel", "Decision", "DualLoop",
    "effective_rank", "export_lora", "get_aroma_model", "load_adapter", "load_controller_state", "lr_factor",
    "module_effective_ranks", "reset_optimizer_state", "save_adapter",
]
__version__ = "0.1.0"
