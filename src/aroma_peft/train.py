"""Fine-tune and evaluate one method on one GLUE task, writing a run directory (docs/run_directory.md)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .analysis import effective_rank
from .config import CONVERGED_COMPONENT, OUTER_CRITERIA, RESET_MODES
from .faults import NonFiniteGuard
from .io import (TRAINING_STATE, atomic_write, fsync_dir, load_adapter_into, load_controller_state,
                 load_training_state, read_json, save_training_state, sha256_file, write_json)
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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What each numeric or named option allows: (description, test). None is allowed where the field's
# default is None (the option left out).
_POSITIVE_INT = ("a positive integer", lambda v: _is_int(v) and v > 0)
_NONNEG_INT = ("an integer >= 0", lambda v: _is_int(v) and v >= 0)
_POSITIVE = ("a finite number > 0", lambda v: _is_number(v) and v > 0)
_NONNEG = ("a finite number >= 0", lambda v: _is_number(v) and v >= 0)
OPTION_RULES = {
    "lr": _POSITIVE, "batch_size": _POSITIVE_INT, "eval_batch_size": _POSITIVE_INT, "max_seq_len": _POSITIVE_INT,
    "epochs": _POSITIVE, "max_steps": _POSITIVE_INT, "warmup_steps": _NONNEG_INT, "weight_decay": _NONNEG,
    "eval_steps": _POSITIVE_INT, "save_steps": _POSITIVE_INT, "max_nonfinite_steps": _NONNEG_INT,
    "seed": _NONNEG_INT, "train_limit": _POSITIVE_INT, "train_limit_seed": _NONNEG_INT, "eval_limit": _POSITIVE_INT,
    # method options
    "r": _POSITIVE_INT, "alpha": _POSITIVE, "dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "eps_in": _POSITIVE, "eps_out": _POSITIVE, "check_interval": _POSITIVE_INT, "max_inner_steps": _POSITIVE_INT,
    "restart_warmup_steps": _NONNEG_INT, "init_r": _POSITIVE_INT, "tinit": _NONNEG_INT, "tfinal": _NONNEG_INT,
    "delta_t": _POSITIVE_INT, "orth_reg_weight": _NONNEG,
    "reset": (f"one of {RESET_MODES}", lambda v: v in RESET_MODES),
    "outer_criterion": (f"one of {OUTER_CRITERIA}", lambda v: v in OUTER_CRITERIA),
    "converged_component": (f"one of {CONVERGED_COMPONENT}", lambda v: v in CONVERGED_COMPONENT),
}
_NONE_ALLOWED = {"epochs", "max_steps", "save_steps", "train_limit", "train_limit_seed", "eval_limit", "eps_in",
                 "eps_out"}


def validate_option(name: str, value) -> None:
    """Check one option's value; the message names the command-line flag, the value and what is allowed."""
    if name not in OPTION_RULES or (value is None and name in _NONE_ALLOWED):
        return
    allowed, ok = OPTION_RULES[name]
    if not ok(value):
        raise ValueError(f"--{name.replace('_', '-')} must be {allowed}, got {value!r}")


def validate(opts: TrainOptions) -> None:
    """Check every option before any file is read or any compute is spent; a bad value names the option."""
    if opts.task not in TASKS:
        raise ValueError(f"--task {opts.task!r} is unknown: expected one of {', '.join(TASKS)}")
    if opts.method not in METHODS:
        raise ValueError(f"--method {opts.method!r} is unknown: expected one of {', '.join(METHODS)}")
    for name, value in dataclasses.asdict(opts).items():
        validate_option(name, value)
    for name, value in dataclasses.asdict(opts.method_options).items():
        validate_option(name, value)
    if opts.resume and opts.method not in ("aroma", "relora"):
        raise ValueError(f"--resume is supported for the aroma and relora methods, not {opts.method!r}")
    if (opts.epochs is None) == (opts.max_steps is None):
        raise ValueError("give exactly one of --epochs and --max-steps (a preset may set one)")
    mopts = opts.method_options
    if opts.method in ("aroma", "relora") and mopts.max_inner_steps < mopts.check_interval:
        raise ValueError(f"--max-inner-steps {mopts.max_inner_steps} must be at least --check-interval "
                         f"{mopts.check_interval}, or no inner check could ever run")
    world = _world_size()
    if opts.batch_size < world:
        raise ValueError(f"--batch-size {opts.batch_size} is the global batch: it needs at least one example for "
                         f"each of the {world} processes")


