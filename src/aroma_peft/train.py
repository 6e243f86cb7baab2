"""Fine-tune and evaluate one method on one GLUE task, writing a run directory (docs/run_directory.md)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .analysis import effective_rank
from .faults import NonFiniteGuard
from .io import load_adapter_into, load_controller_state, load_training_state, save_training_state, write_json
from .layer import derived_seed
from .methods import METHODS, MethodOptions, MethodRun, prepare
from .report import trainable_mean, write_report
from .tasks.glue import TASKS, Example, find_split_files, load_glue_hub, read_split
from .tasks.metrics import glue_metrics, main_metric, majority_baseline


@dataclass
class TrainOptions:
    """Everything one run needs; ``config.json`` of the run directory is this, resolved."""

    task: str
    model: str
    method: str = "aroma"
    preset: str | None = None
    data_dir: str | None = None
    out: str | None = None
    lr: float = 5e-4
    batch_size: int = 32
    eval_batch_size: int = 64
    max_seq_len: int = 128
    epochs: float | None = None
    max_steps: int | None = None
    warmup_steps: int = 100
    weight_decay: float = 0.0
    eval_steps: int = 200
    save_steps: int | None = None  # checkpoint every this many steps (None: at every evaluation)
    resume: bool = False  # continue from OUT/checkpoint when there is one (AROMA and ReLoRA)
    max_nonfinite_steps: int = 10  # steps skipped for a NaN/inf loss or gradient before the run stops
    seed: int = 0
    train_limit: int | None = None
    train_limit_seed: int | None = None  # draws the --train-limit subset (None: --seed); fix it to compare seeds on one subset
    eval_limit: int | None = None
    progress: bool = True
    method_options: MethodOptions = field(default_factory=MethodOptions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(opts: TrainOptions) -> None:
    """Check options that need no file access; a bad value names the option."""
    if opts.task not in TASKS:
        raise ValueError(f"--task {opts.task!r} is unknown: expected one of {', '.join(TASKS)}")
    if opts.method not in METHODS:
        raise ValueError(f"--method {opts.method!r} is unknown: expected one of {', '.join(METHODS)}")
    for name in ("lr",):
        if not (isinstance(getattr(opts, name), (int, float)) and getattr(opts, name) > 0):
            raise ValueError(f"--{name} must be > 0, got {getattr(opts, name)!r}")
    for name in ("batch_size", "eval_batch_size", "max_seq_len", "eval_steps"):
        if getattr(opts, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(opts, name)!r}")
    if opts.save_steps is not None and (isinstance(opts.save_steps, bool) or not isinstance(opts.save_steps, int)
                                        or opts.save_steps <= 0):
        raise ValueError(f"--save-steps must be a positive integer, got {opts.save_steps!r}")
    if isinstance(opts.max_nonfinite_steps, bool) or not isinstance(opts.max_nonfinite_steps, int) \
            or opts.max_nonfinite_steps < 0:
        raise ValueError(f"--max-nonfinite-steps must be an integer >= 0, got {opts.max_nonfinite_steps!r}")
    if opts.resume and opts.method not in ("aroma", "relora"):
        raise ValueError(f"--resume is supported for the aroma and relora methods, not {opts.method!r}")
    if (opts.epochs is None) == (opts.max_steps is None):
        raise ValueError("give exactly one of --epochs and --max-steps (a preset may set one)")


def load_model_and_tokenizer(path: str, num_labels: int):
    """A sequence classifier and its tokenizer from a local folder (or a hub id when online)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = Path(path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"--model {path}: no config.json in this folder")
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
        if not any((local / f).is_file() for f in tokenizer_files):
            raise FileNotFoundError(f"--model {path}: no tokenizer in this folder (looked for {', '.join(tokenizer_files)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    except OSError as err:
        raise FileNotFoundError(f"--model {path}: cannot load a model and tokenizer ({err})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def classifier_head_names(model) -> list[str]:
    """The sequence-classification head(s) of a transformers model, trained in full by every method."""
    names = [n for n in ("classifier", "score") if hasattr(model, n)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head; pass --modules-to-save")
    return names


def encode(tokenizer, examples, max_len: int) -> list[dict]:
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_len)
    return [{k: enc[k][i] for k in enc} | {"labels": examples[i].label} for i in range(len(examples))]


def collate(tokenizer, rows: list[dict], regression: bool, length: int | None = None) -> dict:
    """A padded batch: to its longest row, or to ``length``."""
    feats = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    padding = {"padding": "max_length", "max_length": length} if length else {}
    batch = tokenizer.pad(feats, return_tensors="pt", **padding)
    batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float32 if regression else torch.long)
    return dict(batch)


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], task: str, batch_size: int) -> tuple[dict, list]:
    regression = TASKS[task].num_labels == 1
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # similar lengths: less padding
    preds = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate(tokenizer, [rows[i] for i in idx], regression)
        batch.pop("labels")
        logits = model(**batch).logits
        out = logits.squeeze(-1) if regression else logits.argmax(-1)
        for i, p in zip(idx, out.tolist()):
            preds[i] = p
    model.train()
    labels = [r["labels"] for r in rows]
    return glue_metrics(task, preds, labels), preds


