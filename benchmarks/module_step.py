"""One adapted module's forward + backward against the frozen module's, and what each extra kernel costs.

The whole-model step (``step_time.py``) varies by +-20 % from step to step on a shared 2-core VM,
which hides a few per cent of adapter overhead. Here one module is timed alone, many times, with
its variants interleaved, so the adapter's own cost is measured much more precisely:

    python benchmarks/module_step.py            # RoBERTa-base and MiniLM module shapes, batch 8 x 128

Variants, each ``y = module(x); y.backward(g)`` with ``x`` requiring grad and ``W0`` frozen:
    floor        the frozen nn.Linear (its input gradient only)
    aroma        AromaLinear at p=1, the fused path (``fused._LiveLinear``)
    aroma-plain  the same layer with ``fused = False`` (plain autograd: base + s (x A^T) B^T)
    lora-r1      PEFT's LoRA r=1 on the same nn.Linear

Then each kernel the fused path adds is timed alone (``components`` table).
Written to ``results/module_step.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import RESULTS, machine_line, paired_ratio  # noqa: E402

from aroma_peft import AromaLinear  # noqa: E402

SHAPES = {"roberta-base": [(768, 768), (768, 3072), (3072, 768)], "minilm": [(384, 384), (384, 1536), (1536, 384)]}


def build(in_f: int, out_f: int):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).requires_grad_(False)
    aroma = AromaLinear(copy.deepcopy(base), r=1, alpha=4.0)
    aroma.base_layer.requires_grad_(False)
    with torch.no_grad():
        aroma.lora_B.normal_(std=0.01)
    plain = copy.deepcopy(aroma)
    plain.fused = False
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(nn.Sequential(copy.deepcopy(base)), LoraConfig(r=1, lora_alpha=2, target_modules=["0"]))
    return {"floor": base, "aroma": aroma, "aroma-plain": plain, "lora-r1": lora}


def time_modules(modules: dict, x: torch.Tensor, g: torch.Tensor, rounds: int, warmup: int) -> dict:
    times = {k: [] for k in modules}
    for round_ in range(warmup + rounds):
        for name, m in random.Random(round_).sample(list(modules.items()), len(modules)):  # no fixed order
            xr = x.detach().requires_grad_(True)
            t = time.perf_counter()
            m(xr).backward(g)
            times[name].append(time.perf_counter() - t)
            m.zero_grad(set_to_none=True)
    return {k: v[warmup:] for k, v in times.items()}


def components(in_f: int, out_f: int, n: int, rounds: int) -> dict:
    """Each kernel the fused path runs beyond the frozen layer's, timed alone (median ms)."""
    x, g = torch.randn(n, in_f), torch.randn(n, out_f)
    a, b, bias = torch.randn(1, in_f), torch.randn(out_f, 1), torch.randn(out_f)
    u, v = torch.randn(n, 1), torch.randn(n, 1)
    kernels = {
        "fwd: u = x A^T": lambda: x @ a.t(),
        "fwd: bias + u B^T (replaces the bias broadcast)": lambda: torch.addcmul(bias, u, b.t()),
        "fwd: the bias broadcast it replaces": lambda: bias.expand(n, out_f).clone(),
        "fwd: bias + u B^T as a GEMM with k=1 (addmm, not used)": lambda: torch.addmm(bias, u, b.t()),
        "bwd: v = s g B": lambda: g @ b,
        "bwd: dB = g^T (s u)": lambda: g.t() @ u,
        "bwd: dA = v^T x": lambda: v.t() @ x,
        "bwd: v A (the input gradient's rank-one part)": lambda: v * a,
    }
    times = {k: [] for k in kernels}
    for _ in range(rounds):
        for k, fn in kernels.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--models", default="roberta-base,minilm")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(SHAPES))
    if unknown:
        p.error(f"unknown models {unknown}; known: {sorted(SHAPES)}")
    machine = machine_line()
    print(machine, flush=True)
    n = args.batch_size * args.seq_len
    rows, comp_rows = [], []
    for model in models:
        for in_f, out_f in SHAPES[model]:
            modules = build(in_f, out_f)
            x = torch.randn(args.batch_size, args.seq_len, in_f)
            g = torch.randn(args.batch_size, args.seq_len, out_f)
            times = time_modules(modules, x, g, args.rounds, args.warmup)
            row = {"model": model, "shape": f"{in_f}->{out_f}", "floor_ms": 1e3 * statistics.median(times["floor"])}
            for name in ("aroma", "aroma-plain", "lora-r1"):
                row[name] = paired_ratio(times[name], times["floor"])
                row[name + "_extra_ms"] = 1e3 * (statistics.median(times[name]) - statistics.median(times["floor"]))
            rows.append(row)
            comp_rows.append({"model": model, "shape": row["shape"], **components(in_f, out_f, n, args.rounds)})
            print(json.dumps(row), flush=True)

    def fmt(r):
        return f"{r['median']:.3f} [{r['low']:.3f}–{r['high']:.3f}]"

    lines = [f"### One module's forward + backward, batch {args.batch_size} x {args.seq_len}, {args.rounds} "
             f"interleaved rounds\n\n{machine}\n",
             "| model | in->out | floor ms | AROMA fused × floor [95 % CI] | AROMA plain × floor | PEFT LoRA r=1 × floor "
             "| AROMA fused − floor ms |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['shape']} | {r['floor_ms']:.2f} | {fmt(r['aroma'])} | {fmt(r['aroma-plain'])} "
                     f"| {fmt(r['lora-r1'])} | {r['aroma_extra_ms']:.2f} |")
    names = [k for k in comp_rows[0] if k not in ("model", "shape")]
    lines += ["", "Each extra kernel of the fused path alone, median ms:", "",
              "| model | in->out | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for c in comp_rows:
        lines.append(f"| {c['model']} | {c['shape']} | " + " | ".join(f"{c[k]:.3f}" for k in names) + " |")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "module_step.md").write_text(report)
    (args.out_dir / "module_step.json").write_text(json.dumps({"machine": machine, "rows": rows, "components": comp_rows,
                                                               "command": " ".join(sys.argv)}, indent=1))
    print(f"saved {args.out_dir / 'module_step.md'} and .json")


if __name__ == "__main__":
    main()
