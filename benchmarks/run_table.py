"""A markdown table of several run directories' final_metrics.json: what benchmarks/glue_minilm.sh reports.

    python benchmarks/run_table.py runs/glue-minilm/mrpc-* runs/glue-minilm/rte-*
"""

from __future__ import annotations

import sys
from pathlib import Path

from aroma_peft.report import read_run_file


def row(run_dir: Path) -> str:
    d = read_run_file(run_dir, "final_metrics.json")
    main = d["main_metric"]
    metrics = ", ".join(f"{k} {100 * v:.2f}" for k, v in d["metrics"].items())
    majority = ", ".join(f"{k} {100 * v:.2f}" for k, v in d["majority_baseline"].items())
    p = d["trainable_params"]
    return (f"| {d['task']} | {d['method']} | {100 * d['metrics'][main]:.2f} | {metrics} | {majority} "
            f"| {p['initial']:,} / {p['mean']:,.0f} / {p['final']:,} | {d['total_rank']} | {d['steps']} "
            f"| {d['wall_time_s']:.0f} | {d['mean_step_time_s']:.3f} |")


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python benchmarks/run_table.py RUN_DIR...")
    print("| task | method | main metric | dev metrics | majority class | trainable (initial / mean / final) "
          "| total rank | steps | wall s | mean s/step |")
    print("|---|---|---:|---|---|---|---:|---:|---:|---:|")
    for d in argv:
        print(row(Path(d)))


if __name__ == "__main__":
    main(sys.argv[1:])
