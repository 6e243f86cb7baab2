"""AromaLinear against a float64 computation from the factors, and get_aroma_model's target matching.

Every expected value here is computed from the factors the test itself wrote into the layer (never
read back from the layer's buffers): ``y = x (W0 + s dW)^T + bias`` with ``dW`` the sum of the
merged components and the live one, ``s = alpha / r`` (paper eq. 4).
"""

import math
import re

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2
from torch import nn
from transformers.pytorch_utils import Conv1D

from aroma_peft import AromaConfig, AromaLinear, get_aroma_model

ALPHA = 4.0
IN, OUT = 12, 10
KINDS = ["fp32_linear", "bf16_linear", "conv1d"]


def make_base(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv1d":  # GPT-2 layout: weight is (in, out)
        base = Conv1D(OUT, IN)
        nn.init.normal_(base.weight, std=0.3)
        nn.init.normal_(base.bias, std=0.3)
        return base
    base = nn.Linear(IN, OUT)
    return base.to(torch.bfloat16) if kind == "bf16_linear" else base


def weight_out_in(base: nn.Module) -> torch.Tensor:
    """The base weight as an (out, in) float64 matrix."""
    w = base.weight.detach().to(torch.float64)
    return w.T.clone() if isinstance(base, Conv1D) else w.clone()


def set_live(layer: AromaLinear, g: torch.Generator, scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    b = torch.randn(layer.lora_B.shape, generator=g) * scale
    a = torch.randn(layer.lora_A.shape, generator=g) * scale
    with torch.no_grad():
        layer.lora_B.copy_(b)
        layer.lora_A.copy_(a)
    return b.double(), a.double()


def build(kind: str, r: int, n_merges: int, live: bool = True, seed: int = 0):
    """A layer with ``n_merges`` merged components (+ a random live one), and its reference pieces."""
    base = make_base(kind, seed)
    w0 = weight_out_in(base)
    bias = base.bias.detach().to(torch.float64).clone()
    layer = AromaLinear(base, r=r, alpha=ALPHA, seed=seed, index=3)
    g = torch.Generator().manual_seed(seed + 100)
    merged = []
    for _ in range(n_merges):
        merged.append(set_live(layer, g))
        layer.merge_live()
        layer.reinit_live()
    live_factors = set_live(layer, g) if live else None
    return layer, w0, bias, merged, live_factors


def reference(x, w0, bias, merged, live, r):
    """x (W0 + s dW)^T + bias in float64."""
    s = ALPHA / r
    delta = torch.zeros_like(w0)
    for b, a in merged + ([live] if live is not None else []):
        delta += b @ a
    return x.to(torch.float64) @ (w0 + s * delta).T + bias


def tolerance(kind: str, expected: torch.Tensor) -> dict:
    if kind == "bf16_linear":  # bf16 keeps 8 significant bits; a few roundings of O(|y|) values
        return dict(rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    return dict(rtol=1e-5, atol=1e-5)


def make_input(kind: str, n: int = 5) -> torch.Tensor:
    x = torch.randn(n, IN, generator=torch.Generator().manual_seed(7))
    return x.to(torch.bfloat16) if kind == "bf16_linear" else x


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", [1, 4])
def test_forward_equals_float64_reference_with_merged_and_live_components(kind, r):
    layer, w0, bias, merged, live = build(kind, r, n_merges=3)
    x = make_input(kind)
    expected = reference(x, w0, bias, merged, live, r)
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == (5, OUT)
    torch.testing.assert_close(out.to(torch.float64), expected, **tolerance(kind, expected))
    # The update is large against the tolerance, so dropping any component would fail above.
    base_only = reference(x, w0, bias, [], None, r)
    assert (expected - base_only).abs().max() > 20 * tolerance(kind, expected)["atol"]


@pytest.mark.parametrize("kind", KINDS)
def test_inactive_layer_ignores_the_live_factors(kind):
    layer, w0, bias, merged, _ = build(kind, r=1, n_merges=2)
    layer.set_active(False)
    with torch.no_grad():
        layer.lora_B.normal_()  # would change the output if it were still used
    x = make_input(kind)
    expected = reference(x, w0, bias, merged, None, 1)
    torch.testing.assert_close(layer(x).to(torch.float64), expected, **tolerance(kind, expected))
    assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_reinit_leaves_the_output_unchanged(kind):
    layer, *_ = build(kind, r=2, n_merges=1)
    x = make_input(kind)
    before = layer(x).to(torch.float64)
    layer.merge_live()
    layer.reinit_live()
    after = layer(x).to(torch.float64)
    torch.testing.assert_close(after, before, **tolerance(kind, before))


def test_bf16_base_weight_is_never_modified_and_merged_factors_stay_fp32():
    base = make_base("bf16_linear")
    w_before = base.weight.detach().clone()
    layer, *_ = build("bf16_linear", r=2, n_merges=4)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base_layer.weight, w_before)  # bit-identical
    assert layer.merged_A.dtype == torch.float32 and layer.merged_B.dtype == torch.float32
    assert layer.merged_A.shape == (8, IN) and layer.merged_B.shape == (OUT, 8)


@pytest.mark.parametrize("kind", ["fp32_linear", "conv1d"])
def test_fp32_base_folds_merged_components_into_its_weight(kind):
    layer, w0, _, merged, _ = build(kind, r=2, n_merges=3)
    folded = w0 + (ALPHA / 2) * sum(b @ a for b, a in merged)
    torch.testing.assert_close(weight_out_in(layer.base_layer), folded, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ gradients
def reference_grads(x, w0, bias, merged, live, r, weight_of_out):
    """d/dx, d/da, d/db of sum(y * weight_of_out) by float64 autograd on the formula of ``reference``."""
    b, a = (t.clone().requires_grad_(True) for t in live)
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    y = reference(x64, w0, bias, merged, (b, a), r)
    (y * weight_of_out).sum().backward()
    return x64.grad, a.grad, b.grad


def uses_fused_path(out: torch.Tensor) -> bool:
    return "LiveLinear" in type(out.grad_fn).__name__


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("input_needs_grad", [True, False])
def test_gradients_equal_float64_reference(kind, r, fused, input_needs_grad):
    layer, w0, bias, merged, live = build(kind, r, n_merges=2)
    layer.base_layer.requires_grad_(False)  # as get_aroma_model leaves it
    layer.fused = fused
    x = torch.randn(2, 4, IN, generator=torch.Generator().manual_seed(3)).to(layer.base_layer.weight.dtype)
    x.requires_grad_(input_needs_grad)
    weight_of_out = torch.randn(2, 4, OUT, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = layer(x)
    # The fused path is taken exactly for an fp32 base (merged components folded into W0).
    assert uses_fused_path(out) == (fused and kind != "bf16_linear")
    (out.to(torch.float64) * weight_of_out).sum().backward()
    gx, ga, gb = reference_grads(x, w0, bias, merged, live, r, weight_of_out)
    for got, expected in ((layer.lora_A.grad, ga), (layer.lora_B.grad, gb)) + (((x.grad, gx),) if input_needs_grad else ()):
        torch.testing.assert_close(got.to(torch.float64), expected, **tolerance(kind, expected))
    assert x.grad is None or input_needs_grad
    assert layer.base_layer.weight.grad is None


def test_fused_path_steps_aside_for_hooks_autocast_and_trainable_base_weights():
    """Anything the fused kernel would bypass (hooks, autocast, a trainable W0) takes the plain path."""
    x = torch.randn(3, IN)

    def fresh():  # frozen base, trainable live factors: as get_aroma_model leaves a layer
        layer, *_ = build("fp32_linear", r=1, n_merges=1)
        layer.base_layer.requires_grad_(False)
        return layer

    layer = fresh()
    assert uses_fused_path(layer(x))
    calls = []
    layer.base_layer.register_forward_hook(lambda *args: calls.append(1))
    assert not uses_fused_path(layer(x)) and calls == [1]

    layer = fresh()
    layer.base_layer.weight.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None

    layer = fresh()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # F.linear autocasts; the fused kernel would not

    layer = fresh()
    layer.set_active(False)
    assert not uses_fused_path(layer(x))


# ------------------------------------------------------------------------------------------ reinit
@pytest.mark.parametrize("r", [1, 4])
def test_reinit_gives_zero_b_and_bounded_nonzero_kaiming_a(r):
    layer = AromaLinear(nn.Linear(IN, OUT), r=r, alpha=ALPHA, seed=0, index=0)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
    # kaiming_uniform_(a=sqrt(5)) as in PEFT's LoRA A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(IN)


def test_init_scale_scales_the_kaiming_draw_of_the_first_and_every_reinitialized_a():
    """AromaConfig.init_scale: a is exactly the scale-1 draw of the same (seed, index, component) times it."""
    plain = AromaLinear(nn.Linear(IN, OUT), r=2, alpha=ALPHA, seed=3, index=5)
    small = AromaLinear(nn.Linear(IN, OUT), r=2, alpha=ALPHA, seed=3, index=5, init_scale=0.1)
    for component in range(3):
        assert torch.equal(small.lora_A, plain.lora_A * 0.1), component
        assert small.lora_A.abs().max() <= 0.1 / math.sqrt(IN)
        assert torch.count_nonzero(small.lora_B) == 0
        for layer in (plain, small):
            with torch.no_grad():
                layer.lora_B.fill_(0.5)
            layer.merge_live()
            layer.reinit_live()
        assert small.num_merged == component + 1


def test_init_scale_reaches_every_layer_and_is_validated():
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query", "value"], init_scale=0.25))
    reference = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query", "value"]))
    pairs = list(zip(model.aroma_layers.values(), reference.aroma_layers.values()))
    assert pairs and all(torch.equal(a.lora_A, b.lora_A * 0.25) for a, b in pairs)
    for bad in (0, -1.0, float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match=r"AromaConfig.init_scale=.* is invalid: expected a finite number > 0"):
            AromaConfig(init_scale=bad)


def test_reinit_is_a_fixed_function_of_seed_index_and_num_merged():
    def initial_a(seed, index, n_merges):
        layer, *_ = build("fp32_linear", r=2, n_merges=n_merges, live=False, seed=seed)
        layer.index = index
        layer.reinit_live()
        return layer.lora_A.detach().clone()

    assert torch.equal(initial_a(0, 3, 2), initial_a(0, 3, 2))
    assert not torch.equal(initial_a(0, 3, 2), initial_a(0, 3, 1))
    assert not torch.equal(initial_a(0, 3, 2), initial_a(0, 4, 2))
    assert not torch.equal(initial_a(0, 3, 2), initial_a(1, 3, 2))
    # Independent of the global RNG.
    torch.manual_seed(123)
    a1 = initial_a(0, 3, 2)
    torch.manual_seed(456)
    assert torch.equal(a1, initial_a(0, 3, 2))


def test_merges_create_no_new_parameters():
    layer = AromaLinear(nn.Linear(IN, OUT), r=2, alpha=ALPHA)
    before = {n: id(p) for n, p in layer.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        set_live(layer, g)
        layer.merge_live()
        layer.reinit_live()
    assert {n: id(p) for n, p in layer.named_parameters()} == before
    assert set(before) == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B"}


# ------------------------------------------------------------------------------------------ eqs. (5), (6)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", [1, 4])
def test_live_norm_is_frobenius_norm_of_b_times_a(kind, r):
    layer, *_ = build(kind, r, n_merges=2)
    expected = torch.linalg.norm(layer.lora_B.detach().double() @ layer.lora_A.detach().double())
    torch.testing.assert_close(layer.live_norm().double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", [1, 4])
def test_outer_ratio_matches_eq6_computed_by_hand(kind, r):
    layer, w0, _, merged, (b, a) = build(kind, r, n_merges=3)
    s = ALPHA / r
    merged_weight = w0 + s * sum(bk @ ak for bk, ak in merged)
    expected = s * torch.linalg.norm(b @ a) / torch.linalg.norm(merged_weight)
    torch.testing.assert_close(layer.outer_ratio().double(), expected, rtol=1e-5, atol=0)
    # outer_criterion="update": the same live norm over the merged update's norm, without W0.
    expected_update = torch.linalg.norm(b @ a) / torch.linalg.norm(sum(bk @ ak for bk, ak in merged))
    torch.testing.assert_close(layer.outer_ratio("update").double(), expected_update, rtol=1e-5, atol=0)


def test_outer_ratio_update_is_inf_before_the_first_merge_and_nan_for_a_non_finite_component():
    layer, *_ = build("linear", 1, n_merges=0)
    assert layer.rank == 0 and layer.outer_ratio("update").item() == float("inf")
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    assert torch.isnan(layer.outer_ratio("update")) and torch.isnan(layer.outer_ratio("weight"))
    with pytest.raises(ValueError, match="outer criterion 'norm' is invalid"):
        layer.outer_ratio("norm")


# ------------------------------------------------------------------------------------------ whole-weight views
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", [1, 4])
def test_merged_base_layer_computes_the_adapted_function(kind, r):
    layer, w0, bias, merged, live = build(kind, r, n_merges=3)
    x = make_input(kind)
    expected = reference(x, w0, bias, merged, live, r)
    plain = layer.merged_base_layer()
    assert type(plain) is (Conv1D if kind == "conv1d" else nn.Linear)
    assert plain.weight.dtype == (torch.bfloat16 if kind == "bf16_linear" else torch.float32)
    torch.testing.assert_close(plain(x).to(torch.float64), expected, **tolerance(kind, expected))


@pytest.mark.parametrize("kind", KINDS)
def test_original_base_layer_gives_back_w0(kind):
    base = make_base(kind)
    w0 = base.weight.detach().clone()
    layer, *_ = build(kind, r=2, n_merges=3)
    plain = layer.original_base_layer()
    assert plain.weight.dtype == w0.dtype
    torch.testing.assert_close(plain.weight.detach(), w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fresh_merges", [0, 1])
def test_state_dict_round_trip_into_a_layer_with_other_merged_sizes(kind, fresh_merges):
    src, *_ = build(kind, r=2, n_merges=3, seed=0)
    dst, *_ = build(kind, r=2, n_merges=fresh_merges, seed=5)  # other factors, other buffer sizes
    assert dst.merged_A.shape != src.merged_A.shape
    dst.load_state_dict(src.state_dict())
    assert dst.rank == src.rank == 6 and dst.num_merged == 3
    for name, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], value), name
    x = make_input(kind)
    assert torch.equal(dst(x), src(x))


def test_wrapping_an_unsupported_module_raises():
    with pytest.raises(TypeError, match="cannot wrap this layer: it is a Conv2d; AROMA adapts nn.Linear"):
        AromaLinear(nn.Conv2d(3, 4, 3), r=1, alpha=ALPHA)
    with pytest.raises(TypeError, match="it is a Embedding; AROMA adapts nn.Linear"):
        AromaLinear(nn.Embedding(10, 4), r=1, alpha=ALPHA)


# ------------------------------------------------------------------------------------------ get_aroma_model
def names_of(model, types) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, types)]


def test_target_modules_as_suffix_list():
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query", "value"]))
    expected = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    assert list(model.aroma_layers) == expected
    assert all(isinstance(model.base_model.get_submodule(n), AromaLinear) for n in expected)
    assert isinstance(model.base_model.get_submodule("bert.encoder.layer.0.attention.self.key"), nn.Linear)


def test_target_modules_suffix_needs_a_whole_name_component():
    # "dense" matches attention.output.dense, intermediate.dense, output.dense and the pooler's
    # dense, but a suffix such as "ense" matches nothing.
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["output.dense"]))
    expected = [f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.output.dense", "output.dense")]
    assert list(model.aroma_layers) == expected
    with pytest.raises(ValueError, match="matches no module"):
        get_aroma_model(tiny_bert(), AromaConfig(target_modules=["ense"]))


def test_target_modules_as_regex_on_the_full_name():
    regex = r"bert\.encoder\.layer\.1\.attention\.self\.(key|value)"
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=regex))
    assert list(model.aroma_layers) == ["bert.encoder.layer.1.attention.self.key",
                                        "bert.encoder.layer.1.attention.self.value"]
    # fullmatch, not search: a partial pattern matches nothing.
    with pytest.raises(ValueError, match="matches no module"):
        get_aroma_model(tiny_bert(), AromaConfig(target_modules=r"attention\.self\.key"))


