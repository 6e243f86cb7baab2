"""Figures, report.md and the comparison table, from run directories written by hand."""

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from aroma_peft.plots import default_modules, parse_layer_and_type, plot_rank_distribution, plot_training
from aroma_peft.report import compare_metrics, compare_runs, format_count, load_run, trainable_mean, write_report

TYPES = ["attention.self.query", "attention.self.value", "attention.output.dense", "output.dense"]
MODULES = [f"bert.encoder.layer.{layer}.{t}" for layer in range(3) for t in TYPES] + ["classifier.dense"]
PER_RANK = 1000  # trainable parameters of one rank-one pair in these synthetic runs


def write_run(path: Path, *, task="mrpc", method="aroma", main=0.85, history, ranks, evals=None,
              majority=0.68, trainable=(13000, 5000.0, 0), steps=300) -> Path:
    """A complete run directory in the format of docs/run_directory.md."""
    modules = [r["module"] for r in ranks]
    main_name = "accuracy" if task != "cola" else "matthews_correlation"
    evals = evals if evals is not None else [(100, main - 0.1), (200, main - 0.02), (steps, main)]
    files = {
        "config.json": {"task": task, "method": method, "model": "/models/roberta-base", "lr": 1e-3},
        "rank_history.json": {"modules": modules, "history": history},
        "ranks.json": {"modules": ranks},
        "final_metrics.json": {
            "task": task, "method": method, "model": "/models/roberta-base", "main_metric": main_name,
            "metrics": {main_name: main, "f1": 0.9012}, "majority_baseline": {main_name: majority, "f1": 0.8122},
            "trainable_params": dict(zip(("initial", "mean", "final"), trainable)),
            "total_rank": sum(r["rank"] for r in ranks), "steps": steps, "stopped_early": method == "aroma",
            "wall_time_s": 123.4, "mean_step_time_s": 0.0512,
        },
    }
    path.mkdir(parents=True)
    for name, obj in files.items():
        (path / name).write_text(json.dumps(obj))
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "metrics": {main_name: m}, "main": m, "trainable_params": 0, "total_rank": 0}) + "\n"
        for s, m in evals))
    return path


def aroma_run(path: Path, **kw) -> Path:
    """Ranks grow one at a time; modules converge (stop growing) at different steps; layer 0 grows most."""
    final = [3 - layer + (t == 1) for layer in range(3) for t in range(4)] + [0]  # classifier stays at 0
    history, current = [], [0] * len(MODULES)
    for step in range(0, 250, 50):
        trainable = sum(PER_RANK for c, f in zip(current, final) if c < f)  # live pairs of unconverged modules
        history.append({"step": step, "trainable_params": trainable, "total_rank": sum(current),
                        "ranks": list(current)})
        current = [min(c + 1, f) for c, f in zip(current, final)]
    history.append({"step": 250, "trainable_params": 0, "total_rank": sum(final), "ranks": final})
    ranks = [{"module": m, "rank": r, "effective_rank": 0.9 * r} for m, r in zip(MODULES, final)]
    return write_run(path, history=history, ranks=ranks, **kw)


def lora_run(path: Path, **kw) -> Path:
    rank = 8
    history = [{"step": 0, "trainable_params": 8 * PER_RANK * len(MODULES), "total_rank": rank * len(MODULES),
                "ranks": [rank] * len(MODULES)}]
    ranks = [{"module": m, "rank": rank, "effective_rank": 2.0} for m in MODULES]
    kw.setdefault("trainable", (104000, 104000.0, 104000))
    return write_run(path, method="lora", history=history, ranks=ranks, **kw)


def full_run(path: Path, **kw) -> Path:
    history = [{"step": 0, "trainable_params": 125_000_000, "total_rank": 0, "ranks": []}]
    kw.setdefault("trainable", (125_000_000, 125_000_000.0, 125_000_000))
    return write_run(path, method="full", history=history, ranks=[], **kw)


def assert_png(path: Path, min_height: int, min_width: int):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] >= min_height and image.shape[1] >= min_width
    assert image[..., :3].std() > 0.05  # not a blank canvas


# ---------------------------------------------------------------------- helpers


@pytest.mark.parametrize("name, expected", [
    ("bert.encoder.layer.3.attention.self.value", (3, "attention.self.value")),
    ("model.layers.10.self_attn.q_proj", (10, "self_attn.q_proj")),
    ("transformer.h.0.attn.c_attn", (0, "attn.c_attn")),
    ("roberta.encoder.layer.11.output.dense", (11, "output.dense")),
    ("classifier.dense", (None, "classifier.dense")),
    ("encoder.layer.3", (None, "encoder.layer.3")),
])
def test_parse_layer_and_type(name, expected):
    assert parse_layer_and_type(name) == expected


