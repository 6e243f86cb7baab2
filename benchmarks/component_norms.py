"""Per-component quantities of finished runs: how large each rank-one component of the update is.

    python benchmarks/component_norms.py RUN_DIR [RUN_DIR...]
    python benchmarks/component_norms.py LORA_RUN_DIR --starts-from ONE_STEP_RUN_DIR
    python benchmarks/component_norms.py RUN_DIR --against OTHER_RUN_DIR

A run is an AROMA/ReLoRA run (its ``adapter/`` holds ``merged_A``/``merged_B``) or a LoRA run (a PEFT
LoRA adapter in ``adapter/``). For component k of each module, with s the adapter's scale:

- ``||s b_k a_k||_F`` and its eq. (6) ratio ``||s b_k a_k||_F / ||W0 + s sum_{j<k} b_j a_j||_F``
  (what the controller computed when component k ended; for LoRA, k runs over the rank's columns);
- the factor norms ``||a_k||`` and ``||b_k||``;
- how evenly ``a_k`` spreads over the input features: its participation ratio over its dimension,
  ``||a||_2^4 / (||a||_4^4 * in)`` (1: every entry the same size; 1/in: a single feature; about
  0.56, 5/9, for a Kaiming uniform draw);
- for an AROMA run with ``reinit="kaiming"`` (the paper's), how far ``a_k`` turned in its inner loop:
  its cosine with the Kaiming draw it started from, recomputed from the run's seed (1: it never
  turned; about 0.05 against an unrelated draw of 384 entries); for a LoRA run, against the A of
  ``--starts-from``'s run;

printed as min / median / max over the modules that have a k-th component, then the whole update
``||s B A||_F`` of each module (min / median / max), its ratio to ``||W0||_F``, and how the
components add up: ``||s B A||_F / sqrt(sum_k ||s b_k a_k||_F^2)``, 1 when they are orthogonal
to one another (their norms add in quadrature), sqrt(k) when all k point the same way; the sum of
the component norms ``sum_k ||s b_k a_k||_F`` (how much the components grew in all: the whole
update's norm had they all pointed one way) and the update's largest singular value (its largest
single direction).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch


def run_factors(run_dir: Path) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """``{module: (s, A [k, in], B [out, k])}`` of the run's adapter (AROMA's merged factors or PEFT's LoRA)."""
    adapter = run_dir / "adapter"
    if (adapter / "aroma_adapter.json").is_file():
        from aroma_peft.io import read_adapter

        meta, config, tensors, _ = read_adapter(adapter)
        if config.reinit == "offset":  # rows alternate trained pairs and offset terms: not one row a component
            raise SystemExit(f"{adapter}: a reinit='offset' run, whose merged rows are not one component each; "
                             "this script reads runs of the other re-init modes")
        return {m: (config.scaling, tensors[f"{m}.merged_A"], tensors[f"{m}.merged_B"]) for m in meta["modules"]}
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise SystemExit(f"{adapter}: neither aroma_adapter.json nor adapter_config.json: not an adapter of a finished run")
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise SystemExit(f"{config_path}: only a plain LoRA adapter (no rsLoRA, no DoRA) is read")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            r = ranks.get(get_pattern_key(ranks, module), config["r"])  # PEFT's own per-module lookup
            alpha = alphas.get(get_pattern_key(alphas, module), config["lora_alpha"])
            out[module] = (alpha / r, a, tensors[key.replace(".lora_A.", ".lora_B.")])
    return out


