"""Non-finite losses and gradients: the step is skipped, nothing merges from it, the run stops past the limit."""

import math
import warnings

import pytest
import torch
from conftest import synthetic_batches, tiny_bert

from aroma_peft import AromaConfig, AromaController, get_aroma_model
from aroma_peft.faults import NonFiniteGuard, all_finite

TARGETS = ["query", "value", "intermediate.dense"]


def make(**overrides):
    kw = dict(target_modules=TARGETS, modules_to_save=["classifier"], eps_in=None, eps_out=1e-9, check_interval=2,
              max_inner_steps=4, max_steps=12, warmup_steps=2, restart_warmup_steps=1)
    kw.update(overrides)
    model = get_aroma_model(tiny_bert(0), AromaConfig(**kw))
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    return model, opt, AromaController(model, opt)


def train(model, opt, ctrl, batches, poison=()):
    """The README's loop; the loss of the batches at the indices in ``poison`` is multiplied by NaN."""
    model.train()
    for i, batch in enumerate(batches):
        loss = model(**batch).loss
        if i in poison:
            loss = loss * float("nan")
        loss.backward()
        if ctrl.skip_nonfinite_step(loss):
            opt.zero_grad()
            continue
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        if ctrl.step():
            break


def test_a_nan_step_changes_nothing_and_the_run_continues_as_if_it_never_happened():
    data = synthetic_batches(12, batch_size=8)
    ref_model, ref_opt, ref_ctrl = make()
    train(ref_model, ref_opt, ref_ctrl, data)

    model, opt, ctrl = make()
    # The poisoned batch would have been optimizer step 4, the end of the first inner loop (T_in = 4):
    # if it were taken, its NaN component would be checked by eq. (6) and merged.
    poisoned = data[:3] + [data[3]] + data[3:]
    with pytest.warns(RuntimeWarning, match=r"non-finite loss \(NaN or inf\) at step 4: step skipped"):
        train(model, opt, ctrl, poisoned, poison={3})

    assert ctrl.nonfinite.skipped == [4]
    assert [h["step"] for h in ctrl.history] == [h["step"] for h in ref_ctrl.history] == [0, 4, 8, 12]
    assert ctrl.history == ref_ctrl.history
    assert ctrl.loop.state_dict() == ref_ctrl.loop.state_dict()
    assert ctrl.scheduler.last_epoch == ref_ctrl.scheduler.last_epoch == 12
    for (name, p), q in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(p, q), name
        assert torch.isfinite(p).all(), name
    for layer in ctrl.layers:  # every merged component is finite
        assert torch.isfinite(layer.merged_A).all() and torch.isfinite(layer.merged_B).all()


@pytest.mark.parametrize("limit", [0, 1])
def test_past_max_nonfinite_steps_the_run_stops_with_the_message(limit):
    model, opt, ctrl = make(max_nonfinite_steps=limit)
    data = synthetic_batches(6, batch_size=8)
    poison = {2, 4}  # would-be step 3, then (after one skip) would-be step 4
    expected_stop = 3 if limit == 0 else 4
    match = (rf"non-finite loss \(NaN or inf\) at step {expected_stop}: {limit + 1} non-finite steps .*"
             rf"more than max_nonfinite_steps={limit}; stopping")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(FloatingPointError, match=match):
        warnings.simplefilter("always")
        train(model, opt, ctrl, data, poison=poison)
    assert [str(w.message).split(":")[0] for w in caught] == ["non-finite loss (NaN or inf) at step 3"] * limit
    # Stopped before the step that would have ended the first inner loop: nothing merged.
    assert ctrl.loop.step_count == expected_stop - 1
    assert all(layer.rank == 0 for layer in ctrl.layers)
    assert all(torch.isfinite(p).all() for p in model.adapter_parameters())


def test_an_inf_gradient_with_a_finite_loss_is_caught():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([0.0, math.inf, 1.0])
    guard = NonFiniteGuard(2)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        assert guard.check([p], torch.tensor(0.5), step=7)
    assert p.grad is None and guard.skipped == [7]
    p.grad = torch.ones(3)
    assert not guard.check([p], torch.tensor(0.5), step=8)
    assert torch.equal(p.grad, torch.ones(3))


def test_all_finite_without_gradients_or_loss():
    assert all_finite([torch.nn.Parameter(torch.ones(2))])
    assert not all_finite([], torch.tensor(float("nan")))


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_bad_max_nonfinite_steps_names_the_field(value):
    with pytest.raises(ValueError, match=rf"AromaConfig\.max_nonfinite_steps={value!r}"):
        AromaConfig(max_nonfinite_steps=value)


def test_the_skipped_count_survives_a_controller_round_trip():
    model, opt, ctrl = make()
    data = synthetic_batches(3, batch_size=8)
    with pytest.warns(RuntimeWarning):
        train(model, opt, ctrl, data, poison={1})
    state = ctrl.state_dict()
    model2, opt2, ctrl2 = make()
    ctrl2.load_state_dict(state)
    assert ctrl2.nonfinite.skipped == [2]
