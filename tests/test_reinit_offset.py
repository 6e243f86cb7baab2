"""reinit="offset": after a merge the new pair starts at the merged pair's norms and its product is
subtracted into the merged update, so the model's function is unchanged and the component's
contribution is s (b a - b0 a0). Every expected value is computed here in float64 from factors the test
recorded itself (never from the layer's merged buffers), or from Adam's first-step formula."""

import peft
import pytest
import torch
from conftest import save_and_resume, synthetic_batches, tiny_bert, train_steps
from test_layer import KINDS, build, make_input, reference, set_live, tolerance

from aroma_peft import AromaConfig, AromaController, get_aroma_model

TARGETS = ["query", "value", "intermediate.dense"]


def make(**overrides):
    kw = dict(target_modules=TARGETS, modules_to_save=["classifier"], max_steps=80, max_inner_steps=20,
              check_interval=10, eps_in=0.1, eps_out=1e-9, warmup_steps=5, restart_warmup_steps=3,
              reinit="offset", reset="zero")
    kw.update(overrides)
    model = get_aroma_model(tiny_bert(0), AromaConfig(**kw))
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    return model, opt, AromaController(model, opt)


def w_out_in(layer) -> torch.Tensor:
    w = layer.base_layer.weight.detach().double()
    return w.T if layer.is_conv1d else w


