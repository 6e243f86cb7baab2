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
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import synthetic_batches, tiny_bert
from safetensors.torch import load_file, save_file
from test_cli import model_dir, mrpc_dir  # noqa: F401  (fixtures: a tiny BERT with tokenizer, MRPC files)
from test_reset import check_first_updates, first_updates_after_merges
from test_train_resume import launch_and_compare

from aroma_peft import AromaConfig, AromaController, AromaModel, get_aroma_model
from aroma_peft.layer import full_tensor

WORLD = 2
STEPS = 24
GLOBAL_BATCH = 16


def build():
    # Calibrated on this tiny model: merges at steps 4, 8, 12, 16, 20; modules freeze at 12, 16 and 24
    # (eq. 6 ratios stay >= 0.006 away from eps_out, far above data-parallel rounding).
    config = AromaConfig(target_modules=["query", "value", "intermediate.dense"], modules_to_save=["classifier"],
                         eps_in=None, check_interval=2, max_inner_steps=4, eps_out=0.12, max_steps=STEPS,
                         warmup_steps=2, restart_warmup_steps=1)
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
        for mode in ("ddp", "fsdp2"):
            model = build()
            if mode == "ddp":
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


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_take_the_same_decisions_as_one(two_processes, single_process, mode):
    ref_tensors, ref_log = single_process
    logs = [json.loads((two_processes / f"{mode}-rank{r}.json").read_text()) for r in range(WORLD)]
    tensors = [load_file(str(two_processes / f"{mode}-rank{r}.safetensors")) for r in range(WORLD)]
    for log in logs:
        assert log["decisions"] == ref_log["decisions"]  # same decisions at the same steps
        assert log["skipped"] == [22]  # the NaN of the last process stopped the step on every process
        assert log["history"] == ref_log["history"]
        assert log["loop"]["modules"] == ref_log["loop"]["modules"] or _same_but_ratios(log, ref_log)
    # FSDP2 shards every weight (a DTensor, 16 of the 32 rows here); DDP replicates it.
    assert [log["weight_type"] for log in logs] == ["DTensor" if mode == "fsdp2" else "Parameter"] * WORLD
    assert [log["local_weight_rows"] for log in logs] == [16 if mode == "fsdp2" else 32] * WORLD
    assert tensors[0].keys() == tensors[1].keys() == ref_tensors.keys()
    for key in ref_tensors:
        assert torch.equal(tensors[0][key], tensors[1][key]), key  # replicas bit-identical
        torch.testing.assert_close(tensors[0][key], ref_tensors[key], rtol=0, atol=1e-5, msg=key)
    # The adapter each process saved: the same files, and they load into a plain model as the run ended.
    files = [(two_processes / f"{mode}-adapter-rank{r}" / "aroma_adapter.safetensors").read_bytes() for r in range(WORLD)]
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
