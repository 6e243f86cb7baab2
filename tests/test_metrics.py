"""GLUE metrics against direct scikit-learn / scipy calls, and the majority-class baseline."""

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from aroma_peft.tasks.glue import GLUE_TASKS
from aroma_peft.tasks.metrics import glue_metrics, main_metric, majority_baseline


def random_classes(task: str, n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = GLUE_TASKS[task].num_labels
    labels = rng.integers(0, k, n)
    preds = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))  # correlated, not perfect
    return preds.tolist(), labels.tolist()


def test_cola_matthews():
    preds, labels = random_classes("cola")
    expected = {"matthews_correlation": matthews_corrcoef(labels, preds)}
    assert glue_metrics("cola", preds, labels) == pytest.approx(expected)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1(task):
    preds, labels = random_classes(task, seed=1)
    assert glue_metrics(task, preds, labels) == pytest.approx(
        {"accuracy": accuracy_score(labels, preds), "f1": f1_score(labels, preds)})


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "mnli"])
def test_accuracy_only(task):
    preds, labels = random_classes(task, seed=2)
    assert glue_metrics(task, preds, labels) == pytest.approx({"accuracy": accuracy_score(labels, preds)})


def test_stsb_pearson_spearman():
    rng = np.random.default_rng(3)
    labels = rng.uniform(0, 5, 150)
    preds = labels + rng.normal(0, 1.5, 150)
    got = glue_metrics("stsb", preds.tolist(), labels.tolist())
    assert got == pytest.approx({"pearson": pearsonr(preds, labels)[0], "spearman": spearmanr(preds, labels)[0]})
    assert all(isinstance(v, float) for v in got.values())


def test_main_metric():
    assert {t: main_metric(t) for t in GLUE_TASKS} == {
        "cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "accuracy", "qqp": "accuracy",
        "stsb": "pearson", "qnli": "accuracy", "rte": "accuracy", "mnli": "accuracy"}
    for task in GLUE_TASKS:
        preds, labels = ([0.5, 1.0, 2.0], [1.0, 1.5, 1.0]) if task == "stsb" else ([0, 1, 0], [0, 1, 1])
        assert main_metric(task) in glue_metrics(task, preds, labels)


def test_majority_baseline_classification():
    train = [1, 0, 1, 1, 0]  # majority 1
    dev = [1, 0, 0, 1]
    assert majority_baseline("mrpc", train, dev) == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
    assert majority_baseline("rte", train, dev) == {"accuracy": 0.5}
    assert majority_baseline("mnli", [2, 2, 0, 1], [2, 0, 2]) == {"accuracy": pytest.approx(2 / 3)}
    assert majority_baseline("sst2", [0, 1], [0, 0, 1]) == {"accuracy": pytest.approx(2 / 3)}  # tie: smallest label
    assert majority_baseline("cola", train, dev) == {"matthews_correlation": 0.0}  # sklearn: 0 for a constant guess


def test_majority_baseline_stsb_is_the_mean_and_correlations_are_zero():
    assert majority_baseline("stsb", [1.0, 2.0, 4.5], [0.0, 5.0, 2.5]) == {"pearson": 0.0, "spearman": 0.0}
    assert glue_metrics("stsb", [1.0, 2.0], [3.0, 3.0]) == {"pearson": 0.0, "spearman": 0.0}


def test_bad_input():
    with pytest.raises(ValueError, match="unknown task 'wnli'"):
        glue_metrics("wnli", [0], [0])
    with pytest.raises(ValueError, match=r"rte: need as many predictions as labels.*got 2 predictions, 3 labels"):
        glue_metrics("rte", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="got 0 predictions, 0 labels"):
        glue_metrics("rte", [], [])
    with pytest.raises(ValueError, match="majority baseline needs at least one training label"):
        majority_baseline("rte", [], [0])
