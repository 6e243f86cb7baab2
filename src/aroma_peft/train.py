"""Fine-tune and evaluate one method on one task, writing a run directory (docs/run_directory.md).

``run`` composes the pieces every task family shares: the options (here), the family's data and
model head (``tasks/``), the base model (``pretrained``), the method (``methods``), the engine and
its loop (``engine``), the run directory (``rundir``) and the report (``report``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import CONVERGED_COMPONENT, OUTER_CRITERIA, REINIT_MODES, RESET_MODES
from .engine import PRECISIONS, Job, check_device, make_accelerator, train_loop
from .faults import NonFiniteGuard
from .io import sha256_file, write_json
from .layer import derived_seed
from .methods import METHODS, MethodOptions, optimizer_groups, prepare
from .pretrained import check_model_folder, check_model_kind, load_model_and_tokenizer
from .rundir import (LoopState, NoWriter, RankHistory, RunWriter, check_resumable, drop_metrics_after,
                     find_checkpoint, resume, write_results)
from .tasks.family import FAMILIES, get_family


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
    # the engine
    device: str = "cpu"  # cpu, cuda or auto (cuda when there is one)
    mixed_precision: str = "no"  # no, bf16 (autocast; on CPU too) or fp16 (CUDA, with loss scaling)
    grad_accum: int = 1  # each (global) batch of batch_size in this many parts, one optimizer step
    # the task family and its own options (commonsense, summarization: docs/tasks.md)
    family: str = "glue"
    train_file: str | None = None  # a training file instead of the family's default (Commonsense170K, ...)
    train_tasks: list[str] | None = None  # commonsense: datasets trained on (None: every one with a train file)
    eval_tasks: list[str] | None = None  # commonsense: datasets evaluated (None: the seven of Table 3)
    eval_mode: str = "generate"  # commonsense: generate (greedy + answer extraction, the paper) or loglik
    max_new_tokens: int | None = None  # generation length (commonsense: generate), and summarization's target
    # length (Table 14's Max Target Length: training targets cut at it too); None: the family's own (NEW_TOKENS)
    decoder_only: bool = False  # summarization with a causal LM through a prompt

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The generation length a family gets when --max-new-tokens is left out: XSum's summaries are 28 tokens
# on average and 38 at the 95th percentile (MiniLM's tokenizer, the 1,000-row sample); a commonsense
# answer ("the correct answer is answer1") is about ten.
NEW_TOKENS = {"summarization": 64}


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
    "epochs": _POSITIVE, "max_steps": ("an integer >= 0 (0: evaluate the model as loaded, zero-shot)",
                                       lambda v: _is_int(v) and v >= 0), "warmup_steps": _NONNEG_INT, "weight_decay": _NONNEG,
    "eval_steps": _POSITIVE_INT, "save_steps": _POSITIVE_INT, "max_nonfinite_steps": _NONNEG_INT,
    "seed": _NONNEG_INT, "train_limit": _POSITIVE_INT, "train_limit_seed": _NONNEG_INT, "eval_limit": _POSITIVE_INT,
    "grad_accum": _POSITIVE_INT, "max_new_tokens": _POSITIVE_INT,
    "mixed_precision": (f"one of {PRECISIONS}", lambda v: v in PRECISIONS),
    # method options
    "r": _POSITIVE_INT, "alpha": _POSITIVE, "dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "eps_in": _POSITIVE, "eps_out": _POSITIVE, "check_interval": _POSITIVE_INT, "max_inner_steps": _POSITIVE_INT,
    "restart_warmup_steps": _NONNEG_INT, "init_r": _POSITIVE_INT, "tinit": _NONNEG_INT, "tfinal": _NONNEG_INT,
    "delta_t": _POSITIVE_INT, "orth_reg_weight": _NONNEG,
    "reset": (f"one of {RESET_MODES}", lambda v: v in RESET_MODES),
    "reinit": (f"one of {REINIT_MODES}", lambda v: v in REINIT_MODES), "loraplus_lr_ratio": _POSITIVE,
    "a_lr_ratio": _NONNEG,
    "init_scale": _POSITIVE,
    "outer_criterion": (f"one of {OUTER_CRITERIA}", lambda v: v in OUTER_CRITERIA),
    "converged_component": (f"one of {CONVERGED_COMPONENT}", lambda v: v in CONVERGED_COMPONENT),
}
_NONE_ALLOWED = {"max_new_tokens", "epochs", "max_steps", "save_steps", "train_limit", "train_limit_seed", "eval_limit", "eps_in",
                 "eps_out"}


# Options added after checkpoints were first written (with the engine and the task families, then
# AROMA's re-initialization and LoRA+): a run's definition records one only where it differs from its
# default, and a checkpoint that lacks one was made at its default, so an older checkpoint still resumes.
_LATER_OPTIONS = ("family", "mixed_precision", "grad_accum", "train_file", "train_tasks", "decoder_only")
_LATER_METHOD_OPTIONS = ("reinit", "loraplus_lr_ratio", "init_scale", "a_lr_ratio")


def _later_defaults(opts: TrainOptions) -> dict:
    """The defaults of the options added later, keyed as a flattened definition keys them."""
    run_defaults, method_defaults = TrainOptions(task=opts.task, model=opts.model), MethodOptions()
    return ({name: getattr(run_defaults, name) for name in _LATER_OPTIONS}
            | {name: getattr(method_defaults, name) for name in _LATER_METHOD_OPTIONS})


def validate_option(name: str, value) -> None:
    """Check one option's value; the message names the command-line flag, the value and what is allowed."""
    if name not in OPTION_RULES or (value is None and name in _NONE_ALLOWED):
        return
    allowed, ok = OPTION_RULES[name]
    if not ok(value):
        raise ValueError(f"--{name.replace('_', '-')} must be {allowed}, got {value!r}")


