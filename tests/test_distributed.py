"""Data-parallel AROMA on 2 CPU processes (gloo): DDP and FSDP2 against one process with the same global batch.

Every process runs its own controller on its own replica (or shard); nothing is broadcast. The
runs cross five merges and freezes at three different steps, so the test sees every kind of
decision: eq. (6) on replicated or sharded factors, Merge & Reinit (seeded), the optimizer Reset
(seeded masks), freezing a module that DDP or FSDP2 was already wrapping. One batch has a NaN loss
on the second process only: every process skips that step.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import synthetic_batches, tiny_bert
from safetensors.torch import load_file, save_file
from test_cli import model_dir, mrpc_dir, write_mrpc  # noqa: F401  (fixtures: a tiny BERT with tokenizer, MRPC files)
from test_reset import check_first_updates, first_updates_after_merges
from test_train_resume import compare_with_one_process, launch_and_compare
from test_train_resume import options as run_options

from aroma_peft import AromaConfig, AromaController, AromaModel, get_aroma_model
from aroma_peft.cli import main
from aroma_peft.layer import full_tensor

WORLD = 2
STEPS = 24
GLOBAL_BATCH = 16


def build(reinit="kaiming"):
    # Calibrated on this tiny model: merges at steps 4, 8, 12, 16, 20; modules freeze at 12, 16 and 24
    # (eq. 6 ratios stay >= 0.006 away from eps_out, far above data-parallel rounding).
    config = AromaConfig(target_modules=["query", "value", "intermediate.dense"], modules_to_save=["classifier"],
                         eps_in=None, check_interval=2, max_inner_steps=4, eps_out=0.12, max_steps=STEPS,
                         warmup_steps=2, restart_warmup_steps=1, reinit=reinit)
    return get_aroma_model(tiny_bert(0), config)


POISONED_BATCH = 21  # its loss is NaN (on the last process): would-be step 22 is skipped everywhere


def train(model, forward, rank=0, world=1):
    """The README's loop on this process's slice of each global batch; returns every decision taken."""
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    controller = AromaController(model, optimizer)
    decisions, loop_step = [], controller.loop.step

    def record(norms, ratios):
        decision = loop_step(norms, ratios)
        decisions.append(dataclasses.asdict(decision))
        return decision
    controller.loop.step = record
    model.train()
    per_rank = GLOBAL_BATCH // world
    for i, batch in enumerate(synthetic_batches(STEPS + 1, batch_size=GLOBAL_BATCH)):
        local = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
        loss = forward(**local).loss
        if i == POISONED_BATCH and rank == world - 1:
            loss = loss * float("nan")
        loss.backward()
        if controller.skip_nonfinite_step(loss):
            optimizer.zero_grad()
            continue
        optimizer.step(); controller.scheduler.step(); optimizer.zero_grad()
        if controller.step():
            break
    return controller, decisions


def result(model, controller, decisions) -> tuple[dict, dict]:
    tensors = {k: full_tensor(v.detach()).clone().contiguous() for k, v in model.state_dict().items()}
    return tensors, {"decisions": decisions, "history": controller.history, "loop": controller.loop.state_dict(),
                     "skipped": controller.nonfinite.skipped}


def worker(rank: int, directory: str) -> None:
    """One process of the 2-process runs: DDP, then FSDP2, each from a fresh model."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=WORLD)
    try:
        for mode, reinit in (("ddp", "kaiming"), ("fsdp2", "kaiming"), ("ddp-gradient", "gradient"),
                             ("fsdp2-gradient", "gradient")):
            model = build(reinit)
            if mode.startswith("ddp"):
                from torch.nn.parallel import DistributedDataParallel as DDP

                # find_unused_parameters: a frozen module's factors stop receiving gradients.
                forward = DDP(model, find_unused_parameters=True)
            else:
                from torch.distributed.fsdp import fully_shard

                for layer in model.base_model.bert.encoder.layer:
                    fully_shard(layer)
                fully_shard(model)
                forward = model
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the skipped step's report
                controller, decisions = train(model, forward, rank, WORLD)
            tensors, log = result(model, controller, decisions)
            # save_pretrained gathers the shards (a collective): every process calls it.
            model.save_pretrained(f"{directory}/{mode}-adapter-rank{rank}", controller)
            weight = controller.layers[0].base_layer.weight
            log["weight_type"] = type(weight).__name__
            log["local_weight_rows"] = weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]
            save_file(tensors, f"{directory}/{mode}-rank{rank}.safetensors")
            with open(f"{directory}/{mode}-rank{rank}.json", "w") as f:
                json.dump(log, f)
        # The prune Reset on MiniLM-wide factors: the first update after each merge, whole tensors.
        for mode, wrap in (("ddp", _ddp), ("fsdp2", _fsdp2)):
            records = first_updates_after_merges("prune", wrap=wrap, rank=rank, world=WORLD)
            torch.save(records, f"{directory}/{mode}-reset-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp(model):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, find_unused_parameters=True)


def _fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("two-processes")
    mp.start_processes(worker, args=(str(directory),), nprocs=WORLD, join=True, start_method="spawn")
    return directory


@pytest.fixture(scope="module")
def single_process():
    model = build()
    with pytest.warns(RuntimeWarning, match="non-finite loss .* at step 22: step skipped"):
        controller, decisions = train(model, model)
    tensors, log = result(model, controller, decisions)
    # The scenario the docstring promises, from the one-process run.
    merges = sorted({d["step"] for d in log["decisions"] if d["merged"]})
    freezes = sorted({d["step"] for d in log["decisions"] if d["converged"]})
    assert merges == [4, 8, 12, 16, 20] and freezes == [12, 16, 24] and log["skipped"] == [22]
    return tensors, json.loads(json.dumps(log))


@pytest.fixture(scope="module")
def single_process_gradient():
    """reinit="gradient": each process sketches its own part of the batch; the sketches are summed at a merge."""
    model = build("gradient")
    with pytest.warns(RuntimeWarning, match="at step 22: step skipped"):
        controller, decisions = train(model, model)
    tensors, log = result(model, controller, decisions)
    assert sorted({d["step"] for d in log["decisions"] if d["merged"]}) == [4, 8, 12, 16, 20]
    return tensors, json.loads(json.dumps(log))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "ddp-gradient", "fsdp2-gradient"])
