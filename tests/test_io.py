"""Adapter artefacts: PEFT LoRA export, merge_and_unload, save/load round trips, corrupt files, effective rank."""

import hashlib
import json
import math
import re

import numpy as np
import peft
import pytest
import scipy.stats
import torch
from conftest import synthetic_batches, tiny_bert, tiny_gpt2
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aroma_peft import AromaConfig, AromaController, AromaLinear, AromaModel, effective_rank, get_aroma_model

BERT_TARGETS = ["query", "value", "intermediate.dense", "output.dense"]


def set_live(layer, g, scale=0.2):
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def give_state(model, seed=0) -> dict[str, int]:
    """Hand-made training state; returns the rank each module's whole update (merged + live) has.

    Module 0 converged at its first component (rank 0), module 1 converged later (merged
    components only), the others have 1-3 merged components and are still training (live factors).
    """
    g = torch.Generator().manual_seed(seed)
    ranks = {}
    for i, (name, layer) in enumerate(model.aroma_layers.items()):
        if i == 0:
            set_live(layer, g)
            layer.drop_live()
            ranks[name] = 0
            continue
        n_merges = 1 + i % 3
        for _ in range(n_merges):
            set_live(layer, g)
            layer.merge_live()
            layer.reinit_live()
        if i == 1:
            layer.drop_live()
            ranks[name] = n_merges * layer.r
        else:
            set_live(layer, g)
            ranks[name] = (n_merges + 1) * layer.r
    with torch.no_grad():
        for name in model.modules_to_save_names:
            for p in model.base_model.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return ranks


def bert_aroma(r=1, seed=0):
    model = get_aroma_model(tiny_bert(seed), AromaConfig(target_modules=BERT_TARGETS, r=r, modules_to_save=["classifier"]))
    return model, give_state(model, seed + 1)


def gpt2_aroma(r=1, seed=0):
    model = get_aroma_model(tiny_gpt2(seed), AromaConfig(target_modules="all-linear", r=r))
    return model, give_state(model, seed + 1)


def bert_logits(model):
    batch = synthetic_batches(1, batch_size=4, seed=11)[0]
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def gpt2_logits(model):
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return model(input_ids=ids).logits


def bert_bf16_aroma(r=1, seed=0):
    model = get_aroma_model(tiny_bert(seed, dtype=torch.bfloat16),
                            AromaConfig(target_modules=BERT_TARGETS, r=r, modules_to_save=["classifier"]))
    return model, give_state(model, seed + 1)


CASES = {
    "bert": (bert_aroma, tiny_bert, bert_logits),
    "gpt2_conv1d": (gpt2_aroma, tiny_gpt2, gpt2_logits),
}
ROUND_TRIP_CASES = CASES | {"bert_bf16": (bert_bf16_aroma, lambda seed: tiny_bert(seed, dtype=torch.bfloat16), bert_logits)}


def snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------------------------------ PEFT export
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("r", [1, 2])
def test_export_lora_loads_in_peft_and_gives_the_same_logits(tmp_path, case, r):
    make, fresh_base, logits = CASES[case]
    model, ranks = make(r=r)
    model.eval()
    expected = logits(model)
    model.export_lora(tmp_path)

    peft_model = peft.PeftModel.from_pretrained(fresh_base(0), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=1e-5)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    exported = {n: k for n, k in ranks.items() if k > 0}
    assert sorted(config["target_modules"]) == sorted(exported)
    for name, rank in exported.items():
        key = get_pattern_key(config["rank_pattern"].keys(), name)
        assert config["rank_pattern"][key] == rank, name
        # PEFT's scaling lora_alpha / rank must be AROMA's s = alpha / r.
        assert config["alpha_pattern"][key] / rank == pytest.approx(4.0 / r, rel=1e-12), name
        lora_a = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight
        assert lora_a.shape[0] == rank
    rank_zero = [n for n, k in ranks.items() if k == 0]
    assert rank_zero  # modules of rank 0 are left out: PEFT does not wrap them
    assert not any(hasattr(peft_model.base_model.model.get_submodule(n), "lora_A") for n in rank_zero)


