"""Optimizer Reset after Merge & Reinit: keyed by Parameter, seeded, and no inflated first step."""

import pytest
import torch

from aroma_peft import reset_optimizer_state


def trained_adamw(n_params=4, shape=(64, 32), steps=3):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for _ in range(n_params)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        sum((p ** 2).sum() * (i + 1) for i, p in enumerate(params)).backward()
        opt.step()
        opt.zero_grad()
    return params, opt


def snapshot(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items()}


def test_prune_zeroes_at_least_99_8_percent_and_leaves_others_bit_identical():
    params, opt = trained_adamw()
    others = {i: snapshot(opt, params[i]) for i in (2, 3)}
    reset_optimizer_state(opt, params[:2], mode="prune", prune_ratio=0.999, seed=7)
    for p in params[:2]:
        for key in ("exp_avg", "exp_avg_sq"):
            zero_fraction = (opt.state[p][key] == 0).float().mean().item()
            assert zero_fraction >= 0.998, (key, zero_fraction)
        assert opt.state[p]["step"].item() == 0
    for i, snap in others.items():
        for k, v in snap.items():
            assert torch.equal(opt.state[params[i]][k], v)


def test_reset_is_keyed_by_parameter_object_not_by_shape_or_position():
    params, opt = trained_adamw(n_params=2)
    before = snapshot(opt, params[1])
    reset_optimizer_state(opt, [params[0]], mode="zero")
    assert all(torch.equal(opt.state[params[1]][k], v) for k, v in before.items())
    assert torch.count_nonzero(opt.state[params[0]]["exp_avg"]) == 0


def test_prune_masks_are_a_function_of_the_seed():
    masks = []
    for seed in (3, 3, 4):
        params, opt = trained_adamw(n_params=1, shape=(200, 200))
        reset_optimizer_state(opt, params, mode="prune", prune_ratio=0.999, seed=seed)
        masks.append(opt.state[params[0]]["exp_avg"] != 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert 0 < masks[0].sum() < 200 * 200 * 0.002


def test_none_mode_changes_nothing():
    params, opt = trained_adamw(n_params=1)
    before = snapshot(opt, params[0])
    reset_optimizer_state(opt, params, mode="none")
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in before.items())


def test_first_step_after_zero_reset_equals_a_fresh_adam_step():
    # Independent reference: a brand-new AdamW taking its first step with the same gradient.
    params, opt = trained_adamw(n_params=1)
    p = params[0]
    reset_optimizer_state(opt, [p], mode="zero")
    grad = torch.randn_like(p)
    fresh = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([fresh], lr=1e-2)
    for param, o in ((p, opt), (fresh, ref)):
        param.grad = grad.clone()
        o.step()
    torch.testing.assert_close(p.detach(), fresh.detach(), rtol=0, atol=1e-7)


def test_without_step_reset_the_first_update_would_be_inflated():
    # Why the step count is reset: zeroed moments with an old step count give a first update
    # (1 - b1) / sqrt(1 - b2) ~ 3.16 times a fresh one (bias correction ~ 1 instead of 1 - b^1).
    params, opt = trained_adamw(n_params=1, steps=5000 // 100)
    p = params[0]
    state = opt.state[p]
    state["exp_avg"].zero_(); state["exp_avg_sq"].zero_()
    state["step"].fill_(10_000)
    opt.param_groups[0]["weight_decay"] = 0.0
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    update = (before - p.detach()).abs().mean().item() / 1e-2
    assert update == pytest.approx(0.1 / (0.001 ** 0.5), rel=1e-3)


def test_sgd_momentum_buffer_is_reset_too():
    p = torch.nn.Parameter(torch.randn(10, 10))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    (p ** 2).sum().backward()
    opt.step()
    reset_optimizer_state(opt, [p], mode="zero")
    assert torch.count_nonzero(opt.state[p]["momentum_buffer"]) == 0


def test_unknown_mode_is_rejected():
    params, opt = trained_adamw(n_params=1)
    with pytest.raises(ValueError, match="reset mode 'random' is invalid"):
        reset_optimizer_state(opt, params, mode="random")
