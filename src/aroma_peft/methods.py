"""The fine-tuning methods compared side by side: AROMA, ReLoRA, LoRA, DoRA, AdaLoRA, full, BitFit.

Every method is prepared into a ``MethodRun`` with the same small surface, so the training loop
of ``train.py`` treats them alike: the parameters to optimize, the schedule, what happens after
each optimizer step, the current rank of each adapted module, and how the result is saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from .config import LR_DECAYS, AromaConfig
from .controller import AromaController
from .io import atomic_write
from .model import get_aroma_model

METHODS = ("aroma", "relora", "lora", "dora", "adalora", "full", "bitfit")
PEFT_METHODS = ("lora", "dora", "adalora")


def _aroma(name: str):
    """AROMA's options have one default, AromaConfig's."""
    return AromaConfig.__dataclass_fields__[name].default


@dataclass
class MethodOptions:
    """The method-specific options (the rest of the run's options live in ``train.TrainOptions``)."""

    target_modules: list[str] | str | None = None  # None: default_target_modules(model)
    modules_to_save: list[str] = field(default_factory=list)
    r: int = _aroma("r")  # LoRA/DoRA rank, AdaLoRA target rank, AROMA inner-space rank, ReLoRA rank per cycle
    alpha: float = _aroma("alpha")
    dropout: float = 0.0
    # AROMA / ReLoRA
    eps_in: float | None = _aroma("eps_in")
    eps_out: float | None = _aroma("eps_out")
    outer_criterion: str = _aroma("outer_criterion")  # eq. (6) relative to "weight" (the paper) or "update"
    converged_component: str = _aroma("converged_component")  # a converged module's last: "discard" or "merge"
    check_interval: int = _aroma("check_interval")
    max_inner_steps: int = _aroma("max_inner_steps")
    restart_warmup_steps: int = _aroma("restart_warmup_steps")
    # every method: the learning rate's decay after the warmup, to min_lr_ratio x peak at T
    lr_decay: str = _aroma("lr_decay")
    min_lr_ratio: float = _aroma("min_lr_ratio")
    reset: str = _aroma("reset")
    reinit: str = _aroma("reinit")  # AROMA's new a after a merge: "kaiming" (the paper), "gradient", "gradient-sign", "previous", "offset"
    init_scale: float = _aroma("init_scale")  # AROMA/ReLoRA: every new a is the Kaiming draw times this
    # LoRA+ (Hayou et al. 2024; PEFT's create_loraplus_optimizer): the B factors train at lr x this ratio
    loraplus_lr_ratio: float = 1.0
    # the A factors (lora_A) train at lr x this ratio; 0 freezes them at their draw (a diagnostic)
    a_lr_ratio: float = 1.0
    train_heads_after_convergence: bool = _aroma("train_heads_after_convergence")
    # AdaLoRA
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 10
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.loraplus_lr_ratio, bool) or not isinstance(self.loraplus_lr_ratio, (int, float)) \
                or not self.loraplus_lr_ratio > 0:
            raise ValueError(f"--loraplus-lr-ratio must be a number > 0, got {self.loraplus_lr_ratio!r}")
        if isinstance(self.a_lr_ratio, bool) or not isinstance(self.a_lr_ratio, (int, float)) \
                or not self.a_lr_ratio >= 0:
            raise ValueError(f"--a-lr-ratio must be a number >= 0, got {self.a_lr_ratio!r}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"--lr-decay {self.lr_decay!r} is unknown: expected one of {', '.join(LR_DECAYS)}")
        if isinstance(self.min_lr_ratio, bool) or not isinstance(self.min_lr_ratio, (int, float)) \
                or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be a number in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class MethodRun:
    """A model prepared for one method, and the hooks the training loop calls."""

    method: str
    model: nn.Module
    parameters: list[nn.Parameter]
    make_scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
    # A method's own work after optimizer.step() and scheduler.step(), given the step number (AdaLoRA's
    # budget allocation). AROMA's is controller.step(), which the training loop calls itself.
    after_step: Callable[[int], None] | None
    module_ranks: Callable[[], dict[str, int]]
    module_updates: Callable[[], dict[str, torch.Tensor]]  # the final s*B*A (or delta) of each adapted module
    save: Callable[[Path], None]
    controller: AromaController | None = None
    count_trainable: Callable[[], int] | None = None  # when not every requires_grad entry trains (AdaLoRA)

    def trainable_count(self) -> int:
        if self.count_trainable is not None:
            return self.count_trainable()
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def split_options(values: dict) -> tuple[dict, MethodOptions]:
    """A flat dict of run options (a preset, a study's run) as the rest, for ``TrainOptions``, and
    the method's own, as ``MethodOptions``."""
    names = {f.name for f in dataclasses.fields(MethodOptions)}
    return ({k: v for k, v in values.items() if k not in names},
            MethodOptions(**{k: v for k, v in values.items() if k in names}))


def default_target_modules(model: nn.Module) -> list[str]:
    """Every linear inside the numbered transformer blocks (``encoder.layer.3.attention.self.query``,
    ``model.layers.0.mlp.up_proj``, ``h.5.attn.c_attn``): the paper's W_q, W_k, W_v, W_o, W_f1, W_f2,
    without the pooler and the head."""
    import re

    from .layer import SUPPORTED_BASE_LAYERS

    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS) and re.search(r"\.\d+\.", n)]