def test_two_processes_take_the_same_decisions_as_one(two_processes, single_process, single_process_gradient, mode):
    ref_tensors, ref_log = single_process_gradient if mode.endswith("gradient") else single_process
    logs = [json.loads((two_processes / f"{mode}-rank{r}.json").read_text()) for r in range(WORLD)]
    tensors = [load_file(str(two_processes / f"{mode}-rank{r}.safetensors")) for r in range(WORLD)]
    for log in logs:
        assert log["decisions"] == ref_log["decisions"]  # same decisions at the same steps
        assert log["skipped"] == [22]  # the NaN of the last process stopped the step on every process
        assert log["history"] == ref_log["history"]
        assert log["loop"]["modules"] == ref_log["loop"]["modules"] or _same_but_ratios(log, ref_log)
    # FSDP2 shards every weight (a DTensor, 16 of the 32 rows here); DDP replicates it.
    assert [log["weight_type"] for log in logs] == ["DTensor" if mode.startswith("fsdp2") else "Parameter"] * WORLD
    assert [log["local_weight_rows"] for log in logs] == [16 if mode.startswith("fsdp2") else 32] * WORLD
    assert tensors[0].keys() == tensors[1].keys() == ref_tensors.keys()
    for key in ref_tensors:
        assert torch.equal(tensors[0][key], tensors[1][key]), key  # replicas bit-identical
        torch.testing.assert_close(tensors[0][key], ref_tensors[key], rtol=0, atol=1e-5, msg=key)
    # The adapter each process saved: the same files, and they load into a plain model as the run ended.
    files = [(two_processes / f"{mode}-adapter-rank{r}" / "adapter_model.safetensors").read_bytes() for r in range(WORLD)]
    assert files[0] == files[1]
    loaded = AromaModel.from_pretrained(tiny_bert(0), two_processes / f"{mode}-adapter-rank0")
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ref_tensors[key], rtol=0, atol=1e-5, msg=key)


def _same_but_ratios(log, ref_log) -> bool:
    """The loop states agree except for the float ratios, which may differ in the last bits."""
    for m, r in zip(log["loop"]["modules"], ref_log["loop"]["modules"]):
        for key in m:
            if key in ("last_ratio", "last_change", "prev_norm"):
                if (m[key] is None) != (r[key] is None) or (m[key] is not None and abs(m[key] - r[key]) > 1e-5):
                    return False
            elif m[key] != r[key]:
                return False
    return True