def check_model_folder(path: str) -> None:
    """A local ``--model`` folder holds a config, a tokenizer and readable weights (cheap: headers only).

    A path that does not exist is an error unless it reads as a hub id (``name`` or ``org/name``).
    """
    local = Path(path)
    if not local.exists():
        looks_like_path = local.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1 \
            or os.sep != "/" and os.sep in path
        if looks_like_path or not path.strip():
            raise FileNotFoundError(f"--model {path}: no such folder (expected a local model folder with "
                                    "config.json, a tokenizer and the weights, or a hub id such as roberta-base)")
        return
    if not local.is_dir():
        raise FileNotFoundError(f"--model {path}: not a folder (expected a model folder with config.json)")
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no config.json in this folder")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
    if not any((local / f).is_file() for f in tokenizer_files):
        raise FileNotFoundError(f"--model {path}: no tokenizer in this folder (looked for {', '.join(tokenizer_files)})")
    from safetensors import SafetensorError, safe_open

    for weights in sorted(local.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass  # opening checks the header against the file's size
        except (SafetensorError, OSError) as err:
            raise ValueError(f"--model {path}: {weights} is not a readable safetensors file (truncated or "
                             f"corrupted?): {err}") from None


def load_model_and_tokenizer(path: str, num_labels: int):
    """A sequence classifier and its tokenizer from a local folder (or a hub id when online)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_model_folder(path)
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


def _world_size() -> int:
    """The number of processes: torchrun's WORLD_SIZE, 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group) under torchrun; (0, 1, False) otherwise."""
    if _world_size() == 1:
        return 0, 1, False
    import torch.distributed as dist

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
    # Everything that can fail on bad input fails here, before the model is loaded and before the
    # run directory is touched: the options, the model folder, the data, a checkpoint to resume.
    validate(opts)
    check_model_folder(opts.model)
    spec = TASKS[opts.task]
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
        train_examples = random.Random(_subset_seed(opts)).sample(train_examples,
                                                                  min(opts.train_limit, len(train_examples)))
    if opts.eval_limit:
        eval_splits = {s: ex[:opts.eval_limit] for s, ex in eval_splits.items()}
    steps_per_epoch = math.ceil(len(train_examples) / opts.batch_size)
    max_steps = opts.max_steps or max(1, round(opts.epochs * steps_per_epoch))
    warmup = min(opts.warmup_steps, max_steps - 1)
    out = Path(opts.out or f"runs/{opts.task}-{opts.method}-{Path(opts.model).name}")
    definition = run_definition(opts, len(train_examples), max_steps, warmup, _world_size())
    checkpoint = _find_checkpoint(out) if opts.resume else None
    if checkpoint is not None:
        check_resumable(checkpoint, definition)

    _seed_everything(opts.seed)
    base, tokenizer = load_model_and_tokenizer(opts.model, spec.num_labels)
    mopts = opts.method_options
    if not mopts.modules_to_save:
        mopts = dataclasses.replace(mopts, modules_to_save=classifier_head_names(base))
    method_run = prepare(opts.method, base, mopts, max_steps=max_steps, warmup_steps=warmup, seed=opts.seed)
    model = method_run.model
    rank, world, owns_group = _init_distributed()
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
    if checkpoint is not None:
        step, order, position, last_eval, loss_since_eval = _resume(checkpoint, method_run, optimizer, scheduler,
                                                                    gen, guard, rank)
        finished = method_run.controller.finished
        history.update(step)
    # The run directory is touched only now: a failed resume leaves it as it was.
    writer = RunWriter(out) if main else _NoWriter()
    if main and checkpoint is not None:
        _drop_metrics_after(out / "metrics.jsonl", step)
    elif main:
        (out / "metrics.jsonl").write_text("")
    if main:
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
                                  "loss_since_eval": loss_since_eval, "run": definition})
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
    fsync_dir(out)  # the renames reach the disk before the previous checkpoint is deleted
    shutil.rmtree(old, ignore_errors=True)


def _subset_seed(opts: TrainOptions) -> int:
    return opts.seed if opts.train_limit_seed is None else opts.train_limit_seed


def run_definition(opts: TrainOptions, train_examples: int, max_steps: int, warmup: int, world: int) -> dict:
    """What a checkpoint was made with, and a resume must repeat (docs/run_directory.md): every option
    that changes the steps taken. Left out, free to change on resume: eval_steps, save_steps,
    eval_batch_size, max_nonfinite_steps, progress."""
    model = Path(opts.model)
    local = model.exists()
    definition = {
        "task": opts.task, "method": opts.method,
        "model": str(model.resolve()) if local else opts.model,
        "model_config_sha256": sha256_file(model / "config.json") if local and (model / "config.json").is_file() else None,
        "data_dir": str(Path(opts.data_dir).resolve()) if opts.data_dir else None,
        "train_limit": opts.train_limit, "train_limit_seed": _subset_seed(opts) if opts.train_limit else None,
        "train_examples": train_examples, "eval_limit": opts.eval_limit, "max_seq_len": opts.max_seq_len,
        "batch_size": opts.batch_size, "lr": opts.lr, "weight_decay": opts.weight_decay, "max_steps": max_steps,
        "warmup_steps": warmup, "seed": opts.seed, "processes": world,
        "method_options": dataclasses.asdict(opts.method_options),
    }
    return json.loads(json.dumps(definition))  # as it reads back from the checkpoint (lists, not tuples)


_DEFINITION_LABELS = {
    "model_config_sha256": "the model's config.json (sha256)", "train_examples": "the number of training examples",
    "max_steps": "--max-steps (resolved)", "warmup_steps": "--warmup-steps (resolved)",
    "processes": "the number of processes", "data_dir": "--data-dir",
}


def check_resumable(checkpoint: Path, definition: dict) -> None:
    """Refuse a resume whose options differ from those the checkpoint was made with, naming each one."""
    recorded = read_json(checkpoint / TRAINING_STATE).get("extra", {}).get("run")
    if recorded is None:
        warnings.warn(f"{checkpoint}: the checkpoint records no options (written by an older version); "
                      "the resume cannot check that it repeats them", RuntimeWarning, stacklevel=2)
        return
    then, now = _flat(recorded), _flat(definition)
    differences = [f"{_DEFINITION_LABELS.get(k, '--' + k.replace('_', '-'))}: {then.get(k)!r} in the checkpoint, "
                   f"{now.get(k)!r} now" for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
    if differences:
        raise ValueError(f"--resume: the checkpoint in {checkpoint.parent} was made with other options; "
                         f"resume with the same ones, or start a new run in another --out. Differences: "
                         + "; ".join(differences))


def _flat(definition: dict) -> dict:
    return {k: v for k, v in definition.items() if k != "method_options"} | definition.get("method_options", {})


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
    """Evaluations logged after the checkpoint will be logged again by the resumed run. Rewritten
    beside the file and renamed over it: a kill at any moment leaves the whole history."""
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))


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
