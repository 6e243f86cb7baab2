"""Where a training step's time goes: torch.profiler's operator table for chosen step_time.py variants.

    python benchmarks/profile_step.py --model minilm --variants floor,lora-r1,aroma-p1

Each variant is built as in ``step_time.py``, takes ``--warmup`` untimed steps, then ``--steps``
profiled ones; the table lists the operators by self CPU time (totals over the profiled steps).
Written to ``results/profile_<model>.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import RESULTS, VARIANTS, build_base_model, build_variant, machine_line, make_batch  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm", choices=["minilm", "roberta-base-shape"])
    p.add_argument("--variants", default="floor,lora-r1,aroma-p1")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {VARIANTS}")
    template = build_base_model(args.model)
    batch = make_batch(template, args.batch_size, args.seq_len)
    parts = [f"### Operator profile, {args.model}, batch {args.batch_size} x {args.seq_len}, "
             f"{args.steps} profiled steps per variant\n\n{machine_line()}\n"]
    for name in names:
        v = build_variant(name, copy.deepcopy(template))
        for _ in range(args.warmup):
            v.step(batch, record=False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                v.step(batch, record=True)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.rows]
        lines = [f"#### {name}: {total / args.steps:.3f} s self CPU per step (all threads' ops, profiler on)\n",
                 "| operator | calls/step | self CPU s/step | share |", "|---|---:|---:|---:|"]
        for e in rows:
            lines.append(f"| {e.key} | {e.count / args.steps:.0f} | {e.self_cpu_time_total / 1e6 / args.steps:.3f} "
                         f"| {100 * e.self_cpu_time_total / 1e6 / total:.1f} % |")
        parts.append("\n".join(lines) + "\n")
        print(parts[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"profile_{args.model}.md"
    out.write_text("\n".join(parts))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
