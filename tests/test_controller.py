"""AromaController on a tiny random-initialized BERT and a learnable synthetic task (no download)."""

import pytest
import torch
from conftest import save_and_resume, synthetic_batches, tiny_bert

from aroma_peft import AromaConfig, AromaController, get_aroma_model, lr_factor

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def make(config_overrides=None, seed=0, lr=1e-2):
    kw = dict(target_modules=TARGETS, modules_to_save=["classifier"], max_steps=600, max_inner_steps=20,
              eps_out=0.1, warmup_steps=10, restart_warmup_steps=5, train_heads_after_convergence=False)
    kw.update(config_overrides or {})
    model = get_aroma_model(tiny_bert(seed), AromaConfig(**kw))
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=lr)
    return model, opt, AromaController(model, opt)


def train(model, opt, ctrl, data, steps, start=0, on_step=None):
    model.train()
    losses = []
    for step in range(start, start + steps):
        loss = model(**data[step % len(data)]).loss
        loss.backward()
        losses.append(loss.item())
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        before = on_step(step) if on_step else None
        done = ctrl.step()
        if on_step:
            on_step(step, before)
        if done:
            break
    return losses


def probe_logits(model):
    """The model's logits on a fixed batch, in eval mode (the function the model computes)."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=synthetic_batches(1, seed=99)[0]["input_ids"]).logits
    model.train()
    return logits


def test_end_to_end_loss_falls_ranks_grow_modules_freeze_and_training_stops_itself():
    model, opt, ctrl = make()
    data = synthetic_batches(20)
    losses = train(model, opt, ctrl, data, 600)
    assert ctrl.finished and ctrl.loop.step_count < 600  # stopped by convergence, before T
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    ranks = list(model.ranks().values())
    assert max(ranks) > 1
    assert all(row["converged"] for row in ctrl.summary())
    trainable = [h["trainable_params"] for h in ctrl.history]
    assert trainable[0] > trainable[-1] and trainable == sorted(trainable, reverse=True)
    assert len(set(trainable)) > 2  # modules froze at different outer steps
    head = sum(p.numel() for p in model.base_model.classifier.parameters())
    assert trainable[-1] == head  # every adapter factor has left the count
    assert ctrl.history[-1]["total_rank"] == sum(ranks)
    # outer_checks: one entry per inner-loop end; the converged ones are the modules that froze there,
    # and a module's final rank is the number of its checks that did not converge it.
    checks = ctrl.outer_checks
    assert [c["step"] for c in checks] == sorted(c["step"] for c in checks) and checks[-1]["step"] == ctrl.loop.step_count
    assert sum(c["inner_steps"] for c in checks) == ctrl.loop.step_count
    assert all(c["inner_steps"] <= 20 for c in checks)
    for i, rank in enumerate(ranks):
        seen = [c for c in checks if i in c["modules"]]
        assert sum(i not in c["converged"] for c in seen) == rank
        assert i in seen[-1]["converged"] and all(i not in c["converged"] for c in seen[:-1])
        ratio = seen[-1]["eq6_ratio"][seen[-1]["modules"].index(i)]
        assert ratio < 0.1 and all(c["eq6_ratio"][c["modules"].index(i)] >= 0.1 for c in seen[:-1])  # eq. (6)


def test_merge_does_not_change_the_function_and_restarts_warmup():
    # With eps_out tiny nothing converges: every inner-loop end merges and re-initializes
    # (b = 0), which must leave the model's output unchanged, and restarts the warmup.
    model, opt, ctrl = make({"eps_out": 1e-9, "max_steps": 100})
    merges = []

    def on_step(step, before=None):
        logits = probe_logits(model)
        if before is None:
            return logits
        if not ctrl.finished and ctrl.loop.inner_step == 0 and ctrl.history[-1]["step"] == step + 1:
            merges.append(step + 1)
            torch.testing.assert_close(logits, before, rtol=0, atol=1e-5)
            lr = opt.param_groups[0]["lr"]
            assert lr == pytest.approx(1e-2 * lr_factor(step + 1, max_steps=100, warmup_steps=10,
                                                        restart_step=step + 1, restart_warmup_steps=5))
            zeros = total = 0
            for layer in ctrl.layers:
                assert torch.count_nonzero(layer.lora_B) == 0
                for p in (layer.lora_A, layer.lora_B):
                    assert opt.state[p]["step"].item() == 0
                    for key in ("exp_avg", "exp_avg_sq"):
                        zeros += (opt.state[p][key] == 0).sum().item()
                        total += opt.state[p][key].numel()
            assert zeros / total >= 0.998

    train(model, opt, ctrl, synthetic_batches(10), 100, on_step=on_step)
    assert merges == [20, 40, 60, 80]


def test_heads_keep_training_after_all_modules_converge():
    model, opt, ctrl = make({"eps_out": 10.0, "max_steps": 60, "train_heads_after_convergence": True})
    data = synthetic_batches(10)
    train(model, opt, ctrl, data, 20)
    assert all(m.converged for m in ctrl.loop.modules) and not ctrl.finished
    head_before = model.base_model.classifier.weight.detach().clone()
    encoder_before = {n: p.detach().clone() for n, p in model.base_model.bert.named_parameters()}
    train(model, opt, ctrl, data, 40, start=20)
    assert ctrl.finished and ctrl.loop.step_count == 60
    assert not torch.equal(head_before, model.base_model.classifier.weight)
    for n, p in model.base_model.bert.named_parameters():
        assert torch.equal(encoder_before[n], p), n
        assert p.grad is None, n


def test_stops_at_max_steps_and_keeps_live_components():
    model, opt, ctrl = make({"eps_out": 1e-9, "max_steps": 30})
    data = synthetic_batches(10)
    probe = synthetic_batches(1, seed=5)[0]
    model.eval()
    train(model, opt, ctrl, data, 29)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=probe["input_ids"]).logits
    train(model, opt, ctrl, data, 1, start=29)
    model.eval()
    with torch.no_grad():
        after = model(input_ids=probe["input_ids"]).logits
    assert ctrl.finished and all(row["stopped_at_max_steps"] for row in ctrl.summary())
    # The last step's update itself changes the output; the stop keeps the live component, so the
    # returned model equals its trained state: check by recomputing with the merged weights only.
    assert all(layer.rank == 2 and not layer.active for layer in ctrl.layers)  # merged at 20, kept at 30
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe["input_ids"]).logits, after, rtol=0, atol=1e-5)
    assert not torch.equal(before, after)


def test_resume_mid_inner_loop_makes_the_same_decisions_and_weights(tmp_path):
    data = synthetic_batches(20)
    ref_model, ref_opt, ref_ctrl = make()
    train(ref_model, ref_opt, ref_ctrl, data, 300)

    model, opt, ctrl = make()
    train(model, opt, ctrl, data, 137)  # 137: in the middle of an inner loop (T_in = 20)
    assert ctrl.loop.inner_step == 17
    model, opt, ctrl = save_and_resume(tmp_path / "ckpt", model, opt, ctrl)
    train(model, opt, ctrl, data, 300 - 137, start=137)

    assert ctrl.history == ref_ctrl.history
    assert ctrl.loop.state_dict() == ref_ctrl.loop.state_dict()
    ref_state, state = ref_model.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], state[k]), k


def test_controller_needs_max_steps_and_an_aroma_model():
    model = get_aroma_model(tiny_bert(), AromaConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match=r"AromaConfig\.max_steps \(T\) is None"):
        AromaController(model)
    with pytest.raises(ValueError, match=r"max_steps=50 is invalid: expected an integer > warmup_steps=100"):
        AromaController(model, max_steps=50)
    with pytest.raises(TypeError, match="needs the AromaModel"):
        AromaController(tiny_bert(), max_steps=500)


def test_eq6_is_relative_to_the_weight_norm():
    # eq. (6) divides by ||W0 + s B A||_F: the same component on a base twice as large has half the
    # ratio, so eps_out must be set per model (docs/algorithm.md, "Setting eps_out").
    from aroma_peft import AromaLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=False)
    ratios = []
    for scale in (1.0, 2.0):
        lin = torch.nn.Linear(24, 16, bias=False)
        with torch.no_grad():
            lin.weight.copy_(base.weight * scale)
        layer = AromaLinear(lin, r=1, alpha=4.0, seed=3)
        with torch.no_grad():
            layer.lora_B.fill_(0.01)
        ratios.append(layer.outer_ratio().item())
        expected = 4.0 * torch.linalg.norm(layer.lora_B @ layer.lora_A) / torch.linalg.norm(base.weight * scale)
        assert ratios[-1] == pytest.approx(expected.item(), rel=1e-6)
    assert ratios[1] == pytest.approx(ratios[0] / 2, rel=1e-6)


def test_outer_criterion_update_gives_every_module_a_component_and_converges_on_the_update_ratio():
    model, opt, ctrl = make({"outer_criterion": "update", "eps_out": 0.5})
    data = synthetic_batches(20)
    ratios = {}

    def record(step, before=None):
        if before is None:  # before controller.step(): the ratio each module would be judged on
            return {i: layer.outer_ratio("update").item() for i, layer in enumerate(ctrl.layers) if layer.active}
        for check in ctrl.outer_checks:
            if check["step"] == step + 1:
                ratios[step + 1] = (before, check)

    train(model, opt, ctrl, data, 600, on_step=record)
    assert ctrl.finished and ratios
    for before, check in ratios.values():
        for i, logged in zip(check["modules"], check["eq6_ratio"]):
            if logged is None:  # first component: no merged update yet, so never converged
                assert before[i] == float("inf") and i not in check["converged"]
            else:
                assert logged == pytest.approx(before[i], rel=1e-6)
                assert (i in check["converged"]) == (logged < 0.5)
    assert min(model.ranks().values()) >= 1



@pytest.mark.parametrize("mode", ["merge", "discard"])
def test_a_converged_module_merges_or_discards_its_last_component(mode):
    # "merge": freezing leaves the function unchanged and every outer check adds a component;
    # "discard" (the paper): the last component is thrown away, so the output moves.
    model, opt, ctrl = make({"converged_component": mode})
    changes = []

    def on_step(step, before=None):
        logits = probe_logits(model)
        if before is None:
            return logits
        check = ctrl.outer_checks[-1] if ctrl.outer_checks else None
        if check is not None and check["step"] == step + 1 and check["converged"]:
            changes.append((logits - before).abs().max().item())

    train(model, opt, ctrl, synthetic_batches(20), 600, on_step=on_step)
    assert ctrl.finished and changes
    if mode == "merge":
        assert max(changes) <= 1e-5
        for i, rank in enumerate(model.ranks().values()):
            assert rank == sum(i in c["modules"] for c in ctrl.outer_checks)  # every component kept
    else:
        assert max(changes) > 1e-3
        for i, rank in enumerate(model.ranks().values()):
            assert rank == sum(i in c["modules"] for c in ctrl.outer_checks) - 1  # the last one discarded


def test_the_learning_rate_follows_a_cosine_to_its_floor_through_the_merges():
    # Every step's rate, merges and restarted warmups included, is the peak times ReLoRA's cosine
    # (down to 0.1 of the peak at T) times the warmup of the component being trained.
    import math

    T = 60
    model, opt, ctrl = make({"eps_out": 1e-9, "max_steps": T, "lr_decay": "cosine", "min_lr_ratio": 0.1})
    seen, envelopes, restart = [], [], 0

    def on_step(step, before=None):
        nonlocal restart
        if before is None:
            return True
        if ctrl.loop.inner_step == 0 and not ctrl.finished:
            restart = step + 1  # a merge: the next component warms up from here
        if ctrl.finished:
            return
        s = step + 1
        env = 1.0 if s <= 10 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / (T - 10)))
        warm = min(1.0, (s - restart + 1) / (10 if restart == 0 else 5))
        seen.append((opt.param_groups[0]["lr"], 1e-2 * env * warm))
        envelopes.append(env)

    train(model, opt, ctrl, synthetic_batches(10), T, on_step=on_step)
    assert len(ctrl.history) >= 3  # merges happened
    got, want = zip(*seen)
    assert got == pytest.approx(want)
    assert envelopes[-1] == pytest.approx(0.1, abs=1e-3)  # the last steps train at the floor, not at 0


class TestForgottenStep:
    def test_a_second_optimizer_step_without_controller_step_is_refused(self):
        model, opt, ctrl = make()
        data = synthetic_batches(3)
        model(**data[0]).loss.backward()
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        model(**data[1]).loss.backward()
        with pytest.raises(RuntimeError, match=r"optimizer step 2 without controller\.step\(\) \(the controller is at step 0\)"):
            opt.step()

    def test_gradient_accumulation_steps_the_controller_once_per_optimizer_step(self):
        model, opt, ctrl = make({"max_steps": 30, "check_interval": 2, "max_inner_steps": 4, "eps_out": 1e-4})
        data = synthetic_batches(4)
        for step in range(30):
            for micro in range(2):  # two backward passes, one optimizer step
                (model(**data[(2 * step + micro) % 4]).loss / 2).backward()
            opt.step(); ctrl.scheduler.step(); opt.zero_grad()
            done = ctrl.step()
        assert done and ctrl.loop.step_count == 30 and sum(model.ranks().values()) > 0
