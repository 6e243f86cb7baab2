"""AROMA through PEFT's own entry points: get_peft_model, PeftModel.from_pretrained, PeftConfig's language."""

import dataclasses

import pytest
import torch
from conftest import synthetic_batches, tiny_bert, tiny_gpt2
from peft import PeftConfig, PeftModel, get_peft_model

from aroma_peft import AromaConfig, AromaController, AromaModel, get_aroma_model

MODELS = {
    "bert": (tiny_bert, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"])),
}


def config(**kw):
    return AromaConfig(max_steps=30, check_interval=2, max_inner_steps=4, eps_out=1e-4, warmup_steps=2,
                       restart_warmup_steps=1, **kw)


def batch(name):
    b = synthetic_batches(1)[0]
    return b if name == "bert" else {"input_ids": b["input_ids"], "labels": b["input_ids"]}


def train(model, name, steps=9):
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    controller = AromaController(model, optimizer)
    model.train()
    for _ in range(steps):
        model(**batch(name)).loss.backward()
        optimizer.step()
        controller.scheduler.step()
        optimizer.zero_grad()
        controller.step()
    model.eval()
    return controller


@pytest.mark.parametrize("name", sorted(MODELS))
class TestRoundTrip:
    def test_get_peft_model_trains_an_aroma_model(self, name):
        make, kw = MODELS[name]
        peft_model = get_peft_model(make(), config(**kw))
        assert isinstance(peft_model, PeftModel) and isinstance(peft_model.base_model, AromaModel)
        train(peft_model, name)
        assert all(rank >= 2 for rank in peft_model.base_model.ranks().values())

    def test_peft_from_pretrained_loads_the_native_format_with_equal_logits(self, name, tmp_path):
        make, kw = MODELS[name]
        aroma = get_aroma_model(make(), config(**kw))
        controller = train(aroma, name)
        assert sum(aroma.ranks().values()) > 0
        with torch.no_grad():
            expected = aroma(**batch(name)).logits
        aroma.save_pretrained(tmp_path, controller)
        loaded = PeftModel.from_pretrained(make(), str(tmp_path))
        assert isinstance(loaded.base_model, AromaModel)
        assert loaded.base_model.ranks() == aroma.ranks()
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(loaded(**batch(name)).logits, expected)
        trainable = PeftModel.from_pretrained(make(), str(tmp_path), is_trainable=True)
        assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
            f"base_model.model.{n}.{f}" for n, layer in aroma.aroma_layers.items() if layer.active
            for f in ("lora_A", "lora_B")} | {f"base_model.model.{k}" for k in aroma.modules_to_save_state()}


def test_the_config_speaks_peft(tmp_path):
    c = config(target_modules=["query"], task_type="SEQ_CLS")
    assert isinstance(c, PeftConfig) and c.peft_type == "AROMA" and c.task_type == "SEQ_CLS"
    c.save_pretrained(str(tmp_path))
    again = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(again, AromaConfig) and again.hyperparameters() == c.hyperparameters()
    c.base_model_name_or_path = "x"  # PEFT's own fields stay assignable, as PEFT sets them
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"AromaConfig\.r cannot be assigned"):
        c.r = 2


def test_from_pretrained_loads_in_eval_mode_unless_trainable(tmp_path):
    aroma = get_aroma_model(tiny_bert(), config(target_modules=["query"], modules_to_save=["classifier"]))
    aroma.save_pretrained(tmp_path)
    loaded = AromaModel.from_pretrained(tiny_bert(), tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.adapter_parameters())
    assert all(p.requires_grad for p in AromaModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
               .adapter_parameters())


def test_peft_models_disable_adapter_gives_the_original_output_without_a_warning(recwarn):
    """PEFT 0.21's PeftModel.disable_adapter() raised TypeError for an out-of-tree tuner."""
    b = batch("bert")
    with torch.no_grad():
        original = tiny_bert()(**b).logits
    peft_model = get_peft_model(tiny_bert(), config(target_modules=["query", "value"], modules_to_save=["classifier"]))
    train(peft_model, "bert")
    with torch.no_grad():
        trained = peft_model(**b).logits
        with peft_model.disable_adapter():
            assert peft_model._adapters_disabled
            reference = peft_model(**b).logits
        after = peft_model(**b).logits
    assert not peft_model._adapters_disabled
    assert not torch.allclose(trained, original, atol=1e-4)
    torch.testing.assert_close(reference, original, rtol=0, atol=1e-5)
    assert torch.equal(after, trained)
    assert not [w for w in recwarn if "adapter" in str(w.message)]


def test_other_peft_models_keep_peft_s_disable_adapter():
    from peft import LoraConfig

    b = batch("bert")
    with torch.no_grad():
        original = tiny_bert()(**b).logits
    lora = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"], init_lora_weights=False))
    with torch.no_grad():
        assert (lora(**b).logits - original).abs().max() > 1e-6
        with lora.disable_adapter():
            assert torch.equal(lora(**b).logits, original)


def test_disable_adapter_gives_the_original_output_and_get_base_model_the_wrapped_one():
    b = batch("bert")
    with torch.no_grad():
        original = tiny_bert()(**b).logits
    aroma = get_aroma_model(tiny_bert(), config(target_modules=["query", "value"], modules_to_save=["classifier"]))
    train(aroma, "bert")
    assert aroma.get_base_model() is aroma.base_model
    with torch.no_grad():
        trained = aroma(**b).logits
        with aroma.disable_adapter():
            reference = aroma(**b).logits
        after = aroma(**b).logits
    assert not torch.allclose(trained, original, atol=1e-4)
    torch.testing.assert_close(reference, original, rtol=0, atol=1e-5)
    assert torch.equal(after, trained)


def test_push_to_hub_uploads_the_adapter_not_the_base_model(tmp_path, monkeypatch):
    """AromaModel.push_to_hub used to reach the wrapped model's, which uploads every base weight."""
    import shutil

    import huggingface_hub

    aroma = get_aroma_model(tiny_bert(), config(target_modules=["query", "value"], modules_to_save=["classifier"]))
    controller = train(aroma, "bert")
    calls = {}

    class Repo:
        repo_id = "someone/aroma-tiny"

    def create_repo(repo_id, **kwargs):  # the network is never reached
        calls["create"] = (repo_id, kwargs)
        return Repo()

    def upload_folder(repo_id, folder_path, **kwargs):
        calls["upload"] = repo_id
        shutil.copytree(folder_path, tmp_path / "uploaded")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    aroma.push_to_hub("someone/aroma-tiny", controller, private=True)
    assert calls["create"] == ("someone/aroma-tiny", {"private": True, "token": None, "exist_ok": True})
    assert calls["upload"] == "someone/aroma-tiny"
    files = {p.name for p in (tmp_path / "uploaded").iterdir()}
    assert files == {"adapter_model.safetensors", "adapter_config.json", "aroma_adapter.json", "aroma_controller.json"}
    with torch.no_grad():
        expected = aroma(**batch("bert")).logits
        again = AromaModel.from_pretrained(tiny_bert(), tmp_path / "uploaded")(**batch("bert")).logits
    assert torch.equal(again, expected)