def test_all_linear_on_gpt2_takes_conv1d_layers_and_leaves_out_the_lm_head():
    base = tiny_gpt2()
    expected = [n for n in names_of(base, (nn.Linear, Conv1D)) if n != "lm_head"]
    model = get_aroma_model(base, AromaConfig(target_modules="all-linear"))
    assert list(model.aroma_layers) == expected
    assert "transformer.h.0.attn.c_attn" in expected and "transformer.h.1.mlp.c_proj" in expected
    assert len(expected) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert type(model.base_model.lm_head) is nn.Linear
    assert model.aroma_layers["transformer.h.0.attn.c_attn"].is_conv1d


def test_exclude_modules_removes_matches():
    base = tiny_gpt2()
    model = get_aroma_model(base, AromaConfig(target_modules="all-linear", exclude_modules=["c_proj"]))
    assert list(model.aroma_layers) == [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "mlp.c_fc")]


def test_modules_to_save_are_trainable_and_everything_else_is_frozen():
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    assert "classifier" not in model.aroma_layers  # a saved module is trained in full, not adapted
    trainable = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{f}" for n in model.aroma_layers for f in "AB"} | {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    assert len(model.aroma_layers) == len(names_of(tiny_bert(), nn.Linear)) - 2  # "all-linear" leaves out the pooler


