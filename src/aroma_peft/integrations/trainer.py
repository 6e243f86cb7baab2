"""Hugging Face ``Trainer`` integration: a callback that drives the controller and its schedule.

    controller = AromaController(model)
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=args.learning_rate)
    scheduler = controller.attach_optimizer(optimizer)
    trainer = Trainer(model=model, args=args, ..., optimizers=(optimizer, scheduler),
                      callbacks=[AromaCallback(controller)])
"""

from __future__ import annotations

from transformers import TrainerCallback

from ..controller import AromaController


class AromaCallback(TrainerCallback):
    """Calls ``controller.step()`` after every optimizer step and stops the Trainer when it is finished.

    The Trainer steps the ``AromaLRSchedule`` passed in ``optimizers=``; the controller restarts
    its warmup at merges. If the Trainer created the optimizer itself, the callback attaches it
    at the start of training (the schedule must then be the controller's: pass it in ``optimizers``).
    """

    def __init__(self, controller: AromaController):
        self.controller = controller

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.controller.optimizer is None:
            if optimizer is None:
                raise ValueError("AromaCallback: the Trainer has no optimizer to attach to the controller")
            self.controller.attach_optimizer(optimizer, lr_scheduler if hasattr(lr_scheduler, "refresh") else None)
        if lr_scheduler is not None and lr_scheduler is not self.controller.scheduler:
            raise ValueError("AromaCallback: the Trainer's lr_scheduler is not the controller's AromaLRSchedule; "
                             "pass optimizers=(optimizer, controller.attach_optimizer(optimizer)) to the Trainer")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.controller.step():
            control.should_training_stop = True
        return control
