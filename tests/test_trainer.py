"""The Hugging Face Trainer callback drives the controller and its schedule, and stops the Trainer."""

import functools
import json
import os

import pytest
import torch
from conftest import synthetic_batches, tiny_bert
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from aroma_peft import AromaConfig, AromaController, AromaModel, get_aroma_model, lr_factor
from aroma_peft.integrations.trainer import AromaCallback, AromaTrainer


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def rows(n_batches=20):
    out = []
    for b in synthetic_batches(n_batches):
        for i in range(len(b["labels"])):
            out.append({k: v[i] for k, v in b.items()})
    return out


def make_trainer(tmp_path, max_steps=600, eps_out=0.1):
    config = AromaConfig(target_modules=["query", "key", "value", "dense"], exclude_modules=["pooler.dense"],
                         modules_to_save=["classifier"], max_steps=max_steps, max_inner_steps=20, eps_out=eps_out,
                         warmup_steps=10, restart_warmup_steps=5, train_heads_after_convergence=False)
    model = get_aroma_model(tiny_bert(), config)
    controller = AromaController(model)
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    scheduler = controller.attach_optimizer(optimizer)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=max_steps,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(rows()),
                      optimizers=(optimizer, scheduler), callbacks=[AromaCallback(controller)])
    return trainer, controller


def test_trainer_stops_when_every_module_converged_and_follows_the_schedule(tmp_path):
    trainer, controller = make_trainer(tmp_path)
    trainer.train()
    assert controller.finished
    assert trainer.state.global_step == controller.loop.step_count < 600
    assert all(row["converged"] for row in controller.summary())
    assert max(controller.model.ranks().values()) > 1
    # The learning rate logged at each step is the schedule's value for that step's restart point.
    merge_steps = [h["step"] for h in controller.history[1:] if h["total_rank"] > 0]
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    first_restart = merge_steps[0]
    assert logged[first_restart + 1] == pytest.approx(1e-2 * lr_factor(
        first_restart, max_steps=600, warmup_steps=10, restart_step=first_restart, restart_warmup_steps=5))


def test_trainer_with_another_scheduler_is_refused(tmp_path):
    trainer, controller = make_trainer(tmp_path, max_steps=20)
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    with pytest.raises(ValueError, match="not the controller's AromaLRSchedule"):
        trainer.train()


def resumable_trainer(out, max_steps=45, save_steps=25, poison_step=None, eval_dataset=None, reinit="kaiming", **args_kw):
    config = AromaConfig(target_modules=["query", "value", "intermediate.dense"], modules_to_save=["classifier"],
                         max_steps=max_steps, check_interval=5, max_inner_steps=10, eps_out=0.05,
                         warmup_steps=4, restart_warmup_steps=2, train_heads_after_convergence=False, reinit=reinit)
    model = get_aroma_model(tiny_bert(), config)
    if poison_step is not None:  # the loss of the poison_step-th training forward is NaN
        forward, calls = model.forward, []

        @functools.wraps(forward)  # the Trainer reads the signature to pick dataset columns
        def poisoned(**batch):
            out = forward(**batch)
            calls.append(1)
            if len(calls) == poison_step:
                out.loss = out.loss * float("nan")
            return out
        model.forward = poisoned
    controller = AromaController(model)
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    scheduler = controller.attach_optimizer(optimizer)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=16, max_steps=max_steps,
                             logging_steps=1, save_strategy="steps", save_steps=save_steps, report_to=[],
                             use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, **args_kw)
    trainer = AromaTrainer(model=model, args=args, train_dataset=ListDataset(rows(8)), eval_dataset=eval_dataset,
                           optimizers=(optimizer, scheduler), callbacks=[AromaCallback(controller)])
    return trainer, controller