def test_target_modules_matching_nothing_lists_the_existing_suffixes():
    with pytest.raises(ValueError, match=r"target_modules=.*'qkv_proj'.* matches no module of BertForSequenceClassification") as err:
        get_aroma_model(tiny_bert(), AromaConfig(target_modules=["qkv_proj"]))
    suffixes = {n.rsplit(".", 1)[-1] for n in names_of(tiny_bert(), nn.Linear)}
    assert suffixes == {"query", "key", "value", "dense", "classifier"}
    for suffix in suffixes:
        assert repr(suffix) in str(err.value)


@pytest.mark.parametrize("target, name, type_name", [
    (["LayerNorm"], "bert.embeddings.LayerNorm", "LayerNorm"),
    (r".*\.attention\.output\.LayerNorm", "bert.encoder.layer.0.attention.output.LayerNorm", "LayerNorm"),
    (["word_embeddings"], "bert.embeddings.word_embeddings", "Embedding"),
])
def test_target_modules_matching_a_non_linear_names_the_module_and_its_type(target, name, type_name):
    pattern = rf"matches {re.escape(repr(name))}, a {type_name}; AROMA adapts nn\.Linear and transformers Conv1D only"
    with pytest.raises(ValueError, match=pattern):
        get_aroma_model(tiny_bert(), AromaConfig(target_modules=target))


