"""Method wrappers (methods.py): what the run directory reports for the PEFT baselines."""

import torch

from aroma_peft.methods import MethodOptions, prepare
from conftest import tiny_bert


def _batch(model, n=8, seq=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def test_adalora_ranks_follow_the_allocator_budget():
    """init_r per module before the first masking; target_r per module on average once the budget is final."""
    base = tiny_bert()
    opts = MethodOptions(r=2, init_r=6, alpha=8.0, tinit=1, tfinal=2, delta_t=1, modules_to_save=["classifier"])
    run = prepare("adalora", base, opts, max_steps=8, warmup_steps=1)
    n_modules = len(run.module_ranks())
    assert n_modules > 0 and set(run.module_ranks().values()) == {6}
    layers = {n: m for n, m in run.model.base_model.model.named_modules() if hasattr(m, "lora_E")}
    width = {n: m.in_features + m.out_features + 1 for n, m in layers.items()}
    head = sum(p.numel() for n, p in run.model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert run.trainable_count() == sum(6 * w for w in width.values()) + head

    optimizer = torch.optim.AdamW(run.parameters, lr=1e-2)
    for step in range(1, 8):
        run.model(**_batch(base)).loss.backward()
        optimizer.step()
        run.after_step(step)
        optimizer.zero_grad()
    ranks = run.module_ranks()
    # AdaLoRA's final budget is target_r times the number of modules (peft.AdaLoraConfig)
    assert sum(ranks.values()) == 2 * n_modules
    # the reported ranks are the kept triplets of the rank pattern, which hold E at zero elsewhere
    for n, m in layers.items():
        assert int((m.lora_E["default"] != 0).sum()) <= ranks[n]
    assert run.trainable_count() == sum(ranks[n] * width[n] for n in layers) + head


import pytest  # noqa: E402

from aroma_peft.methods import optimizer_groups  # noqa: E402


@pytest.mark.parametrize("method", ["lora", "aroma"])
def test_loraplus_trains_the_b_factors_at_the_ratio_through_the_schedule_and_the_merges(method):
    """LoRA+: the first Adam step moves each B entry by lr x ratio x factor, A and the head by lr x factor."""
    base = tiny_bert()
    opts = MethodOptions(r=2, alpha=4.0, modules_to_save=["classifier"], eps_out=1e-9, check_interval=2,
                         max_inner_steps=4, restart_warmup_steps=1, reset="zero")  # zero: every step after a merge is a first step
    run = prepare(method, base, opts, max_steps=12, warmup_steps=2)
    names = {id(p): n for n, p in run.model.named_parameters()}
    groups = optimizer_groups(run, 1e-3, 16.0)
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    scheduler = run.make_scheduler(optimizer)
    assert sum(len(g["params"]) for g in groups) == len(run.parameters)
    assert all("lora_B" in names[id(p)] for p in groups[1]["params"])
    assert not any("lora_B" in names[id(p)] for p in groups[0]["params"])
    for step in range(12):
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs[1] == pytest.approx(16.0 * lrs[0], rel=1e-12)
        first = {id(p) for g in optimizer.param_groups for p in g["params"]
                 if optimizer.state.get(p, {}).get("step", torch.tensor(0.0)).item() == 0}
        before = {id(p): p.detach().clone() for g in optimizer.param_groups for p in g["params"]}
        run.model(**_batch(base)).loss.backward()
        optimizer.step()
        for g, lr in zip(optimizer.param_groups, lrs):
            for p in g["params"]:
                if id(p) in first and p.grad is not None and p.grad.abs().max() > 0 and lr > 0:  # a first Adam step: <= lr
                    moved = (p.detach() - before[id(p)]).abs().max().item()
                    assert moved <= lr * (1 + 1e-4) and moved > 0.5 * lr, names[id(p)]
        scheduler.step()
        optimizer.zero_grad()
        if method == "aroma" and run.controller.step():
            break
    if method == "aroma":
        assert run.controller.outer_checks  # the run went through merges


@pytest.mark.parametrize("ratio", [0.0, 4.0])
def test_a_lr_ratio_trains_the_a_factors_at_the_ratio_and_zero_keeps_each_a_at_its_draw(ratio):
    """AROMA with the A factors in their own group: the first Adam step of each A moves it by lr x ratio;
    at 0 every component's a is still the Kaiming draw it started from when it is merged."""
    from aroma_peft.layer import kaiming_draw

    base = tiny_bert()
    opts = MethodOptions(r=1, alpha=4.0, modules_to_save=["classifier"], eps_out=1e-9, check_interval=2,
                         max_inner_steps=4, restart_warmup_steps=1, reset="zero", a_lr_ratio=ratio)
    run = prepare("aroma", base, opts, max_steps=12, warmup_steps=2)
    names = {id(p): n for n, p in run.model.named_parameters()}
    groups = optimizer_groups(run, 1e-3, 1.0, ratio)
    assert len(groups) == 2 and all("lora_A" in names[id(p)] for p in groups[1]["params"])
    assert not any("lora_A" in names[id(p)] for p in groups[0]["params"])
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    scheduler = run.make_scheduler(optimizer)
    for step in range(12):
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs[1] == pytest.approx(ratio * lrs[0], rel=1e-12, abs=0)
        first = {id(p) for p in groups[1]["params"] if optimizer.state.get(p, {}).get("step", torch.tensor(0.0)).item() == 0}
        before = {id(p): p.detach().clone() for p in groups[1]["params"]}
        run.model(**_batch(base)).loss.backward()
        optimizer.step()
        for p in groups[1]["params"]:
            moved = (p.detach() - before[id(p)]).abs().max().item()
            if ratio == 0:
                assert moved == 0.0
            elif id(p) in first and p.grad is not None and p.grad.abs().max() > 0 and lrs[1] > 0:
                assert 0.5 * lrs[1] < moved <= lrs[1] * (1 + 1e-4), names[id(p)]
        scheduler.step()
        optimizer.zero_grad()
        if run.controller.step():
            break
    assert run.controller.outer_checks  # the run went through merges
    layers = run.model.aroma_layers
    merged = [(i, k) for i, layer in enumerate(layers.values()) for k in range(layer.num_merged)]
    assert merged
    for i, layer in enumerate(layers.values()):
        for k in range(layer.num_merged):
            draw = kaiming_draw((1, layer.in_features), layer.seed, i, k)
            same = torch.equal(layer.merged_A[k:k + 1].cpu(), draw)
            assert same == (ratio == 0), (i, k)


def test_loraplus_needs_b_factors():
    base = tiny_bert()
    run = prepare("full", base, MethodOptions(), max_steps=4, warmup_steps=1)
    with pytest.raises(ValueError, match="method 'full' has no B factors"):
        optimizer_groups(run, 1e-3, 4.0)
    with pytest.raises(ValueError, match="--loraplus-lr-ratio must be a number > 0"):
        MethodOptions(loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="method 'full' has no A factors"):
        optimizer_groups(run, 1e-3, 1.0, 0.0)
    with pytest.raises(ValueError, match="--a-lr-ratio must be a number >= 0"):
        MethodOptions(a_lr_ratio=-1)
