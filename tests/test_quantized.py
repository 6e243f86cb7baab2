"""4-bit bitsandbytes bases (QLoRA style): eq. (6) on the dequantized weight, merged components beside it.

bitsandbytes is a dependency of the ``dev`` extra, so these tests run (never skip) wherever the suite does;
users install it with ``pip install aroma-peft[quantized]``.
"""

import bitsandbytes as bnb
import peft
import pytest
import torch
from conftest import synthetic_batches, tiny_bert
from torch import nn

from aroma_peft import AromaConfig, AromaController, AromaModel, get_aroma_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # bitsandbytes' CPU kernels warn

TARGETS = ["query", "value", "intermediate.dense"]
ALPHA = 4.0


def quantize_4bit(model: nn.Module, names=("query", "key", "value", "dense")) -> nn.Module:
    """Every encoder linear named ``names`` replaced by an NF4 ``Linear4bit`` of its weights (in place)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and ".encoder." in f".{name}" and name.rsplit(".", 1)[-1] in names:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
            q.bias = nn.Parameter(module.bias.data.clone())
            # bitsandbytes 0.50's CPU inference repacking fails on these small shapes ("shape '[32, 0]' is
            # invalid"), also on a model AROMA never touched: compute as in training.
            q.support_avx512bf16_for_cpu = False
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to(module.weight.device))  # .to() quantizes
    return model


def dequantized(layer) -> torch.Tensor:
    w = layer.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float64)


def bert_4bit(seed=0):
    model = quantize_4bit(tiny_bert(seed))
    model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    return model


def logits(model):
    batch = synthetic_batches(1, batch_size=4, seed=11)[0]
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class TestFourBitBase:
    def test_factors_have_the_layers_shape_and_the_forward_is_w_dequantized_plus_the_update(self):
        model = get_aroma_model(bert_4bit(), AromaConfig(target_modules=TARGETS))
        layer = model.aroma_layers["bert.encoder.layer.0.intermediate.dense"]
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.weight.dtype == torch.uint8
        assert layer.lora_A.shape == (1, 32) and layer.lora_B.shape == (64, 1)
        g = torch.Generator().manual_seed(3)
        comps = []
        for _ in range(2):
            b, a = torch.randn(64, 1, generator=g) * 0.1, torch.randn(1, 32, generator=g) * 0.1
            with torch.no_grad():
                layer.lora_B.copy_(b)
                layer.lora_A.copy_(a)
            layer.merge_live()
            comps.append((b.double(), a.double()))
        layer.reinit_live()
        w = dequantized(layer.base_layer)
        delta = ALPHA * sum(b @ a for b, a in comps)
        x = torch.randn(5, 32, generator=g)
        expected = x.double() @ (w + delta).T + layer.base_layer.bias.double()
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-5)
        # eq. (6)'s denominator on the dequantized weight plus the merged components
        torch.testing.assert_close(layer.merged_weight_norm().double(), (w + delta).norm(), rtol=1e-5, atol=0)
        assert layer.base_layer.weight.dtype == torch.uint8  # nothing was folded into the 4-bit weight

    def test_trains_with_merges_exports_and_loads_in_peft_on_the_4bit_base(self, tmp_path):
        config = AromaConfig(target_modules=TARGETS, modules_to_save=["classifier"], max_steps=12, eps_in=None,
                             eps_out=1e-9, check_interval=4, max_inner_steps=4, warmup_steps=2, restart_warmup_steps=1)
        model = get_aroma_model(bert_4bit(), config)
        opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
        ctrl = AromaController(model, opt)
        model.train()
        for batch in synthetic_batches(12, batch_size=8):
            model(**batch).loss.backward()
            opt.step(); ctrl.scheduler.step(); opt.zero_grad()
            ctrl.step()
        model.eval()
        assert all(rank == 3 for rank in model.ranks().values())
        assert all(r > 0 for check in ctrl.outer_checks for r in check["eq6_ratio"])
        expected = logits(model)
        model.export_lora(tmp_path)

        peft_model = peft.PeftModel.from_pretrained(bert_4bit(), tmp_path).eval()
        assert isinstance(peft_model.base_model.model.bert.encoder.layer[0].attention.self.query,
                          peft.tuners.lora.bnb.Linear4bit)
        torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=1e-4)

    def test_merge_and_unload_into_a_4bit_weight_is_refused(self):
        model = get_aroma_model(bert_4bit(), AromaConfig(target_modules=TARGETS))
        with pytest.raises(ValueError, match=r"cannot merge into the 4-bit weight of 'bert\.encoder\.layer\.0\.attention"
                                             r"\.self\.query'.*export_lora"):
            model.merge_and_unload()

    def test_an_8bit_base_is_refused_by_name(self):
        base = tiny_bert()
        lin = base.bert.encoder.layer[0].attention.self.query
        q8 = bnb.nn.Linear8bitLt(32, 32, has_fp16_weights=False)
        q8.load_state_dict(lin.state_dict())
        base.bert.encoder.layer[0].attention.self.query = q8.to("cpu")
        with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.0\.attention\.self\.query', a Linear8bitLt, a "
                                             r"subclass of nn\.Linear with its own forward"):
            get_aroma_model(base, AromaConfig(target_modules=["query"]))

    def test_save_and_from_pretrained_round_trip_on_the_4bit_base(self, tmp_path):
        model = get_aroma_model(bert_4bit(), AromaConfig(target_modules=TARGETS))
        g = torch.Generator().manual_seed(4)
        for layer in model.aroma_layers.values():
            with torch.no_grad():
                layer.lora_A.normal_(generator=g)
                layer.lora_B.normal_(std=0.1, generator=g)
            layer.merge_live()
            layer.reinit_live()
        model.eval()
        model.save_pretrained(tmp_path)
        loaded = AromaModel.from_pretrained(bert_4bit(), tmp_path).eval()
        assert loaded.ranks() == model.ranks() and set(model.ranks().values()) == {1}
        assert torch.equal(logits(loaded), logits(model))
