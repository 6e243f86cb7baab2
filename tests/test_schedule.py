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