def validate(opts: TrainOptions) -> None:
    """Check every option before any file is read or any compute is spent; a bad value names the option."""
    if opts.family not in FAMILIES:
        raise ValueError(f"task family {opts.family!r} is unknown: expected one of {', '.join(FAMILIES)}")
    get_family(opts).check(opts)
    if opts.method not in METHODS:
        raise ValueError(f"--method {opts.method!r} is unknown: expected one of {', '.join(METHODS)}")
    for name, value in dataclasses.asdict(opts).items():
        validate_option(name, value)
    for name, value in dataclasses.asdict(opts.method_options).items():
        validate_option(name, value)
    if opts.max_steps == 0 and opts.family == "glue":
        raise ValueError("--max-steps 0 (zero-shot) needs a language-model task: a GLUE classifier's head is "
                         "untrained, so its score would be chance; the majority-class floor is in every GLUE report")
    if opts.max_steps == 0 and opts.resume:
        raise ValueError("--max-steps 0 evaluates the model as loaded: there is nothing to --resume")
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
    if opts.batch_size < world * opts.grad_accum:
        raise ValueError(f"--grad-accum {opts.grad_accum} splits each process's share of --batch-size "
                         f"{opts.batch_size} into {opts.grad_accum} parts: it needs at least {world * opts.grad_accum} "
                         f"examples ({world} process(es) x {opts.grad_accum} parts)")
    check_device(opts.device, opts.mixed_precision)