def test_print_trainable_parameters(capsys):
    base = tiny_bert()
    base_total = sum(p.numel() for p in base.parameters())
    model = get_aroma_model(base, AromaConfig(target_modules=["query", "value"], r=2, modules_to_save=["classifier"]))
    # 4 adapted 32x32 linears with r=2 factors (2x32 and 32x2), plus the 32->2 classifier with bias.
    trainable = 4 * (2 * 32 + 32 * 2) + (32 * 2 + 2)
    total = base_total + 4 * (2 * 32 + 32 * 2)
    model.print_trainable_parameters()
    out = capsys.readouterr().out.strip()
    assert out == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert model.get_nb_trainable_parameters() == (trainable, total)


# ------------------------------------------------------------------------------------------ whole model
@pytest.mark.parametrize("model_fn", [tiny_bert, tiny_gpt2])
def test_fused_model_gives_the_plain_paths_loss_and_gradients_also_under_checkpointing(model_fn):
    """The whole model through the fused path equals the plain path, and activation checkpointing
    (which reruns the forward in the backward pass) leaves the gradients as they are."""
    from conftest import synthetic_batches

    batch = synthetic_batches(1)[0]
    if model_fn is tiny_gpt2:
        batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}

    def loss_and_grads(fused: bool, checkpointing: bool):
        model = get_aroma_model(model_fn(0), AromaConfig(target_modules="all-linear", r=1, alpha=ALPHA))
        g = torch.Generator().manual_seed(1)
        for layer in model.aroma_layers.values():
            layer.fused = fused
            with torch.no_grad():
                layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
        base = model.base_model
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert base.is_gradient_checkpointing
        base.train()
        seen = []
        hooks = [m.register_forward_hook(lambda _m, _a, y: seen.append(uses_fused_path(y)))
                 for m in model.aroma_layers.values()]
        out = model(**batch)
        out.loss.backward()
        for h in hooks:
            h.remove()
        assert seen and set(seen) == {fused}  # every module took the path asked for
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.loss.detach(), grads

    loss_ref, grads_ref = loss_and_grads(fused=False, checkpointing=False)
    assert len(grads_ref) >= 8
    for fused, ckpt in ((True, False), (True, True)):
        loss, grads = loss_and_grads(fused, ckpt)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_torch_compile_traces_the_fused_path_and_computes_the_same_gradients():
    # aot_eager: dynamo and AOTAutograd trace the custom autograd function, without a C++ compiler.
    from conftest import synthetic_batches

    batch = synthetic_batches(1)[0]

    def loss_and_grads(compiled: bool):
        model = get_aroma_model(tiny_bert(0), AromaConfig(target_modules="all-linear", r=1, alpha=ALPHA))
        g = torch.Generator().manual_seed(1)
        for layer in model.aroma_layers.values():
            with torch.no_grad():
                layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
        forward = torch.compile(model.base_model, backend="aot_eager") if compiled else model.base_model
        loss = forward(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
    assert grads.keys() == grads_ref.keys() and len(grads) >= 8
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------ .to(dtype)
class TestCastingTheModel:
    """``model.to(torch.bfloat16)`` casts the base; the factors and merged components stay float32."""

    def test_a_bf16_cast_keeps_the_factors_float32_and_the_forward_runs(self):
        model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query", "value"]))
        model.to(torch.bfloat16)
        layer = model.aroma_layers["bert.encoder.layer.0.attention.self.query"]
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert {t.dtype for t in (layer.lora_A, layer.lora_B, layer.merged_A, layer.merged_B)} == {torch.float32}
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        assert model(input_ids=ids).logits.dtype == torch.bfloat16

    def test_components_folded_in_fp32_are_taken_out_before_the_weight_goes_bf16(self):
        layer, w0, bias, merged, live = build("fp32_linear", r=2, n_merges=3)
        layer.to(torch.bfloat16)
        # The bf16 weight is W0 rounded, not W0 + s B A rounded: the components stay exact beside it.
        torch.testing.assert_close(weight_out_in(layer.base_layer), w0.to(torch.bfloat16).to(torch.float64),
                                   rtol=0, atol=1e-6)
        x = make_input("bf16_linear")
        expected = reference(x, w0.to(torch.bfloat16).to(torch.float64), bias.to(torch.bfloat16).to(torch.float64),
                             merged, live, r=2)
        torch.testing.assert_close(layer(x).to(torch.float64), expected, **tolerance("bf16_linear", expected))
        layer.float()  # and back: folded again, the same function in fp32
        assert layer.base_layer.weight.dtype == torch.float32
        torch.testing.assert_close(layer(x.float()).to(torch.float64), expected, **tolerance("bf16_linear", expected))

    def test_a_small_update_merged_after_a_bf16_cast_is_not_rounded_away(self):
        base = make_base("fp32_linear")
        layer = AromaLinear(base, r=1, alpha=ALPHA).to(torch.bfloat16)
        w_bf16 = weight_out_in(layer.base_layer)
        g = torch.Generator().manual_seed(5)
        # ||s b a|| is about 1e-3 of ||W0||: below bf16's resolution for most entries of W0.
        b, a = set_live(layer, g, scale=0.01)
        layer.merge_live()
        layer.reinit_live()
        assert torch.equal(weight_out_in(layer.base_layer), w_bf16)  # the weight was not touched
        expected = ALPHA * (b @ a)  # float64, from the factors the test wrote
        assert expected.norm() / w_bf16.norm() < 2e-3
        torch.testing.assert_close(layer.delta_weight().to(torch.float64), expected, rtol=1e-6, atol=1e-9)
        # eq. (6)'s denominator sees the update too: ||W0 + s b a|| in float64.
        torch.testing.assert_close(layer.merged_weight_norm().to(torch.float64), (w_bf16 + expected).norm(),
                                   rtol=1e-6, atol=0)
