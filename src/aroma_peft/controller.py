"""AromaController: carries out Algorithm 1's decisions on the model, the optimizer and the schedule.

Plain PyTorch loop::

    model = get_aroma_model(base, AromaConfig(target_modules=["query", "value"], max_steps=3000))
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-4)
    controller = AromaController(model, optimizer)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        if controller.skip_nonfinite_step(loss):   # NaN/inf: skip, count, raise past max_nonfinite_steps
            optimizer.zero_grad(); continue
        optimizer.step(); controller.scheduler.step(); optimizer.zero_grad()
        if controller.step():          # Check & Merge & Reinit & Reset, after the optimizer step
            break
"""

from __future__ import annotations

import torch

from .dual_loop import Decision, DualLoop
from .faults import NonFiniteGuard
from .grad_sketch import GradientSketch
from .model import AromaModel
from .reset import drop_optimizer_state, reset_optimizer_state
from .schedule import AromaLRSchedule, lr_factor
from .seeds import derived_seed


class AromaController:
    """Drives the dual loop of ``model``'s AROMA layers.

    Args:
        model: the ``AromaModel`` (unwrapped: not the DDP/FSDP wrapper), or the ``PeftModel`` around it.
        optimizer: the optimizer holding the live factors; needed for the Reset and the schedule.
            It may also be attached later with ``attach_optimizer`` (the Trainer callback does).
        max_steps: T, when ``model.aroma_config.max_steps`` is None.
    """

    def __init__(self, model: AromaModel, optimizer: torch.optim.Optimizer | None = None, max_steps: int | None = None):
        if not isinstance(model, AromaModel) and isinstance(getattr(model, "base_model", None), AromaModel):
            model = model.base_model  # the PeftModel of peft.get_peft_model(model, AromaConfig(...))
        if not isinstance(model, AromaModel):
            raise TypeError(f"AromaController needs the AromaModel from get_aroma_model, got {type(model).__name__}")
        self.model = model
        self.config = config = model.aroma_config
        self.max_steps = max_steps if max_steps is not None else config.max_steps
        if self.max_steps is None:
            raise ValueError("AromaConfig.max_steps (T) is None: set it in the config or pass max_steps=")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps <= config.warmup_steps:
            raise ValueError(f"max_steps={self.max_steps!r} is invalid: expected an integer > warmup_steps={config.warmup_steps}")
        self.names = list(model.aroma_layers)
        self.layers = list(model.aroma_layers.values())
        heads_remain = bool(model.modules_to_save_names) and config.train_heads_after_convergence
        self.loop = DualLoop(len(self.layers), eps_in=config.eps_in, check_interval=config.check_interval,
                             max_inner_steps=config.max_inner_steps, eps_out=config.eps_out,
                             max_steps=self.max_steps, stop_when_converged=not heads_remain,
                             merge_converged=config.converged_component == "merge")
        if config.reinit in ("gradient", "gradient-sign"):  # each layer's weight gradient, sketched, for its next a
            for i, layer in enumerate(self.layers):
                layer.grad_sketch = GradientSketch(layer.in_features, layer.out_features, layer.r, config.seed, i,
                                                   device=layer.lora_A.device)
        self.history: list[dict] = []
        # One entry per inner-loop end: its length and, per module checked, eq. (5)'s last change and
        # eq. (6)'s ratio (the per-component quantities to look at when a run surprises).
        self.outer_checks: list[dict] = []
        self.nonfinite = NonFiniteGuard(config.max_nonfinite_steps)
        self.skipping = False  # the current step was skipped: step() and the schedule do not advance
        self.optimizer = None
        self.scheduler = None
        self._step_hook = None
        self._unchecked_optimizer_steps = 0  # optimizer steps since the last step()
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        self._record()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, scheduler: AromaLRSchedule | None = None) -> AromaLRSchedule:
        """Use ``optimizer`` for Resets; create (or adopt) the schedule that drives its learning rate.

        From then on the optimizer refuses to take a second step without a ``step()`` of this
        controller in between (``RuntimeError``): a loop or Trainer that forgets it would train a
        plain LoRA with no check, merge or stop.
        """
        if self._step_hook is not None:
            self._step_hook.remove()
        self.optimizer = optimizer
        self._step_hook = optimizer.register_step_pre_hook(self._before_optimizer_step)
        self._unchecked_optimizer_steps = 0
        self.model.controlled = True
        self.scheduler = scheduler if scheduler is not None else AromaLRSchedule(optimizer, self)
        return self.scheduler

    # ------------------------------------------------------------------ the step
    @property
    def finished(self) -> bool:
        return self.loop.finished

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate after ``step`` optimizer steps."""
        c = self.config
        return lr_factor(step, max_steps=self.max_steps, warmup_steps=c.warmup_steps,
                         restart_step=self.loop.restart_step, restart_warmup_steps=c.restart_warmup_steps,
                         decay=c.lr_decay, min_lr_ratio=c.min_lr_ratio)

    def skip_nonfinite_step(self, loss: torch.Tensor | None = None) -> bool:
        """Call after ``backward()``, before ``optimizer.step()``: True when the step must be skipped.

        The step is skipped when ``loss`` or a gradient of ``adapter_parameters()`` is NaN or inf
        (on any process of a distributed run: every process must call this at every step). The
        gradients are then cleared, and the following ``scheduler.step()`` and ``step()`` do
        nothing, so a skipped step takes no check and merges nothing. Past
        ``AromaConfig.max_nonfinite_steps`` skipped steps it raises ``FloatingPointError``.
        """
        self.skipping = self.nonfinite.check(self.model.adapter_parameters(), loss, step=self.loop.step_count + 1)
        return self.skipping

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._unchecked_optimizer_steps:
            raise RuntimeError(
                f"AromaController: optimizer step {self._unchecked_optimizer_steps + 1} without controller.step() "
                f"(the controller is at step {self.loop.step_count}): AROMA's checks, merges and stop happen in "
                "controller.step(), to be called after every optimizer.step(). With the Hugging Face Trainer, pass "
                "callbacks=[AromaCallback(controller)]")
        self._unchecked_optimizer_steps += 1

    def step(self) -> bool:
        """Call once after every ``optimizer.step()``. Returns True when training is finished."""
        self._unchecked_optimizer_steps = 0
        sketches = self.sketches
        if self.skipping:
            self.skipping = False
            for sketch in sketches:
                sketch.discard()
            return self.finished
        for sketch in sketches:
            sketch.commit()
        decision = self.loop.step(self._norms, self._ratios)
        if decision.inner_end:
            self._record_outer_check(decision)
        self._apply(decision)
        if decision.checked or decision.inner_end:  # the window of reinit="gradient": since the last check
            for sketch in sketches:
                sketch.clear()
        return decision.finished

    @property
    def sketches(self) -> list[GradientSketch]:
        return [layer.grad_sketch for layer in self.layers if layer.grad_sketch is not None]

    def _stacked(self, values: list[torch.Tensor]) -> list[float]:
        # One host synchronization for all modules, and only at check steps.
        if not values:
            return []
        return torch.stack([v.to(values[0].device) for v in values]).tolist()

    def _norms(self, indices: list[int]) -> list[float]:
        return self._stacked([self.layers[i].live_norm() for i in indices])

    def _ratios(self, indices: list[int]) -> list[float]:
        """Eq. (6) for ``indices``; a live component still exactly 0 after a whole inner loop is an error."""
        values = self._stacked([self.layers[i].live_norm() for i in indices]
                               + [self.layers[i].outer_ratio(self.config.outer_criterion) for i in indices])
        norms, ratios = values[:len(indices)], values[len(indices):]
        # b starts at 0 and any gradient moves it: exactly 0 means no gradient reached the factors.
        dead = [self.names[i] for i, norm in zip(indices, norms) if norm == 0.0]
        if dead:
            raise RuntimeError(
                f"AromaController: no gradient reached the live factors of {len(dead)} module(s) in the "
                f"{self.loop.inner_step} steps of this inner loop (step {self.loop.step_count}; {', '.join(dead[:3])}"
                f"{', ...' if len(dead) > 3 else ''}): ||b a|| is exactly 0, so eq. (6) would freeze them at rank 0. "
                "The usual cause is reentrant gradient checkpointing (transformers' default) with frozen embeddings: "
                "enable it through the AromaModel (model.gradient_checkpointing_enable(), which the Trainer calls), pass "
                'gradient_checkpointing_kwargs={"use_reentrant": False}, or call model.enable_input_require_grads(). '
                "A module that the forward pass does not use gets no gradient either: leave it out with exclude_modules")
        return ratios

    def _apply(self, d: Decision) -> None:
        """Carry out a decision after the optimizer step, before the next forward."""
        for i in d.converged:
            layer = self.layers[i]
            if self.loop.merge_converged:
                layer.merge_live()
            layer.drop_live()
            if self.optimizer is not None:
                drop_optimizer_state(self.optimizer, [layer.lora_A, layer.lora_B])
        for i in d.merged:
            layer = self.layers[i]
            layer.merge_live()
            if self.config.reinit == "previous":
                layer.restart_b()
            elif self.config.reinit == "offset":
                layer.reinit_offset()
            else:
                layer.reinit_live(self._gradient_direction(i))
            if self.optimizer is not None:
                reset_optimizer_state(self.optimizer, [layer.lora_A, layer.lora_B], mode=self.config.reset,
                                      prune_ratio=self.config.prune_ratio,
                                      seed=derived_seed(self.config.seed, i, layer.num_merged, 1))
        kept = set(d.kept_at_max_steps)
        for i in d.stopped_at_max_steps:
            layer = self.layers[i]
            if i in kept:
                layer.merge_live()
            layer.drop_live()
            if self.optimizer is not None:
                drop_optimizer_state(self.optimizer, [layer.lora_A, layer.lora_B])
        if d.merged and self.scheduler is not None:
            self.scheduler.refresh()
        if d.changed:
            self._record()

    def _gradient_direction(self, i: int) -> torch.Tensor | None:
        """``reinit="gradient"``: the top right singular vector(s) of module ``i``'s sketched weight gradient
        (``"gradient-sign"``: their signs, as unit rows); None with ``reinit="kaiming"``."""
        layer = self.layers[i]
        if layer.grad_sketch is None:
            return None
        direction = layer.grad_sketch.top_right(layer.r)
        if direction is None:
            raise RuntimeError(
                f"AromaController: reinit={self.config.reinit!r} found no finite weight gradient of {self.names[i]} in the "
                f"steps before the merge at step {self.loop.step_count}: its backward pass did not run through the "
                "layer's forward (a compiled or checkpointed forward that drops tensor hooks?)")
        if self.config.reinit == "gradient-sign":  # every entry the same size, the signs of the gradient's
            direction = torch.where(direction >= 0, 1.0, -1.0) / layer.in_features ** 0.5
        return direction

    # ------------------------------------------------------------------ introspection
    def _record(self) -> None:
        trainable, _ = self.model.get_nb_trainable_parameters()
        ranks = [layer.rank for layer in self.layers]
        self.history.append({
            "step": self.loop.step_count,
            "trainable_params": trainable,
            "total_rank": sum(ranks),
            "ranks": ranks,
            "active_modules": len(self.loop.active()),
        })

    def _record_outer_check(self, d: Decision) -> None:
        previous = self.outer_checks[-1]["step"] if self.outer_checks else 0
        checked = sorted(d.converged + d.merged)
        self.outer_checks.append({
            "step": d.step, "inner_steps": d.step - previous, "ended_by_eq5": d.ended_by_eq5,
            "modules": checked,
            "eq5_change": [self.loop.modules[i].last_change for i in checked],
            "eq6_ratio": [self.loop.modules[i].last_ratio for i in checked],
            "converged": sorted(d.converged),
        })

    def summary(self) -> list[dict]:
        """One row per module: name, rank, converged, stopped at T, steps trained, last eq. (6) ratio."""
        rows = []
        for name, layer, m in zip(self.names, self.layers, self.loop.modules):
            rows.append({
                "module": name,
                "rank": layer.rank,
                "converged": m.converged,
                "stopped_at_max_steps": m.stopped,
                "steps": m.finished_at if m.finished_at is not None else self.loop.step_count,
                "last_ratio": m.last_ratio,
            })
        return rows

    def print_summary(self) -> None:
        print(f"{'module':<60} {'rank':>4} {'state':>9} {'steps':>6} {'eq6 ratio':>10}")
        for row in self.summary():
            state = "converged" if row["converged"] else "stopped@T" if row["stopped_at_max_steps"] else "training"
            ratio = "-" if row["last_ratio"] is None else f"{row['last_ratio']:.2e}"
            print(f"{row['module']:<60} {row['rank']:>4} {state:>9} {row['steps']:>6} {ratio:>10}")

    # ------------------------------------------------------------------ serialization
    def state_dict(self) -> dict:
        """The dual loop, T, the module names and the history (JSON types), and with ``reinit="gradient"``
        each module's gradient sketch under ``"grad_sketch"`` (tensors; ``save_adapter`` writes them apart)."""
        state = {"loop": self.loop.state_dict(), "max_steps": self.max_steps, "modules": self.names,
                 "history": self.history, "outer_checks": self.outer_checks, "nonfinite": self.nonfinite.state_dict()}
        if self.sketches:
            state["grad_sketch"] = {name: layer.grad_sketch.state_dict() for name, layer in zip(self.names, self.layers)}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved state; the model's layers must already hold the matching adapter."""
        if state.get("modules") != self.names:
            raise ValueError("controller state was saved for other modules than this model's AROMA layers")
        self.max_steps = int(state["max_steps"])
        self.loop.max_steps = self.max_steps
        self.loop.load_state_dict(state["loop"])
        self.history = list(state["history"])
        self.outer_checks = list(state.get("outer_checks", []))
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
        if self.sketches:
            saved = state.get("grad_sketch")
            if saved is None:
                raise ValueError("controller state has no gradient sketches, and this run re-initializes from the "
                                 "gradient (reinit='gradient'): it was saved by a run with reinit='kaiming'")
            for name, layer in zip(self.names, self.layers):
                layer.grad_sketch.load_state_dict({k: torch.as_tensor(v) for k, v in saved[name].items()})
        for layer, m in zip(self.layers, self.loop.modules):
            layer.set_active(m.active)
        self._unchecked_optimizer_steps = 0
        if self.scheduler is not None:
            self.scheduler.refresh()