def test_default_modules_highest_rank_then_median_of_last_layer():
    names = ["l.0.q", "l.0.v", "l.2.q", "l.2.v", "l.2.o", "head"]
    # highest final rank: l.0.v (5); last layer 2 has ranks 1, 3, 2 -> median 2 is l.2.o
    assert default_modules(names, [4, 5, 1, 3, 2, 0]) == ["l.0.v", "l.2.o"]
    # the top module itself in the last layer: the median of the others there
    assert default_modules(["l.1.q", "l.1.v", "l.1.o"], [9, 1, 2]) == ["l.1.q", "l.1.v"]
    assert default_modules(["l.0.q"], [3]) == ["l.0.q"]
    assert default_modules([], []) == []


def test_trainable_mean_matches_hand_computation():
    history = [{"step": 0, "trainable_params": 100}, {"step": 10, "trainable_params": 60},
               {"step": 25, "trainable_params": 0}]
    # (10 * 100 + 15 * 60 + 15 * 0) / 40
    assert trainable_mean(history, 40) == pytest.approx(47.5)
    # an entry past the final step never held: (10 * 100 + 10 * 60) / 20
    assert trainable_mean(history, 20) == pytest.approx(80.0)
    assert trainable_mean(history[:1], 7) == pytest.approx(100.0)


def test_trainable_mean_rejects_bad_input():
    with pytest.raises(ValueError, match="final_step must be > 0"):
        trainable_mean([{"step": 0, "trainable_params": 1}], 0)
    with pytest.raises(ValueError, match="history is empty"):
        trainable_mean([], 10)


@pytest.mark.parametrize("n, text", [(172_032, "0.17M"), (80_000, "80.0k"), (0, "0"), (24_576, "24.6k"),
                                     (125_000_000, "125.00M"), (512, "512")])
def test_format_count(n, text):
    assert format_count(n) == text


def test_format_count_shares_a_unit():
    assert [format_count(n, unit_of=172_032) for n in (172_032, 80_000, 0)] == ["0.17M", "0.08M", "0.00M"]


# ---------------------------------------------------------------------- figures


def test_figures_for_aroma_run(tmp_path):
    run = aroma_run(tmp_path / "aroma")
    fig1 = plot_training(run)
    fig3 = plot_rank_distribution(run)
    assert fig1 == run / "figures" / "fig1_training.png"
    assert fig3 == run / "figures" / "fig3_rank_distribution.png"
    assert_png(fig1, 900, 800)  # four panels
    assert_png(fig3, 300, 600)
    assert not list((run / "figures").glob("*.tmp"))


def test_training_figure_with_chosen_modules_and_constant_ranks(tmp_path):
    run = lora_run(tmp_path / "lora")
    assert_png(plot_training(run, modules=[MODULES[0], MODULES[-2]]), 900, 800)
    assert_png(plot_rank_distribution(run), 300, 600)  # classifier.dense (no layer) in the "none" column
    with pytest.raises(ValueError, match=r"module\(s\) \['nope'\] not in .*rank_history.json"):
        plot_training(run, modules=["nope"])


def test_figures_without_modules(tmp_path):
    run = full_run(tmp_path / "full")
    assert_png(plot_training(run), 400, 800)  # two panels: no rank to show
    assert_png(plot_rank_distribution(run), 200, 600)


# ---------------------------------------------------------------------- report and compare


def test_load_run_reads_every_file(tmp_path):
    run = load_run(aroma_run(tmp_path / "aroma"))
    assert set(run) == {"config", "metrics", "rank_history", "ranks", "final_metrics"}
    assert [e["step"] for e in run["metrics"]] == [100, 200, 300]
    assert run["rank_history"]["modules"] == MODULES


def test_write_report_contains_the_numbers(tmp_path):
    run = aroma_run(tmp_path / "aroma", main=0.8676, trainable=(172_032, 80_123.4, 0))
    report = write_report(run).read_text()
    for text in ["mrpc", "aroma", "/models/roberta-base", "accuracy = 0.8676", "majority-class baseline 0.6800",
                 "| f1 | 0.9012 | 0.8122 |", "172,032 / 80,123.4 / 0 (0.17M / 0.08M / 0.00M)", "| total rank | 27 |",
                 "| steps | 300 |", "| stopped early | yes |", "123.4 s", "0.0512 s",
                 "| bert.encoder.layer.0.attention.self.value | 4 | 3.60 |", "| classifier.dense | 0 | 0.00 |",
                 "24.30 / 27 = 90.0%",
                 "](figures/fig1_training.png)", "](figures/fig3_rank_distribution.png)"]:
        assert text in report, text
    assert (run / "figures" / "fig1_training.png").is_file()
    assert (run / "figures" / "fig3_rank_distribution.png").is_file()


