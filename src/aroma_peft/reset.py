"""Reset: the optimizer state of re-initialized factors after Merge & Reinit (paper §3.2)."""

from __future__ import annotations

from typing import Iterable

import torch

from .dtensor import like
from .seeds import derived_seed


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], *,
                          mode: str, prune_ratio: float = 0.999, seed: int = 0) -> None:
    """Reset the state ``optimizer`` keeps for ``params`` (looked up by Parameter object).

    ``mode="prune"`` zeroes a random ``prune_ratio`` of the entries of the moments (Adam's
    ``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``: any state tensor shaped like the
    parameter), the paper's choice; ``"zero"`` zeroes all of them; ``"none"`` leaves the state as it is.

    ``prune`` draws **one mask per parameter** and applies it to every moment, so an entry keeps
    all of its moments or none. (With a mask per moment, an entry could keep ``exp_avg`` and lose
    ``exp_avg_sq``: right after a merge its gradient is 0, and Adam moves it by about
    ``9 m_old / eps``, tens of thousands of times the learning rate.)

    With ``prune`` or ``zero`` the per-parameter ``step`` is set to 0, so Adam's bias correction
    treats the next step as a first step: an entry whose moments were zeroed moves by at most ``lr``,
    exactly as in a fresh optimizer, and a kept entry by at most ``lr / sqrt(1 - b1**2 / b2)``
    (2.30 lr for Adam's defaults; docs/algorithm.md). With zeroed moments and a large step count,
    the next update would instead be ``(1-b1)/sqrt(1-b2)`` = 3.16 times a fresh Adam step.

    The masks are drawn from a generator seeded by ``seed`` and the parameter's position, whole
    (also for an FSDP2 shard, which keeps its own part), so every process of a data-parallel run
    draws the same ones. State of other parameters is untouched.
    """
    if mode == "none":
        return
    if mode not in ("prune", "zero"):
        raise ValueError(f"reset mode {mode!r} is invalid: expected 'prune', 'zero' or 'none'")
    for k, p in enumerate(params):
        state = optimizer.state.get(p)
        if not state:
            continue
        if mode == "prune":
            gen = torch.Generator().manual_seed(derived_seed(seed, k))
            keep = (torch.rand(p.shape, generator=gen) >= prune_ratio).to(torch.float32)  # whole mask
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            if key == "step":
                value.zero_()
            elif value.shape == p.shape:
                if mode == "zero":
                    value.zero_()
                else:
                    value.mul_(like(value, keep))  # this process's part of the one mask


def drop_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> None:
    """Free the state of parameters that will never train again (a converged module's factors)."""
    for p in params:
        optimizer.state.pop(p, None)
