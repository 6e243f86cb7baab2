"""Non-finite losses and gradients: skip the optimizer step, report it, stop after too many.

A NaN or infinite gradient would otherwise be written into the live factors by the optimizer and
then merged (or trip eq. 6) at the next inner-loop end. ``NonFiniteGuard.check`` runs after
``backward()`` and before ``optimizer.step()``; a step it skips changes no weight, no optimizer
state and (through ``AromaController.skip_nonfinite_step``) no controller or schedule state.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.distributed as dist

from .dtensor import local_tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_finite(params: Iterable[torch.nn.Parameter], loss: torch.Tensor | None = None) -> bool:
    """True when ``loss`` and every gradient of ``params`` are finite, on every process.

    In a distributed run every process must call it at the same step: the verdict is all-reduced
    (one scalar), so all of them skip the same steps even when only one saw a NaN.
    """
    tensors = [local_tensor(p.grad) for p in params if p.grad is not None]
    if loss is not None:
        tensors.append(local_tensor(loss.detach()))
    device = tensors[0].device if tensors else torch.device("cpu")
    bad = torch.zeros((), dtype=torch.int32, device=device)
    for t in tensors:
        bad = bad | (~torch.isfinite(t)).any().to(device=device, dtype=torch.int32)
    if _distributed():
        if dist.get_backend() == "nccl" and device.type != "cuda":
            bad = bad.cuda()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


class NonFiniteGuard:
    """Skips steps whose loss or gradients are not finite; raises past ``max_nonfinite_steps`` of them.

    Args:
        max_nonfinite_steps: how many steps may be skipped in the whole run; the next non-finite
            one raises ``FloatingPointError`` (0: the first one raises).
    """

    def __init__(self, max_nonfinite_steps: int):
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps={max_nonfinite_steps!r} is invalid: expected an integer >= 0")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped: list[int] = []  # the steps skipped, numbered as the optimizer step they would have been

    def check(self, params: Iterable[torch.nn.Parameter], loss: torch.Tensor | None = None, step: int = 0) -> bool:
        """True when this step must be skipped; the gradients of ``params`` are then cleared."""
        params = list(params)
        if all_finite(params, loss):
            return False
        for p in params:
            p.grad = None  # an optimizer.step() that still runs moves nothing
        self.skipped.append(step)
        what = "loss" if loss is not None and not torch.isfinite(local_tensor(loss.detach())).all() else "gradient"
        if len(self.skipped) > self.max_nonfinite_steps:
            raise FloatingPointError(
                f"non-finite {what} (NaN or inf) at step {step}: {len(self.skipped)} non-finite steps "
                f"(at steps {self.skipped[-10:]}), more than max_nonfinite_steps={self.max_nonfinite_steps}; "
                "stopping. Lower the learning rate or check the data; nothing was merged from these steps.")
        warnings.warn(f"non-finite {what} (NaN or inf) at step {step}: step skipped, no weight or AROMA state changed "
                      f"({len(self.skipped)} of at most {self.max_nonfinite_steps} skipped)", RuntimeWarning,
                      stacklevel=2)
        return True

    def state_dict(self) -> dict:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = [int(s) for s in state.get("skipped", [])]
