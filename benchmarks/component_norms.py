"""Per-component quantities of a finished AROMA/ReLoRA run: the norm of each merged component and its eq. (6) ratio.

    python benchmarks/component_norms.py RUN_DIR [RUN_DIR...]

For each component k of each module: ||s b_k a_k||_F and ||s b_k a_k||_F / ||W0 + s sum_{j<k} b_j a_j||_F
(eq. 6 as the controller computed it when component k ended), from the run's adapter and the
pretrained weights; printed as min / median / max over the modules that have a k-th component.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch


def component_ratios(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    from transformers import AutoModelForSequenceClassification

    config = json.loads((run_dir / "config.json").read_text())
    from aroma_peft.io import read_adapter

    meta, _, tensors, _ = read_adapter(run_dir / "adapter")  # format 1 or 2, keyed "{module}.merged_A"
    s = meta["config"]["alpha"] / meta["config"]["r"]
    base = AutoModelForSequenceClassification.from_pretrained(config["model"], num_labels=2)
    modules = dict(base.named_modules())
    out = {}
    for name in meta["modules"]:
        w = modules[name].weight.detach().double()
        a, b = tensors[f"{name}.merged_A"].double(), tensors[f"{name}.merged_B"].double()
        rows = []
        for k in range(a.shape[0]):
            comp = s * torch.outer(b[:, k], a[k])
            rows.append((comp.norm().item(), (comp.norm() / w.norm()).item()))
            w = w + comp
        out[name] = rows
    return out


def main(argv: list[str]) -> None:
    for d in argv:
        ratios = component_ratios(Path(d))
        depth = max(len(r) for r in ratios.values())
        print(f"{d}: {len(ratios)} modules, ranks {sorted(len(r) for r in ratios.values())}")
        print("| component | modules | norm min / median / max | eq. (6) ratio min / median / max |")
        print("|---:|---:|---|---|")
        for k in range(depth):
            have = [r[k] for r in ratios.values() if len(r) > k]
            n = [x[0] for x in have]
            q = [x[1] for x in have]
            print(f"| {k + 1} | {len(have)} | {min(n):.3g} / {statistics.median(n):.3g} / {max(n):.3g} "
                  f"| {min(q):.2e} / {statistics.median(q):.2e} / {max(q):.2e} |")


if __name__ == "__main__":
    main(sys.argv[1:])