def test_write_report_full_finetuning(tmp_path):
    report = write_report(full_run(tmp_path / "full")).read_text()
    assert "No adapted modules" in report
    assert "125,000,000 / 125,000,000.0 / 125,000,000 (125.00M / 125.00M / 125.00M)" in report


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]


def test_compare_runs_table(tmp_path):
    runs = [aroma_run(tmp_path / "a-mrpc", task="mrpc", main=0.9417, trainable=(172_032, 80_000.0, 0)),
            aroma_run(tmp_path / "a-rte", task="rte", main=0.9049, trainable=(172_032, 60_000.0, 0), majority=0.5271),
            lora_run(tmp_path / "l-mrpc", task="mrpc", main=0.8834, trainable=(1_340_000, 1_340_000.0, 1_340_000)),
            lora_run(tmp_path / "l-cola", task="cola", main=0.6170, trainable=(1_340_000, 1_340_000.0, 1_340_000),
                     majority=0.0)]
    table = compare_runs(runs)
    rows = _rows(table)
    assert rows[0] == ["method", "#Param (initial / mean / final)", "COLA matthews_correlation", "MRPC accuracy",
                       "RTE accuracy", "Avg"]
    assert rows[2] == ["aroma", "0.17M / 0.07M / 0.00M", "-", "94.17", "90.49", "92.33"]  # (94.17 + 90.49) / 2
    assert rows[3] == ["lora", "1.34M / 1.34M / 1.34M", "61.70", "88.34", "-", "75.02"]  # (61.70 + 88.34) / 2
    assert rows[4] == ["majority class", "-", "0.00", "68.00", "52.71", "40.24"]  # (0 + 68.00 + 52.71) / 3
    assert len(rows) == 5
    assert "mean over the tasks present in the row" in table


def _set_config(run: Path, **changes) -> Path:
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, **changes}))
    return run


def test_compare_runs_averages_the_seeds_of_one_setting(tmp_path):
    seeds = [_set_config(aroma_run(tmp_path / f"a{i}", main=main, trainable=(172_032, mean, 0)),
                         seed=i, out=f"runs/a{i}")
             for i, (main, mean) in enumerate([(0.8162, 80_000.0), (0.8113, 70_000.0), (0.8211, 90_000.0)])]
    lora = _set_config(lora_run(tmp_path / "l", main=0.8235), seed=0)
    rows = _rows(compare_runs(seeds + [lora]))
    # numpy, by hand: mean 81.62, sample standard deviation 0.49 (ddof=1); #Param mean 80k.
    values = np.array([81.62, 81.13, 82.11])
    expected = f"{values.mean():.2f} ± {values.std(ddof=1):.2f} (3 seeds)"
    assert rows[2] == ["aroma", "0.17M / 0.08M / 0.00M", expected, f"{values.mean():.2f}"]
    assert rows[3][2] == "82.35"  # one run: its value, no spread


def test_compare_runs_rejects_duplicates_mixed_settings_and_nothing(tmp_path):
    a, b = aroma_run(tmp_path / "a"), aroma_run(tmp_path / "b")  # no seed recorded: the same seed
    with pytest.raises(ValueError, match="two runs of method 'aroma' on task 'mrpc' with seed None"):
        compare_runs([a, b])
    _set_config(a, seed=0, method_options={"eps_in": 0.1})
    _set_config(b, seed=1, lr=2e-3, method_options={"eps_in": 0.05})
    with pytest.raises(ValueError, match=r"differ in lr \(0.001 in .*a, 0.002 in .*b\), "
                                         r"method_options.eps_in \(0.1 in .*a, 0.05 in .*b\)"):
        compare_runs([a, b])
    # A key only one file has (written by an older version) is not compared; the device is not a setting.
    _set_config(b, lr=1e-3, method_options={"eps_in": 0.1}, device="cuda", grad_accum=1)
    assert _rows(compare_runs([a, b]))[2][0] == "aroma"
    with pytest.raises(ValueError, match="at least one run directory"):
        compare_runs([])


def test_run_never_evaluated(tmp_path):
    run = aroma_run(tmp_path / "aroma", evals=[])
    final = json.loads((run / "final_metrics.json").read_text())
    final["metrics"] = {}
    (run / "final_metrics.json").write_text(json.dumps(final))
    assert "accuracy: not evaluated" in write_report(run).read_text()
    with pytest.raises(ValueError, match="main metric 'accuracy' not among its metrics"):
        compare_runs([run])


