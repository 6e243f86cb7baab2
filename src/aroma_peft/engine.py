"""The training engine every task family shares: Accelerate for the device, mixed precision and
processes; the loop itself, with the controller's decisions in it, right here.

Accelerate places the model on ``--device``, wraps it in DDP under ``torchrun`` / ``accelerate
launch``, applies bf16/fp16 autocast (and fp16's loss scaling), skips the all-reduce of all but the
last micro-batch of a gradient accumulation, and writes TensorBoard. What is AROMA's own stays in
the loop: the non-finite guard before the optimizer step, ``controller.step()`` after it, the data
order and the checkpoints that make a resume bitwise (docs/run_directory.md).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .faults import NonFiniteGuard
from .methods import MethodRun
from .rundir import LoopState, RankHistory, save_checkpoint, torch_rng_states

DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("no", "bf16", "fp16")


def check_device(device: str, precision: str) -> None:
    """Refuse a device or a mixed precision this machine cannot give, before any compute."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r} is unknown: expected one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"mixed precision {precision!r} is unknown: expected one of {', '.join(PRECISIONS)}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu, or auto)")
    on_cuda = cuda and device != "cpu"
    if precision == "fp16" and not on_cuda:
        raise ValueError("--fp16 needs a CUDA device (fp16 autocast with loss scaling is GPU-only); on CPU use --bf16")
    if precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--bf16: this GPU ({torch.cuda.get_device_name()}) cannot compute in bfloat16; "
                         "use --fp16 or full precision")


def make_accelerator(device: str, precision: str, out: Path):
    """An ``Accelerator`` for this run (TensorBoard into ``out/tb`` once the run directory exists)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    # Accelerate keeps its state in process-wide singletons that refuse a second configuration;
    # one process may run several runs (tests, the demo), each with its own device and precision.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # A frozen module's factors stop receiving gradients: find_unused_parameters. The merged buffers
    # are equal on every process by construction: no need to broadcast them at every forward.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
    return Accelerator(cpu=device == "cpu", mixed_precision=precision, log_with="tensorboard", project_dir=str(out),
                       kwargs_handlers=[ddp])


@dataclass
class Job:
    """What the loop works with: prepared by ``train.run`` from the task family, the method and the run directory."""

    accelerator: object
    family: object  # tasks.family.TaskFamily
    tokenizer: object
    method_run: MethodRun
    train_model: torch.nn.Module  # the model as the engine prepared it (DDP-wrapped under a launcher)
    optimizer: torch.optim.Optimizer  # the engine's wrapper (fp16 loss scaling); checkpoints hold the inner one
    scheduler: object
    guard: NonFiniteGuard
    data_rng: torch.Generator
    train_rows: list
    eval_data: object
    writer: object
    history: RankHistory
    out: Path
    definition: dict
    max_steps: int
    batch_size: int
    grad_accum: int
    eval_steps: int
    save_steps: int
    eval_batch_size: int
    progress: bool


def micro_batches(rows: list, rank: int, world: int, accum: int) -> list[tuple[list, float, float]]:
    """This process's share of a global batch, in ``accum`` parts: (rows, weight of its mean loss in the
    gradient, weight in the logged loss). DDP averages gradients over processes, so each part weighs
    its share of the global batch times ``world``. A part left without rows (an epoch's short last
    batch) runs a stand-in row with weight 0: every process takes every forward and backward."""
    mine = rows[rank::world]
    size = -(-len(mine) // accum)  # ceil
    parts = [mine[i * size:(i + 1) * size] for i in range(accum)]
    return [(part or rows[:1], len(part) * world / len(rows), len(part) / max(1, len(mine))) for part in parts]


def train_loop(job: Job, state: LoopState) -> tuple[list[float], list[float]]:
    """Train until ``max_steps`` or until the controller finishes; returns the losses and step times."""
    acc, run, controller = job.accelerator, job.method_run, job.method_run.controller
    rank, world = acc.process_index, acc.num_processes
    losses, step_times = [], []
    progress = _progress(job.max_steps, state.step, job.progress and acc.is_main_process)
    if job.max_steps == 0:  # zero-shot: the model as loaded, evaluated once
        _evaluate_and_record(job, state)
    while state.step < job.max_steps and not state.finished:
        if state.position >= len(state.order):  # a new epoch
            state.order, state.position = torch.randperm(len(job.train_rows), generator=job.data_rng).tolist(), 0
        t0 = time.perf_counter()
        rows = [job.train_rows[i] for i in state.order[state.position:state.position + job.batch_size]]
        state.position += job.batch_size
        # Every part padded like the whole batch: the same computation per example as one process, one part.
        length = max(len(r["input_ids"]) for r in rows) if world > 1 or job.grad_accum > 1 else None
        parts, loss = micro_batches(rows, rank, world, job.grad_accum), 0.0
        for i, (part, grad_weight, log_weight) in enumerate(parts):
            last = i == len(parts) - 1  # gradients are all-reduced once, after the last part
            with nullcontext() if last else acc.no_sync(job.train_model):
                batch = {k: v.to(acc.device) for k, v in job.family.collate(job.tokenizer, part, length).items()}
                part_loss = job.train_model(**batch).loss
                acc.backward(part_loss * grad_weight)
            loss = loss + part_loss.detach() * log_weight
        if acc.scaler is not None:
            acc.unscale_gradients()  # fp16: the guard and the controller read true gradients
        if job.guard.check(run.parameters, loss, step=state.step + 1):  # NaN/inf: no step, no AROMA decision
            if acc.scaler is not None:
                acc.scaler.update()  # a smaller loss scale for the next step
            job.optimizer.zero_grad(set_to_none=True)
            job.writer.scalar("train/skipped_steps", len(job.guard.skipped), state.step + 1)
            continue
        job.optimizer.step()
        job.scheduler.step()
        state.step += 1
        if controller is not None:  # AROMA, ReLoRA: Algorithm 1 (inner checks, eq. 6, merge & reinit, freeze)
            state.finished = controller.step()
        elif run.after_step is not None:
            run.after_step(state.step)  # AdaLoRA's budget allocation (needs this step's gradients)
        job.optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        state.loss_since_eval = [state.loss_since_eval[0] + losses[-1], state.loss_since_eval[1] + 1]
        _log_step(job, state.step, losses[-1], progress)
        done = state.finished or state.step >= job.max_steps
        if state.step % job.eval_steps == 0 or done:
            _evaluate_and_record(job, state)
        if state.step % job.save_steps == 0 and not done:
            torch_rng = torch_rng_states(world, acc.device)  # a collective: every process takes part
            if acc.is_main_process:
                save_checkpoint(job.out, run, _inner(job.optimizer), job.scheduler, job.data_rng, job.guard, torch_rng,
                                state.position_record() | {"run": job.definition})
    progress.close()
    return losses, step_times


def _inner(optimizer):
    """The torch optimizer inside the engine's wrapper: its state_dict is what a checkpoint holds."""
    return getattr(optimizer, "optimizer", optimizer)