@pytest.mark.parametrize("reinit", ["kaiming", "gradient"])
def test_resume_from_a_trainer_checkpoint_continues_the_same_inner_loop(tmp_path, reinit):
    # Step 27: two steps into a window of reinit="gradient" (inner checks every 5 steps), whose
    # sketches travel in trainer_state.json.
    ref, ref_ctrl = resumable_trainer(tmp_path / "ref", save_steps=27, reinit=reinit)
    ref.train()
    merges = [h["step"] for h in ref_ctrl.history[1:]]
    assert merges and merges[0] == 10 and merges[-1] > 27  # decisions on both sides of the checkpoint
    checkpoint = tmp_path / "ref" / "checkpoint-27"
    assert checkpoint.is_dir()

    resumed, ctrl = resumable_trainer(tmp_path / "resumed", save_steps=27, reinit=reinit)
    assert ctrl.loop.step_count == 0
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert ctrl.loop.inner_step == ref_ctrl.loop.inner_step
    assert ctrl.history == ref_ctrl.history
    assert ctrl.loop.state_dict() == ref_ctrl.loop.state_dict()
    ref_state, state = ref_ctrl.model.state_dict(), ctrl.model.state_dict()
    for k in ref_state:
        assert torch.equal(ref_state[k], state[k]), k


def test_a_nan_gradient_in_the_trainer_skips_the_step(tmp_path):
    trainer, controller = resumable_trainer(tmp_path, max_steps=12, save_steps=100, poison_step=3)
    seen = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = [p.detach().clone() for p in controller.model.adapter_parameters()]

    trainer.add_callback(Snapshot())
    with pytest.warns(RuntimeWarning, match="non-finite gradient .* at step 3: step skipped"):
        trainer.train()
    assert controller.nonfinite.skipped == [3]
    assert controller.loop.step_count == trainer.state.global_step - 1 == 11
    assert controller.scheduler.last_epoch == 11
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))  # the skipped step moved nothing
    assert not all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))
    assert all(torch.isfinite(p).all() for p in controller.model.adapter_parameters())


# ------------------------------------------------------------------------------------------ what a checkpoint holds
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "aroma_adapter.json", "aroma_controller.json"}
BASE_WEIGHTS = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def logits_of(model):
    model.eval()
    with torch.no_grad():
        batch = synthetic_batches(1, seed=7)[0]
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def full_model_bytes(model, tmp_path):
    """What the plain Trainer writes for a non-PreTrainedModel: its whole state_dict as safetensors."""
    path = tmp_path / "full.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