def lm_run(path: Path, method: str, scores: dict, *, task="commonsense", zero_shot=False,
           floor=None, trainable=(1_658_880, 1_658_880.0, 1_658_880), steps=250) -> Path:
    """A run directory's final_metrics.json for a multi-metric family (all compare_metrics reads)."""
    final = {"task": task, "method": method, "model": "smollm2", "main_metric": "average", "metrics": scores,
             "majority_baseline": floor or {"boolq_accuracy": 0.62, "piqa_accuracy": 0.51, "average": 0.565},
             "trainable_params": dict(zip(("initial", "mean", "final"), trainable)), "total_rank": 1200,
             "steps": steps, "stopped_early": False, "wall_time_s": 1234.4, "mean_step_time_s": 4.9}
    if zero_shot:
        final["zero_shot"] = True
    path.mkdir(parents=True)
    (path / "final_metrics.json").write_text(json.dumps(final))
    return path


class TestCompareMetrics:
    def test_a_row_per_run_a_column_per_metric(self, tmp_path):
        zs = lm_run(tmp_path / "zs", "lora", {"boolq_accuracy": 0.5, "piqa_accuracy": 0.25, "average": 0.375},
                    zero_shot=True, steps=0)
        lora = lm_run(tmp_path / "lora", "lora", {"boolq_accuracy": 0.65, "piqa_accuracy": 0.55, "average": 0.6})
        aroma = lm_run(tmp_path / "aroma", "aroma", {"boolq_accuracy": 0.7, "piqa_accuracy": 0.5, "average": 0.6},
                       trainable=(207_360, 150_000.0, 0))
        rows = _rows(compare_metrics([zs, lora, aroma]))
        assert rows[0] == ["method", "boolq_accuracy", "piqa_accuracy", "average", "#Param (initial / mean / final)",
                           "total rank", "steps", "wall time (s)"]
        assert rows[2] == ["zero-shot", "50.00", "25.00", "37.50", "-", "-", "0", "1234"]
        assert rows[3] == ["lora", "65.00", "55.00", "60.00", "1.66M / 1.66M / 1.66M", "1200", "250", "1234"]
        assert rows[4] == ["aroma", "70.00", "50.00", "60.00", "0.21M / 0.15M / 0.00M", "1200", "250", "1234"]
        assert rows[5] == ["majority class", "62.00", "51.00", "56.50", "-", "-", "-", "-"]
        assert len(rows) == 6

    def test_summarization_floor_is_lead_1(self, tmp_path):
        rouge = {"rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.25}
        run = lm_run(tmp_path / "a", "aroma", rouge, task="summarization", floor={"rouge1": 0.2, "rouge2": 0.05,
                                                                                    "rougeL": 0.15})
        table = compare_metrics([run])
        assert _rows(table)[-1] == ["LEAD-1", "20.00", "5.00", "15.00", "-", "-", "-", "-"]
        assert "(LEAD-1)" in table

    def test_command_line(self, tmp_path, capsys):
        from aroma_peft.cli import main

        run = lm_run(tmp_path / "a", "aroma", {"boolq_accuracy": 0.7, "piqa_accuracy": 0.5, "average": 0.6})
        assert main(["compare", "--per-metric", str(run), "--out", str(tmp_path / "t.md")]) == 0
        assert "| aroma | 70.00 | 50.00 | 60.00 |" in capsys.readouterr().out
        assert (tmp_path / "t.md").read_text().startswith("| method | boolq_accuracy |")

    def test_refuses_what_cannot_share_a_table(self, tmp_path):
        scores = {"boolq_accuracy": 0.5, "piqa_accuracy": 0.5, "average": 0.5}
        a, b = lm_run(tmp_path / "a", "lora", scores), lm_run(tmp_path / "b", "lora", scores)
        with pytest.raises(ValueError, match="two runs labelled 'lora'"):
            compare_metrics([a, b])
        other = lm_run(tmp_path / "c", "aroma", scores, floor={"boolq_accuracy": 0.6, "piqa_accuracy": 0.5,
                                                               "average": 0.55})
        with pytest.raises(ValueError, match="not scored on the same examples"):
            compare_metrics([a, other])
        empty = lm_run(tmp_path / "d", "aroma", {})
        with pytest.raises(ValueError, match="no metrics: was the run ever evaluated"):
            compare_metrics([empty])
        with pytest.raises(ValueError, match="at least one run directory"):
            compare_metrics([])


# ---------------------------------------------------------------------- bad run directories


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", "rank_history.json", "ranks.json",
                                  "final_metrics.json"])
