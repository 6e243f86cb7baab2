"""The paper's Figures 1 and 3 (§4.2) drawn from a run directory, as PNG files under ``figures/``.

Figures are built on ``matplotlib.figure.Figure`` and saved through the Agg canvas: no pyplot, no
display, no global backend switch for whoever imports this module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, MaxNLocator

from .io import atomic_write
from .run_files import read_run_file

_LAYER = re.compile(r"\.(\d+)\.")
MAX_MARKER_AREA = 700.0  # points^2 of the largest rank's circle in Figure 3


def parse_layer_and_type(name: str) -> tuple[int | None, str]:
    """Layer index and module type from the first ``.<digits>.`` of a module name.

    ``bert.encoder.layer.3.attention.self.value`` -> ``(3, "attention.self.value")``;
    a name without one (``classifier.dense``) -> ``(None, name)``.
    """
    match = _LAYER.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end():]


def default_modules(names: Sequence[str], final_ranks: Sequence[int]) -> list[str]:
    """The two modules Figure 1 follows: the highest final rank, then the median rank of the last layer.

    The second is taken from the deepest layer without the first module; with a single module, one.
    """
    if not names:
        return []
    first = max(range(len(names)), key=lambda i: (final_ranks[i], -i))
    rest = [i for i in range(len(names)) if i != first]
    if not rest:
        return [names[first]]
    layers = {i: parse_layer_and_type(names[i])[0] for i in rest}
    last = max((layer for layer in layers.values() if layer is not None), default=None)
    candidates = sorted((i for i in rest if layers[i] == last), key=lambda i: (final_ranks[i], i))
    return [names[first], names[candidates[(len(candidates) - 1) // 2]]]


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    return path


def _run_title(run_dir: Path) -> str:
    config = read_run_file(run_dir, "config.json")
    return f"{config['task']} / {config['method']} / {Path(str(config['model'])).name}"


def _steps(history: list[dict], key, last_step: int) -> tuple[list[int], list]:
    """x, y of a step function held from each entry's step, extended to ``last_step``."""
    xs = [e["step"] for e in history] + [last_step]
    ys = [key(e) for e in history]
    return xs, ys + ys[-1:]


def plot_training(run_dir: str | Path, modules: Sequence[str] | None = None) -> Path:
    """Figure 1 analogue: trainable parameters, total rank, two modules' ranks, eval metric vs step.

    ``modules`` overrides ``default_modules``. Runs without adapted modules (full fine-tuning,
    BitFit) get the two panels without ranks. Writes ``figures/fig1_training.png``.
    """
    run_dir = Path(run_dir)
    rank_history = read_run_file(run_dir, "rank_history.json")
    evals = read_run_file(run_dir, "metrics.jsonl")
    names, history = rank_history["modules"], rank_history["history"]
    if not history:
        raise ValueError(f"{run_dir / 'rank_history.json'}: history is empty")
    last_step = max([e["step"] for e in evals] + [history[-1]["step"]])
    if modules is None:
        modules = default_modules(names, history[-1]["ranks"])
    unknown = [m for m in modules if m not in names]
    if unknown:
        raise ValueError(f"module(s) {unknown} not in {run_dir / 'rank_history.json'}; "
                         f"adapted modules are e.g. {names[:3]}")
    main_name = "main metric"
    if (run_dir / "final_metrics.json").is_file():  # the trainer may draw before writing it
        main_name = read_run_file(run_dir, "final_metrics.json")["main_metric"]

    n_panels = 4 if names else 2
    fig = Figure(figsize=(8, 2.3 * n_panels + 0.6), layout="constrained")
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(f"Training: {_run_title(run_dir)}")

    ax = axes[0]
    ax.step(*_steps(history, lambda e: e["trainable_params"], last_step), where="post", color="tab:green")
    ax.set_ylabel("trainable params")
    ax.yaxis.set_major_formatter(EngFormatter(sep=""))  # 75k, 100k, 125M
    ax.set_title("(a) trainable parameters", loc="left", fontsize="medium")

    if names:
        ax = axes[1]
        ax.step(*_steps(history, lambda e: e["total_rank"], last_step), where="post", color="tab:red")
        ax.set_ylabel("total rank")
        ax.set_title(f"(b) total rank over {len(names)} modules", loc="left", fontsize="medium")

        ax = axes[2]
        for module, style in zip(modules, ["-", "--"] * len(modules)):  # dashed: equal ranks stay visible
            i = names.index(module)
            ax.step(*_steps(history, lambda e: e["ranks"][i], last_step), where="post", ls=style, label=module)
        ax.set_ylabel("rank")
        ax.set_title("(c) rank of selected modules", loc="left", fontsize="medium")
        ax.legend(fontsize="small", loc="best")

    ax = axes[-1]
    if evals:
        ax.plot([e["step"] for e in evals], [e["main"] for e in evals], marker="o", markersize=3,
                color="tab:blue")
    else:
        ax.text(0.5, 0.5, "no evaluation recorded", transform=ax.transAxes, ha="center", va="center")
    ax.set_ylabel(main_name)
    ax.set_title(f"({'d' if names else 'b'}) eval {main_name}", loc="left", fontsize="medium")
    ax.set_xlabel("step")

    for ax in axes[:-1]:  # counts from 0 (a constant LoRA line reads as its size); a zero line stays visible
        top = max(ax.get_ylim()[1], 1)
        ax.set_ylim(-0.04 * top, top)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, run_dir / "figures" / "fig1_training.png")