def test_each_merge_keeps_the_function_restarts_at_the_merged_norms_and_the_next_step_is_a_fresh_one():
    model, opt, ctrl = make()
    layers = ctrl.layers
    s = layers[0].scaling
    # W before the live component started, by our own bookkeeping: W0 + s sum_k (b_k a_k - b0_k a0_k)
    before_live = [w_out_in(layer).clone() for layer in layers]
    data = synthetic_batches(10)
    probe = data[0]
    model.train()
    merges = 0
    for step in range(80):
        model(**data[step % len(data)]).loss.backward()
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        pairs = [(layer.lora_B.detach().double().clone(), layer.lora_A.detach().double().clone()) for layer in layers]
        offsets = [(layer.offset_B.double().clone(), layer.offset_A.double().clone()) for layer in layers]
        for layer, (b, a), (b0, a0) in zip(layers, pairs, offsets):  # eqs. (5)/(6) read b a - b0 a0
            dense = torch.linalg.matrix_norm(b @ a - b0 @ a0)
            assert layer.live_norm().item() == pytest.approx(dense.item(), rel=1e-4, abs=1e-7)
        state = [(layer.rank, layer.num_merged) for layer in layers]
        model.eval()
        with torch.no_grad():
            before = model(**probe).logits
        model.train()
        ctrl.step()
        if ctrl.finished:
            break
        if ctrl.loop.inner_step != 0:
            continue
        merges += 1  # every module merged at this step
        for i, layer in enumerate(layers):
            (b, a), (b0_old, a0_old) = pairs[i], offsets[i]
            before_live[i] += s * (b @ a - b0_old @ a0_old)
            assert layer.rank == state[i][0] + 2  # the trained pair and the new offset term
            assert layer.num_merged == state[i][1] + 1  # offset terms are not components
            a0, b0 = layer.lora_A.detach().double(), layer.lora_B.detach().double()
            assert torch.linalg.vector_norm(a0).item() == pytest.approx(torch.linalg.vector_norm(a).item(), rel=1e-5)
            assert torch.linalg.vector_norm(b0).item() == pytest.approx(torch.linalg.vector_norm(b).item(), rel=1e-5)
            assert torch.equal(layer.offset_A, layer.lora_A.detach()) and torch.equal(layer.offset_B, layer.lora_B.detach())
            assert layer.live_norm().item() == 0.0  # nothing trained yet
            # the folded weight is W before the live component minus s b0 a0; eq. (6)'s denominator is its norm
            torch.testing.assert_close(w_out_in(layer), before_live[i] - s * b0 @ a0, rtol=0, atol=1e-5)
            assert layer.merged_weight_norm().item() == pytest.approx(torch.linalg.matrix_norm(before_live[i]).item(), rel=1e-5)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**probe).logits, before, rtol=1e-5, atol=1e-5)
        model.train()
        # the first step of the new component, against Adam's first step from zeroed moments
        lr = opt.param_groups[0]["lr"]
        start = [(layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for layer in layers]
        model(**data[(step + 1) % len(data)]).loss.backward()
        grads = [(layer.lora_A.grad.clone(), layer.lora_B.grad.clone()) for layer in layers]
        assert all(torch.count_nonzero(g_a) > 0 and torch.count_nonzero(g_b) > 0 for g_a, g_b in grads)  # b0 != 0
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        wd, eps = opt.param_groups[0]["weight_decay"], opt.param_groups[0]["eps"]
        for layer, (a0, b0), (g_a, g_b) in zip(layers, start, grads):
            for new, old, g in ((layer.lora_A, a0, g_a), (layer.lora_B, b0, g_b)):
                fresh = old * (1 - lr * wd) - lr * g / (g.abs() + eps)
                torch.testing.assert_close(new.detach(), fresh, rtol=1e-5, atol=1e-7)
                assert (new.detach() - old).abs().max() <= lr * (1 + 1e-3) + lr * wd * old.abs().max()
        ctrl.step()
    assert merges >= 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("merge_converged", [False, True])
def test_a_converged_component_with_an_offset_is_dropped_or_merged_whole(kind, merge_converged):
    layer, w0, bias, merged, _ = build(kind, r=1, n_merges=1, live=False)
    g = torch.Generator().manual_seed(5)
    first = set_live(layer, g)
    layer.merge_live()
    layer.reinit_offset()
    b0, a0 = layer.offset_B.double().clone(), layer.offset_A.double().clone()
    x = make_input(kind)
    ref = reference(x, w0, bias, merged + [first], None, 1)
    torch.testing.assert_close(layer(x).double(), ref, **tolerance(kind, ref))  # the function is unchanged
    second = set_live(layer, g)  # "trained"
    if merge_converged:
        layer.merge_live()
    layer.drop_live()
    assert layer.num_merged == (3 if merge_converged else 2)
    assert layer.rank == (4 if merge_converged else 2)
    assert not layer.has_offset and not layer.lora_A.requires_grad
    if merge_converged:  # W0 + s (first components + b a - b0 a0)
        ref = reference(x, w0, bias, merged + [first, second, (-b0, a0)], None, 1)
    torch.testing.assert_close(layer(x).double(), ref, **tolerance(kind, ref))


def test_offset_falls_back_to_the_plain_reinit_when_the_merged_pair_is_zero():
    layer, *_ = build("fp32_linear", r=1, n_merges=0, live=False)
    layer.merge_live()  # b = 0: nothing to match
    layer.reinit_offset()
    assert not layer.has_offset and torch.count_nonzero(layer.lora_B) == 0 and layer.rank == 1


def test_resume_mid_component_with_an_offset_is_bitwise_the_same_run(tmp_path):
    data = synthetic_batches(10)
    ref = make()
    train_steps(*ref, data, 0, 60)
    model, opt, ctrl = make()
    train_steps(model, opt, ctrl, data, 0, 35)
    assert all(layer.has_offset for layer in ctrl.layers)  # mid-component, after a merge
    merged = [layer.num_merged for layer in ctrl.layers]
    model, opt, ctrl = save_and_resume(tmp_path, model, opt, ctrl)
    assert [layer.num_merged for layer in model.aroma_layers.values()] == merged
    train_steps(model, opt, ctrl, data, 35, 60)
    assert ctrl.history == ref[2].history
    ref_state, state = ref[0].state_dict(), model.state_dict()
    assert set(ref_state) == set(state)
    for k in ref_state:
        assert torch.equal(ref_state[k], state[k]), k


def test_export_mid_component_with_an_offset_gives_peft_the_same_logits(tmp_path):
    data = synthetic_batches(10)
    model, opt, ctrl = make()
    train_steps(model, opt, ctrl, data, 0, 35)
    assert all(layer.has_offset for layer in ctrl.layers)
    model.eval()
    probe = data[0]
    with torch.no_grad():
        expected = model(**probe).logits
    model.export_lora(tmp_path / "lora")
    peft_model = peft.PeftModel.from_pretrained(tiny_bert(0), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**probe).logits, expected, rtol=0, atol=1e-5)


def test_a_checkpoint_written_before_offsets_existed_loads_with_no_offset(tmp_path):
    """A state dict without offset_A / offset_B / merged_count (an older checkpoint): no offset, and
    every merged term one trained component."""
    layer, *_ = build("fp32_linear", r=1, n_merges=3)
    state = {k: v for k, v in layer.state_dict().items() if k not in ("offset_A", "offset_B", "merged_count")}
    fresh, *_ = build("fp32_linear", r=1, n_merges=0)
    fresh.load_state_dict(state)
    assert fresh.num_merged == 3 and fresh.rank == 3 and not fresh.has_offset