def _world_size() -> int:
    """The number of processes: torchrun's WORLD_SIZE, 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run(opts: TrainOptions, splits: dict[str, list] | None = None) -> dict:
    """Train ``opts.method`` on ``opts.task`` and write the run directory; returns final_metrics.

    ``splits`` (train and the task's eval splits) replaces reading the data files.
    """
    # Everything that can fail on bad input fails here, before the model is loaded and before the
    # run directory is touched: the options, the model folder, the data, a checkpoint to resume.
    validate(opts)
    if opts.max_new_tokens is None:
        opts = dataclasses.replace(opts, max_new_tokens=NEW_TOKENS.get(opts.family, 32))
    family = get_family(opts)
    check_model_folder(opts.model)
    check_model_kind(opts.model, family.head, family.name)
    train_examples, eval_splits = family.read(opts, splits)
    if opts.train_limit:
        train_examples = random.Random(_subset_seed(opts)).sample(train_examples,
                                                                  min(opts.train_limit, len(train_examples)))
    if opts.eval_limit:
        eval_splits = {s: ex[:opts.eval_limit] for s, ex in eval_splits.items()}
    steps_per_epoch = math.ceil(len(train_examples) / opts.batch_size)
    max_steps = opts.max_steps if opts.max_steps is not None else max(1, round(opts.epochs * steps_per_epoch))
    # max_steps 0 (zero-shot): every method starts from the base model's function (LoRA, AROMA and
    # ReLoRA with B = 0, AdaLoRA with E = 0, full and BitFit untrained), evaluated once at step 0.
    warmup = max(0, min(opts.warmup_steps, max_steps - 1))
    out = Path(opts.out or f"runs/{opts.task}-{opts.method}-{Path(opts.model).name}")
    definition = run_definition(opts, len(train_examples), max_steps, warmup, _world_size())
    checkpoint = find_checkpoint(out) if opts.resume else None
    if checkpoint is not None:
        check_resumable(checkpoint, definition, json.loads(json.dumps(_later_defaults(opts))))

    owns_group = _world_size() > 1 and not torch.distributed.is_initialized()
    accelerator = make_accelerator(opts.device, opts.mixed_precision, out)  # the process group, under a launcher
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    _seed_everything(opts.seed)
    base, tokenizer = load_model_and_tokenizer(opts.model, family.head)
    mopts = opts.method_options
    if not mopts.modules_to_save:
        mopts = dataclasses.replace(mopts, modules_to_save=family.modules_to_save(base))
    if mopts.target_modules is None:
        mopts = dataclasses.replace(mopts, target_modules=family.target_modules(base))
    method_run = prepare(opts.method, base, mopts, max_steps=max(1, max_steps), warmup_steps=warmup, seed=opts.seed)
    model = method_run.model
    # Under a launcher: DDP, each process a slice of every (global) batch; every process runs its own
    # controller and takes the same decisions (docs/distributed.md).
    train_model = accelerator.prepare_model(model)
    if rank > 0:
        # Dropout draws from torch's global generator. Seeded alike, every process would draw the same
        # masks for its slice; each process other than the first gets a stream of its own (the first
        # keeps a one-process run's). AROMA's own draws (Reinit, Reset masks) use derived seeds: alike.
        torch.manual_seed(derived_seed(opts.seed, rank))

    resolved = opts.to_dict() | {"method_options": dataclasses.asdict(mopts), "resolved_max_steps": max_steps,
                                 "resolved_warmup_steps": warmup, "train_examples": len(train_examples),
                                 "eval_examples": {s: len(e) for s, e in eval_splits.items()}, "processes": world,
                                 "device": str(accelerator.device)}
    train_rows = family.encode(tokenizer, train_examples, opts.max_seq_len)
    eval_data = family.eval_data(tokenizer, eval_splits, opts.max_seq_len)
    baseline = family.baseline(train_examples, eval_splits)

    optimizer = torch.optim.AdamW(optimizer_groups(method_run, opts.lr, mopts.loraplus_lr_ratio, mopts.a_lr_ratio), lr=opts.lr,
                                  weight_decay=opts.weight_decay)
    scheduler = method_run.make_scheduler(optimizer)
    history = RankHistory(method_run)

    model.train()
    gen = torch.Generator().manual_seed(opts.seed)
    guard = NonFiniteGuard(opts.max_nonfinite_steps)
    state = LoopState()
    if checkpoint is not None:
        state = resume(checkpoint, method_run, optimizer, scheduler, gen, guard, rank, accelerator.device)
        history.update(state.step)
    # The run directory is touched only now: a failed resume leaves it as it was.
    writer = RunWriter(out, accelerator) if main else NoWriter()
    if main and checkpoint is not None:
        drop_metrics_after(out / "metrics.jsonl", state.step)
    elif main:
        (out / "metrics.jsonl").write_text("")
    if main:
        write_json(out / "config.json", resolved)
    job = Job(accelerator=accelerator, family=family, tokenizer=tokenizer, method_run=method_run,
              train_model=train_model, optimizer=accelerator.prepare_optimizer(optimizer, device_placement=False),
              scheduler=scheduler, guard=guard, data_rng=gen, train_rows=train_rows, eval_data=eval_data,
              writer=writer, history=history, out=out, definition=definition, max_steps=max_steps,
              batch_size=opts.batch_size, grad_accum=opts.grad_accum, eval_steps=opts.eval_steps,
              save_steps=opts.save_steps or opts.eval_steps, eval_batch_size=opts.eval_batch_size,
              progress=opts.progress)
    started = time.perf_counter()
    losses, step_times = train_loop(job, state)
    wall = time.perf_counter() - started

    if owns_group:
        torch.distributed.destroy_process_group()
    # Every process returns the same summary (its replica is the same); only the first writes files.
    final = {
        "task": opts.task, "method": opts.method, "model": opts.model, "main_metric": family.main_key,
        "metrics": state.last_eval, "majority_baseline": baseline,
        "trainable_params": history.summary(state.step), "total_rank": history.total_rank, "steps": state.step,
        "stopped_early": state.step < max_steps, "nonfinite_steps_skipped": guard.skipped, "wall_time_s": wall,
        "mean_step_time_s": sum(step_times) / max(1, len(step_times)),
    }
    if opts.family != "glue":
        final["family"] = opts.family
    if max_steps == 0:
        final["zero_shot"] = True
    if main:
        write_results(out, method_run, history, final)
        writer.close()
    return final


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
    }
    later = _later_defaults(opts)  # recorded only where they differ from their defaults
    definition["method_options"] = {k: v for k, v in dataclasses.asdict(opts.method_options).items()
                                    if k not in _LATER_METHOD_OPTIONS or v != later[k]}
    for name in _LATER_OPTIONS:
        if getattr(opts, name) != later[name]:
            definition[name] = getattr(opts, name)
    return json.loads(json.dumps(definition))  # as it reads back from the checkpoint (lists, not tuples)