def test_the_plain_training_loop_under_torchrun_matches_one_process(model_dir, mrpc_dir, tmp_path):
    launch_and_compare(model_dir, mrpc_dir, tmp_path,
                       ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"])


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_the_prune_reset_draws_the_same_masks_on_every_process_and_bounds_the_next_update(two_processes, mode):
    reference = check_first_updates(first_updates_after_merges("prune"), "prune")
    for r in range(WORLD):
        records = torch.load(two_processes / f"{mode}-reset-rank{r}.pt")
        masks = check_first_updates(records, "prune")  # on every process: one mask, <= KEPT_BOUND * lr
        assert len(masks) == len(reference)
        for mask, ref in zip(masks, reference):
            assert torch.equal(mask, ref)  # the same kept entries as one process, on every process


# ---------------------------------------------------------------------- `aroma train` under torchrun
# 97 examples in batches of 8: every epoch ends in a batch of one row, fewer than the processes.
SHORT_BATCH_DATA, SHORT_BATCH = 97, 8
CLI_OPTIONS = ["--method", "aroma", "--max-steps", "16", "--eval-steps", "8", "--save-steps", "5", "--batch-size",
               str(SHORT_BATCH), "--warmup-steps", "2", "--lr", "5e-3", "--max-inner-steps", "4", "--check-interval",
               "2", "--restart-warmup-steps", "1", "--eps-out", "0.05", "--no-progress"]
RUN_FILES = ("config.json", "metrics.jsonl", "rank_history.json", "ranks.json", "final_metrics.json", "report.md",
             "figures/fig1_training.png", "figures/fig3_rank_distribution.png", "adapter/adapter_model.safetensors",
             "lora/adapter_model.safetensors", "checkpoint/training_state.json")


def _launch_env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def mrpc97_dir(tmp_path_factory):
    return write_mrpc(tmp_path_factory.mktemp("mrpc97"), SHORT_BATCH_DATA)


@pytest.fixture(scope="module")
def cli_runs(model_dir, mrpc97_dir, tmp_path_factory):
    """docs/distributed.md's command, `torchrun --standalone --nproc_per_node 2 -m aroma_peft train glue ...`,
    beside the same `aroma train glue` in one process."""
    d = tmp_path_factory.mktemp("cli-torchrun")
    argv = ["train", "glue", "--task", "mrpc", "--model", str(model_dir), "--data-dir", str(mrpc97_dir), *CLI_OPTIONS]
    assert main(argv + ["--out", str(d / "ref")]) == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(WORLD), "-m", "aroma_peft", *argv, "--out", str(d / "run")],
                          env=_launch_env(), capture_output=True, text=True, timeout=1200)
    return d / "ref", d / "run", done


def test_the_documented_torchrun_command_exits_0_and_writes_the_whole_run_directory(cli_runs):
    _, run, done = cli_runs
    assert done.returncode == 0, done.stderr[-3000:]
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["steps"] == 16 and set(final["metrics"]) == {"accuracy", "f1"}
    assert done.stdout.count('"main_metric"') == 1  # the summary is printed once, not once per process
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [8, 16]


def test_the_documented_torchrun_command_takes_the_steps_of_one_process(cli_runs):
    ref, run, done = cli_runs
    assert done.returncode == 0, done.stderr[-3000:]
    # ceil(97 / 8) = 13 steps an epoch, the 13th on one row: 16 steps cross it. One process trains
    # on that row; two processes must too (the second runs a stand-in of weight 0).
    assert json.loads((ref / "config.json").read_text())["train_examples"] == SHORT_BATCH_DATA
    compare_with_one_process(ref, run, WORLD)


