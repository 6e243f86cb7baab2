"""Read a run directory (docs/run_directory.md) and summarise it: one run as report.md, many as a Table 2."""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path

from .io import atomic_write
from .plots import plot_rank_distribution, plot_training
from .run_files import RUN_FILES, read_run_file


def load_run(run_dir: str | Path) -> dict:
    """All JSON files of a run: ``{"config", "metrics", "rank_history", "ranks", "final_metrics"}``."""
    return {name.split(".")[0]: read_run_file(run_dir, name) for name in RUN_FILES}


def trainable_mean(history: Sequence[dict], final_step: int) -> float:
    """Step-weighted mean of ``trainable_params`` over the steps [0, final_step).

    ``history`` is the step function of rank_history.json: each entry holds from its ``step`` until
    the next entry's. The first entry is taken to hold from step 0; entries at or after
    ``final_step`` never held.
    """
    if final_step <= 0:
        raise ValueError(f"final_step must be > 0, got {final_step}")
    if not history:
        raise ValueError("history is empty: no trainable parameter count recorded")
    entries = sorted(history, key=lambda e: e["step"])
    starts = [0] + [e["step"] for e in entries[1:]]
    ends = starts[1:] + [final_step]
    total = sum(e["trainable_params"] * max(0, min(end, final_step) - start)
                for e, start, end in zip(entries, starts, ends))
    return total / final_step


def format_count(n: float, unit_of: float | None = None) -> str:
    """A parameter count as in the paper: 0.17M from 100k up, 24.6k from 1k up, else the integer.

    ``unit_of`` picks the unit from another value, so counts side by side share one (0.17M / 0.00M).
    """
    ref = abs(n if unit_of is None else unit_of)
    if ref >= 1e5:
        return f"{n / 1e6:.2f}M"
    if ref >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def mean_std(values: Sequence[float]) -> str:
    """Scores (fractions) x100 as a table cell: ``81.62`` for one run, ``81.54 ± 0.51 (3 seeds)`` for several.

    The spread is the sample standard deviation (n - 1), as for the paper's seeds.
    """
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} ({len(values)} seeds)"


def _params_cell(trainable: dict) -> str:
    values = [trainable[k] for k in ("initial", "mean", "final")]
    return " / ".join(format_count(v, unit_of=max(values)) for v in values)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def loop_notes(config: dict, rank_history: dict) -> tuple[list[str], list[str]]:
    """What the dual loop decided, from the inner-loop ends in ``rank_history.json``: lines for
    report.md, and the problems among them (a run in which eq. (5) ended no inner loop, or eq. (6)
    froze no module before T, trained as something other than AROMA; docs/algorithm.md). Runs
    without a dual loop, or written before ``outer_checks`` were recorded: nothing."""
    checks = rank_history.get("outer_checks")
    opts = config.get("method_options") or {}
    if checks is None or "max_inner_steps" not in opts:
        return [], []
    from .methods import loop_tolerances

    eps_in, eps_out = loop_tolerances(config.get("method"), opts.get("eps_in"), opts.get("eps_out"))
    t_in, interval = opts["max_inner_steps"], opts["check_interval"]
    lengths = [c["inner_steps"] for c in checks]
    # Files written before "ended_by_eq5" was recorded: a loop shorter than T_in was ended by eq. (5).
    by_eq5 = [c["inner_steps"] for c in checks if c.get("ended_by_eq5", c["inner_steps"] < t_in)]
    lines, problems = [], []
    if eps_in is None:
        lines.append(f"{len(lengths)} inner loops ended, every one at T_in = {t_in} steps (eq. (5) is off).")
    else:
        after = (f" (after {min(by_eq5)} / {statistics.median(by_eq5):g} / {max(by_eq5)} steps, min / median / max)"
                 if by_eq5 else "")
        lines.append(f"{len(lengths)} inner loops ended: {len(by_eq5)} by eq. (5){after}, "
                     f"{len(lengths) - len(by_eq5)} at T_in = {t_in} steps.")
        if lengths and not by_eq5:
            problems.append(
                f"eq. (5) ended no inner loop: every one ran T_in = {t_in} steps, so the components were merged on a "
                f"fixed cycle, as ReLoRA merges them. Under Adam a norm that grows about linearly meets eq. (5) after "
                f"about check_interval / eps_in = {interval / eps_in:g} steps (docs/algorithm.md, eq. (5)): a "
                f"max_inner_steps above that lets eq. (5) end the loops.")
    n_modules = len(rank_history.get("modules", []))
    converged = [(c["step"], len(c["converged"])) for c in checks if c["converged"]]
    if converged:
        lines.append(f"Modules frozen by eq. (6): {sum(n for _, n in converged)} of {n_modules}, "
                     f"at steps {converged[0][0]} to {converged[-1][0]}.")
    elif eps_out is not None and checks:
        ratios = [r for c in checks for r in c["eq6_ratio"] if r is not None]
        smallest = f" (the smallest measured: {min(ratios):.3g})" if ratios else ""
        problems.append(
            f"eq. (6) froze no module before T: eps_out = {eps_out:g} is below every ratio it was compared "
            f"with{smallest}, so every module trained to T and the trainable parameters fell only there "
            f"(docs/algorithm.md, \"Setting eps_out\").")
    return lines + [f"**Warning: {p}**" for p in problems], problems