def plot_rank_distribution(run_dir: str | Path) -> Path:
    """Figure 3 analogue from ranks.json: layer index (x) by module type (y).

    Circle area is proportional to the rank (red, outer) and to the effective rank (blue, inner);
    a rank of 0 draws nothing. Modules without a layer index sit in the column "none" at x = -1.
    Writes ``figures/fig3_rank_distribution.png``.
    """
    run_dir = Path(run_dir)
    modules = read_run_file(run_dir, "ranks.json")["modules"]
    path = run_dir / "figures" / "fig3_rank_distribution.png"
    if not modules:
        fig = Figure(figsize=(6, 2.5), layout="constrained")
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no adapted modules\n(full fine-tuning or BitFit)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        fig.suptitle(f"Rank distribution: {_run_title(run_dir)}")
        return _save(fig, path)

    parsed = [parse_layer_and_type(m["module"]) for m in modules]
    types = list(dict.fromkeys(t for _, t in parsed))  # model order, as the paper's W_q ... W_f2
    xs = [-1 if layer is None else layer for layer, _ in parsed]
    ys = [types.index(t) for _, t in parsed]
    ranks = [m["rank"] for m in modules]
    effs = [m["effective_rank"] for m in modules]
    max_rank = max(max(ranks), 1)
    area = MAX_MARKER_AREA / max_rank

    columns = sorted(set(xs))
    fig = Figure(figsize=(max(6.0, 0.55 * (columns[-1] - columns[0] + 1) + 4.5), 0.6 * len(types) + 2.2),
                 layout="constrained")
    ax = fig.subplots()
    shown = [i for i, r in enumerate(ranks) if r > 0]
    ax.scatter([xs[i] for i in shown], [ys[i] for i in shown], s=[area * ranks[i] for i in shown],
               facecolors="mistyrose", edgecolors="red", linewidths=1.2, zorder=2)
    ax.scatter([xs[i] for i in shown], [ys[i] for i in shown], s=[area * effs[i] for i in shown],
               color="tab:blue", alpha=0.85, linewidths=0, zorder=3)

    ax.set_xticks(range(columns[0], columns[-1] + 1))
    ax.set_xticklabels(["none" if x == -1 else str(x) for x in range(columns[0], columns[-1] + 1)])
    ax.set_xlim(columns[0] - 0.7, columns[-1] + 0.7)
    ax.set_yticks(range(len(types)), types)
    ax.set_ylim(len(types) - 0.5, -0.5)
    ax.set_xlabel("hidden layer index")
    ax.set_ylabel("weight matrix")
    ax.grid(alpha=0.25, zorder=0)
    total_rank, total_eff = sum(ranks), sum(effs)
    ratio = f", effective {100 * total_eff / total_rank:.1f}%" if total_rank else ""
    ax.set_title(f"Rank distribution: {_run_title(run_dir)}\n"
                 f"total rank {total_rank}{ratio}; ranks of 0 are not drawn", fontsize="medium")

    key_ranks = sorted({1, max(1, max_rank // 2), max_rank})
    handles = [Line2D([], [], ls="", marker="o", markersize=9, markerfacecolor="mistyrose",
                      markeredgecolor="red", label="rank (red, outer)"),
               Line2D([], [], ls="", marker="o", markersize=6, color="tab:blue", label="effective rank (blue, inner)")]
    handles += [Line2D([], [], ls="", marker="o", markersize=(area * r) ** 0.5, markerfacecolor="none",
                       markeredgecolor="grey", label=f"area of rank {r}") for r in key_ranks]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), labelspacing=1.3,
              borderpad=1.0, fontsize="small", frameon=False)
    return _save(fig, path)
