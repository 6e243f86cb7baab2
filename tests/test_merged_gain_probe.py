"""benchmarks/merged_gain_probe.py: the layer with a gain per merged component, against numpy."""

import numpy as np
import pytest
import torch
from conftest import load_benchmark, tiny_bert

from aroma_peft import AromaConfig, get_aroma_model
from aroma_peft.layer import AromaLinear
from aroma_peft.methods import MethodRun


@pytest.fixture
def probe():
    module = load_benchmark("merged_gain_probe")
    restore = module.patch(gain_lr_ratio=3.0)
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
    module = load_benchmark("merged_gain_probe")
    forward = AromaLinear.forward
    module.patch(1.0)()
    assert AromaLinear.forward is forward
    assert not hasattr(get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query"], max_steps=200))
                       .aroma_layers.values().__iter__().__next__(), "merged_gain")