def test_missing_file_is_named(tmp_path, name):
    run = aroma_run(tmp_path / "aroma")
    (run / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{name} not found"):
        load_run(run)


def test_malformed_jsonl_line_is_named(tmp_path):
    run = aroma_run(tmp_path / "aroma")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 400, "main": 0.9\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 4: not valid JSON"):
        load_run(run)
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 4: not valid JSON"):
        plot_training(run)


def test_malformed_json_and_missing_key_are_named(tmp_path):
    run = aroma_run(tmp_path / "aroma")
    (run / "ranks.json").write_text('{"modules": [\n  {"module": "x",\n')
    with pytest.raises(ValueError, match=r"ranks.json, line 3: not valid JSON"):
        load_run(run)
    (run / "ranks.json").write_text('{"mods": []}')
    with pytest.raises(ValueError, match=r"ranks.json: missing key\(s\) \['modules'\]"):
        write_report(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "main": 0.5}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: expected a JSON object"):
        load_run(run)


class TestDualLoopNotes:
    """report.md's "The dual loop" section, from outer_checks written by hand."""

    OPTS = {"max_inner_steps": 200, "check_interval": 10, "eps_in": 0.1, "eps_out": 5e-3}

    @staticmethod
    def check(step, inner, by_eq5, converged=(), ratios=(0.02, 0.03)):
        c = {"step": step, "inner_steps": inner, "modules": [0, 1], "eq5_change": [0.05, 0.05],
             "eq6_ratio": list(ratios), "converged": list(converged)}
        return c if by_eq5 is None else c | {"ended_by_eq5": by_eq5}

    def notes(self, checks, method="aroma", **opts):
        from aroma_peft.report import loop_notes

        return loop_notes({"method": method, "method_options": self.OPTS | opts},
                          {"modules": ["m0", "m1"], "history": [], "outer_checks": checks})

    def test_loops_ended_by_eq5_and_modules_frozen(self):
        checks = [self.check(120, 120, True), self.check(200, 80, True, converged=[0]),
                  self.check(400, 200, False), self.check(490, 90, True, converged=[1])]
        lines, problems = self.notes(checks)
        assert problems == []
        assert lines == ["4 inner loops ended: 3 by eq. (5) (after 80 / 90 / 120 steps, min / median / max), "
                         "1 at T_in = 200 steps.",
                         "Modules frozen by eq. (6): 2 of 2, at steps 200 to 490."]

    def test_no_loop_ended_by_eq5_is_a_warning_with_the_steps_eq5_needs(self):
        lines, problems = self.notes([self.check(40, 40, False), self.check(80, 40, False)], max_inner_steps=40)
        assert len(problems) == 2  # eq. (6) froze nothing either
        assert problems[0].startswith("eq. (5) ended no inner loop: every one ran T_in = 40 steps")
        assert "check_interval / eps_in = 100 steps" in problems[0]  # 10 / 0.1
        assert "eps_out = 0.005 is below every ratio it was compared with (the smallest measured: 0.02)" in problems[1]
        assert lines[-2:] == [f"**Warning: {p}**" for p in problems]

    def test_files_without_ended_by_eq5_read_a_loop_shorter_than_t_in_as_eq5(self):
        lines, _ = self.notes([self.check(150, 150, None, converged=[0, 1]), self.check(350, 200, None)])
        assert lines[0].startswith("2 inner loops ended: 1 by eq. (5) (after 150 / 150 / 150 steps")

    def test_relora_and_runs_without_a_dual_loop_warn_of_nothing(self):
        lines, problems = self.notes([self.check(50, 50, False)], method="relora", max_inner_steps=50)
        assert (lines, problems) == (["1 inner loops ended, every one at T_in = 50 steps (eq. (5) is off)."], [])
        from aroma_peft.report import loop_notes

        assert loop_notes({"method": "lora"}, {"modules": [], "history": []}) == ([], [])

    def test_write_report_shows_the_section_and_raises_the_warning(self, tmp_path):
        run = aroma_run(tmp_path / "aroma")
        config = json.loads((run / "config.json").read_text()) | {"method_options": self.OPTS | {"max_inner_steps": 40}}
        history = json.loads((run / "rank_history.json").read_text()) | {"outer_checks": [self.check(40, 40, False)]}
        (run / "config.json").write_text(json.dumps(config))
        (run / "rank_history.json").write_text(json.dumps(history))
        with pytest.warns(UserWarning, match=r"eq\. \(5\) ended no inner loop"):
            report = write_report(run).read_text()
        assert "## The dual loop" in report and "- **Warning: eq. (5) ended no inner loop" in report
