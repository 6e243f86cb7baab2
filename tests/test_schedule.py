"""The learning-rate schedule: linear decay over T, warmups restarting at the controller's merges."""

import pytest
import torch

from aroma_peft import lr_factor


def reference(step, T, W0, restart, Wr):
    # Written out case by case from the definition in docs/algorithm.md.
    envelope = 1.0 if step <= W0 else max(0.0, (T - step) / (T - W0))
    length = W0 if restart == 0 else Wr
    if length == 0:
        warm = 1.0
    else:
        warm = min(1.0, (step - restart + 1) / length)
    return envelope * warm


@pytest.mark.parametrize("step, restart", [(0, 0), (4, 0), (9, 0), (10, 0), (50, 0), (50, 48), (52, 48),
                                           (53, 48), (99, 90), (100, 90), (120, 90)])
def test_lr_factor_matches_the_definition(step, restart):
    got = lr_factor(step, max_steps=100, warmup_steps=10, restart_step=restart, restart_warmup_steps=5)
    assert got == pytest.approx(reference(step, 100, 10, restart, 5))


def test_hand_values():
    kw = dict(max_steps=110, warmup_steps=10, restart_warmup_steps=4)
    assert lr_factor(0, restart_step=0, **kw) == pytest.approx(0.1)  # first step: 1/10, not 0
    assert lr_factor(9, restart_step=0, **kw) == pytest.approx(1.0)
    assert lr_factor(60, restart_step=0, **kw) == pytest.approx(0.5)  # halfway down the decay
    assert lr_factor(60, restart_step=60, **kw) == pytest.approx(0.5 * 0.25)  # restarted warmup, 1/4
    assert lr_factor(63, restart_step=60, **kw) == pytest.approx((47 / 100) * 1.0)
    assert lr_factor(110, restart_step=60, **kw) == 0.0


def test_zero_length_warmups():
    assert lr_factor(0, max_steps=10, warmup_steps=0, restart_step=0, restart_warmup_steps=0) == 1.0
    assert lr_factor(5, max_steps=10, warmup_steps=0, restart_step=5, restart_warmup_steps=0) == pytest.approx(0.5)


def relora_cosine(step, T, W0, min_ratio):
    # ReLoRA's cosine decay (the schedule of the AROMA authors' code), written out from its definition.
    import math
    if step <= W0:
        return 1.0
    progress = (step - W0) / (T - W0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@pytest.mark.parametrize("step, restart", [(0, 0), (9, 0), (10, 0), (35, 0), (60, 0), (60, 58), (62, 58),
                                           (100, 90), (110, 90), (130, 90)])
def test_cosine_decay_to_a_floor_matches_the_definition(step, restart):
    got = lr_factor(step, max_steps=110, warmup_steps=10, restart_step=restart, restart_warmup_steps=4,
                    decay="cosine", min_lr_ratio=0.1)
    warm = min(1.0, (step - restart + 1) / (10 if restart == 0 else 4))
    assert got == pytest.approx(relora_cosine(step, 110, 10, 0.1) * warm)


def test_hand_values_of_cosine_and_of_a_linear_floor():
    kw = dict(max_steps=110, warmup_steps=10, restart_step=0, restart_warmup_steps=4)
    assert lr_factor(60, decay="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 / 2
    assert lr_factor(110, decay="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.1)  # T: the floor, not 0
    assert lr_factor(110, decay="linear", min_lr_ratio=0.2, **kw) == pytest.approx(0.2)
    assert lr_factor(60, decay="linear", min_lr_ratio=0.2, **kw) == pytest.approx(0.6)


@pytest.mark.parametrize("decay, floor", [("linear", 0.0), ("cosine", 0.0), ("cosine", 0.1)])
def test_the_schedule_of_methods_without_restarts_is_transformers_own(decay, floor):
    # LoRA, AdaLoRA, full and BitFit: the same envelope, after transformers' warmup from 0; compared
    # with transformers' own schedules step by step.
    from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup

    from aroma_peft.methods import MethodOptions, decay_schedule

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(51):  # steps 0..T (past T transformers' cosine would rise again)
            out.append(opt.param_groups[0]["lr"])
            opt.step(); sched.step()
        return out

    ours = lrs(lambda o: decay_schedule(o, 50, 7, MethodOptions(lr_decay=decay, min_lr_ratio=floor)))
    if decay == "linear":
        ref = lrs(lambda o: get_linear_schedule_with_warmup(o, 7, 50))
    else:
        ref = lrs(lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, 7, 50, min_lr_rate=floor))
    assert ours == pytest.approx(ref, abs=1e-12)


def test_schedule_options_are_checked():
    from aroma_peft import AromaConfig
    from aroma_peft.methods import MethodOptions

    with pytest.raises(ValueError, match="--lr-decay 'step' is unknown"):
        MethodOptions(lr_decay="step")
    with pytest.raises(ValueError, match=r"--min-lr-ratio must be a number in \[0, 1\], got 1.5"):
        MethodOptions(min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="lr_decay"):
        AromaConfig(lr_decay="exp")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        AromaConfig(min_lr_ratio=-0.1)
