"""get_aroma_model / AromaModel: wrap a model's linears with AromaLinear, PEFT style."""

from __future__ import annotations

import functools
import re
import tempfile
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .config import AromaConfig
from .io import adapter_tensors, apply_adapter, checked_adapter, export_lora, read_adapter, save_adapter
from .layer import SUPPORTED_BASE_LAYERS, AromaLinear, base_features, unsupported_base_layer


def _matches(name: str, spec) -> bool:
    """PEFT semantics: a string is a regex on the full name, a list holds name suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


SEQ_CLS_HEAD_NAMES = ("classifier", "score")  # PEFT's names for a classification head (SEQ_CLS_HEAD_NAMES)


def output_head_names(model: nn.Module) -> list[str]:
    """The output heads ``"all-linear"`` leaves out, PEFT's way: a language model's output
    embeddings (``lm_head``); otherwise a classifier's head (``classifier`` or ``score``, whole) and
    the pooler feeding it (unlike PEFT, which adapts the pooler: see docs/algorithm.md)."""
    get = getattr(model, "get_output_embeddings", None)
    lm_head = get() if callable(get) else None
    if lm_head is not None:
        return [n for n, m in model.named_modules() if m is lm_head][:1]
    heads = [getattr(model, name) for name in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    if not heads:
        return []
    names = [n for n, m in model.named_modules() if m is heads[0]][:1]
    return names + [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "pooler"]


def _inside(name: str, parents: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def find_target_modules(model: nn.Module, config: AromaConfig) -> list[str]:
    """Names of the modules ``config`` adapts, in model order; a clear error if none or a bad type."""
    saved = [n for n, _ in model.named_modules() if n and _matches(n, config.modules_to_save)]
    linear_names = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS)]
    if config.target_modules == "all-linear":
        heads = output_head_names(model)
        names = [n for n in linear_names if not _inside(n, heads)]
    else:
        names = [n for n, _ in model.named_modules() if n and _matches(n, config.target_modules)]
    excluded = config.exclude_modules
    names = [n for n in names if not _inside(n, saved) and not (excluded and _matches(n, excluded))]
    if not names:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(
            f"AromaConfig.target_modules={config.target_modules!r} matches no module of {type(model).__name__}. "
            f"Linear modules here are named with the suffixes {suffixes}; for example {linear_names[:8]}")
    modules = dict(model.named_modules())
    for n in names:
        why = unsupported_base_layer(modules[n])
        if why is not None:
            raise ValueError(f"AromaConfig.target_modules={config.target_modules!r} matches {n!r}, {why}")
    return names


def _find_modules_to_save(model: nn.Module, config: AromaConfig) -> list[str]:
    names = [n for n, _ in model.named_modules() if n and _matches(n, config.modules_to_save)]
    if config.modules_to_save and not names:
        raise ValueError(f"AromaConfig.modules_to_save={list(config.modules_to_save)!r} matches no module of "
                         f"{type(model).__name__}")
    return names


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class AromaModel(nn.Module):
    """A model whose target linears are ``AromaLinear``; everything else is frozen except ``modules_to_save``.

    Calls and unknown attributes go to the wrapped model, so it is used like the original one.
    It is also PEFT's tuner for AROMA: ``peft.get_peft_model(model, AromaConfig(...))`` returns a
    ``PeftModel`` whose ``base_model`` is an ``AromaModel`` (PEFT passes ``{adapter_name: config}``).
    """

    prefix = "aroma_"  # PEFT's key for this method (register_peft_method); no AROMA tensor name contains it
    uses_shared_state = False

    def __init__(self, model: nn.Module, config: AromaConfig | dict, adapter_name: str = "default", **peft_options):
        if isinstance(config, dict):  # PeftModel builds its tuner with {adapter_name: config}
            config = config[adapter_name]
        wrapped = [n for n, m in model.named_modules() if isinstance(m, AromaLinear)]
        if wrapped:
            raise ValueError(
                f"{type(model).__name__} already has {len(wrapped)} AROMA layers ({', '.join(wrapped[:3])}"
                f"{', ...' if len(wrapped) > 3 else ''}): it was wrapped by get_aroma_model before. Wrap the "
                "original model once; to change the targets, start again from the unwrapped model (unload())")
        super().__init__()
        self.model = model  # PEFT's name: a PeftModel's keys are then "base_model.model.<module>", as LoRA's
        self.aroma_config = config
        self.peft_config = {adapter_name: config}
        self.active_adapter = adapter_name
        targets = find_target_modules(model, config)
        self.modules_to_save_names = _find_modules_to_save(model, config)
        # unload() gives these back; kept on the CPU, out of the state dict (PEFT keeps the original too).
        self._original_heads = {k: v.detach().to("cpu", copy=True) for k, v in self.modules_to_save_state().items()}
        for p in model.parameters():
            p.requires_grad_(False)
        for i, name in enumerate(targets):
            _set_submodule(model, name, AromaLinear(model.get_submodule(name), config.r, config.alpha, config.seed, i,
                                                   config.init_scale))
        for name in self.modules_to_save_names:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        if config.inference_mode:  # PeftModel.from_pretrained(..., is_trainable=False)
            for p in self.adapter_parameters():
                p.requires_grad_(False)
        if getattr(model, "is_gradient_checkpointing", False):
            self._let_gradients_through_checkpoints()
        # Until an AromaController with an optimizer drives the model, any optimizer holding its
        # live factors may take one step, not two (see _watch_optimizers).
        self.controlled = False
        self._steps_without_controller = 0
        _watch_optimizers(self)
        # Calls go to the wrapped model, with its forward's signature, which callers such as the HF
        # Trainer inspect (to choose dataset columns). Not its bound forward itself: accelerate's
        # autocast rebinds a bound forward's function to this object, whose ``.model`` a Llama's
        # forward would then call for its decoder.
        @functools.wraps(model.forward)
        def forward(*args, **kwargs):
            return self.model(*args, **kwargs)
        self.forward = forward

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not wrapped yet
                raise
            return getattr(self.model, name)

    @property
    def base_model(self) -> nn.Module:
        """The wrapped model, its target linears replaced by ``AromaLinear``."""
        return self.model

    def get_base_model(self) -> nn.Module:
        """The wrapped model, as ``PeftModel.get_base_model()``."""
        return self.model

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    # ------------------------------------------------------------------ the reference output
    @contextmanager
    def disable_adapter(self):
        """Within the block, the model computes what the original one did: every adapted linear its
        ``W0 x + bias``, the ``modules_to_save`` with their weights from before wrapping (the reference
        output DPO-style training needs). Leave the block before the next optimizer step."""
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    @torch.no_grad()
    def disable_adapter_layers(self) -> None:
        """Switch every AROMA layer and ``modules_to_save`` head to the original model (PEFT calls this)."""
        if any(layer.disabled for layer in self.aroma_layers.values()):
            return
        for layer in self.aroma_layers.values():
            layer.disabled = True
        self._trained_heads = {k: v.detach().clone() for k, v in self.modules_to_save_state().items()}
        for key, param in self.modules_to_save_state().items():
            param.copy_(self._original_heads[key])

    @torch.no_grad()
    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers``."""
        for layer in self.aroma_layers.values():
            layer.disabled = False
        for key, param in self.modules_to_save_state().items():
            param.copy_(self._trained_heads.pop(key, param))

    # ------------------------------------------------------------------ PEFT's state-dict hooks (PEFT >= 0.21)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """What ``PeftModel.save_pretrained`` writes: the adapter, under the PeftModel's keys."""
        return adapter_tensors(model.base_model)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # one adapter: its name is in no key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        return state_dict

    # ------------------------------------------------------------------ training guards
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise at the second step of an optimizer that trains the live factors with no controller.

        The HF Trainer without ``AromaController`` and ``AromaCallback`` otherwise trains a rank-r
        LoRA for the whole run: no check, no merge, no stop, no warning.
        """
        if self.controlled:
            return
        # Ids of the factors as they are now: ids kept from construction go stale when a factor is
        # replaced (FSDP2's DTensor parameters, load_state_dict(assign=True)), and a freed id can be
        # reused by another model's parameter, which would make this model object to a step it is not in.
        factor_ids = {id(p) for layer in self.aroma_layers.values() for p in (layer.lora_A, layer.lora_B)}
        if not any(id(p) in factor_ids for g in optimizer.param_groups for p in g["params"]):
            return
        self._steps_without_controller += 1
        if self._steps_without_controller >= 2:
            raise RuntimeError(
                f"AromaModel: the optimizer is taking step {self._steps_without_controller} of the live factors without "
                "an AromaController, so no check, merge or stop of AROMA happens. Create controller = "
                "AromaController(model, optimizer) and call controller.step() after every optimizer.step(); with the "
                "Hugging Face Trainer pass optimizers=(optimizer, controller.attach_optimizer(optimizer)) and "
                "callbacks=[AromaCallback(controller)]")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """The base model's activation checkpointing (the HF Trainer calls this), made to work for the factors.

        transformers' default is reentrant checkpointing, which computes no gradient for a
        checkpointed block whose inputs need none, and the frozen embeddings give none: the live
        factors would get no gradient at all. So the embeddings' output is made to need one, as
        PEFT does (``enable_input_require_grads``).
        """
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        self._let_gradients_through_checkpoints()

    def _let_gradients_through_checkpoints(self) -> None:
        if hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()

    # ------------------------------------------------------------------ introspection
    @property
    def aroma_layers(self) -> "OrderedDict[str, AromaLinear]":
        """Adapted modules by their name in the base model, in model order."""
        return OrderedDict((n, m) for n, m in self.base_model.named_modules() if isinstance(m, AromaLinear))

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every parameter AROMA may train, in a fixed order: live factors, then ``modules_to_save``.

        Give this list to the optimizer (not only the ``requires_grad`` ones): frozen factors get no
        gradient and are skipped, and the order stays the same after a resume, so a saved optimizer
        state loads back onto the same parameters.
        """
        params = [p for layer in self.aroma_layers.values() for p in (layer.lora_A, layer.lora_B)]
        for name in self.modules_to_save_names:
            params.extend(self.base_model.get_submodule(name).parameters())
        return params

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT reports them."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def ranks(self) -> dict[str, int]:
        """Rank of each module's merged update (live component not counted)."""
        return {n: m.rank for n, m in self.aroma_layers.items()}

    def modules_to_save_state(self) -> dict[str, torch.Tensor]:
        """Parameters of ``modules_to_save`` by their full name in the base model."""
        out = {}
        for name in self.modules_to_save_names:
            for pname, p in self.base_model.get_submodule(name).named_parameters():
                out[f"{name}.{pname}"] = p.detach()
        return out

    # ------------------------------------------------------------------ artefacts
    def save_pretrained(self, directory: str | Path, controller=None) -> None:
        """Write the adapter (safetensors), its PEFT config, its metadata and controller state (JSON) to
        ``directory``; ``AromaModel.from_pretrained`` and ``peft.PeftModel.from_pretrained`` load it."""
        save_adapter(self, directory, controller)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, is_trainable: bool = False) -> "AromaModel":
        """Wrap ``model`` (the original base) and load the adapter saved in ``directory``; as in PEFT, in
        eval mode with every adapter parameter frozen unless ``is_trainable``."""
        aroma = load_adapter(model, directory)
        if not is_trainable:
            aroma.aroma_config.inference_mode = True
            for p in aroma.adapter_parameters():
                p.requires_grad_(False)
            aroma.eval()
        return aroma

    def push_to_hub(self, repo_id: str, controller=None, commit_message: str = "Upload AROMA adapter",
                    private: bool | None = None, token: str | None = None, **upload_kwargs):
        """Upload the adapter, the files of ``save_pretrained``, to the Hub repository ``repo_id`` (created if
        needed); never the base model's weights, which the wrapped model's own ``push_to_hub`` would send."""
        from huggingface_hub import create_repo, upload_folder

        repo = create_repo(repo_id, private=private, token=token, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, controller)
            return upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message,
                                 token=token, **upload_kwargs)

    def export_lora(self, directory: str | Path) -> None:
        """Write a standard PEFT LoRA adapter that ``peft.PeftModel.from_pretrained(base, directory)`` loads."""
        export_lora(self, directory)

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Write W0 + s B A into every adapted linear and return the plain base model."""
        quantized = [name for name, layer in self.aroma_layers.items() if layer.quantized]
        if quantized:
            raise ValueError(f"merge_and_unload: cannot merge into the 4-bit weight of {quantized[0]!r}"
                             f"{f' (and {len(quantized) - 1} more)' if len(quantized) > 1 else ''}: quantizing "
                             "W0 + s B A again would round the update away. Export the adapter (export_lora) and "
                             "load it with PEFT on the 4-bit base, or load the base unquantized, then "
                             "AromaModel.from_pretrained(base, adapter).merge_and_unload()")
        for name, layer in self.aroma_layers.items():
            _set_submodule(self.base_model, name, layer.merged_base_layer())
        return self.base_model

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """Return the base model with its original weights: folded components taken out, and the
        ``modules_to_save`` heads as they were when the model was wrapped (``merge_and_unload``
        keeps the trained heads)."""
        for name, layer in self.aroma_layers.items():
            _set_submodule(self.base_model, name, layer.original_base_layer())
        for key, param in self.modules_to_save_state().items():
            param.copy_(self._original_heads[key])
        return self.base_model


_uncontrolled: "weakref.WeakSet[AromaModel]" = weakref.WeakSet()
_optimizer_hook = None


def _before_any_optimizer_step(optimizer, args, kwargs) -> None:
    for model in list(_uncontrolled):
        if model.controlled:
            _uncontrolled.discard(model)
        else:
            model._before_optimizer_step(optimizer)


def _watch_optimizers(model: AromaModel) -> None:
    """Look at every optimizer step (a global hook, registered once) until ``model`` is controlled."""
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_pre_hook(_before_any_optimizer_step)
    _uncontrolled.add(model)


def load_adapter(model, directory: str | Path):
    """Wrap ``model`` (the original base) and load an adapter written by ``save_adapter``."""
    directory = Path(directory)
    meta, config, tensors, weights_path = read_adapter(directory)
    # Check every tensor against the model before touching it: a failed load leaves the model as it was.
    layers = {name: base_features(model.get_submodule(name)) for name in find_target_modules(model, config)}
    heads = {f"{head}.{pname}": tuple(param.shape) for head in _find_modules_to_save(model, config)
             for pname, param in model.get_submodule(head).named_parameters()}
    checked, saved = checked_adapter(meta, tensors, config.r, directory, weights_path, layers, heads)
    aroma = AromaModel(model, config)
    apply_adapter(aroma, meta, checked, saved)
    return aroma


def get_aroma_model(model: nn.Module, config: AromaConfig) -> AromaModel:
    """Wrap ``model`` for AROMA, like ``peft.get_peft_model``. The model is modified in place."""
    return AromaModel(model, config)
