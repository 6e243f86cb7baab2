"""AromaConfig: every hyperparameter of AROMA, validated in one place."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from peft import PeftConfig

RESET_MODES = ("prune", "zero", "none")
OUTER_CRITERIA = ("weight", "update")
LR_DECAYS = ("linear", "cosine")
CONVERGED_COMPONENT = ("discard", "merge")
REINIT_MODES = ("kaiming", "gradient", "gradient-sign", "previous", "offset")

TargetModules = Union[str, tuple[str, ...]]


def _fail(name: str, value, allowed: str) -> None:
    raise ValueError(f"AromaConfig.{name}={value!r} is invalid: expected {allowed}")


def _as_name_tuple(name: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    _fail(name, value, "a list of module-name suffixes (non-empty strings)")


@dataclass
class AromaConfig(PeftConfig):
    """Hyperparameters of AROMA (paper §3, Algorithm 1), as a ``peft.PeftConfig``.

    ``peft_type`` is ``"AROMA"`` (added to PEFT's ``PeftType`` when ``aroma_peft`` is imported), so
    ``peft.get_peft_model(model, AromaConfig(...))`` and ``PeftModel.from_pretrained`` work;
    ``save_pretrained`` / ``from_pretrained`` write and read ``adapter_config.json``. The AROMA
    fields below are frozen once validated; PEFT's own fields (``task_type``,
    ``base_model_name_or_path``, ``inference_mode``, ...) stay assignable, as PEFT sets them.

    Each adapted linear computes ``W0 x + bias + s * (B A) x`` with ``s = alpha / r`` as in LoRA
    eq. (1); ``B A`` is the sum of the merged rank-``r`` components plus the live one.

    Args:
        target_modules: which linears to adapt: a list of name suffixes (PEFT semantics: the full
            name equals the suffix or ends with ``"." + suffix``), a single string used as a regex
            that must match the full module name, or ``"all-linear"`` (every ``nn.Linear``/``Conv1D``
            except the output head: ``lm_head``, or a classifier's head and its pooler).
        exclude_modules: suffixes (or one regex string) removed from the match.
        modules_to_save: suffixes of modules trained in full and saved with the adapter (a
            classifier head, say). They are not AROMA components and never converge.
        r: inner-space rank of each component (1 in the paper's AROMA; 8 for AROMA_{r=8}).
        alpha: LoRA scaling numerator; the update is scaled by ``alpha / r``.
        eps_in: inner tolerance of eq. (5); None switches eq. (5) off (every inner loop lasts T_in).
        check_interval: ΔT_in, the number of steps between two inner checks.
        max_inner_steps: T_in, the most steps one inner loop may take.
        eps_out: outer tolerance of eq. (6); None switches eq. (6) off (no module converges: every
            inner loop ends in a merge until T). Both None with ``r`` > 1 is ReLoRA (paper §4.1).
        outer_criterion: what eq. (6) divides the live component's norm ``||s b_p a_p||_F`` by:
            ``"weight"`` (the paper): ``||W0 + s B_{p-1} A_{p-1}||_F``; ``"update"``: the merged
            update ``||s B_{p-1} A_{p-1}||_F``, which does not depend on the pretrained weights' scale
            (a module cannot converge before its first merge). See docs/algorithm.md.
        converged_component: what happens to the live component of a module that eq. (6)
            converges: ``"discard"`` (the paper, §3.1) or ``"merge"`` (keep what it learned).
        max_steps: T, the most optimizer steps of the whole run (None: set it on the controller).
        warmup_steps: warmup of the first component.
        restart_warmup_steps: warmup after each Merge & Reinit & Reset.
        lr_decay: how the learning rate falls from its peak after ``warmup_steps``: ``"linear"``
            or ``"cosine"`` (half a cosine period), down to ``min_lr_ratio`` x peak at T.
        min_lr_ratio: the learning rate at T, as a fraction of the peak (0: it decays to 0; the
            authors' code uses cosine to 0.1). See docs/algorithm.md, "The learning-rate schedule".
        reset: optimizer reset after a merge: ``"prune"`` (zero a random ``prune_ratio`` of the
            moments, the paper), ``"zero"`` (all of them) or ``"none"`` (ablation, Table 5).
        prune_ratio: fraction of moments zeroed by ``"prune"`` (0.999 in the paper).
        reinit: the new ``a`` at each Merge & Reinit: ``"kaiming"`` (Kaiming uniform, as LoRA's A:
            the paper) or ``"gradient"`` (the top right singular vector(s) of the module's weight
            gradient over the last ``check_interval`` steps, at the Kaiming draw's norm; LoRA-GA's
            idea, see ``grad_sketch.py`` and docs/algorithm.md), or ``"gradient-sign"`` (the signs of
            that vector, every entry the same size: the direction Adam's first steps on ``a`` take),
            or ``"previous"`` (a diagnostic, not the paper: ``a`` keeps the trained value of the
            component just merged, so a new component starts from where the last one's input
            direction ended; only ``b`` restarts at 0), or ``"offset"`` (a variant, not the paper: the
            new pair ``(b0, a0)`` starts at the norms the merged pair grew to, ``a0`` the Kaiming
            draw's direction, and ``-s b0 a0`` is merged so the model's function is unchanged; eqs.
            (5) and (6) read the contribution ``s (b a - b0 a0)``). The first component is Kaiming in
            every mode.
        init_scale: every new ``a`` (the first and each re-initialized one) is the Kaiming draw times
            this (1: the paper; in the gradient modes, the norm that direction is given). A small
            one (0.1) lets a component's own training set its direction instead of the random draw
            (docs/algorithm.md, "Re-initialization"; docs/study.md measures it).
        train_heads_after_convergence: when every adapted module has converged before T and
            ``modules_to_save`` is not empty, keep training those heads alone until T instead of
            stopping (see docs/algorithm.md).
        seed: seeds every random choice of the controller (re-initializations, reset masks).
        max_nonfinite_steps: how many optimizer steps with a non-finite loss or gradient may be
            skipped (``AromaController.skip_nonfinite_step``) before the run stops with
            ``FloatingPointError``; 0: the first one stops it.
    """

    target_modules: TargetModules = "all-linear"
    exclude_modules: TargetModules = ()
    modules_to_save: tuple[str, ...] = ()
    r: int = 1
    alpha: float = 4.0
    eps_in: float | None = 0.1
    check_interval: int = 10
    max_inner_steps: int = 200
    eps_out: float | None = 5e-3
    outer_criterion: str = "weight"
    converged_component: str = "discard"
    max_steps: int | None = None
    warmup_steps: int = 100
    restart_warmup_steps: int = 50
    lr_decay: str = "linear"
    min_lr_ratio: float = 0.0
    reset: str = "prune"
    prune_ratio: float = 0.999
    reinit: str = "kaiming"
    init_scale: float = 1.0
    train_heads_after_convergence: bool = True
    seed: int = 0
    max_nonfinite_steps: int = 10

    def __post_init__(self) -> None:
        from peft.utils import PeftType

        super().__post_init__()
        self.peft_type = PeftType.AROMA
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                try:
                    re.compile(tm)
                except re.error as err:
                    _fail("target_modules", tm, f"a valid regex, a list of suffixes or 'all-linear' ({err})")
        else:
            object.__setattr__(self, "target_modules", _as_name_tuple("target_modules", tm))
            if not self.target_modules:
                _fail("target_modules", tm, "at least one module-name suffix")
        if not isinstance(self.exclude_modules, str):
            object.__setattr__(self, "exclude_modules", _as_name_tuple("exclude_modules", self.exclude_modules))
        object.__setattr__(self, "modules_to_save", _as_name_tuple("modules_to_save", self.modules_to_save))

        def positive_int(name: str, value, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(name, value, "a positive integer" + (" or None" if allow_none else ""))

        def nonneg_int(name: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(name, value, "an integer >= 0")

        def positive_float(name: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                _fail(name, value, "a finite number > 0")

        positive_int("r", self.r)
        positive_float("alpha", self.alpha)
        for name in ("eps_in", "eps_out"):
            if getattr(self, name) is not None:
                positive_float(name, getattr(self, name))
        positive_int("check_interval", self.check_interval)
        positive_int("max_inner_steps", self.max_inner_steps)
        positive_int("max_steps", self.max_steps, allow_none=True)
        nonneg_int("warmup_steps", self.warmup_steps)
        nonneg_int("restart_warmup_steps", self.restart_warmup_steps)
        nonneg_int("seed", self.seed)
        nonneg_int("max_nonfinite_steps", self.max_nonfinite_steps)
        if self.max_inner_steps < self.check_interval:
            _fail("max_inner_steps", self.max_inner_steps,
                  f"at least check_interval={self.check_interval}, or no inner check could ever run")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            _fail("warmup_steps", self.warmup_steps, f"fewer than max_steps={self.max_steps}")
        if self.outer_criterion not in OUTER_CRITERIA:
            _fail("outer_criterion", self.outer_criterion, f"one of {OUTER_CRITERIA}")
        if self.converged_component not in CONVERGED_COMPONENT:
            _fail("converged_component", self.converged_component, f"one of {CONVERGED_COMPONENT}")
        if self.lr_decay not in LR_DECAYS:
            _fail("lr_decay", self.lr_decay, f"one of {LR_DECAYS}")
        if isinstance(self.min_lr_ratio, bool) or not isinstance(self.min_lr_ratio, (int, float)) \
                or not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        if self.reset not in RESET_MODES:
            _fail("reset", self.reset, f"one of {RESET_MODES}")
        if self.reinit not in REINIT_MODES:
            _fail("reinit", self.reinit, f"one of {REINIT_MODES}")
        if isinstance(self.init_scale, bool) or not isinstance(self.init_scale, (int, float)) \
                or not 0.0 < self.init_scale < float("inf"):
            _fail("init_scale", self.init_scale, "a finite number > 0")
        if isinstance(self.prune_ratio, bool) or not isinstance(self.prune_ratio, (int, float)) \
                or not 0.0 < self.prune_ratio <= 1.0:
            _fail("prune_ratio", self.prune_ratio, "a number in (0, 1]")
        if not isinstance(self.train_heads_after_convergence, bool):
            _fail("train_heads_after_convergence", self.train_heads_after_convergence, "True or False")
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value) -> None:
        if name in HYPERPARAMETERS and getattr(self, "_validated", False):
            raise dataclasses.FrozenInstanceError(
                f"AromaConfig.{name} cannot be assigned: the AROMA fields are frozen once validated; "
                f"use config.replace({name}=...)")
        object.__setattr__(self, name, value)

    @property
    def scaling(self) -> float:
        """s = alpha / r, the factor applied to every component's B A."""
        return self.alpha / self.r

    def replace(self, **changes) -> "AromaConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def hyperparameters(self) -> dict:
        """The AROMA fields alone (JSON types): what a run or an adapter was trained with."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.to_dict().items() if k in HYPERPARAMETERS}

    def to_dict(self) -> dict:
        """Every field, PEFT's included (what ``adapter_config.json`` holds)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "AromaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AromaConfig: unknown field(s) {unknown}; known fields are {sorted(HYPERPARAMETERS)} "
                             "and PEFT's")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k != "peft_type"})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.hyperparameters(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "AromaConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of AromaConfig fields")
        return cls.from_dict(d)


HYPERPARAMETERS = frozenset(f.name for f in dataclasses.fields(AromaConfig)) - {
    f.name for f in dataclasses.fields(PeftConfig)}
