"""Hugging Face ``Trainer`` integration: a callback that drives the controller and its schedule, and a
``Trainer`` that saves the adapter instead of the whole model.

    controller = AromaController(model)
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=args.learning_rate)
    scheduler = controller.attach_optimizer(optimizer)
    trainer = AromaTrainer(model=model, args=args, ..., optimizers=(optimizer, scheduler),
                           callbacks=[AromaCallback(controller)])
    trainer.train()                                     # or trainer.train(resume_from_checkpoint=True)
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import ExportableState
from transformers.utils import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

from ..controller import AromaController
from ..io import CONTROLLER_STATE, load_adapter_into, load_controller_state
from ..model import AromaModel


class AromaCallback(TrainerCallback, ExportableState):
    """Calls ``controller.step()`` after every optimizer step and stops the Trainer when it is finished.

    The Trainer steps the ``AromaLRSchedule`` passed in ``optimizers=``; the controller restarts
    its warmup at merges. If the Trainer created the optimizer itself, the callback attaches it
    at the start of training (the schedule must then be the controller's: pass it in ``optimizers``).
    The Trainer's ``max_steps`` must be the controller's T (checked at the start of training).

    Non-finite gradients: before every optimizer step the gradients are checked; a step with a NaN
    or inf gradient is skipped (gradients cleared, so the optimizer moves nothing; the schedule and
    the controller do not advance), up to ``AromaConfig.max_nonfinite_steps`` such steps.

    Checkpoints: the controller's state (dual loop, history, skipped steps) is saved in the
    checkpoint's ``trainer_state.json`` (``state()``, the Trainer's mechanism for stateful
    callbacks); the model, optimizer and schedule states are the Trainer's own files. With
    ``trainer.train(resume_from_checkpoint=...)`` the controller is restored at the start of
    training, so the run continues the same inner loop. Leave ``restore_callback_states_from_checkpoint``
    at False: that option rebuilds callbacks from their arguments, and this one needs the controller.
    """

    def __init__(self, controller: AromaController):
        self.controller = controller

    def state(self) -> dict:
        state = self.controller.state_dict()
        if "grad_sketch" in state:  # trainer_state.json is JSON: float32 values survive a round trip as lists
            state["grad_sketch"] = {name: {k: v.tolist() for k, v in s.items()} for name, s in state["grad_sketch"].items()}
        return {"args": {}, "attributes": {"controller_state": state}}

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.max_steps != self.controller.max_steps:
            raise ValueError(
                f"AromaCallback: the Trainer runs {state.max_steps} optimizer steps (TrainingArguments.max_steps, or "
                f"the epochs it was given) but the controller's T = max_steps = {self.controller.max_steps}: the "
                "learning rate would not decay to 0 at the end and the dual loop would not finish. Give both the same "
                f"number: TrainingArguments(max_steps={self.controller.max_steps}) or AromaConfig(max_steps={state.max_steps})")
        if self.controller.optimizer is None:
            if optimizer is None:
                raise ValueError("AromaCallback: the Trainer has no optimizer to attach to the controller")
            self.controller.attach_optimizer(optimizer, lr_scheduler if hasattr(lr_scheduler, "refresh") else None)
        if lr_scheduler is not None and lr_scheduler is not self.controller.scheduler:
            raise ValueError("AromaCallback: the Trainer's lr_scheduler is not the controller's AromaLRSchedule; "
                             "pass optimizers=(optimizer, controller.attach_optimizer(optimizer)) to the Trainer")
        if state.global_step > 0:  # resuming: the Trainer has loaded trainer_state.json of the checkpoint
            saved = state.stateful_callbacks.get(type(self).__name__)
            if saved is None:
                raise ValueError(f"AromaCallback: the checkpoint at step {state.global_step} has no AROMA controller "
                                 "state in its trainer_state.json; it was not written with AromaCallback")
            if isinstance(saved, list):
                raise ValueError("AromaCallback: the checkpoint holds several AromaCallback states; use one callback")
            self.controller.load_state_dict(saved["attributes"]["controller_state"])
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.controller.skip_nonfinite_step()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.controller.step():
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if any(os.path.isfile(os.path.join(checkpoint, f)) for f in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME)):
            warnings.warn(f"AromaCallback: {checkpoint} holds the whole model, base weights included; use "
                          "AromaTrainer instead of Trainer to checkpoint the adapter only", RuntimeWarning, stacklevel=2)
        return control


class AromaTrainer(Trainer):
    """A ``Trainer`` whose checkpoints, ``save_model()`` and ``push_to_hub()`` hold the adapter, not the base model.

    The ``Trainer`` calls ``save_pretrained`` only on a ``PreTrainedModel`` or ``PeftModel`` and writes the
    whole ``state_dict`` of any other model (every base weight, at each checkpoint). For an ``AromaModel``
    this one writes ``AromaModel.save_pretrained`` instead (with the ``AromaCallback``'s controller state,
    ``aroma_controller.json``), and ``resume_from_checkpoint`` loads that adapter back. With
    ``load_best_model_at_end`` the best checkpoint's adapter replaces the final one, and the controller
    takes that checkpoint's state (ranks, history), so what ``save_model()`` writes next is the best
    adapter with its own decisions. Any other model is saved and loaded as by ``Trainer``.
    """

    def _aroma_model(self) -> AromaModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, AromaModel) else None

    def _controller(self) -> AromaController | None:
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, AromaCallback)]
        return callbacks[0].controller if callbacks else None

    def _save(self, output_dir: str | None = None, state_dict=None):
        model = self._aroma_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, controller=self._controller())
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        aroma = self._aroma_model() if model is None else model
        if not isinstance(aroma, AromaModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_into(aroma, resume_from_checkpoint)  # the controller comes back in AromaCallback.on_train_begin

    def _load_best_model(self):
        aroma = self._aroma_model()
        if aroma is None:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        load_adapter_into(aroma, best, replace=True)
        controller = self._controller()
        if controller is not None and os.path.isfile(os.path.join(best, CONTROLLER_STATE)):
            controller.load_state_dict(load_controller_state(best))
