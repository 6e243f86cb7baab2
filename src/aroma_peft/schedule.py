"""The learning-rate schedule of AROMA: a decay over T with warmups that restart at merges."""

from __future__ import annotations

import math
from typing import Protocol

from torch.optim.lr_scheduler import LRScheduler


class Loop(Protocol):
    """What the schedule reads of the loop that drives it (``AromaController`` is one)."""

    skipping: bool  # the current step was skipped for a non-finite gradient

    def lr_factor(self, step: int) -> float: ...


def envelope(step: int, *, max_steps: int, warmup_steps: int, decay: str = "linear", min_lr_ratio: float = 0.0) -> float:
    """1 until ``warmup_steps``, then down to ``min_lr_ratio`` at ``max_steps`` (T), linearly or by a half cosine."""
    span = max(1, max_steps - warmup_steps)
    if decay == "linear":
        shape = min(1.0, max(0.0, (max_steps - step) / span))
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, (step - warmup_steps) / span))))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, restart_step: int, restart_warmup_steps: int,
              decay: str = "linear", min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for the optimizer step that follows ``step`` steps.

    ``envelope``: 1 until ``warmup_steps``, then down to ``min_lr_ratio`` at ``max_steps`` (T),
    linearly (the default: 0 at T) or by a half cosine (``decay="cosine"``; with
    ``min_lr_ratio=0.1`` the schedule of the authors' code, ReLoRA's cosine with restarts).
    ``warmup``: the first component warms up over ``warmup_steps``; every component started by a
    merge at ``restart_step`` > 0 warms up over ``restart_warmup_steps``. The first step of a
    warmup gets 1/length of the rate (not 0: no step is wasted).
    """
    length = warmup_steps if restart_step == 0 else restart_warmup_steps
    warmup = 1.0 if length == 0 else min(1.0, (step - restart_step + 1) / length)
    return envelope(step, max_steps=max_steps, warmup_steps=warmup_steps, decay=decay,
                    min_lr_ratio=min_lr_ratio) * warmup


class AromaLRSchedule(LRScheduler):
    """An ``LRScheduler`` whose warmups follow the controller's actual merges.

    Step it after ``optimizer.step()`` like any scheduler (the HF Trainer does); the controller
    re-applies it right after a merge, so the first step of a new component already warms up.
    """

    def __init__(self, optimizer, controller: Loop):
        self.controller = controller
        super().__init__(optimizer)

    def step(self, epoch=None) -> None:
        if getattr(self.controller, "skipping", False):
            return  # a step skipped for a non-finite gradient is not a step of the schedule
        super().step(epoch)

    def get_lr(self) -> list[float]:
        f = self.controller.lr_factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def refresh(self) -> None:
        """Apply the rate for the current step again (after the controller restarted a warmup)."""
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "controller")}
