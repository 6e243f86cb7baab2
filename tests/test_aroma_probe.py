"""benchmarks/aroma_probe.py: the gains probe's layer against numpy, its optimizer group and count; the
head-first probe's frozen factors and their first step, against a fresh Adam step."""

import numpy as np
import pytest
import torch
from conftest import load_benchmark, tiny_bert

from aroma_peft import AromaConfig, AromaController, get_aroma_model
from aroma_peft.layer import AromaLinear
from aroma_peft.methods import MethodRun


@pytest.fixture
def probe():
    module = load_benchmark("aroma_probe")
    restore = module.patch_gains(gain_lr_ratio=3.0)
    yield module
    restore()


def test_forward_and_gain_gradients_match_numpy(probe):
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query"], r=1, alpha=4.0, max_steps=200))
    layer = next(iter(model.aroma_layers.values()))
    w0 = layer.base_layer.weight.detach().double().numpy().copy()
    bias = layer.base_layer.bias.detach().double().numpy()
    g = torch.Generator().manual_seed(0)
    comps = []
    for _ in range(2):  # two trained components merged (folded into W0), then a live one
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        comps.append((layer.lora_B.detach().double().numpy().copy(), layer.lora_A.detach().double().numpy().copy()))
        layer.merge_live()
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    b_live, a_live = layer.lora_B.detach().double().numpy(), layer.lora_A.detach().double().numpy()
    x = torch.randn(3, layer.in_features, generator=g)
    xs, s = x.double().numpy(), layer.scaling

    def expected(gains):
        w = w0 + s * sum(gi * b @ a for gi, (b, a) in zip(gains, comps)) + s * b_live @ a_live
        return xs @ w.T + bias

    np.testing.assert_allclose(layer(x).detach().double().numpy(), expected([1.0, 1.0]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.merged_gain[:2] = torch.tensor([1.5, 0.25])
    weights = torch.randn(3, layer.out_features, generator=g)
    out = layer(x)
    np.testing.assert_allclose(out.detach().double().numpy(), expected([1.5, 0.25]), rtol=1e-5, atol=1e-5)
    (out * weights).sum().backward()
    r = weights.double().numpy()
    for i, (b, a) in enumerate(comps):  # d/dg_i of sum(R * out) = s * sum_n R_n . (b a x_n)
        assert layer.merged_gain.grad[i].item() == pytest.approx(float(np.sum(r * (xs @ (s * b @ a).T))), rel=1e-5)
    assert torch.count_nonzero(layer.merged_gain.grad[2:]) == 0  # the gains of components not merged yet


def test_gains_are_trained_in_their_own_group(probe):
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query"], r=1, alpha=4.0, max_steps=200,
                                                     modules_to_save=["classifier"]))
    run = MethodRun(method="aroma", model=model, parameters=model.adapter_parameters(), make_scheduler=None,
                    after_step=None, module_ranks=dict, module_updates=dict, save=None)
    groups = probe.train.optimizer_groups(run, 1e-3, 1.0, 1.0)
    gains = [layer.merged_gain for layer in model.aroma_layers.values()]
    assert [id(p) for p in groups[-1]["params"]] == [id(p) for p in gains] and groups[-1]["lr"] == pytest.approx(3e-3)
    assert not any(id(p) in {id(q) for q in gains} for group in groups[:-1] for p in group["params"])
    trainable, _ = model.get_nb_trainable_parameters()
    everything = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == everything - probe.CAP * len(gains)  # no component merged yet: no gain counted


def test_restore_undoes_the_patch():
    module = load_benchmark("aroma_probe")
    forward = AromaLinear.forward
    module.patch_gains(1.0)()
    assert AromaLinear.forward is forward
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query"], max_steps=200))
    assert not hasattr(next(iter(model.aroma_layers.values())), "merged_gain")


def _head_first_run(steps: int, total: int):
    module = load_benchmark("aroma_probe")
    restore = module.patch_head_first(steps)
    try:
        config = AromaConfig(target_modules=["query", "value"], modules_to_save=["classifier"], r=1, alpha=4.0,
                             eps_in=0.1, check_interval=5, max_inner_steps=50, max_steps=200, warmup_steps=2)
        model = get_aroma_model(tiny_bert(), config)
        model.train()
        optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2, weight_decay=0.0)
        controller = AromaController(model, optimizer)
        g = torch.Generator().manual_seed(1)
        layers = list(model.aroma_layers.values())
        head = model.base_model.get_submodule("classifier").weight
        history = []
        for _ in range(total):
            before = [(layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for layer in layers]
            head_before = head.detach().clone()
            batch = {"input_ids": torch.randint(0, 64, (8, 12), generator=g), "labels": torch.randint(0, 2, (8,), generator=g)}
            model(**batch).loss.backward()
            grads = [layer.lora_B.grad for layer in layers]
            optimizer.step()
            controller.scheduler.step()
            optimizer.zero_grad()
            controller.step()
            history.append((before, [(layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for layer in layers],
                            grads, optimizer.param_groups[0]["lr"], not torch.equal(head_before, head.detach())))
        return history
    finally:
        restore()


def test_head_first_trains_the_head_alone_then_the_factors_as_a_fresh_adam_step():
    history = _head_first_run(steps=4, total=6)
    for before, after, grads, _, head_moved in history[:4]:  # steps 1-4: the head alone
        assert head_moved
        assert all(g is None for g in grads)
        assert all(torch.equal(a0, a1) and torch.equal(b0, b1) for (a0, b0), (a1, b1) in zip(before, after))
        assert all(torch.count_nonzero(b1) == 0 for _, b1 in after)
    before, after, grads, _, _ = history[4]  # step 5: the factors' first step, on a fresh Adam state
    for (a0, b0), (a1, b1), grad in zip(before, after, grads):
        assert torch.equal(a0, a1)  # b was 0, so a's gradient was exactly 0 and Adam leaves it
        lr = history[3][3]  # the rate this step used: set by the scheduler step after step 4
        assert grad is not None and lr > 0
        # A fresh Adam step moves each entry by lr * g / (|g| + eps): lr wherever |g| >> eps.
        expected = lr * grad / (grad.abs() + 1e-8)
        torch.testing.assert_close(b1 - b0, -expected, rtol=1e-5, atol=1e-9)


def test_head_first_refuses_steps_beyond_the_first_inner_loop():
    module = load_benchmark("aroma_probe")
    restore = module.patch_head_first(50)
    try:
        model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query"], max_inner_steps=50, max_steps=200))
        with pytest.raises(ValueError, match="T_in = 50"):
            AromaController(model)
    finally:
        restore()


def test_head_first_freezes_lora_factors_until_the_step_then_thaws_them():
    from aroma_peft.methods import MethodOptions, prepare

    module = load_benchmark("aroma_probe")
    restore = module.patch_head_first(3)
    try:
        run = prepare("lora", tiny_bert(), MethodOptions(r=1, target_modules=["query"], modules_to_save=["classifier"]),
                      max_steps=20, warmup_steps=2)
    finally:
        restore()
    factors = [p for name, p in run.model.named_parameters() if "lora_" in name]
    in_optimizer = {id(p) for p in run.parameters}
    assert factors and all(id(p) in in_optimizer and not p.requires_grad for p in factors)
    assert any(p.requires_grad for name, p in run.model.named_parameters() if "classifier" in name)
    run.after_step(2)
    assert not any(p.requires_grad for p in factors)
    run.after_step(3)
    assert all(p.requires_grad for p in factors)