class TestAdapterCheckpoints:
    def test_checkpoints_and_save_model_hold_the_adapter_not_the_base_model(self, tmp_path):
        trainer, controller = resumable_trainer(tmp_path / "run", max_steps=30, save_steps=15)
        trainer.train()
        trainer.save_model(str(tmp_path / "final"))
        full = full_model_bytes(controller.model, tmp_path)
        expected = logits_of(controller.model)
        for folder in (tmp_path / "run" / "checkpoint-30", tmp_path / "final"):
            files = {p.name for p in folder.iterdir()}
            assert ADAPTER_FILES <= files and not files & BASE_WEIGHTS, (folder, files)
            adapter_bytes = sum((folder / f).stat().st_size for f in ADAPTER_FILES)
            assert adapter_bytes < full / 5, (adapter_bytes, full)
            assert json.loads((folder / "aroma_controller.json").read_text()) == json.loads(
                json.dumps(controller.state_dict()))
            loaded = AromaModel.from_pretrained(tiny_bert(), folder)
            assert loaded.ranks() == controller.model.ranks() and sum(loaded.ranks().values()) > 0
            torch.testing.assert_close(logits_of(loaded), expected, rtol=0, atol=1e-6)

    def test_a_run_resumed_from_an_adapter_checkpoint_equals_the_uninterrupted_run(self, tmp_path):
        ref, ref_ctrl = resumable_trainer(tmp_path / "ref", max_steps=40, save_steps=20)
        ref.train()
        checkpoint = tmp_path / "ref" / "checkpoint-20"
        assert not {p.name for p in checkpoint.iterdir()} & BASE_WEIGHTS
        assert json.loads((checkpoint / "aroma_adapter.json").read_text())["modules"]  # merged ranks at step 20
        assert any(h["step"] <= 20 for h in ref_ctrl.history[1:]) and any(h["step"] > 20 for h in ref_ctrl.history)

        resumed, ctrl = resumable_trainer(tmp_path / "resumed", max_steps=40, save_steps=20)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.state.global_step == ref.state.global_step == 40
        assert ctrl.history == ref_ctrl.history and ctrl.loop.state_dict() == ref_ctrl.loop.state_dict()
        assert ctrl.model.ranks() == ref_ctrl.model.ranks()
        torch.testing.assert_close(logits_of(ctrl.model), logits_of(ref_ctrl.model), rtol=0, atol=1e-6)

    def test_the_trainers_push_to_hub_uploads_only_the_adapter(self, tmp_path, monkeypatch):
        import transformers.trainer

        trainer, controller = resumable_trainer(tmp_path / "run", max_steps=10, save_steps=100)
        trainer.train()
        uploaded = {}

        def upload_folder(repo_id, folder_path, **kwargs):  # the network is never reached
            uploaded[repo_id] = sorted(p.name for p in os.scandir(folder_path) if p.is_file())

        monkeypatch.setattr(transformers.trainer, "upload_folder", upload_folder)
        monkeypatch.setattr(trainer, "create_model_card", lambda **kwargs: None)
        trainer.hub_model_id = "someone/aroma-tiny-bert"  # as init_hf_repo would set it; no repo is created
        trainer.args.push_to_hub = True
        trainer.push_to_hub()
        files = set(uploaded["someone/aroma-tiny-bert"])
        assert ADAPTER_FILES <= files and not files & BASE_WEIGHTS, files
        assert sum((tmp_path / "run" / f).stat().st_size for f in files) < full_model_bytes(controller.model, tmp_path) / 5

    def test_load_best_model_at_end_loads_the_best_checkpoints_adapter_and_decisions(self, tmp_path):
        """The Trainer looked for the base model's weight files in the best checkpoint."""
        # the highest eval loss is the best: an early checkpoint, not the last one
        trainer, controller = resumable_trainer(tmp_path / "run", max_steps=45, save_steps=10,
                                                eval_dataset=ListDataset(rows(2)), eval_strategy="steps",
                                                eval_steps=10, load_best_model_at_end=True,
                                                metric_for_best_model="loss", greater_is_better=True,
                                                label_names=["labels"])
        trainer.train()
        best = trainer.state.best_model_checkpoint
        assert best is not None and not best.endswith("checkpoint-45"), best
        expected = AromaModel.from_pretrained(tiny_bert(), best)
        assert controller.model.ranks() == expected.ranks() != {n: 0 for n in expected.ranks()}
        torch.testing.assert_close(logits_of(controller.model), logits_of(expected), rtol=0, atol=1e-6)
        saved = json.loads((tmp_path / "run" / os.path.basename(best) / "aroma_controller.json").read_text())
        assert controller.history == saved["history"] and controller.loop.state_dict() == saved["loop"]
        trainer.save_model(str(tmp_path / "final"))  # the best adapter, with its own decisions
        again = AromaModel.from_pretrained(tiny_bert(), tmp_path / "final")
        torch.testing.assert_close(logits_of(again), logits_of(expected), rtol=0, atol=1e-6)

    def test_a_plain_trainer_writing_the_whole_model_is_warned_about(self, tmp_path):
        trainer, controller = resumable_trainer(tmp_path, max_steps=6, save_steps=6)
        trainer.__class__ = Trainer
        with pytest.warns(RuntimeWarning, match=r"checkpoint-6 holds the whole model.*use AromaTrainer"):
            trainer.train()


WORLD = 2

TRAINER_DRIVER = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from safetensors.torch import save_file
from test_trainer import resumable_trainer

torch.set_num_threads(1)
out = sys.argv[2]
trainer, controller = resumable_trainer(out, max_steps=60, save_steps=1000)
decisions, loop_step = [], controller.loop.step
def record(norms, ratios):
    decision = loop_step(norms, ratios)
    decisions.append(decision.__dict__)
    return decision
