"""The decisions of Algorithm 1 as plain logic over numbers: inner checks, outer checks, stop.

Nothing here knows about tensors, layers or optimizers. ``DualLoop.step`` is called once per
optimizer step; it asks for the quantities it needs (the live components' norms for eq. 5 at a
check step, the ratios of eq. 6 at the end of an inner loop) and returns what must happen to each
module. The model-facing ``AromaController`` carries the decisions out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

Quantities = Callable[[list[int]], Sequence[float]]


@dataclass
class ModuleState:
    """What the dual loop knows of one adapted module."""

    components: int = 0  # merged components (p - 1 during the p-th outer step)
    converged: bool = False  # eq. (6) held: frozen for good (last component discarded, or merged)
    stopped: bool = False  # reached T without converging: live component kept, frozen
    inner_converged: bool = False  # eq. (5) held at some check of the current inner loop
    prev_norm: float = 0.0  # ||b_p a_p||_F at the previous check (0 at the start of an inner loop)
    last_change: float | None = None  # left side of eq. (5) at the last check
    last_ratio: float | None = None  # left side of eq. (6) at the last outer check
    finished_at: int | None = None  # step at which the module stopped training

    @property
    def active(self) -> bool:
        return not (self.converged or self.stopped)


@dataclass
class Decision:
    """What one call of ``DualLoop.step`` decided."""

    step: int
    checked: list[int] = field(default_factory=list)  # modules whose eq. (5) was evaluated
    inner_end: bool = False  # the inner loop ended at this step
    ended_by_eq5: bool = False  # ... because eq. (5) held for every active module (else: T_in)
    converged: list[int] = field(default_factory=list)  # eq. (6) held: freeze, discard (or merge) live component
    merged: list[int] = field(default_factory=list)  # eq. (6) failed: merge, reinit, reset
    kept_at_max_steps: list[int] = field(default_factory=list)  # at T: merge live component, freeze
    stopped_at_max_steps: list[int] = field(default_factory=list)  # at T: every module still active
    finished: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.converged or self.merged or self.stopped_at_max_steps)


class DualLoop:
    """Algorithm 1 of the paper for ``n_modules`` modules trained in parallel.

    Args:
        n_modules: number of adapted modules.
        eps_in: inner tolerance of eq. (5); None: never inner-converged (loops last T_in).
        check_interval: ΔT_in.
        max_inner_steps: T_in.
        eps_out: outer tolerance of eq. (6); None: never converged (merge at every loop end).
        max_steps: T.
        stop_when_converged: finish as soon as every module has converged (False: go on to T,
            used when trained heads remain).
        merge_converged: a module that converges keeps (merges) its last component instead of
            discarding it (the paper discards it).
    """

    def __init__(self, n_modules: int, *, eps_in: float | None, check_interval: int, max_inner_steps: int,
                 eps_out: float | None, max_steps: int, stop_when_converged: bool = True,
                 merge_converged: bool = False):
        self.eps_in = eps_in
        self.check_interval = check_interval
        self.max_inner_steps = max_inner_steps
        self.eps_out = eps_out
        self.max_steps = max_steps
        self.stop_when_converged = stop_when_converged
        self.merge_converged = merge_converged
        self.modules = [ModuleState() for _ in range(n_modules)]
        self.step_count = 0  # optimizer steps taken
        self.inner_step = 0  # t, steps of the current inner loop (shared: all modules advance together)
        self.outer_step = 1  # p
        self.restart_step = 0  # step at which the live components were last (re)initialized
        self.finished = False

    def active(self) -> list[int]:
        return [i for i, m in enumerate(self.modules) if m.active]

    @property
    def all_converged(self) -> bool:
        return all(m.converged for m in self.modules)

    def step(self, norms: Quantities, ratios: Quantities) -> Decision:
        """Advance one optimizer step; ``norms``/``ratios`` give eq. (5)/(6) quantities for the indices asked."""
        if self.finished:
            raise RuntimeError(f"the AROMA run already finished at step {self.step_count}; do not call step() again")
        self.step_count += 1
        decision = Decision(step=self.step_count)
        active = self.active()
        if active:
            self.inner_step += 1
            if self.eps_in is not None and self.inner_step % self.check_interval == 0:
                self._inner_check(active, norms, decision)
            everyone_done = bool(decision.checked) and all(self.modules[i].inner_converged for i in active)
            if everyone_done or self.inner_step >= self.max_inner_steps:
                decision.ended_by_eq5 = everyone_done
                self._outer_check(active, ratios, decision)
        if self.step_count >= self.max_steps and not self.finished:
            self._stop_at_max_steps(decision)
        if self.all_converged and self.stop_when_converged:
            self.finished = True
        decision.finished = self.finished
        return decision

    def _inner_check(self, active: list[int], norms: Quantities, decision: Decision) -> None:
        """Eq. (5), signed: (||b a||_t - ||b a||_{t-ΔT}) / ||b a||_{t-ΔT} < eps_in.

        At the first check of an inner loop the previous norm is that of b=0, so the change is
        +inf (or undefined): never converged. Once converged, a module stays so until the loop ends.
        """
        for i, norm in zip(active, norms(active)):
            m = self.modules[i]
            norm = float(norm)
            change = (norm - m.prev_norm) / m.prev_norm if m.prev_norm > 0 else math.inf
            m.last_change = change if math.isfinite(change) else None
            if change < self.eps_in:  # False for NaN: a non-finite norm never converges
                m.inner_converged = True
            m.prev_norm = norm
            decision.checked.append(i)

    def _outer_check(self, active: list[int], ratios: Quantities, decision: Decision) -> None:
        """Eq. (6) for every active module at the end of the inner loop, then start the next one."""
        decision.inner_end = True
        for i, ratio in zip(active, ratios(active)):
            m = self.modules[i]
            ratio = float(ratio)
            # +inf: nothing to compare with yet (outer_criterion="update" before the first merge).
            if math.isnan(ratio) or ratio < 0:
                raise FloatingPointError(
                    f"module #{i}: the ratio of eq. (6) is {ratio} at step {self.step_count}; "
                    "the live component is not finite and will not be merged")
            m.last_ratio = ratio if math.isfinite(ratio) else None
            if self.eps_out is not None and ratio < self.eps_out:
                m.converged = True
                m.components += self.merge_converged
                m.finished_at = self.step_count
                decision.converged.append(i)
            else:
                m.components += 1
                decision.merged.append(i)
        for m in self.modules:
            m.inner_converged = False
            m.prev_norm = 0.0
        self.inner_step = 0
        self.outer_step += 1
        if decision.merged:
            self.restart_step = self.step_count

    def _stop_at_max_steps(self, decision: Decision) -> None:
        """At T every active module stops; a live component that has trained is kept (merged)."""
        for i in self.active():
            m = self.modules[i]
            m.stopped = True
            m.finished_at = self.step_count
            decision.stopped_at_max_steps.append(i)
            if self.inner_step > 0:
                m.components += 1
                decision.kept_at_max_steps.append(i)
        self.finished = True

    # ------------------------------------------------------------------ serialization
    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "inner_step": self.inner_step,
            "outer_step": self.outer_step,
            "restart_step": self.restart_step,
            "finished": self.finished,
            "modules": [asdict(m) for m in self.modules],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["modules"]) != len(self.modules):
            raise ValueError(f"controller state has {len(state['modules'])} modules, this model has {len(self.modules)}")
        self.step_count = int(state["step_count"])
        self.inner_step = int(state["inner_step"])
        self.outer_step = int(state["outer_step"])
        self.restart_step = int(state["restart_step"])
        self.finished = bool(state["finished"])
        self.modules = [ModuleState(**m) for m in state["modules"]]
