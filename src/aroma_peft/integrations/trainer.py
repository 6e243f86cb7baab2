"""Hugging Face ``Trainer`` integration: a callback that drives the controller and its schedule.

    controller = AromaController(model)
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=args.learning_rate)
    scheduler = controller.attach_optimizer(optimizer)
    trainer = Trainer(model=model, args=args, ..., optimizers=(optimizer, scheduler),
                      callbacks=[AromaCallback(controller)])
    trainer.train()                                     # or trainer.train(resume_from_checkpoint=True)
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..controller import AromaController


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
        return {"args": {}, "attributes": {"controller_state": self.controller.state_dict()}}

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