DROPOUT_RUN = """
import json, os, sys
import torch
from aroma_peft import train as T
from aroma_peft.methods import MethodOptions

d = json.loads(sys.argv[1])
record = d.pop("record")
opts = T.TrainOptions(**(d | {"method_options": MethodOptions(**d["method_options"])}))
prepare, runs, masks = T.prepare, [], []

def prepare_and_watch(*args, **kwargs):
    run = prepare(*args, **kwargs)
    runs.append(run)
    dropout = next(m for m in run.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0)
    dropout.register_forward_hook(lambda m, i, o: masks.append(o == 0) if m.training and not masks else None)
    return run

T.prepare = prepare_and_watch
T.run(opts)
rank = int(os.environ["RANK"])
runs[0].save(__import__("pathlib").Path(record) / f"rank{rank}")  # this process's replica
torch.save(masks[0], f"{record}/mask-rank{rank}.pt")  # the first training step's first dropout mask
"""


def _launch_dropout_run(d, opts, record) -> None:
    spec = json.dumps(dataclasses.asdict(opts) | {"record": str(record)})
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(WORLD), str(d / "driver.py"), spec], env=_launch_env(), capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def dropout_run(model_dir, mrpc97_dir, tmp_path_factory):
    """train.run under torchrun on a model with dropout (0.1 after the embeddings and in every block),
    each process saving its own replica."""
    d = tmp_path_factory.mktemp("dropout-torchrun")
    shutil.copytree(model_dir, d / "model")
    model = tiny_bert(0)
    model.config.hidden_dropout_prob = 0.1
    model.save_pretrained(d / "model")
    (d / "driver.py").write_text(DROPOUT_RUN)
    _launch_dropout_run(d, run_options(model_dir, mrpc97_dir, d / "run", model=str(d / "model"),
                                       batch_size=SHORT_BATCH), d)
    return d


def test_processes_draw_their_own_dropout_masks(dropout_run):
    masks = [torch.load(dropout_run / f"mask-rank{r}.pt") for r in range(WORLD)]
    assert masks[0].shape == masks[1].shape  # two slices of 4 rows, padded alike
    for mask in masks:  # about p = 0.1 of the entries dropped
        assert 0.05 < mask.float().mean().item() < 0.15
    assert not torch.equal(masks[0], masks[1])  # independent streams, not the same mask twice
    # The checkpoint keeps every process's stream, so a resumed run continues each one.
    tensors = load_file(str(dropout_run / "run" / "checkpoint" / "optimizer.safetensors"))
    assert not torch.equal(tensors["extra.torch_rng"], tensors["extra.torch_rng.rank1"])


def test_with_dropout_and_a_short_last_batch_the_replicas_stay_identical(dropout_run):
    # Dropout differs between the processes, the gradient is all-reduced: the replicas, and AROMA's
    # own random draws (Reinit, Reset masks from derived seeds), must agree bit for bit.
    adapters = [(dropout_run / f"rank{r}" / "adapter" / "adapter_model.safetensors").read_bytes() for r in range(WORLD)]
    assert adapters[0] == adapters[1]
    controllers = [json.loads((dropout_run / f"rank{r}" / "adapter" / "aroma_controller.json").read_text())
                   for r in range(WORLD)]
    assert controllers[0] == controllers[1]  # the same decisions at the same steps
    assert len(controllers[0]["history"]) > 2  # merges happened (so Reinit and Reset ran)
    final = json.loads((dropout_run / "run" / "final_metrics.json").read_text())
    assert final["steps"] == 16  # across the one-row batch that ends the first epoch (step 13)


def test_a_resume_under_torchrun_continues_every_dropout_stream(model_dir, mrpc97_dir, dropout_run, tmp_path):
    # The run's last checkpoint is at step 15; resumed from it on 2 processes, step 16 must draw the
    # masks the uninterrupted run drew on each process: the same adapter, bit for bit.
    shutil.copytree(dropout_run / "run", tmp_path / "run")
    for name in ("adapter", "lora"):
        shutil.rmtree(tmp_path / "run" / name)
    assert json.loads((tmp_path / "run" / "checkpoint" / "training_state.json").read_text())["extra"]["step"] == 15
    opts = run_options(model_dir, mrpc97_dir, tmp_path / "run", model=str(dropout_run / "model"),
                       batch_size=SHORT_BATCH, resume=True)
    _launch_dropout_run(dropout_run, opts, tmp_path / "record")
    for r in range(WORLD):
        assert (tmp_path / "record" / f"rank{r}" / "adapter" / "adapter_model.safetensors").read_bytes() == \
            (dropout_run / f"rank{r}" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (dropout_run / "run" / "metrics.jsonl").read_text()
