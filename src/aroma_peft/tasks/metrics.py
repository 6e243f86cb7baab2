"""GLUE metrics as the paper reports them, computed with scikit-learn and scipy.

CoLA: Matthews correlation; STS-B: Pearson and Spearman correlation; MRPC and QQP: accuracy and F1;
the rest (MNLI per split, QNLI, RTE, SST-2): accuracy. Keys carry no split name, so a caller scoring
MNLI's two dev sets prefixes them (``dev_matched_accuracy``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .glue import get_task


def main_metric(task: str) -> str:
    """The key of ``glue_metrics(task, ...)`` that the paper reports first (``"accuracy"``, ``"pearson"``, ...)."""
    return get_task(task).metric


def _correlation(fn, predictions: np.ndarray, labels: np.ndarray) -> float:
    # A constant input has no variance: the correlation is undefined (scipy gives nan). Report 0.0,
    # the score of a predictor that carries no information, so averages and tables stay numeric.
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(fn(predictions, labels)[0])


def glue_metrics(task: str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """Score ``predictions`` (class indices, or floats for STS-B) against ``labels`` for ``task``."""
    spec = get_task(task)
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(f"{task}: need as many predictions as labels, and at least one "
                         f"(got {len(predictions)} predictions, {len(labels)} labels)")
    if spec.is_regression:
        p, y = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float)
        return {"pearson": _correlation(pearsonr, p, y), "spearman": _correlation(spearmanr, p, y)}
    p, y = np.asarray(predictions, dtype=int), np.asarray(labels, dtype=int)
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(y, p))}
    out = {"accuracy": float(accuracy_score(y, p))}
    if task in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(y, p, zero_division=0.0))  # F1 of the positive class (paraphrase / duplicate)
    return out


def majority_baseline(task: str, train_labels: Sequence, eval_labels: Sequence) -> dict[str, float]:
    """Metrics of always predicting the most frequent training label (the smallest on a tie).

    For STS-B the prediction is the training mean: a constant, so Pearson and Spearman are undefined
    and reported as 0.0.
    """
    spec = get_task(task)
    if len(train_labels) == 0:
        raise ValueError(f"{task}: majority baseline needs at least one training label")
    if spec.is_regression:
        guess = float(np.mean(np.asarray(train_labels, dtype=float)))
    else:
        counts = Counter(int(label) for label in train_labels)
        guess = min(counts, key=lambda label: (-counts[label], label))
    return glue_metrics(task, [guess] * len(eval_labels), eval_labels)
