"""reinit="gradient": the new a after a merge is the top right singular vector of the module's weight
gradient over the window before the merge, checked against gradients that autograd computes for W0."""

import math

import pytest
import torch
from conftest import save_and_resume, synthetic_batches, tiny_bert, train_steps
from torch import nn

from aroma_peft import AromaConfig, AromaController, get_aroma_model, load_controller_state
from aroma_peft.grad_sketch import GradientSketch
from aroma_peft.seeds import derived_seed

TARGETS = ["query", "value", "intermediate.dense"]


def make(**overrides):
    kw = dict(target_modules=TARGETS, modules_to_save=["classifier"], max_steps=80, max_inner_steps=20,
              check_interval=10, eps_in=0.1, eps_out=1e-9, warmup_steps=5, restart_warmup_steps=3, reinit="gradient")
    kw.update(overrides)
    model = get_aroma_model(tiny_bert(0), AromaConfig(**kw))
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    return model, opt, AromaController(model, opt)


def top_right(g: torch.Tensor) -> torch.Tensor:
    v = torch.linalg.svd(g.double())[2][0]
    return (v * torch.sign(v[v.abs().argmax()])).float()


def kaiming_norm(layer, component: int) -> float:
    g = torch.Generator().manual_seed(derived_seed(layer.seed, layer.index, component, 0))
    a = torch.empty(layer.lora_A.shape)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
    return torch.linalg.vector_norm(a).item()


def test_the_sketch_finds_the_top_right_singular_vector_of_the_summed_gradient():
    torch.manual_seed(0)
    n_out, n_in = 40, 24
    u, v = torch.randn(n_out, 3), torch.randn(3, n_in)
    sketch = GradientSketch(n_in, n_out, r=1, seed=0, index=0)
    total = torch.zeros(n_out, n_in)
    for step in range(4):
        for _ in range(2):  # two micro-batches of one step add up
            x = torch.randn(50, n_in)
            d = x @ v.T @ torch.diag(torch.tensor([4.0, 2.0, 1.0])) @ u.T / 50 + 0.01 * torch.randn(50, n_out)
            sketch.add(x.reshape(5, 10, n_in), d.reshape(5, 10, n_out))  # (batch, tokens, features) as a layer sees
            total += d.T @ x
        sketch.commit()
    x = torch.randn(50, n_in)
    sketch.add(x, torch.randn(50, n_out) * 100)  # a skipped step: discarded, never in the window
    sketch.discard()
    est = sketch.top_right(1)
    assert est.shape == (1, n_in)
    assert torch.dot(est[0], top_right(total)).item() > 0.9999  # same direction and the same sign
    sketch.clear()
    assert sketch.top_right(1) is None  # nothing in the window


@pytest.mark.parametrize("mode", ["gradient", "gradient-sign"])
def test_after_each_merge_a_is_the_top_direction_of_the_gradient_of_the_last_check_interval_steps(mode):
    model, opt, ctrl = make(reinit=mode)
    layers = ctrl.layers
    for layer in layers:  # autograd's dL/dW0, the independent computation (the plain forward path)
        layer.base_layer.weight.requires_grad_(True)
    data = synthetic_batches(10)
    grads = []  # per step: each layer's dL/dW0
    model.train()
    merges = 0
    for step in range(80):
        loss = model(**data[step % len(data)]).loss
        loss.backward()
        grads.append([layer.base_layer.weight.grad.clone() for layer in layers])
        for layer in layers:
            layer.base_layer.weight.grad = None
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        ranks = [layer.rank for layer in layers]
        ctrl.step()
        if ctrl.finished:
            break
        if ctrl.loop.inner_step == 0:  # the inner loop ended at this step: every module merged
            merges += 1
            # eps_in 0.1 checks at inner steps 10 and 20: the window is the last 10 steps
            for i, layer in enumerate(layers):
                assert layer.rank == ranks[i] + 1
                expected = top_right(sum(g[i] for g in grads[-10:]))
                a = layer.lora_A.detach()[0]
                if mode == "gradient":
                    assert torch.dot(a / a.norm(), expected).item() > 0.999, (step, ctrl.names[i])
                else:  # the signs of that vector, every entry of one size
                    big = expected.abs() > 0.05 / layer.in_features ** 0.5  # signs that the sketch's error cannot flip
                    assert torch.equal(torch.sign(a)[big], torch.sign(expected)[big]), (step, ctrl.names[i])
                    assert big.float().mean() > 0.8
                    torch.testing.assert_close(a.abs(), torch.full_like(a, a.abs()[0].item()))
                assert a.norm().item() == pytest.approx(kaiming_norm(layer, layer.num_merged), rel=1e-5)
                assert torch.count_nonzero(layer.lora_B) == 0
    assert merges >= 3


