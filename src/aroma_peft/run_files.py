"""The run directory's reader: each file of a finished `aroma train` run, parsed and checked (docs/run_directory.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .jsonlines import json_lines

# The keys each file must carry (docs/run_directory.md); for metrics.jsonl, the keys of every line.
RUN_FILES = {
    "config.json": ("task", "method", "model"),
    "metrics.jsonl": ("step", "main"),
    "rank_history.json": ("modules", "history"),
    "ranks.json": ("modules",),
    "final_metrics.json": ("task", "method", "model", "main_metric", "metrics", "majority_baseline",
                           "trainable_params", "total_rank", "steps", "stopped_early", "wall_time_s",
                           "mean_step_time_s"),
}


def _check_keys(obj, required: Sequence[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in required if key not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    return obj


def read_run_file(run_dir: str | Path, name: str):
    """One file of ``RUN_FILES``, parsed and checked: a dict, or a list of dicts for ``.jsonl``."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished run directory of `aroma train`?")
    text = path.read_text(encoding="utf-8")
    if name.endswith(".jsonl"):
        return [_check_keys(obj, RUN_FILES[name], f"{path}, line {n}") for n, obj in json_lines(path, text)]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    return _check_keys(obj, RUN_FILES[name], str(path))