def decay_schedule(optimizer, max_steps: int, warmup_steps: int, opts: MethodOptions):
    """The schedule of the methods without restarts: transformers' linear warmup from 0, then
    ``schedule.envelope`` (with the defaults, ``get_linear_schedule_with_warmup`` exactly)."""
    from torch.optim.lr_scheduler import LambdaLR

    from .schedule import envelope

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return envelope(step, max_steps=max_steps, warmup_steps=warmup_steps, decay=opts.lr_decay,
                        min_lr_ratio=opts.min_lr_ratio)

    return LambdaLR(optimizer, factor)


def _save_trainable(model: nn.Module, directory: Path) -> None:
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "trainable.safetensors", lambda p: save_file(tensors, str(p)))


def prepare(method: str, base: nn.Module, opts: MethodOptions, *, max_steps: int, warmup_steps: int,
            seed: int = 0) -> MethodRun:
    """Wrap ``base`` for ``method``; the base model is modified in place."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if opts.target_modules is None:
        opts = dataclasses.replace(opts, target_modules=default_target_modules(base))
    if method in ("aroma", "relora"):
        return _prepare_aroma(method, base, opts, max_steps, warmup_steps, seed)
    if method in PEFT_METHODS:
        return _prepare_peft(method, base, opts, max_steps, warmup_steps)
    return _prepare_selective(method, base, opts, max_steps, warmup_steps)


def loop_tolerances(method: str, eps_in: float | None, eps_out: float | None) -> tuple[float | None, float | None]:
    """The (eps_in, eps_out) the dual loop of ``method`` runs with: ReLoRA's fixed cycles switch
    eqs. (5) and (6) off, whatever the options say."""
    return (None, None) if method == "relora" else (eps_in, eps_out)


def _prepare_aroma(method, base, opts, max_steps, warmup_steps, seed) -> MethodRun:
    eps_in, eps_out = loop_tolerances(method, opts.eps_in, opts.eps_out)
    config = AromaConfig(
        target_modules=opts.target_modules, modules_to_save=tuple(opts.modules_to_save), r=opts.r,
        alpha=opts.alpha, eps_in=eps_in, eps_out=eps_out,
        outer_criterion=opts.outer_criterion, converged_component=opts.converged_component,
        check_interval=opts.check_interval, max_inner_steps=opts.max_inner_steps, max_steps=max_steps,
        warmup_steps=warmup_steps, restart_warmup_steps=opts.restart_warmup_steps, reset=opts.reset,
        reinit=opts.reinit, init_scale=opts.init_scale, lr_decay=opts.lr_decay, min_lr_ratio=opts.min_lr_ratio,
        train_heads_after_convergence=opts.train_heads_after_convergence, seed=seed)
    model = get_aroma_model(base, config)
    controller = AromaController(model)

    def make_scheduler(optimizer):
        return controller.attach_optimizer(optimizer)

    def save(directory: Path) -> None:
        model.save_pretrained(directory / "adapter", controller=controller)
        if any(layer.rank or layer.active for layer in model.aroma_layers.values()):
            model.export_lora(directory / "lora")

    return MethodRun(
        method=method, model=model, parameters=model.adapter_parameters(), make_scheduler=make_scheduler,
        after_step=None, module_ranks=model.ranks,
        module_updates=lambda: {n: layer.delta_weight() for n, layer in model.aroma_layers.items()},
        save=save, controller=controller)


def _prepare_peft(method, base, opts, max_steps, warmup_steps) -> MethodRun:
    import peft

    common = dict(target_modules=opts.target_modules, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                  modules_to_save=list(opts.modules_to_save) or None)
    if method == "adalora":
        config = peft.AdaLoraConfig(init_r=opts.init_r, target_r=opts.r, tinit=opts.tinit,
                                    tfinal=opts.tfinal, deltaT=opts.delta_t, orth_reg_weight=opts.orth_reg_weight,
                                    total_step=max_steps, **common)
    else:
        config = peft.LoraConfig(r=opts.r, use_dora=method == "dora", **common)
    model = peft.get_peft_model(base, config)
    inner = model.base_model  # LoraModel / AdaLoraModel
    layers = {n: m for n, m in inner.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}

    def module_ranks() -> dict[str, int]:
        if method == "adalora":
            # The ranks AdaLoRA's allocator has budgeted: init_r until its first masking, then the
            # triplets its last rank pattern keeps. (Counting E != 0 is wrong both ways: E starts at
            # zero, and masked entries train back between two maskings.)
            pattern = inner.peft_config["default"].rank_pattern
            if not pattern:
                return {n: m.r["default"] for n, m in layers.items()}
            kept = {k.replace(".default", ""): v for k, v in pattern.items()}
            return {n: int(sum(kept[f"{n}.lora_E"])) for n in layers}
        return {n: m.r["default"] for n, m in layers.items()}

    def count_trainable() -> int:
        # AdaLoRA masks pruned triplets instead of removing them: count the budgeted triplets,
        # rank * (in + out + 1) per module, plus the heads.
        ranks = module_ranks()
        lora = sum(ranks[n] * (m.in_features + m.out_features + 1) for n, m in layers.items())
        others = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
        return lora + others

    def after_step(step: int) -> None:
        inner.update_and_allocate(step)  # needs this step's gradients: before zero_grad

    return MethodRun(
        method=method, model=model, parameters=[p for p in model.parameters() if p.requires_grad],
        make_scheduler=lambda opt: decay_schedule(opt, max_steps, warmup_steps, opts),
        after_step=after_step if method == "adalora" else None,
        module_ranks=module_ranks,
        module_updates=lambda: {n: m.get_delta_weight("default").detach() for n, m in layers.items()},
        save=lambda d: model.save_pretrained(str(d / "adapter")),
        count_trainable=count_trainable if method == "adalora" else None)


def _prepare_selective(method, base, opts, max_steps, warmup_steps) -> MethodRun:
    heads = tuple(opts.modules_to_save)
    for name, p in base.named_parameters():
        in_head = any(name.startswith(h + ".") or f".{h}." in name for h in heads)
        p.requires_grad_(method == "full" or in_head or name.endswith("bias"))
    return MethodRun(
        method=method, model=base, parameters=[p for p in base.parameters() if p.requires_grad],
        make_scheduler=lambda opt: decay_schedule(opt, max_steps, warmup_steps, opts), after_step=None,
        module_ranks=dict, module_updates=dict, save=lambda d: _save_trainable(base, d / "adapter"))


def optimizer_groups(run: MethodRun, lr: float, loraplus_lr_ratio: float, a_lr_ratio: float = 1.0) -> list[dict]:
    """The parameter groups of the run's optimizer: everything at ``lr``; with LoRA+ (a ratio other
    than 1) the B factors (``lora_B`` of LoRA, DoRA, AdaLoRA and AROMA) in a group at ``lr x ratio``,
    and with ``a_lr_ratio`` other than 1 the A factors (``lora_A``) in a group at ``lr x a_lr_ratio``
    (0: frozen at their draw). The groups keep that order: the rest, B, A."""
    groups, taken = [], set()
    for factor, ratio, flag in (("lora_B", loraplus_lr_ratio, "--loraplus-lr-ratio"), ("lora_A", a_lr_ratio, "--a-lr-ratio")):
        if ratio == 1.0:
            continue
        ids = {id(p) for name, p in run.model.named_parameters() if factor in name}
        params = [p for p in run.parameters if id(p) in ids]
        if not params:
            raise ValueError(f"{flag} {ratio}: method {run.method!r} has no {factor[-1]} factors ({factor}) "
                             "to train at another learning rate; leave it at 1")
        groups.append({"params": params, "lr": lr * ratio})
        taken |= ids
    return [{"params": [p for p in run.parameters if id(p) not in taken]}] + groups