def write_report(run_dir: str | Path) -> Path:
    """Draw both figures and write ``report.md`` into the run directory; returns its path."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    final = run["final_metrics"]
    fig1 = plot_training(run_dir)
    fig3 = plot_rank_distribution(run_dir)

    main = final["main_metric"]
    baseline = final["majority_baseline"]
    tp = final["trainable_params"]
    main_line = f"{main} = {final['metrics'][main]:.4f}" if main in final["metrics"] else f"{main}: not evaluated"
    if main in baseline:
        main_line += f" (majority-class baseline {baseline[main]:.4f})"
    summary = [
        ("task", final["task"]),
        ("method", final["method"]),
        ("model", final["model"]),
        ("main metric", main_line),
        ("trainable parameters (initial / mean / final)",
         f"{tp['initial']:,} / {tp['mean']:,.1f} / {tp['final']:,} ({_params_cell(tp)})"),
        ("total rank", str(final["total_rank"])),
        ("steps", str(final["steps"])),
        ("stopped early", "yes" if final["stopped_early"] else "no"),
        ("wall time", f"{final['wall_time_s']:.1f} s"),
        ("mean step time", f"{final['mean_step_time_s']:.4f} s"),
    ]
    lines = [f"# Run report: {final['task']} / {final['method']} / {final['model']}", ""]
    lines += _table(["", ""], summary)
    lines += ["", "## Metrics (last evaluation)", ""]
    lines += _table(["metric", "value", "majority-class baseline"],
                    [(name, f"{value:.4f}", f"{baseline[name]:.4f}" if name in baseline else "-")
                     for name, value in final["metrics"].items()])

    loops, problems = loop_notes(run["config"], run["rank_history"])
    if loops:
        lines += ["", "## The dual loop", ""] + [f"- {line}" for line in loops]
    for problem in problems:
        warnings.warn(f"{run_dir}: {problem}", stacklevel=2)

    modules = run["ranks"]["modules"]
    lines += ["", "## Ranks of the adapted modules", ""]
    if modules:
        total_rank = sum(m["rank"] for m in modules)
        total_eff = sum(m["effective_rank"] for m in modules)
        if total_rank:
            lines += [f"Effective rank / rank over all modules: {total_eff:.2f} / {total_rank} "
                      f"= {100 * total_eff / total_rank:.1f}%.", ""]
        lines += _table(["module", "rank", "effective rank"],
                        [(m["module"], str(m["rank"]), f"{m['effective_rank']:.2f}") for m in modules])
    else:
        lines.append("No adapted modules (full fine-tuning or BitFit train the base weights directly).")

    lines += ["", "## Figures", "",
              f"![Figure 1 analogue: trainable parameters, total rank, module ranks and eval metric vs step]"
              f"({fig1.relative_to(run_dir).as_posix()})", "",
              f"![Figure 3 analogue: rank (red, outer) and effective rank (blue, inner) per layer and module type]"
              f"({fig3.relative_to(run_dir).as_posix()})", ""]
    path = run_dir / "report.md"
    atomic_write(path, lambda p: p.write_text("\n".join(lines), encoding="utf-8"))
    return path


# config.json keys that may differ between the seeds of one setting: where and on what the run ran
SEED_FREE_KEYS = frozenset({"seed", "out", "resume", "progress", "device"})


def _flat(config: dict, prefix: str = "") -> dict:
    """``{"method_options": {"eps_in": 0.1}}`` as ``{"method_options.eps_in": 0.1}``."""
    flat = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat


def compare_runs(run_dirs: Sequence[str | Path]) -> str:
    """A Table 2-style markdown table: one row per method, one column per task (main metric x100), Avg.

    Runs are grouped by method and task. Several runs in one group are seeds of one setting: the
    cell is their mean ± standard deviation (and how many), and their ``config.json`` must agree
    on everything but the seed and where the run ran (``SEED_FREE_KEYS``; a key that one file lacks,
    written by an older version, is not compared); two runs with the same seed, or with different
    settings, are an error. The #Param cell averages initial / mean / final
    over the row's runs. A last row gives the majority-class baseline of each task.
    """
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    groups: dict[tuple[str, str], list[tuple[Path, dict, dict]]] = {}  # (run dir, flat config, final metrics)
    for run_dir in run_dirs:
        final = read_run_file(run_dir, "final_metrics.json")
        if final["main_metric"] not in final["metrics"]:
            raise ValueError(f"{Path(run_dir) / 'final_metrics.json'}: main metric {final['main_metric']!r} "
                             f"not among its metrics {sorted(final['metrics'])}: was the run ever evaluated?")
        mine = _flat(read_run_file(run_dir, "config.json"))
        key = (final["method"], final["task"])
        for other, theirs, _ in groups.get(key, []):
            if theirs.get("seed") == mine.get("seed"):
                raise ValueError(f"two runs of method {key[0]!r} on task {key[1]!r} with seed "
                                 f"{mine.get('seed')!r}: {other} and {run_dir}; compare one run per method, "
                                 f"task and seed")
            differ = sorted(k for k in (set(mine) & set(theirs)) - SEED_FREE_KEYS if mine[k] != theirs[k])
            if differ:
                raise ValueError(f"runs of method {key[0]!r} on task {key[1]!r} differ in "
                                 + ", ".join(f"{k} ({theirs[k]!r} in {other}, {mine[k]!r} in {run_dir})"
                                             for k in differ)
                                 + ": a cell averages seeds of one setting; compare settings as separate tables")
        groups.setdefault(key, []).append((Path(run_dir), mine, final))

    by_method: dict[str, dict[str, list[dict]]] = {}
    for (method, task), runs in groups.items():
        by_method.setdefault(method, {})[task] = [final for _, _, final in runs]
    tasks = sorted({task for runs in by_method.values() for task in runs})
    main_of = {task: next(runs[task][0]["main_metric"] for runs in by_method.values() if task in runs)
               for task in tasks}

    def score_cells(scores: dict[str, list[float]]) -> list[str]:
        means = [statistics.mean(v) for v in scores.values()]
        return ([mean_std(scores[t]) if t in scores else "-" for t in tasks]
                + [f"{100 * sum(means) / len(means):.2f}" if means else "-"])

    rows = []
    for method, runs in by_method.items():
        finals = [f for group in runs.values() for f in group]
        params = {k: sum(f["trainable_params"][k] for f in finals) / len(finals) for k in ("initial", "mean", "final")}
        scores = {t: [f["metrics"][f["main_metric"]] for f in group] for t, group in runs.items()}
        rows.append([method, _params_cell(params)] + score_cells(scores))
    majority = {}
    for task in tasks:
        baselines = [runs[task][0]["majority_baseline"] for runs in by_method.values() if task in runs]
        if main_of[task] in baselines[0]:
            majority[task] = [baselines[0][main_of[task]]]
    if majority:
        rows.append(["majority class", "-"] + score_cells(majority))

    header = ["method", "#Param (initial / mean / final)"] + [f"{t.upper()} {main_of[t]}" for t in tasks] + ["Avg"]
    footnote = ("Main metric x100; mean ± standard deviation over the seeds where a cell has several runs. "
                "#Param: trainable parameters, averaged over the row's runs. Avg: mean over the tasks present "
                "in the row; \"-\" marks a task not run with that method.")
    return "\n".join(_table(header, rows) + ["", footnote]) + "\n"


def compare_metrics(run_dirs: Sequence[str | Path]) -> str:
    """One row per run, one column per metric (x100): the table of a multi-metric family.

    Commonsense reports seven accuracies and summarization three ROUGE scores, which
    ``compare_runs`` (one main metric per task) cannot show. Each row is labelled with its method, or
    ``zero-shot`` for a ``--max-steps 0`` run; two runs with one label are an error. The last row is
    the floor every run shares: LEAD-1 for summarization, the majority class otherwise.
    """
    if not run_dirs:
        raise ValueError("compare_metrics needs at least one run directory")
    finals, sources = {}, {}
    for run_dir in run_dirs:
        final = read_run_file(run_dir, "final_metrics.json")
        label = "zero-shot" if final.get("zero_shot") else final["method"]
        if label in sources:
            raise ValueError(f"two runs labelled {label!r}: {sources[label]} and {run_dir}; compare one run per method")
        if not final["metrics"]:
            raise ValueError(f"{Path(run_dir) / 'final_metrics.json'}: no metrics: was the run ever evaluated?")
        sources[label], finals[label] = Path(run_dir), final
    first = next(iter(finals.values()))
    names = list(first["metrics"])
    for label, final in finals.items():
        if list(final["metrics"]) != names or final["majority_baseline"] != first["majority_baseline"]:
            raise ValueError(f"{sources[label]} and {sources[next(iter(finals))]} were not scored on the same "
                             f"examples (their metrics or floors differ): compare runs of one evaluation")

    def cells(scores: dict[str, float]) -> list[str]:
        return [f"{100 * scores[n]:.2f}" if n in scores else "-" for n in names]

    def run_cells(label: str, f: dict) -> list[str]:
        trained = ["-", "-"] if label == "zero-shot" else [_params_cell(f["trainable_params"]), str(f["total_rank"])]
        return trained + [str(f["steps"]), f"{f['wall_time_s']:.0f}"]

    rows = [[label] + cells(f["metrics"]) + run_cells(label, f) for label, f in finals.items()]
    floor = "LEAD-1" if first["task"] == "summarization" else "majority class"
    rows.append([floor] + cells(first["majority_baseline"]) + ["-"] * 4)
    header = ["method"] + names + ["#Param (initial / mean / final)", "total rank", "steps", "wall time (s)"]
    footnote = (f"Metrics x100 on {first['task']}; #Param: trainable parameters; the last row is the floor "
                f"({floor}) every run is read against.")
    return "\n".join(_table(header, rows) + ["", footnote]) + "\n"
