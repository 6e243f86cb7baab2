"""benchmarks/component_norms.py: each component's norm, eq. (6) ratio and factor norms, against numpy."""

import json

import numpy as np
import pytest
import torch
from conftest import load_benchmark, tiny_bert
from safetensors.torch import save_file

from aroma_peft import AromaConfig, get_aroma_model


def load():
    return load_benchmark("component_norms")


def test_rows_match_a_numpy_computation():
    g = np.random.default_rng(0)
    w0, a, b, s = g.normal(size=(5, 4)), g.normal(size=(3, 4)), g.normal(size=(5, 3)), 2.5
    rows = load().component_rows({"m": (s, torch.tensor(a), torch.tensor(b))}, {"m": torch.tensor(w0)})["m"]
    w = w0.copy()
    for k, row in enumerate(rows["components"]):
        comp = s * np.outer(b[:, k], a[k])
        assert row["norm"] == pytest.approx(np.linalg.norm(comp), rel=1e-12)
        assert row["ratio"] == pytest.approx(np.linalg.norm(comp) / np.linalg.norm(w), rel=1e-12)  # W0 + earlier ones
        assert (row["a"], row["b"]) == (pytest.approx(np.linalg.norm(a[k])), pytest.approx(np.linalg.norm(b[:, k])))
        p = a[k] ** 2 / np.sum(a[k] ** 2)  # participation ratio 1 / sum p_i^2, over the dimension
        assert row["spread"] == pytest.approx(1 / np.sum(p ** 2) / a.shape[1], rel=1e-12)
        w = w + comp
    flat = load().component_rows({"m": (1.0, torch.ones(1, 4), torch.ones(5, 1))}, {"m": torch.tensor(w0)})["m"]
    assert flat["components"][0]["spread"] == pytest.approx(1.0)  # every entry the same size
    assert rows["total"] == pytest.approx(np.linalg.norm(s * b @ a), rel=1e-12)
    assert rows["total_ratio"] == pytest.approx(np.linalg.norm(s * b @ a) / np.linalg.norm(w0), rel=1e-12)
    norms = [np.linalg.norm(s * np.outer(b[:, k], a[k])) for k in range(3)]
    assert rows["coherence"] == pytest.approx(np.linalg.norm(s * b @ a) / np.sqrt(np.sum(np.square(norms))), rel=1e-12)
    assert rows["in_line"] == pytest.approx(np.sum(norms), rel=1e-12)
    assert rows["top_singular"] == pytest.approx(np.linalg.svd(s * b @ a, compute_uv=False)[0], rel=1e-12)


def test_coherence_is_one_for_orthogonal_components_and_sqrt_k_for_aligned_ones():
    w0 = torch.eye(4, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)[:3]
    orthogonal = load().component_rows({"m": (1.0, eye, eye.T.clone())}, {"m": w0})["m"]
    aligned = load().component_rows({"m": (1.0, torch.ones(3, 4), torch.ones(4, 3))}, {"m": w0})["m"]
    assert orthogonal["coherence"] == pytest.approx(1.0)
    assert aligned["coherence"] == pytest.approx(3 ** 0.5)
    # Three unit components: in line they make one direction of norm 3, orthogonal three of norm 1.
    assert orthogonal["in_line"] == aligned["in_line"] / 4 == pytest.approx(3.0)
    assert (orthogonal["top_singular"], aligned["top_singular"]) == (pytest.approx(1.0), pytest.approx(12.0))


def test_an_aroma_adapter_and_its_lora_export_give_the_same_update(tmp_path):
    model = get_aroma_model(tiny_bert(0), AromaConfig(target_modules=["query", "value"], r=1, alpha=4.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.aroma_layers.values():  # two merged components, different per module
            for _ in range(2):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
                layer.merge_live()
            layer.lora_B.zero_()  # a fresh live component, as after Merge & Reinit
    model.save_pretrained(tmp_path / "aroma" / "adapter")
    model.export_lora(tmp_path / "lora" / "adapter")
    cn = load()
    native, exported = cn.run_factors(tmp_path / "aroma"), cn.run_factors(tmp_path / "lora")
    assert sorted(native) == sorted(exported) == sorted(model.aroma_layers)
    for name, layer in model.aroma_layers.items():
        s, a, b = native[name]
        assert s == 4.0 and a.shape[0] == 2
        expected = layer.delta_weight().double()  # the layer's own s B A
        torch.testing.assert_close(s * b.double() @ a.double(), expected, rtol=1e-6, atol=1e-5)  # fp32 layer
        s2, a2, b2 = exported[name]  # PEFT's alpha_pattern / rank_pattern, read as PEFT reads them
        torch.testing.assert_close(s2 * b2.double() @ a2.double(), expected, rtol=1e-6, atol=1e-5)


def test_a_plain_lora_adapter_is_read_with_peft_scaling(tmp_path):
    (tmp_path / "adapter").mkdir()
    a, b = torch.randn(8, 6), torch.randn(7, 8)
    save_file({"base_model.model.enc.q.lora_A.weight": a, "base_model.model.enc.q.lora_B.weight": b},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {}, "alpha_pattern": {}}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    s, a_read, b_read = load().run_factors(tmp_path)["enc.q"]
    assert s == 2.0 and torch.equal(a_read, a) and torch.equal(b_read, b)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config | {"alpha_pattern": {"q": 32}}))
    assert load().run_factors(tmp_path)["enc.q"][0] == 4.0  # PEFT's per-module alpha
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(SystemExit, match="adapter_config.json: only a plain LoRA adapter"):
        load().run_factors(tmp_path)


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(SystemExit, match="config.json: not found"):
        load().main([str(tmp_path)])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="neither aroma_adapter.json nor adapter_config.json"):
        load().main([str(tmp_path)])