def test_export_lora_with_every_module_at_rank_zero_raises(tmp_path):
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query"]))
    for layer in model.aroma_layers.values():
        layer.drop_live()
    with pytest.raises(ValueError, match="every adapted module has rank 0"):
        model.export_lora(tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("case", CASES)
def test_merge_and_unload_gives_the_same_logits(case):
    make, _, logits = CASES[case]
    model, _ = make(r=2)
    model.eval()
    expected = logits(model)
    plain = model.merge_and_unload()
    assert not any(type(m).__name__ == "AromaLinear" for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)


def test_unload_gives_back_the_original_model():
    model, _ = bert_aroma(r=2)
    plain = model.unload()
    torch.testing.assert_close(bert_logits(plain), bert_logits(tiny_bert(0)), rtol=0, atol=1e-5)  # heads too


# ------------------------------------------------------------------------------------------ native round trip
@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_save_then_from_pretrained_restores_logits_ranks_and_active_flags(tmp_path, case):
    make, fresh_base, logits = ROUND_TRIP_CASES[case]
    model, _ = make(r=2)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AromaModel.from_pretrained(fresh_base(0), tmp_path, is_trainable=True).eval()
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.ranks() == model.ranks()
    assert [m.active for m in loaded.aroma_layers.values()] == [m.active for m in model.aroma_layers.values()]
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
           {n for n, p in model.named_parameters() if p.requires_grad}


def test_trained_model_and_controller_round_trip_with_safetensors_and_json_only(tmp_path):
    config = AromaConfig(target_modules=BERT_TARGETS, modules_to_save=["classifier"], max_steps=40,
                         eps_in=None, eps_out=1e-9, check_interval=4, max_inner_steps=4,
                         warmup_steps=2, restart_warmup_steps=1)
    model = get_aroma_model(tiny_bert(0), config)
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    ctrl = AromaController(model, opt)
    model.train()
    for batch in synthetic_batches(10, batch_size=8):
        model(**batch).loss.backward()
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        ctrl.step()
    assert all(rank == 2 for rank in model.ranks().values())  # two merges after 10 steps with T_in=4
    model.eval()
    model.save_pretrained(tmp_path, controller=ctrl)

    names = sorted(p.name for p in tmp_path.iterdir())
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    for p in tmp_path.iterdir():
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            with safe_open(str(p), framework="pt") as f:
                assert len(list(f.keys())) > 0
    controller_files = [p for p in tmp_path.iterdir() if p.suffix == ".json" and "controller" in p.name]
    assert len(controller_files) == 1
    assert json.loads(controller_files[0].read_text()) == json.loads(json.dumps(ctrl.state_dict()))

    loaded = AromaModel.from_pretrained(tiny_bert(0), tmp_path).eval()
    assert torch.equal(bert_logits(loaded), bert_logits(model))
    assert loaded.ranks() == model.ranks()


def test_no_controller_file_without_a_controller(tmp_path):
    model, _ = bert_aroma()
    model.save_pretrained(tmp_path)
    assert not [p for p in tmp_path.iterdir() if "controller" in p.name]


# ------------------------------------------------------------------------------------------ bad files
@pytest.fixture
def saved(tmp_path):
    model, _ = bert_aroma(r=2)
    model.save_pretrained(tmp_path)
    (weights,) = [p for p in tmp_path.iterdir() if p.suffix == ".safetensors"]
    meta = tmp_path / "aroma_adapter.json"  # beside it: adapter_config.json, the PEFT config
    return tmp_path, weights, meta


def replace_sha(meta, old: str, new: str) -> None:
    text = meta.read_text()
    assert text.count(old) == 1
    meta.write_text(text.replace(old, new))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("keep", [0, 5, 0.5, -100])
def test_truncated_weights_raise_naming_the_file(saved, keep):
    directory, weights, _ = saved
    data = weights.read_bytes()
    weights.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    before = snapshot(directory)
    with pytest.raises(ValueError, match=re.escape(str(weights)) + ".*truncated or corrupted"):
        AromaModel.from_pretrained(tiny_bert(0), directory)
    assert snapshot(directory) == before


def test_wrong_tensor_shape_raises_naming_the_file_and_the_key(saved):
    directory, weights, meta = saved
    old_sha = sha256(weights)
    tensors = load_file(str(weights))
    key = "bert.encoder.layer.1.attention.self.value.lora_A"
    assert tensors["base_model.model." + key].shape == (2, 32)  # the file's keys are a PeftModel's
    tensors["base_model.model." + key] = torch.zeros(2, 31)
    save_file(tensors, str(weights))
    replace_sha(meta, old_sha, sha256(weights))  # so that the shape check is reached
    before = snapshot(directory)
    base = tiny_bert(0)
    weights_before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(f"{weights}: tensor {key!r} has shape (2, 31)")):
        AromaModel.from_pretrained(base, directory)
    assert snapshot(directory) == before
    # The model passed in is left as it was: not wrapped, same weights.
    assert not any(isinstance(m, AromaLinear) for m in base.modules())
    assert all(torch.equal(v, weights_before[k]) for k, v in base.state_dict().items())


