"""Does eq. (6) measure what a module still needs, or how far the learning rate has decayed?

    python benchmarks/outer_ratio_vs_lr.py RUN_DIR [RUN_DIR...] [--out FILE.md]

For every outer check of a finished AROMA run (``rank_history.json``): the modules checked, the
median and range of their eq. (6) ratio, the mean learning-rate factor over the steps of the
component that just ended (the schedule of the run's ``config.json``, through ``aroma_peft.schedule``),
and the median ratio divided by that mean factor. A ratio that falls with the learning rate while
the divided one stays level says the components shrink because the steps do, not because the
module needs less. Reads JSON only: no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from aroma_peft.schedule import lr_factor


def _read(run_dir: Path) -> tuple[dict, dict, dict]:
    config = json.loads((run_dir / "config.json").read_text())
    method = config["method_options"]
    history = json.loads((run_dir / "rank_history.json").read_text())
    schedule = dict(max_steps=config["max_steps"], warmup_steps=config["warmup_steps"],
                    restart_warmup_steps=method["restart_warmup_steps"],
                    decay=method.get("lr_decay", "linear"), min_lr_ratio=method.get("min_lr_ratio", 0.0))  # older runs: the defaults
    return config, history, schedule


def head_rate(run_dir: Path) -> dict:
    """The heads' learning-rate factor summed over the steps run: with the warmups restarted at every
    inner-loop end that started a new component (one where some module merged, i.e. not all the
    modules checked converged), and with the first warmup and the decay alone."""
    config, history, schedule = _read(run_dir)
    restarts = [c["step"] for c in history["outer_checks"] if len(c["converged"]) < len(c["modules"])]
    steps = json.loads((run_dir / "final_metrics.json").read_text())["steps"] \
        if (run_dir / "final_metrics.json").is_file() else config["max_steps"]
    restart, actual = 0, 0.0
    for s in range(steps):
        if restarts and s == restarts[0]:
            restart = restarts.pop(0)
        actual += lr_factor(s, restart_step=restart, **schedule)
    decay_only = sum(lr_factor(s, restart_step=0, **schedule) for s in range(steps))
    return {"steps": steps, "restarts": sum(1 for c in history["outer_checks"] if len(c["converged"]) < len(c["modules"])),
            "actual": actual, "decay_only": decay_only, "share": actual / decay_only}


def rows(run_dir: Path) -> list[dict]:
    config, history, schedule = _read(run_dir)
    out, start = [], 0
    for check in history["outer_checks"]:
        end = check["step"]
        factors = [lr_factor(s, restart_step=start, **schedule) for s in range(start, end)]
        mean_factor = sum(factors) / len(factors)
        ratios = check["eq6_ratio"]
        median = statistics.median(ratios)
        out.append({"step": end, "inner_steps": check["inner_steps"], "modules": len(check["modules"]),
                    "converged": len(check["converged"]), "median": median,
                    "min": min(ratios), "max": max(ratios), "mean_lr_factor": mean_factor,
                    "median_over_lr": median / mean_factor})
        start = end
    return out


def table(run_dir: Path) -> str:
    lines = [f"`{run_dir}`", "",
             "| outer check at step | inner steps | modules checked | converged | eq. (6) ratio, median (min - max) "
             "| mean lr factor of the component | median / lr factor |",
             "|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows(run_dir):
        lines.append(f"| {r['step']} | {r['inner_steps']} | {r['modules']} | {r['converged']} | "
                     f"{r['median']:.2e} ({r['min']:.2e} - {r['max']:.2e}) | {r['mean_lr_factor']:.3f} | "
                     f"{r['median_over_lr']:.2e} |")
    h = head_rate(run_dir)
    lines += ["", f"The heads' learning-rate factor summed over the {h['steps']} steps: {h['actual']:.1f} with the "
                  f"{h['restarts']} restarted warmups, {h['decay_only']:.1f} with the decay alone ({100 * h['share']:.1f} %)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    for d in args.run_dirs:
        for name in ("config.json", "rank_history.json"):
            if not (d / name).is_file():
                parser.error(f"{d / name}: not found (a finished AROMA run directory is expected)")
    text = "\n".join(table(d) for d in args.run_dirs)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