def test_an_offset_run_is_refused_not_read_as_one_component_a_row(tmp_path):
    model = get_aroma_model(tiny_bert(0), AromaConfig(target_modules=["query"], reinit="offset"))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(SystemExit, match="reinit='offset'"):
        load().run_factors(tmp_path)


def test_each_a_is_compared_with_the_draw_it_started_from(tmp_path):
    """initial_draws recomputes the seeded Kaiming start of every component; the cosine is measured against it."""
    config = AromaConfig(target_modules=["query", "value"], r=1, alpha=4.0, seed=3, init_scale=0.5)
    model = get_aroma_model(tiny_bert(0), config)
    g = torch.Generator().manual_seed(1)
    started, finals = {}, {}
    with torch.no_grad():
        for name, layer in model.aroma_layers.items():  # two components, each turned by a known amount
            for k in range(2):
                a0 = layer.lora_A.detach().clone()  # the layer's own start (reinit_live), not the script's
                started.setdefault(name, []).append(a0[0].double().numpy())
                a1 = a0 + (0.3 * k + 0.1) * a0.norm() * torch.randn(a0.shape, generator=g)
                layer.lora_A.copy_(a1)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
                finals.setdefault(name, []).append(a1[0].double().numpy())
                layer.merge_live()
                layer.reinit_live()
    model.save_pretrained(tmp_path / "run" / "adapter")
    cn = load()
    starts = cn.initial_draws(tmp_path / "run")
    for name, layer in model.aroma_layers.items():
        np.testing.assert_array_equal(starts[name].double().numpy(), np.stack(started[name]))
    weights = {n: layer.base_layer.weight.detach() for n, layer in model.aroma_layers.items()}
    rows = cn.component_rows(cn.run_factors(tmp_path / "run"), weights, starts)
    for name in model.aroma_layers:
        for k, row in enumerate(rows[name]["components"]):
            a0, a1 = started[name][k], finals[name][k]
            assert row["turn"] == pytest.approx(a0 @ a1 / (np.linalg.norm(a0) * np.linalg.norm(a1)), rel=1e-6)
    assert "cos(a, its initial draw)" in cn.table(rows)[0]
    # another re-init, or a PEFT LoRA adapter: no start to compare with
    other = get_aroma_model(tiny_bert(0), AromaConfig(target_modules=["query"], r=1, alpha=4.0, reinit="gradient-sign"))
    other.save_pretrained(tmp_path / "sign" / "adapter")
    assert cn.initial_draws(tmp_path / "sign") is None
    model.export_lora(tmp_path / "lora" / "adapter")
    assert cn.initial_draws(tmp_path / "lora") is None


def test_a_lora_run_is_compared_with_the_a_of_the_run_it_starts_from(tmp_path):
    def lora_run(path, a, b):
        (path / "adapter").mkdir(parents=True)
        save_file({"base_model.model.enc.q.lora_A.weight": a, "base_model.model.enc.q.lora_B.weight": b},
                  str(path / "adapter" / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {}, "alpha_pattern": {}}
        (path / "adapter" / "adapter_config.json").write_text(json.dumps(config))

    g = torch.Generator().manual_seed(0)
    a0, a1, b = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    lora_run(tmp_path / "start", a0, torch.zeros(5, 2))
    lora_run(tmp_path / "end", a1, b)
    cn = load()
    factors = cn.run_factors(tmp_path / "end")
    starts = cn.starts_from(tmp_path / "start", factors)
    rows = cn.component_rows(factors, {"enc.q": torch.randn(5, 6, generator=g)}, starts)["enc.q"]
    for k in range(2):
        expected = float(np.dot(a0[k].numpy(), a1[k].numpy()) / (np.linalg.norm(a0[k].numpy()) * np.linalg.norm(a1[k].numpy())))
        assert rows["components"][k]["turn"] == pytest.approx(expected, rel=1e-6)
    lora_run(tmp_path / "other", torch.randn(3, 6), torch.randn(5, 3))
    with pytest.raises(SystemExit, match="modules or ranks differ"):
        cn.starts_from(tmp_path / "other", factors)
    with pytest.raises(SystemExit):  # two runs and one start: which one started there?
        cn.main([str(tmp_path / "end"), str(tmp_path / "start"), "--starts-from", str(tmp_path / "start")])


def test_update_cosines_match_numpy_and_name_a_mismatch():
    g = np.random.default_rng(1)
    a1, b1, a2, b2 = g.normal(size=(2, 6)), g.normal(size=(5, 2)), g.normal(size=(1, 6)), g.normal(size=(5, 1))
    f1 = {"m": (2.0, torch.tensor(a1), torch.tensor(b1))}
    f2 = {"m": (4.0, torch.tensor(a2), torch.tensor(b2))}
    u, v = (2.0 * b1 @ a1).ravel(), (4.0 * b2 @ a2).ravel()
    assert load().update_cosines(f1, f2)["m"] == pytest.approx(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), rel=1e-12)
    assert load().update_cosines(f1, {"m": (1.0, torch.tensor(a1), torch.tensor(-b1))})["m"] == pytest.approx(-1.0)
    with pytest.raises(SystemExit, match="different modules"):
        load().update_cosines(f1, {"n": f2["m"]})
