"""The run directory (docs/run_directory.md): its writer, its checkpoints and resume, the rank history.

Every task family writes the same directory; only the first process writes (``RunWriter`` is then a
``NoWriter`` on the others). TensorBoard events come from the engine's tracker (Accelerate's
TensorBoard tracker, in ``OUT/tb``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .faults import NonFiniteGuard
from .io import (TRAINING_STATE, atomic_write, fsync_dir, load_adapter_into, load_controller_state,
                 load_training_state, read_json, save_training_state, write_json)
from .methods import MethodRun
from .report import trainable_mean


@dataclass
class LoopState:
    """Where the training loop stands: what a checkpoint saves besides the weights and the RNGs."""

    step: int = 0
    order: list = field(default_factory=list)  # this epoch's permutation of the training rows
    position: int = 0  # the next row of ``order``
    last_eval: dict | None = None
    loss_since_eval: list = field(default_factory=lambda: [0.0, 0])  # sum and count since the last evaluation
    finished: bool = False

    def position_record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "finished"}


class RunWriter:
    """Writes the run directory's files as training goes (docs/run_directory.md)."""

    def __init__(self, out: Path, accelerator):
        self.out = out
        self.accelerator = accelerator
        out.mkdir(parents=True, exist_ok=True)
        try:
            accelerator.init_trackers("tb")  # OUT/tb: the project_dir of the Accelerator is OUT
        except (ImportError, ValueError):  # tensorboard is a dependency; tolerate its absence in minimal installs
            pass

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.accelerator.log({tag: value}, step=step)

    def append_metrics(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for tracker in self.accelerator.trackers:
            tracker.finish()


class NoWriter:
    """The run directory writer of the processes other than the first."""

    def scalar(self, *args) -> None:
        pass

    def append_metrics(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


CHECKPOINT = "checkpoint"


def torch_rng_states(world: int, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Every process's torch generator states (dropout streams differ between processes): ``"cpu"``,
    and ``"cuda"`` (the process's own device generator) when it trains on a GPU, where dropout draws
    from that one. Gathered as objects, so that it works over NCCL as over gloo."""
    device = torch.device(device)
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return [state]
    import torch.distributed as dist

    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states


_RNG_KEYS = {"cpu": "torch_rng", "cuda": "cuda_rng"}


def _torch_rng_key(rank: int, kind: str = "cpu") -> str:
    return _RNG_KEYS[kind] if rank == 0 else f"{_RNG_KEYS[kind]}.rank{rank}"


def rng_tensors(torch_rng: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``torch_rng_states``' result as the checkpoint's named tensors (rank 0 keeps the unsuffixed names)."""
    return {_torch_rng_key(r, kind): t for r, states in enumerate(torch_rng) for kind, t in states.items()}


def restore_torch_rng(tensors: dict[str, torch.Tensor], rank: int, device: torch.device | str = "cpu") -> None:
    """Set this process's generators from a checkpoint's tensors. On a GPU the device generator is
    restored too, when the checkpoint was written on one (a CPU checkpoint resumed on a GPU continues
    the CPU stream only: there is no device stream to continue)."""
    torch.set_rng_state(tensors[_torch_rng_key(rank)])
    device = torch.device(device)
    if device.type == "cuda" and _torch_rng_key(rank, "cuda") in tensors:
        torch.cuda.set_rng_state(tensors[_torch_rng_key(rank, "cuda")], device)


def save_checkpoint(out: Path, method_run: MethodRun, optimizer, scheduler, gen: torch.Generator,
                    guard: NonFiniteGuard, torch_rng: list[dict[str, torch.Tensor]], position: dict) -> None:
    """Write OUT/checkpoint: the adapter and controller, the optimizer, the schedule, the data
    position and every RNG state (torch's of every process). It is written beside the previous one
    and swapped in by renames, so a process killed at any moment leaves a complete checkpoint (the
    new or the previous one)."""
    tmp, old, final = out / f".{CHECKPOINT}.tmp", out / f".{CHECKPOINT}.old", out / CHECKPOINT
    shutil.rmtree(tmp, ignore_errors=True)
    method_run.save(tmp)
    extra = position | {"python_random": _jsonable(random.getstate()), "nonfinite": guard.state_dict()}
    save_training_state(tmp, optimizer, scheduler, extra=extra, tensors=rng_tensors(torch_rng) | {"data_rng": gen.get_state()})
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(out)  # the renames reach the disk before the previous checkpoint is deleted
    shutil.rmtree(old, ignore_errors=True)


_DEFINITION_LABELS = {
    "model_config_sha256": "the model's config.json (sha256)", "train_examples": "the number of training examples",
    "max_steps": "--max-steps (resolved)", "warmup_steps": "--warmup-steps (resolved)",
    "processes": "the number of processes", "data_dir": "--data-dir",
}


def check_resumable(checkpoint: Path, definition: dict, unrecorded_defaults: dict | None = None) -> None:
    """Refuse a resume whose options differ from those the checkpoint was made with, naming each one.

    ``unrecorded_defaults``: options a definition leaves out at these values (added after checkpoints
    were first written); one missing from either side is read as its default."""
    recorded = read_json(checkpoint / TRAINING_STATE).get("extra", {}).get("run")
    if recorded is None:
        warnings.warn(f"{checkpoint}: the checkpoint records no options (written by an older version); "
                      "the resume cannot check that it repeats them", RuntimeWarning, stacklevel=2)
        return
    defaults = unrecorded_defaults or {}
    then, now = defaults | _flat(recorded), defaults | _flat(definition)
    differences = [f"{_DEFINITION_LABELS.get(k, '--' + k.replace('_', '-'))}: {then.get(k)!r} in the checkpoint, "
                   f"{now.get(k)!r} now" for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
    if differences:
        raise ValueError(f"--resume: the checkpoint in {checkpoint.parent} was made with other options; "
                         f"resume with the same ones, or start a new run in another --out. Differences: "
                         + "; ".join(differences))


def _flat(definition: dict) -> dict:
    return {k: v for k, v in definition.items() if k != "method_options"} | definition.get("method_options", {})


def find_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint: OUT/checkpoint, or the previous one if a swap was cut short."""
    for candidate in (out / CHECKPOINT, out / f".{CHECKPOINT}.old"):
        if (candidate / "training_state.json").is_file():
            return candidate
    return None


def resume(checkpoint: Path, method_run: MethodRun, optimizer, scheduler, gen: torch.Generator,
           guard: NonFiniteGuard, rank: int, device: torch.device | str = "cpu") -> LoopState:
    """Load a checkpoint into the freshly prepared run; returns where the loop stood."""
    load_adapter_into(method_run.model, checkpoint / "adapter")
    extra, tensors = load_training_state(checkpoint, optimizer, scheduler)
    method_run.controller.load_state_dict(load_controller_state(checkpoint / "adapter"))
    random.setstate(_python_random_state(extra["python_random"]))
    restore_torch_rng(tensors, rank, device)
    gen.set_state(tensors["data_rng"])
    guard.load_state_dict(extra["nonfinite"])
    return LoopState(step=int(extra["step"]), order=list(extra["order"]), position=int(extra["position"]),
                     last_eval=extra["last_eval"], loss_since_eval=list(extra.get("loss_since_eval", [0.0, 0])),
                     finished=method_run.controller.finished)


def drop_metrics_after(path: Path, step: int) -> None:
    """Evaluations logged after the checkpoint will be logged again by the resumed run. Rewritten
    beside the file and renamed over it: a kill at any moment leaves the whole history."""
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))


def _jsonable(state):
    return [_jsonable(v) for v in state] if isinstance(state, tuple) else state


def _python_random_state(state):
    return tuple(_python_random_state(v) for v in state) if isinstance(state, list) else state


class RankHistory:
    """Step-function history of trainable parameters and per-module ranks (rank_history.json)."""

    def __init__(self, method_run: MethodRun):
        self.run = method_run
        self.modules = list(method_run.module_ranks())
        self.entries: list[dict] = []
        self.update(0)

    @property
    def trainable(self) -> int:
        return self.entries[-1]["trainable_params"]

    @property
    def total_rank(self) -> int:
        return self.entries[-1]["total_rank"]

    def converged(self) -> str:
        c = self.run.controller
        if c is None:
            return "-"
        return f"{sum(m.converged for m in c.loop.modules)}/{len(c.loop.modules)}"

    def update(self, step: int) -> None:
        c = self.run.controller
        if c is not None:  # the controller records its own transitions: adopt the new ones
            self.entries.extend(c.history[len(self.entries):])
            return
        if self.run.method != "adalora" and self.entries:
            return  # constant for LoRA, DoRA, full and BitFit
        ranks = self.run.module_ranks()
        entry = {"step": step, "trainable_params": self.run.trainable_count(),
                 "total_rank": sum(ranks.values()), "ranks": [ranks[n] for n in self.modules]}
        if not self.entries or any(entry[k] != self.entries[-1][k] for k in ("trainable_params", "ranks")):
            self.entries.append(entry)

    def summary(self, final_step: int) -> dict:
        """Initial, step-weighted mean over the steps run, and final trainable counts."""
        mean = trainable_mean(self.entries, final_step) if final_step else float(self.entries[0]["trainable_params"])
        return {"initial": self.entries[0]["trainable_params"], "mean": mean, "final": self.entries[-1]["trainable_params"]}

    def write(self, path: Path) -> None:
        c = self.run.controller
        extra = {"outer_checks": c.outer_checks} if c is not None else {}
        write_json(path, {"modules": self.modules, "history": self.entries} | extra)


def write_results(out: Path, method_run: MethodRun, history: RankHistory, final: dict) -> None:
    """The files of a finished run: adapter/ (and lora/), rank_history, ranks, final_metrics, report.md."""
    from .analysis import effective_rank
    from .report import write_report

    method_run.save(out)
    history.write(out / "rank_history.json")
    ranks = method_run.module_ranks()
    updates = method_run.module_updates()
    write_json(out / "ranks.json", {"modules": [
        {"module": n, "rank": int(ranks.get(n, 0)), "effective_rank": effective_rank(updates[n]) if ranks.get(n) else 0.0}
        for n in updates]})
    write_json(out / "final_metrics.json", final)
    write_report(out)