def _log_step(job: Job, step: int, loss: float, progress) -> None:
    history = job.history
    history.update(step)
    job.writer.scalar("train/loss", loss, step)
    job.writer.scalar("train/learning_rate", _inner(job.optimizer).param_groups[0]["lr"], step)
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.3f}", rank=history.total_rank, trainable=history.trainable,
                         converged=history.converged(), refresh=False)


def _evaluate_and_record(job: Job, state: LoopState) -> None:
    """Score every eval split, append to metrics.jsonl, log to TensorBoard, rewrite the rank history."""
    metrics = job.family.evaluate(job.method_run.model, job.tokenizer, job.eval_data, job.eval_batch_size,
                                  job.accelerator.device)
    state.last_eval = metrics
    history = job.history
    record = {"step": state.step, "metrics": metrics, "main": metrics[job.family.main_key],
              "trainable_params": history.trainable, "total_rank": history.total_rank}
    if state.loss_since_eval[1]:  # the mean training loss since the previous evaluation
        record["train_loss"] = state.loss_since_eval[0] / state.loss_since_eval[1]
    state.loss_since_eval = [0.0, 0]
    job.writer.append_metrics(record)
    for k, v in metrics.items():
        job.writer.scalar(f"eval/{k}", v, state.step)
    job.writer.scalar("train/trainable_params", history.trainable, state.step)
    job.writer.scalar("train/total_rank", history.total_rank, state.step)
    if job.accelerator.is_main_process:
        history.write(job.out / "rank_history.json")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)
