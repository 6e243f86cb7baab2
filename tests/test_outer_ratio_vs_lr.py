"""benchmarks/outer_ratio_vs_lr.py: the mean learning-rate factor of each component, against the formula."""

import json
from pathlib import Path

import pytest
from conftest import load_benchmark


def load():
    return load_benchmark("outer_ratio_vs_lr")


def write_run(d: Path, decay="linear") -> Path:
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"max_steps": 100, "warmup_steps": 10, "method_options": {
        "restart_warmup_steps": 5, "lr_decay": decay, "min_lr_ratio": 0.0}}))
    (d / "rank_history.json").write_text(json.dumps({"modules": ["a", "b"], "history": [], "outer_checks": [
        {"step": 40, "inner_steps": 40, "modules": [0, 1], "converged": [], "eq6_ratio": [0.02, 0.04]},
        {"step": 70, "inner_steps": 30, "modules": [0, 1], "converged": [1], "eq6_ratio": [0.01, 0.003]}]}))
    return d


def test_the_mean_factor_of_each_component_is_the_schedules(tmp_path):
    rows = load().rows(write_run(tmp_path / "run"))

    def factor(s, start, warmup):  # linear decay from step 10 to 0 at step 100; a warmup at each start
        return min(1.0, (100 - s) / 90) * min(1.0, (s - start + 1) / warmup)

    first = sum(factor(s, 0, 10) for s in range(40)) / 40
    second = sum(factor(s, 40, 5) for s in range(40, 70)) / 30
    assert [r["step"] for r in rows] == [40, 70] and [r["converged"] for r in rows] == [0, 1]
    assert rows[0]["mean_lr_factor"] == pytest.approx(first, rel=1e-12)
    assert rows[1]["mean_lr_factor"] == pytest.approx(second, rel=1e-12)
    assert rows[0]["median"] == pytest.approx(0.03) and rows[1]["median"] == pytest.approx(0.0065)
    assert rows[1]["median_over_lr"] == pytest.approx(0.0065 / second)


def test_a_folder_that_is_not_a_run_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load().main([str(tmp_path)])
    assert f"{tmp_path / 'config.json'}: not found" in capsys.readouterr().err


def test_the_heads_rate_restarts_at_merges_only(tmp_path):
    d = write_run(tmp_path / "run")
    history = json.loads((d / "rank_history.json").read_text())
    # a last check at which the one remaining module converges: no new component, no restart
    history["outer_checks"].append({"step": 90, "inner_steps": 20, "modules": [0], "converged": [0], "eq6_ratio": [0.001]})
    (d / "rank_history.json").write_text(json.dumps(history))

    def factor(s, start, warmup):
        return min(1.0, (100 - s) / 90) * min(1.0, (s - start + 1) / warmup)

    actual = (sum(factor(s, 0, 10) for s in range(40)) + sum(factor(s, 40, 5) for s in range(40, 70))
              + sum(factor(s, 70, 5) for s in range(70, 100)))
    decay_only = sum(factor(s, 0, 10) for s in range(100))
    h = load().head_rate(d)
    assert h["steps"] == 100 and h["restarts"] == 2
    assert h["actual"] == pytest.approx(actual, rel=1e-12) and h["decay_only"] == pytest.approx(decay_only, rel=1e-12)
    assert h["share"] < 1.0
    assert "2 restarted warmups" in load().table(d)