def test_reinit_previous_keeps_the_merged_a_restarts_b_and_the_next_step_is_a_fresh_one():
    """reinit="previous" (a diagnostic): after each merge a is the merged component's trained a, b is 0,
    the model's function is unchanged, and the first step moves b by a fresh Adam step (lr at the
    restarted warmup's first rate) while a, with b = 0, gets no gradient."""
    model, opt, ctrl = make(reinit="previous", reset="zero")
    layers = ctrl.layers
    assert all(layer.grad_sketch is None for layer in layers)  # no sketch for this mode
    data = synthetic_batches(10)
    probe = data[0]
    model.train()
    merges = 0
    for step in range(80):
        model(**data[step % len(data)]).loss.backward()
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        trained_a = [layer.lora_A.detach().clone() for layer in layers]
        model.eval()
        with torch.no_grad():
            before = model(**probe).logits
        model.train()
        ctrl.step()
        if ctrl.finished:
            break
        if ctrl.loop.inner_step == 0:  # every module merged at this step
            merges += 1
            for i, layer in enumerate(layers):
                assert torch.equal(layer.lora_A.detach(), trained_a[i])
                assert torch.equal(layer.merged_A[-1:], trained_a[i])
                assert torch.count_nonzero(layer.lora_B) == 0
            model.eval()
            with torch.no_grad():
                torch.testing.assert_close(model(**probe).logits, before, rtol=1e-5, atol=1e-6)
            model.train()
            # the first step of the new component, against a fresh Adam step
            lr = opt.param_groups[0]["lr"]
            model(**data[(step + 1) % len(data)]).loss.backward()
            grad_b = [layer.lora_B.grad.clone() for layer in layers]
            assert all(torch.count_nonzero(layer.lora_A.grad) == 0 for layer in layers)  # b = 0: no gradient for a
            opt.step(); ctrl.scheduler.step(); opt.zero_grad()
            wd, eps = opt.param_groups[0]["weight_decay"], opt.param_groups[0]["eps"]
            for i, layer in enumerate(layers):
                torch.testing.assert_close(layer.lora_A.detach(), trained_a[i] * (1 - lr * wd), rtol=1e-6, atol=0)
                fresh = -lr * grad_b[i] / (grad_b[i].abs() + eps)  # Adam's first step from zeroed moments
                torch.testing.assert_close(layer.lora_B.detach(), fresh, rtol=1e-4, atol=1e-9)
            ctrl.step()
    assert merges >= 3


def test_resume_mid_window_is_bitwise_the_same_run(tmp_path):
    data = synthetic_batches(10)
    ref = make()
    train_steps(*ref, data, 0, 60)
    model, opt, ctrl = make()
    train_steps(model, opt, ctrl, data, 0, 35)  # 5 steps into the window of the second inner loop
    assert ctrl.loop.inner_step % 10 == 5 and ctrl.sketches[0].y.abs().max() > 0  # 5 steps into a window
    model, opt, ctrl = save_and_resume(tmp_path, model, opt, ctrl)
    train_steps(model, opt, ctrl, data, 35, 60)
    assert ctrl.history == ref[2].history
    ref_state, state = ref[0].state_dict(), model.state_dict()
    for k in ref_state:
        assert torch.equal(ref_state[k], state[k]), k


def test_a_kaiming_checkpoint_does_not_resume_a_gradient_run(tmp_path):
    model, opt, ctrl = make(reinit="kaiming")
    model.save_pretrained(tmp_path / "ckpt", controller=ctrl)
    _, _, gradient_ctrl = make()
    with pytest.raises(ValueError, match="no gradient sketches.*reinit='kaiming'"):
        gradient_ctrl.load_state_dict(load_controller_state(tmp_path / "ckpt"))


def test_reinit_is_validated():
    with pytest.raises(ValueError, match=r"AromaConfig.reinit='svd' is invalid: expected one of \('kaiming', 'gradient', 'gradient-sign', 'previous', 'offset'\)"):
        AromaConfig(reinit="svd")


def test_rank_two_components_of_a_gpt2_conv1d_take_the_top_two_directions():
    """r = 2 on transformers' Conv1D (weight stored in x out): the two rows of a lie in the top-2 right
    singular subspace of the window's gradient, orthogonal, each at half the Kaiming draw's squared norm."""
    from conftest import tiny_gpt2

    config = AromaConfig(target_modules=["c_attn", "c_fc"], r=2, max_steps=40, max_inner_steps=20, check_interval=10,
                         eps_in=0.1, eps_out=1e-9, warmup_steps=5, restart_warmup_steps=3, reinit="gradient")
    model = get_aroma_model(tiny_gpt2(0), config)
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    ctrl = AromaController(model, opt)
    layers = ctrl.layers
    assert all(layer.is_conv1d for layer in layers)
    for layer in layers:
        layer.base_layer.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    grads, merged = [], False
    model.train()
    for step in range(40):
        ids = torch.randint(0, 64, (8, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([layer.base_layer.weight.grad.T.clone() for layer in layers])  # Conv1D: (in, out) -> (out, in)
        for layer in layers:
            layer.base_layer.weight.grad = None
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        ctrl.step()
        if ctrl.loop.inner_step == 0 and not ctrl.finished:
            merged = True
            for i, layer in enumerate(layers):
                window = sum(gr[i] for gr in grads[-10:]).double()
                sv = torch.linalg.svdvals(window)
                a = layer.lora_A.detach().double()
                # How much of the gradient the two rows capture, against the best two directions
                # (sigma_1^2 + sigma_2^2): 1 for an exact SVD. The single-pass sketch (k = r + 7
                # columns) is close where the spectrum decays (c_attn: the top two hold 68 % of the
                # energy, captured 0.96-0.98) and rougher where it is flat (c_fc: 41 %, captured 0.79);
                # two random rows would capture about 2/32 of the whole.
                captured = (torch.linalg.matrix_norm(window @ torch.linalg.qr(a.T)[0]) ** 2 / (sv[:2] ** 2).sum()).item()
                top_share = ((sv[:2] ** 2).sum() / (sv ** 2).sum()).item()
                assert captured > (0.9 if top_share > 0.6 else 0.75), (ctrl.names[i], captured, top_share)
                torch.testing.assert_close(a.float() @ a.float().T, torch.eye(2) * kaiming_norm(layer, layer.num_merged) ** 2 / 2,
                                           rtol=0, atol=1e-5)
    assert merged