controller.loop.step = record
trainer.train()
rank = trainer.args.process_index
state = {k: v.detach().contiguous() for k, v in controller.model.state_dict().items()}
save_file(state, f"{out}/rank{rank}.safetensors")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"decisions": decisions, "history": controller.history, "global_step": trainer.state.global_step,
               "world": trainer.args.world_size, "ddp": type(trainer.model_wrapped).__name__}, f)
"""


def test_the_trainer_under_torchrun_takes_the_same_decisions_on_every_process(tmp_path):
    import subprocess
    import sys

    (tmp_path / "driver.py").write_text(TRAINER_DRIVER)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                           str(tmp_path / "driver.py"), tests_dir, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [(log["world"], log["ddp"]) for log in logs] == [(WORLD, "DistributedDataParallel")] * WORLD
    # The Trainer wraps an AromaModel (not a PreTrainedModel) with find_unused_parameters=True: freezing works.
    assert logs[0]["decisions"] == logs[1]["decisions"] and logs[0]["history"] == logs[1]["history"]
    assert logs[0]["global_step"] == logs[1]["global_step"]
    merges = {d["step"] for d in logs[0]["decisions"] if d["merged"]}
    freezes = {d["step"] for d in logs[0]["decisions"] if d["converged"]}
    assert len(merges) >= 2 and freezes and min(freezes) < logs[0]["global_step"]  # trained on after a freeze
    tensors = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key  # replicas bit-identical


# ------------------------------------------------------------------------------------------ silent failures
def small_config(max_steps=12, **overrides):
    kw = dict(target_modules=["query", "value", "intermediate.dense"], modules_to_save=["classifier"],
              max_steps=max_steps, check_interval=2, max_inner_steps=4, eps_out=1e-4, warmup_steps=2,
              restart_warmup_steps=1)
    return AromaConfig(**(kw | overrides))


def small_args(out, max_steps=12, **overrides):
    kw = dict(output_dir=str(out), per_device_train_batch_size=16, max_steps=max_steps, logging_steps=1,
              save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return TrainingArguments(**(kw | overrides))


class TestTrainerMisuse:
    def test_a_trainer_without_the_callback_stops_at_its_second_step(self, tmp_path):
        model = get_aroma_model(tiny_bert(), small_config())
        controller = AromaController(model)
        optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
        trainer = Trainer(model=model, args=small_args(tmp_path), train_dataset=ListDataset(rows(2)),
                          optimizers=(optimizer, controller.attach_optimizer(optimizer)))
        with pytest.raises(RuntimeError, match=r"optimizer step 2 without controller\.step\(\).*AromaCallback"):
            trainer.train()
        assert controller.loop.step_count == 0

    def test_a_trainer_without_a_controller_stops_at_its_second_step(self, tmp_path):
        model = get_aroma_model(tiny_bert(), small_config())
        trainer = Trainer(model=model, args=small_args(tmp_path), train_dataset=ListDataset(rows(2)))
        with pytest.raises(RuntimeError, match=r"taking step 2 of the live factors without an AromaController.*AromaCallback"):
            trainer.train()
        assert trainer.state.global_step == 1

    def test_a_model_whose_factors_were_replaced_does_not_object_to_their_old_objects(self):
        """The guard reads the factors a model has now. Ids kept from construction went stale when a
        factor was replaced, and a freed id reused by another model's parameter made a live, uncontrolled
        model raise at a step it was not in (seen as an order-dependent failure of the test suite)."""
        idle = get_aroma_model(tiny_bert(), small_config())  # uncontrolled, alive, never trained
        layer = next(iter(idle.aroma_layers.values()))
        old_a, old_b = layer.lora_A, layer.lora_B
        layer.lora_A = torch.nn.Parameter(old_a.detach().clone())  # as load_state_dict(assign=True) does
        layer.lora_B = torch.nn.Parameter(old_b.detach().clone())
        optimizer = torch.optim.SGD([old_a, old_b], lr=0.1)  # another owner's tensors, at the old ids
        for _ in range(3):
            (old_a.sum() + old_b.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
        live = torch.optim.SGD([layer.lora_A], lr=0.1)  # its live factor: the guard still holds
        layer.lora_A.grad = torch.ones_like(layer.lora_A)
        live.step()
        with pytest.raises(RuntimeError, match="taking step 2 of the live factors without an AromaController"):
            live.step()

    def test_gradient_accumulation_with_the_callback_steps_the_controller_once_per_optimizer_step(self, tmp_path):
        model = get_aroma_model(tiny_bert(), small_config())
        controller = AromaController(model)
        optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
        trainer = Trainer(model=model, args=small_args(tmp_path, gradient_accumulation_steps=3),
                          train_dataset=ListDataset(rows(6)), optimizers=(optimizer, controller.attach_optimizer(optimizer)),
                          callbacks=[AromaCallback(controller)])
        trainer.train()
        assert controller.loop.step_count == trainer.state.global_step == 12
        assert sum(model.ranks().values()) > 0

    def test_trainer_max_steps_must_be_the_controllers_T(self, tmp_path):
        model = get_aroma_model(tiny_bert(), small_config(max_steps=50))
        controller = AromaController(model)
        optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
        trainer = Trainer(model=model, args=small_args(tmp_path, max_steps=6), train_dataset=ListDataset(rows(2)),
                          optimizers=(optimizer, controller.attach_optimizer(optimizer)),
                          callbacks=[AromaCallback(controller)])
        with pytest.raises(ValueError, match=r"the Trainer runs 6 optimizer steps .* T = max_steps = 50"):
            trainer.train()
        assert trainer.state.global_step == 0


def factor_grads(model, batch):
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


class TestGradientCheckpointing:
    def test_reentrant_checkpointing_enabled_through_the_model_gives_the_plain_gradients(self):
        batch = synthetic_batches(1)[0]
        reference = get_aroma_model(tiny_bert(), small_config())
        for layer in reference.aroma_layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.1, generator=torch.Generator().manual_seed(layer.index))
        expected = factor_grads(reference, batch)

        model = get_aroma_model(tiny_bert(), small_config())
        model.load_state_dict(reference.state_dict())
        model.gradient_checkpointing_enable()  # what the Trainer calls: transformers' default is reentrant
        assert model.base_model.is_gradient_checkpointing
        grads = factor_grads(model, batch)
        assert grads.keys() == expected.keys() and len(grads) == 2 * 6 + 2
        for name in grads:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)

    def test_a_trainer_with_gradient_checkpointing_merges_components(self, tmp_path):
        model = get_aroma_model(tiny_bert(), small_config())
        controller = AromaController(model)
        optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
        trainer = Trainer(model=model, args=small_args(tmp_path, gradient_checkpointing=True),
                          train_dataset=ListDataset(rows(2)), optimizers=(optimizer, controller.attach_optimizer(optimizer)),
                          callbacks=[AromaCallback(controller)])
        trainer.train()
        assert trainer.state.global_step == 12
        assert all(rank >= 2 for rank in model.ranks().values())  # eq. (6) never held at eps_out 1e-4
        assert all(check["eq6_ratio"] and min(check["eq6_ratio"]) > 0 for check in controller.outer_checks)

    def test_no_gradient_reaching_the_factors_is_an_error_that_names_reentrant_checkpointing(self):
        model = get_aroma_model(tiny_bert(), small_config())
        model.base_model.gradient_checkpointing_enable()  # on the base, after wrapping: the inputs need no grad
        optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
        controller = AromaController(model, optimizer)
        model.train()
        pattern = (r"no gradient reached the live factors of 6 module\(s\) .*bert\.encoder\.layer\.0\.attention\.self\.query"
                   r".*reentrant gradient checkpointing.*use_reentrant.*False.*enable_input_require_grads")
        with pytest.raises(RuntimeError, match=pattern):
            for batch in synthetic_batches(4):
                model(**batch).loss.backward()
                optimizer.step()
                controller.scheduler.step()
                optimizer.zero_grad()
                controller.step()
        assert controller.loop.step_count == 4 and sum(model.ranks().values()) == 0