def initial_draws(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """``{module: [k, in]}``, the ``a`` each merged row started from, for an AROMA run whose new
    components start from the seeded Kaiming draw (``reinit="kaiming"``); None for any other run."""
    adapter = run_dir / "adapter"
    if not (adapter / "aroma_adapter.json").is_file():
        return None  # PEFT's LoRA draws its A from the global generator: not recomputable
    from aroma_peft.io import read_adapter
    from aroma_peft.layer import kaiming_draw

    meta, config, tensors, _ = read_adapter(adapter)
    if config.reinit != "kaiming":
        return None
    out = {}
    for index, name in enumerate(meta["modules"]):  # the model order, the layers' own indices
        rows, n_in = tensors[f"{name}.merged_A"].shape
        out[name] = torch.cat([kaiming_draw((config.r, n_in), config.seed, index, k, config.init_scale)
                               for k in range(rows // config.r)] or [torch.zeros(0, n_in)])
    return out


def component_rows(factors: dict[str, tuple[float, torch.Tensor, torch.Tensor]],
                   weights: dict[str, torch.Tensor], starts: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Per module: ``components`` (norm, eq. 6 ratio, ||a||, ||b|| of each, and with ``starts`` the
    cosine of each ``a`` with the draw it started from) and the whole update's norm."""
    out = {}
    for name, (s, a, b) in factors.items():
        w = weights[name].double()
        a, b = a.double(), b.double()
        w0 = w.norm().item()
        rows = []
        for k in range(a.shape[0]):
            comp = s * torch.outer(b[:, k], a[k])
            rows.append({"norm": comp.norm().item(), "ratio": (comp.norm() / w.norm()).item(),
                         "a": a[k].norm().item(), "b": b[:, k].norm().item(),
                         "spread": (a[k].norm() ** 4 / (a[k] ** 4).sum() / a.shape[1]).item()})
            if starts is not None:
                a0 = starts[name][k].double()
                rows[-1]["turn"] = (a[k] @ a0 / (a[k].norm() * a0.norm())).item()
            w = w + comp
        update = s * b @ a
        total = update.norm().item()
        coherence = total / sum(c["norm"] ** 2 for c in rows) ** 0.5 if any(c["norm"] for c in rows) else 0.0
        out[name] = {"components": rows, "total": total, "total_ratio": total / w0, "coherence": coherence,
                     "in_line": sum(c["norm"] for c in rows), "top_singular": torch.linalg.matrix_norm(update, 2).item()}
    return out


def base_weights(run_dir: Path, names) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    config = json.loads((run_dir / "config.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(config["model"], num_labels=2)
    modules = dict(base.named_modules())
    return {n: modules[n].weight.detach() for n in names}


def _spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def table(rows: dict[str, dict]) -> list[str]:
    depth = max(len(r["components"]) for r in rows.values())
    turns = any("turn" in c for r in rows.values() for c in r["components"])
    lines = ["| component | modules | norm min / median / max | eq. (6) ratio min / median / max "
             "| norm of a (median) | norm of b (median) | spread of a (median) |"
             + (" cos(a, its initial draw) min / median / max |" if turns else ""),
             "|---:|---:|---|---|---:|---:|---:|" + ("---|" if turns else "")]
    for k in range(depth):
        have = [r["components"][k] for r in rows.values() if len(r["components"]) > k]
        lines.append(f"| {k + 1} | {len(have)} | {_spread([c['norm'] for c in have], '.3g')} "
                     f"| {_spread([c['ratio'] for c in have], '.2e')} "
                     f"| {statistics.median(c['a'] for c in have):.3g} | {statistics.median(c['b'] for c in have):.3g} "
                     f"| {statistics.median(c['spread'] for c in have):.3g} |"
                     + (f" {_spread([c['turn'] for c in have], '.3f')} |" if turns else ""))
    blank = " |" if turns else ""
    lines.append(f"| whole update | {len(rows)} | {_spread([r['total'] for r in rows.values()], '.3g')} "
                 f"| {_spread([r['total_ratio'] for r in rows.values()], '.2e')} | | | |" + blank)
    lines.append(f"| how they add up: norm of the sum / root sum of squares (1: orthogonal) | {len(rows)} "
                 f"| {_spread([r['coherence'] for r in rows.values()], '.3g')} | | | | |" + blank)
    lines.append(f"| sum of the component norms (all grown in one direction) | {len(rows)} "
                 f"| {_spread([r['in_line'] for r in rows.values()], '.3g')} | | | | |" + blank)
    lines.append(f"| largest singular value of the whole update | {len(rows)} "
                 f"| {_spread([r['top_singular'] for r in rows.values()], '.3g')} | | | | |" + blank)
    return lines


def starts_from(run_dir: Path, factors: dict[str, tuple[float, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``--starts-from RUN``: the A factors of another run (for LoRA, a one-step run with the same seed
    and options, whose A is still PEFT's draw), module by module, to compare each ``a`` with."""
    other = run_factors(run_dir)
    if sorted(other) != sorted(factors) or any(other[m][1].shape != factors[m][1].shape for m in factors):
        raise SystemExit(f"{run_dir}: its adapter's modules or ranks differ from the run's; --starts-from needs the "
                         "same method, rank and model")
    return {m: other[m][1] for m in factors}


def update_cosines(factors: dict[str, tuple[float, torch.Tensor, torch.Tensor]],
                   other: dict[str, tuple[float, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """``--against RUN``: per module, the cosine between the two runs' whole updates ``s B A`` (as
    vectors of out x in entries; about 1/sqrt(out x in), 0.003 at 384 x 384, for unrelated ones)."""
    if sorted(other) != sorted(factors):
        raise SystemExit("--against: the two runs adapt different modules")
    out = {}
    for name, (s, a, b) in factors.items():
        s2, a2, b2 = other[name]
        u, v = s * b.double() @ a.double(), s2 * b2.double() @ a2.double()
        out[name] = (torch.sum(u * v) / (u.norm() * v.norm())).item() if u.norm() and v.norm() else 0.0
    return out


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished runs' folders")
    parser.add_argument("--starts-from", type=Path, default=None,
                        help="a run whose A factors are where the run's started (one run only; AROMA runs with "
                             "reinit='kaiming' need none: their draws are recomputed from the seed)")
    parser.add_argument("--against", type=Path, default=None,
                        help="another finished run: print the cosine between each module's update in the two")
    args = parser.parse_args(argv)
    if args.starts_from is not None and len(args.runs) != 1:
        parser.error("--starts-from compares one run with its start: pass one run")
    for d in args.runs:
        if not (d / "config.json").is_file():
            raise SystemExit(f"{d / 'config.json'}: not found (pass a finished run's folder)")
        factors = run_factors(d)
        starts = starts_from(args.starts_from, factors) if args.starts_from is not None else initial_draws(d)
        rows = component_rows(factors, base_weights(d, factors), starts)
        print(f"{d}: {len(rows)} modules, ranks {sorted(len(r['components']) for r in rows.values())}")
        print("\n".join(table(rows)))
        if args.against is not None:
            cos = list(update_cosines(factors, run_factors(args.against)).values())
            print(f"cosine between each module's update and {args.against}'s (min / median / max over "
                  f"{len(cos)} modules): {_spread(cos, '.3f')}")


if __name__ == "__main__":
    main(sys.argv[1:])
