"""Reset: the optimizer state of re-initialized factors after Merge & Reinit (paper §3.2)."""

from __future__ import annotations

from typing import Iterable

import torch

from .layer import derived_seed, like


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], *,
                          mode: str, prune_ratio: float = 0.999, seed: int = 0) -> None:
    """Reset the state ``optimizer`` keeps for ``params`` (looked up by Parameter object).

    ``mode="prune"`` zeroes a random ``prune_ratio`` of every moment tensor (Adam's ``exp_avg``,
    ``exp_avg_sq``, SGD's ``momentum_buffer``: any state tensor shaped like the parameter), the
    paper's choice; ``"zero"`` zeroes all of them; ``"none"`` leaves the state as it is.

    With ``prune`` or ``zero`` the per-parameter ``step`` is set to 0, so Adam's bias correction
    treats the next step as a first step: with zeroed moments and a large step count, the next
    update would be ``(1-b1)/sqrt(1-b2)`` = 3.16 times the size of a fresh Adam step.

    The masks are drawn from a generator seeded by ``seed`` and the parameter's position, so every
    process of a data-parallel run draws the same ones. State of other parameters is untouched.
    """
    if mode == "none":
        return
    if mode not in ("prune", "zero"):
        raise ValueError(f"reset mode {mode!r} is invalid: expected 'prune', 'zero' or 'none'")
    for k, p in enumerate(params):
        state = optimizer.state.get(p)
        if not state:
            continue
        gen = torch.Generator().manual_seed(derived_seed(seed, k))
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            if key == "step":
                value.zero_()
            elif value.shape == p.shape:
                if mode == "zero":
                    value.zero_()
                else:
                    keep = torch.rand(value.shape, generator=gen) >= prune_ratio  # whole mask, then this shard
                    value.mul_(like(value, keep.to(torch.float32)))


def drop_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> None:
    """Free the state of parameters that will never train again (a converged module's factors)."""
    for p in params:
        optimizer.state.pop(p, None)