def test_changed_weights_fail_the_sha256_check(saved):
    directory, weights, _ = saved
    tensors = load_file(str(weights))
    key = "classifier.weight"
    (full_key,) = [k for k in tensors if k.endswith(key)]
    tensors[full_key] = tensors[full_key] + 1.0  # same shape, other values
    save_file(tensors, str(weights))
    before = snapshot(directory)
    with pytest.raises(ValueError, match=re.escape(str(weights)) + ".*does not match the sha256"):
        AromaModel.from_pretrained(tiny_bert(0), directory)
    assert snapshot(directory) == before


def test_missing_directory_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        AromaModel.from_pretrained(tiny_bert(0), tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ effective rank
def reference_effective_rank(m: np.ndarray) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    if s.sum() == 0:
        return 0.0
    return float(np.exp(scipy.stats.entropy(s / s.sum())))


@pytest.mark.parametrize("shape", [(8, 8), (5, 12), (12, 5)])
def test_effective_rank_matches_numpy_scipy(shape):
    m = np.random.default_rng(0).standard_normal(shape)
    assert effective_rank(torch.from_numpy(m)) == pytest.approx(reference_effective_rank(m), rel=1e-10)
    m32 = m.astype(np.float32)
    assert effective_rank(torch.from_numpy(m32)) == pytest.approx(reference_effective_rank(m32.astype(np.float64)),
                                                                 rel=1e-6)


def test_effective_rank_of_a_low_rank_product():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((16, 3)) @ rng.standard_normal((3, 20))
    value = effective_rank(torch.from_numpy(m))
    assert value == pytest.approx(reference_effective_rank(m), rel=1e-8)
    assert 1.0 < value <= 3.0


@pytest.mark.parametrize("n", [1, 4, 9])
def test_effective_rank_of_identity_is_n(n):
    assert effective_rank(torch.eye(n)) == pytest.approx(n, rel=1e-12)


def test_effective_rank_of_rank_one_is_one():
    rng = np.random.default_rng(2)
    m = np.outer(rng.standard_normal(7), rng.standard_normal(9))
    assert effective_rank(torch.from_numpy(m)) == pytest.approx(1.0, abs=1e-9)


def test_effective_rank_skips_exactly_zero_singular_values():
    # Singular values (3, 1, 0, 0): the zero terms add 0 to the entropy (the limit of p log p).
    m = np.diag([3.0, 1.0, 0.0, 0.0])
    expected = reference_effective_rank(m)
    assert expected == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-12)
    assert effective_rank(torch.from_numpy(m)) == pytest.approx(expected, rel=1e-12)


def test_effective_rank_of_zero_matrix_is_zero():
    assert effective_rank(torch.zeros(4, 6)) == 0.0
    assert math.isfinite(effective_rank(torch.zeros(4, 6)))


def test_effective_rank_rejects_non_matrices():
    with pytest.raises(ValueError, match=r"needs a 2-D matrix, got shape \(2, 3, 4\)"):
        effective_rank(torch.zeros(2, 3, 4))


# ------------------------------------------------------------------------------------------ low-precision bases
def train_few_steps(model, steps=12):
    """AdamW + controller for ``steps`` steps; every inner loop of 4 steps ends in a merge."""
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    ctrl = AromaController(model, opt)
    model.train()
    for batch in synthetic_batches(steps, batch_size=8):
        model(**batch).loss.backward()
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        ctrl.step()
    model.eval()
    return ctrl


def test_a_model_cast_to_bf16_trains_merges_exports_and_loads_in_peft(tmp_path):
    config = AromaConfig(target_modules=BERT_TARGETS, modules_to_save=["classifier"], max_steps=12, eps_in=None,
                         eps_out=1e-9, check_interval=4, max_inner_steps=4, warmup_steps=2, restart_warmup_steps=1)
    model = get_aroma_model(tiny_bert(0), config).to(torch.bfloat16)
    train_few_steps(model)
    assert all(rank == 3 for rank in model.ranks().values())  # merges at 4, 8 and 12 (kept at T)
    assert all(layer.merged_A.dtype == torch.float32 for layer in model.aroma_layers.values())
    expected = bert_logits(model)
    assert expected.dtype == torch.bfloat16
    model.export_lora(tmp_path)

    peft_model = peft.PeftModel.from_pretrained(tiny_bert(0, dtype=torch.bfloat16), tmp_path).eval()
    logits = bert_logits(peft_model)
    torch.testing.assert_close(logits.float(), expected.float(), rtol=0, atol=2e-2 * expected.abs().max().item())
    # The same adapter on an fp32 base: the update was not rounded into the bf16 weights.
    fp32 = peft.PeftModel.from_pretrained(tiny_bert(0), tmp_path).eval()
    for name, layer in model.aroma_layers.items():
        peft_layer = fp32.base_model.model.get_submodule(name)
        torch.testing.assert_close(peft_layer.get_delta_weight("default"), layer.delta_weight(), rtol=1e-6, atol=1e-8)
