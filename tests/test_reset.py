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


# ---------------------------------------------------------------------- the first update after a merge
# Adam's update is lr * m_hat / (sqrt(v_hat) + eps). At a first step (step = 0 before it) over kept
# moments, Cauchy-Schwarz on m = (1-b1) sum b1^k g_k and v = (1-b2) sum b2^k g_k^2 bounds
# |m_hat| / sqrt(v_hat) by 1 / sqrt(1 - b1^2/b2); with bias corrections ~1 (a long run's step count,
# mode "none") the bound is (1-b1)/sqrt(1-b2) times that. A fresh Adam step moves an entry by <= lr.
B1, B2 = 0.9, 0.999
KEPT_BOUND = 1 / (1 - B1 ** 2 / B2) ** 0.5  # 2.30
CONTINUED_BOUND = (1 - B1) / (1 - B2) ** 0.5 * KEPT_BOUND  # 7.27


def wide_bert():
    """Two MiniLM-wide blocks (hidden 384, intermediate 1536), random init."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                        intermediate_size=1536, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def first_updates_after_merges(mode, lr=1e-3, inner=10, merges=3, wrap=None, rank=0, world=1):
    """Train a wide model through the controller, merging every ``inner`` steps; after each merge,
    record per factor (whole tensors, also under FSDP2): the state right after the Reset, the
    gradient and the update of the next step. ``wrap(model)`` returns the forward to train through
    (DDP, say); each of ``world`` processes takes its slice of every batch."""
    from conftest import synthetic_batches

    from aroma_peft import AromaConfig, AromaController, get_aroma_model
    from aroma_peft.layer import full_tensor

    config = AromaConfig(target_modules=["query", "value", "intermediate.dense"], modules_to_save=["classifier"],
                         eps_in=None, eps_out=None, max_inner_steps=inner, max_steps=inner * (merges + 1) + 1,
                         warmup_steps=2, restart_warmup_steps=1, reset=mode)
    model = get_aroma_model(wide_bert(), config)
    forward = wrap(model) if wrap is not None else model
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=lr, weight_decay=0.0)
    controller = AromaController(model, optimizer)
    factors = [p for layer in controller.layers for p in (layer.lora_A, layer.lora_B)]
    whole = lambda t: full_tensor(t.detach()).clone()  # noqa: E731
    records, pending = [], None
    model.train()
    for batch in synthetic_batches(config.max_steps):
        per_rank = len(batch["labels"]) // world
        forward(**{k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}).loss.backward()
        if pending is not None:
            for p, rec in zip(factors, pending):
                rec["grad"] = whole(p.grad)
        optimizer.step(); controller.scheduler.step(); optimizer.zero_grad()
        if pending is not None:
            for p, rec in zip(factors, pending):
                rec["update"] = whole(p) - rec["before"]
            records.append(pending)
            pending = None
        merged_before = [layer.num_merged for layer in controller.layers]
        controller.step()
        if [layer.num_merged for layer in controller.layers] != merged_before:  # a merge at this step
            pending = [{"before": whole(p), "lr": optimizer.param_groups[0]["lr"],
                        "state": {k: whole(v) for k, v in optimizer.state[p].items()}} for p in factors]
        if len(records) == merges:
            break
    assert len(records) == merges
    return records


def fresh_adam_update(before, grad, lr):
    """Independent reference: a brand-new AdamW's first step from ``before`` with ``grad``."""
    p = torch.nn.Parameter(before.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
    p.grad = grad.clone()
    opt.step()
    return p.detach() - before


def check_first_updates(records, mode) -> list[torch.Tensor]:
    """Assert the bounds above on every factor's first update after every merge; returns the kept masks."""
    masks, kept_entries, total_entries = [], 0, 0
    for merge in records:
        for rec in merge:
            lr, state, update = rec["lr"], rec["state"], rec["update"]
            moved = update.abs() / lr
            if mode == "none":
                assert state["step"].item() > 0
                assert moved.max().item() <= CONTINUED_BOUND
                continue
            assert state["step"].item() == 0  # the next step is bias-corrected as a first one
            kept = state["exp_avg_sq"] != 0
            # One mask for the parameter: an entry keeps all of its moments or none.
            assert torch.equal(state["exp_avg"] != 0, kept)
            if mode == "zero":
                assert not kept.any()
            masks.append(kept)
            kept_entries += int(kept.sum())
            total_entries += kept.numel()
            # Entries whose moments were zeroed take exactly a fresh Adam's first step (<= lr)...
            fresh = fresh_adam_update(rec["before"], rec["grad"], lr)
            torch.testing.assert_close(update[~kept], fresh[~kept], rtol=1e-5, atol=1e-9)
            assert moved[~kept].max().item() <= 1 + 1e-4
            # ...and kept entries at most KEPT_BOUND times lr (the old per-moment masks: ~8e4 times).
            if kept.any():
                assert moved[kept].max().item() <= KEPT_BOUND
    if mode == "prune":
        # About 0.1% kept (binomial: within 4 standard deviations), and at least one to look at.
        expected = total_entries * 1e-3
        assert 0 < kept_entries and abs(kept_entries - expected) <= 4 * expected ** 0.5, (kept_entries, expected)
    return masks


@pytest.mark.parametrize("mode", ["prune", "zero", "none"])
def test_the_first_update_after_a_merge_is_at_most_a_fresh_adam_step(mode):
    check_first_updates(first_updates_after_merges(mode), mode)


def test_prune_applies_one_mask_to_every_moment_and_keeps_about_0_1_percent():
    params, opt = trained_adamw(n_params=1, shape=(1000, 1000))
    reset_optimizer_state(opt, params, mode="prune", prune_ratio=0.999, seed=11)
    state = opt.state[params[0]]
    kept = state["exp_avg_sq"] != 0
    assert torch.equal(state["exp_avg"] != 0, kept)
    assert abs(kept.float().mean().item() - 1e-3) <= 4 * (1e-3 / 1e6) ** 0.5