class RunWriter:
    """Writes the run directory's files as training goes (docs/run_directory.md)."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:  # tensorboard is a dependency; tolerate its absence in minimal installs
            pass

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def append_metrics(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _NoWriter:
    """The run directory writer of the processes other than the first."""

    def scalar(self, *args) -> None:
        pass

    def append_metrics(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _init_distributed(opts: TrainOptions) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group) under torchrun; (0, 1, False) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    if opts.batch_size < world:
        raise ValueError(f"--batch-size {opts.batch_size} is the global batch: it needs at least one example for "
                         f"each of the {world} processes")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo")  # the training loop runs on CPU
    return dist.get_rank(), dist.get_world_size(), owns


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run(opts: TrainOptions, splits: dict[str, list[Example]] | None = None) -> dict:
    """Train ``opts.method`` on ``opts.task`` and write the run directory; returns final_metrics.

    ``splits`` (train and the task's eval splits) replaces reading ``opts.data_dir``.
    """
    validate(opts)
    spec = TASKS[opts.task]
    # Everything that can fail on bad input fails here, before any compute is spent.
    if splits is not None:
        pass
    elif opts.data_dir is None:
        splits = load_glue_hub(opts.task)
    else:
        files = find_split_files(opts.task, opts.data_dir)
        splits = {s: read_split(opts.task, files[s]) for s in ("train",) + spec.eval_splits}
    train_examples = splits["train"]
    eval_splits = {s: splits[s] for s in spec.eval_splits}
    if opts.train_limit:
        subset_seed = opts.seed if opts.train_limit_seed is None else opts.train_limit_seed
        train_examples = random.Random(subset_seed).sample(train_examples, min(opts.train_limit, len(train_examples)))
    if opts.eval_limit:
        eval_splits = {s: ex[:opts.eval_limit] for s, ex in eval_splits.items()}
    _seed_everything(opts.seed)
    base, tokenizer = load_model_and_tokenizer(opts.model, spec.num_labels)
    mopts = opts.method_options
    if not mopts.modules_to_save:
        mopts = dataclasses.replace(mopts, modules_to_save=classifier_head_names(base))

    steps_per_epoch = math.ceil(len(train_examples) / opts.batch_size)
    max_steps = opts.max_steps or max(1, round(opts.epochs * steps_per_epoch))
    warmup = min(opts.warmup_steps, max_steps - 1)
    method_run = prepare(opts.method, base, mopts, max_steps=max_steps, warmup_steps=warmup, seed=opts.seed)
    model = method_run.model
    rank, world, owns_group = _init_distributed(opts)
    main = rank == 0  # only the first process writes the run directory
    # Under torchrun: DDP, each process a slice of every (global) batch; every process runs its own
    # controller and takes the same decisions (docs/distributed.md). A frozen module's factors stop
    # receiving gradients: find_unused_parameters.
    train_model = model
    if world > 1:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # The merged buffers are equal on every process by construction: no need to sync them per step.
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers"
        train_model = DistributedDataParallel(model, find_unused_parameters=True, **{no_sync: False})
        # Dropout draws from torch's global generator. Seeded alike, every process would draw the same
        # masks for its slice; each process other than the first gets a stream of its own (the first
        # keeps a one-process run's). AROMA's own draws (Reinit, Reset masks) use derived seeds: alike.
        if rank > 0:
            torch.manual_seed(derived_seed(opts.seed, rank))

    out = Path(opts.out or f"runs/{opts.task}-{opts.method}-{Path(opts.model).name}")
    writer = RunWriter(out) if main else _NoWriter()
    resolved = opts.to_dict() | {"method_options": dataclasses.asdict(mopts), "resolved_max_steps": max_steps,
                                 "resolved_warmup_steps": warmup, "train_examples": len(train_examples),
                                 "eval_examples": {s: len(e) for s, e in eval_splits.items()}, "processes": world}

    regression = spec.num_labels == 1
    train_rows = encode(tokenizer, train_examples, opts.max_seq_len)
    eval_rows = {s: encode(tokenizer, ex, opts.max_seq_len) for s, ex in eval_splits.items()}
    baseline = majority_baseline(opts.task, [e.label for e in train_examples],
                                 [e.label for e in eval_splits[spec.eval_splits[0]]])

    optimizer = torch.optim.AdamW(method_run.parameters, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = method_run.make_scheduler(optimizer)
    history = RankHistory(method_run)
    metric_name = main_metric(opts.task)

    model.train()
    gen = torch.Generator().manual_seed(opts.seed)
    guard = NonFiniteGuard(opts.max_nonfinite_steps)
    step, finished, order, position, last_eval = 0, False, [], 0, None
    loss_since_eval = [0.0, 0]  # sum and count of the training losses since the previous evaluation
    checkpoint = _find_checkpoint(out) if opts.resume else None
    if checkpoint is not None:
        step, order, position, last_eval, loss_since_eval = _resume(checkpoint, method_run, optimizer, scheduler,
                                                                    gen, guard, rank)
        finished = method_run.controller.finished
        history.update(step)
        if main:
            _drop_metrics_after(out / "metrics.jsonl", step)
    elif main:
        (out / "metrics.jsonl").write_text("")
    if main:  # after the checkpoint loaded: a failed resume leaves the run directory as it was
        write_json(out / "config.json", resolved)
    save_steps = opts.save_steps or opts.eval_steps
    losses, step_times = [], []
    started = time.perf_counter()
    progress = _progress(max_steps, opts.progress and main)
    progress.update(step)
    while step < max_steps and not finished:
        if position >= len(order):  # a new epoch
            order, position = torch.randperm(len(train_rows), generator=gen).tolist(), 0
        t0 = time.perf_counter()
        rows = [train_rows[i] for i in order[position:position + opts.batch_size]]
        position += opts.batch_size
        mine = rows[rank::world]
        # Every slice padded like the whole batch: the same computation per example as one process.
        length = max(len(r["input_ids"]) for r in rows) if world > 1 else None
        # An epoch's last batch may have fewer rows than processes: a process left without one runs a
        # stand-in row with weight 0, so every process takes the step that one process takes.
        loss = train_model(**collate(tokenizer, mine or rows[:1], regression, length)).loss
        # DDP averages gradients over processes: weigh each slice by its share of the global batch.
        (loss * (len(mine) * world / len(rows)) if world > 1 else loss).backward()
        if guard.check(method_run.parameters, loss, step=step + 1):  # NaN/inf: no step, no AROMA decision
            optimizer.zero_grad(set_to_none=True)
            writer.scalar("train/skipped_steps", len(guard.skipped), step + 1)
            continue
        optimizer.step()
        scheduler.step()
        step += 1
        finished = method_run.after_step(step)
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        loss_since_eval = [loss_since_eval[0] + losses[-1], loss_since_eval[1] + 1]
        history.update(step)
        writer.scalar("train/loss", losses[-1], step)
        writer.scalar("train/learning_rate", optimizer.param_groups[0]["lr"], step)
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.3f}", rank=history.total_rank, trainable=history.trainable,
                             converged=history.converged(), refresh=False)
        done = finished or step >= max_steps
        if step % opts.eval_steps == 0 or done:
            last_eval = _evaluate_all(model, tokenizer, eval_rows, opts, metric_name)
            record = {"step": step, "metrics": last_eval, "main": last_eval[_main_key(opts.task, metric_name)],
                      "trainable_params": history.trainable, "total_rank": history.total_rank}
            if loss_since_eval[1]:  # the mean training loss since the previous evaluation
                record["train_loss"] = loss_since_eval[0] / loss_since_eval[1]
            loss_since_eval = [0.0, 0]
            writer.append_metrics(record)
            for k, v in last_eval.items():
                writer.scalar(f"eval/{k}", v, step)
            writer.scalar("train/trainable_params", history.trainable, step)
            writer.scalar("train/total_rank", history.total_rank, step)
            if main:
                history.write(out / "rank_history.json")
        if step % save_steps == 0 and not done:
            torch_rng = _torch_rng_states(world)  # a collective: every process takes part
            if main:
                _save_checkpoint(out, method_run, optimizer, scheduler, gen, guard, torch_rng,
                                 {"step": step, "order": order, "position": position, "last_eval": last_eval,
                                  "loss_since_eval": loss_since_eval})
    progress.close()
    wall = time.perf_counter() - started

    if owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    # Every process returns the same summary (its replica is the same); only the first writes files.
    final = {
        "task": opts.task, "method": opts.method, "model": opts.model, "main_metric": _main_key(opts.task, metric_name),
        "metrics": last_eval, "majority_baseline": baseline,
        "trainable_params": history.summary(step), "total_rank": history.total_rank, "steps": step,
        "stopped_early": step < max_steps, "nonfinite_steps_skipped": guard.skipped, "wall_time_s": wall,
        "mean_step_time_s": sum(step_times) / max(1, len(step_times)),
    }
    if not main:
        return final
    method_run.save(out)
    history.write(out / "rank_history.json")
    ranks = method_run.module_ranks()
    updates = method_run.module_updates()
    write_json(out / "ranks.json", {"modules": [
        {"module": n, "rank": int(ranks.get(n, 0)), "effective_rank": effective_rank(updates[n]) if ranks.get(n) else 0.0}
        for n in updates]})
    write_json(out / "final_metrics.json", final)
    writer.close()
    write_report(out)
    return final


# ---------------------------------------------------------------------- checkpoints
CHECKPOINT = "checkpoint"


def _torch_rng_states(world: int) -> list[torch.Tensor]:
    """The torch generator state of every process (dropout streams differ between processes)."""
    state = torch.get_rng_state()
    if world == 1:
        return [state]
    import torch.distributed as dist

    states = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    return states


def _torch_rng_key(rank: int) -> str:
    return "torch_rng" if rank == 0 else f"torch_rng.rank{rank}"


def _save_checkpoint(out: Path, method_run: MethodRun, optimizer, scheduler, gen: torch.Generator,
                     guard: NonFiniteGuard, torch_rng: list[torch.Tensor], position: dict) -> None:
    """Write OUT/checkpoint: the adapter and controller, the optimizer, the schedule, the data
    position and every RNG state (torch's of every process). It is written beside the previous one
    and swapped in by renames, so a process killed at any moment leaves a complete checkpoint (the
    new or the previous one)."""
    tmp, old, final = out / f".{CHECKPOINT}.tmp", out / f".{CHECKPOINT}.old", out / CHECKPOINT
    shutil.rmtree(tmp, ignore_errors=True)
    method_run.save(tmp)
    extra = position | {"python_random": _jsonable(random.getstate()), "nonfinite": guard.state_dict()}
    rng = {_torch_rng_key(r): state for r, state in enumerate(torch_rng)}
    save_training_state(tmp, optimizer, scheduler, extra=extra, tensors=rng | {"data_rng": gen.get_state()})
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint: OUT/checkpoint, or the previous one if a swap was cut short."""
    for candidate in (out / CHECKPOINT, out / f".{CHECKPOINT}.old"):
        if (candidate / "training_state.json").is_file():
            return candidate
    return None


def _resume(checkpoint: Path, method_run: MethodRun, optimizer, scheduler, gen: torch.Generator,
            guard: NonFiniteGuard, rank: int) -> tuple[int, list, int, dict | None, list]:
    """Load a checkpoint into the freshly prepared run; returns (step, epoch order, position, last eval,
    [sum, count] of the training losses since that evaluation)."""
    load_adapter_into(method_run.model, checkpoint / "adapter")
    extra, tensors = load_training_state(checkpoint, optimizer, scheduler)
    method_run.controller.load_state_dict(load_controller_state(checkpoint / "adapter"))
    random.setstate(_python_random_state(extra["python_random"]))
    torch.set_rng_state(tensors[_torch_rng_key(rank)])
    gen.set_state(tensors["data_rng"])
    guard.load_state_dict(extra["nonfinite"])
    return (int(extra["step"]), list(extra["order"]), int(extra["position"]), extra["last_eval"],
            list(extra.get("loss_since_eval", [0.0, 0])))


def _drop_metrics_after(path: Path, step: int) -> None:
    """Evaluations logged after the checkpoint will be logged again by the resumed run."""
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _jsonable(state):
    return [_jsonable(v) for v in state] if isinstance(state, tuple) else state


def _python_random_state(state):
    return tuple(_python_random_state(v) for v in state) if isinstance(state, list) else state


def _main_key(task: str, metric_name: str) -> str:
    return f"dev_matched_{metric_name}" if task == "mnli" else metric_name


def _evaluate_all(model, tokenizer, eval_rows, opts, metric_name) -> dict:
    merged = {}
    for split, rows in eval_rows.items():
        metrics, _ = evaluate(model, tokenizer, rows, opts.task, opts.eval_batch_size)
        prefix = f"{split}_" if len(eval_rows) > 1 else ""
        merged.update({prefix + k: v for k, v in metrics.items()})
    return merged


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="train", dynamic_ncols=True)


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
