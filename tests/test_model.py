"""get_aroma_model / AromaModel: which modules it wraps, what it refuses, and what unload gives back."""

import peft
import pytest
import torch
from conftest import synthetic_batches, tiny_bert, tiny_gpt2
from torch import nn

from aroma_peft import AromaConfig, AromaController, get_aroma_model


def linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def peft_all_linear_targets(base, task_type):
    """The modules plain PEFT wraps for ``target_modules="all-linear"`` (the reference)."""
    lora = peft.get_peft_model(base, peft.LoraConfig(target_modules="all-linear", task_type=task_type))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


class PackedLinear(nn.Linear):
    """Stands in for a quantized layer (GPTQ, bitsandbytes 8-bit): an ``nn.Linear`` subclass whose
    weight is packed into another shape and whose forward unpacks it."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features)
        self.weight = nn.Parameter(torch.zeros(linear.in_features * linear.out_features // 2, 1, dtype=torch.uint8),
                                   requires_grad=False)

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


class TestTargets:
    def test_all_linear_on_a_sequence_classifier_leaves_out_the_head_and_the_pooler(self):
        base = tiny_bert()
        model = get_aroma_model(base, AromaConfig(target_modules="all-linear"))
        expected = peft_all_linear_targets(tiny_bert(), "SEQ_CLS") - {"bert.pooler.dense"}
        assert "classifier" not in expected and len(expected) == 2 * 6
        assert set(model.aroma_layers) == expected
        assert type(base.classifier) is nn.Linear and type(base.bert.pooler.dense) is nn.Linear

    def test_all_linear_leaves_out_every_linear_inside_a_classification_head_module(self):
        base = tiny_bert()
        base.classifier = nn.Sequential()  # RoBERTa's head: classifier.dense, classifier.out_proj
        base.classifier.dense, base.classifier.out_proj = nn.Linear(32, 32), nn.Linear(32, 2)
        model = get_aroma_model(base, AromaConfig(target_modules="all-linear"))
        assert not any(n.startswith(("classifier", "bert.pooler")) for n in model.aroma_layers)
        assert len(model.aroma_layers) == 2 * 6

    def test_all_linear_on_a_language_model_matches_peft(self):
        model = get_aroma_model(tiny_gpt2(), AromaConfig(target_modules="all-linear"))
        assert set(model.aroma_layers) == peft_all_linear_targets(tiny_gpt2(), "CAUSAL_LM")

    def test_a_head_can_still_be_targeted_by_name(self):
        model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["classifier", "pooler.dense"]))
        assert list(model.aroma_layers) == ["bert.pooler.dense", "classifier"]

    def test_wrapping_a_model_twice_is_refused(self):
        model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query"]))
        with pytest.raises(ValueError, match=r"already has 2 AROMA layers .*bert\.encoder\.layer\.0\.attention\.self\.query"):
            get_aroma_model(model.base_model, AromaConfig(target_modules=["value"]))
        with pytest.raises(ValueError, match="already has 2 AROMA layers"):
            get_aroma_model(model, AromaConfig(target_modules=["value"]))
        assert list(model.aroma_layers) == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]

    @pytest.mark.parametrize("target", [["query"], "all-linear"])
    def test_a_linear_subclass_with_its_own_forward_is_refused_by_name(self, target):
        base = tiny_bert()
        base.bert.encoder.layer[1].attention.self.query = PackedLinear(base.bert.encoder.layer[1].attention.self.query)
        with pytest.raises(ValueError, match=r"matches 'bert\.encoder\.layer\.1\.attention\.self\.query', a PackedLinear, "
                                             r"a subclass of nn\.Linear with its own forward"):
            get_aroma_model(base, AromaConfig(target_modules=target))
        assert not any(type(m).__name__ == "AromaLinear" for m in base.modules())  # left as it was

    def test_a_linear_subclass_that_keeps_linears_forward_is_adapted(self):
        base = tiny_bert()
        attention = nn.MultiheadAttention(32, 4)  # out_proj: NonDynamicallyQuantizableLinear
        base.bert.encoder.layer[0].attention.self.query = attention.out_proj
        model = get_aroma_model(base, AromaConfig(target_modules=["query"]))
        assert len(model.aroma_layers) == 2


class TestUnload:
    def test_unload_gives_back_the_original_heads_of_modules_to_save(self):
        model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query", "value"], modules_to_save=["classifier"],
                                                         max_steps=10, warmup_steps=1))
        opt = torch.optim.SGD(model.adapter_parameters(), lr=0.5)
        controller = AromaController(model, opt)
        for batch in synthetic_batches(3):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            controller.step()
        fresh = tiny_bert()
        assert not torch.equal(model.base_model.classifier.weight, fresh.classifier.weight)  # the head trained
        plain = model.unload()
        assert not any(type(m).__name__ == "AromaLinear" for m in plain.modules())
        fresh_state, state = fresh.state_dict(), plain.state_dict()
        assert state.keys() == fresh_state.keys()
        for key in fresh_state:
            torch.testing.assert_close(state[key], fresh_state[key], rtol=0, atol=1e-6, msg=key)
