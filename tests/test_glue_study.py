"""benchmarks/glue_study.py: tuning then seeds, ablation arms, skipping what is done, the report."""

import json
import shutil

import numpy as np
import pytest
from aroma_peft.io import read_adapter
from conftest import load_benchmark
from test_cli import model_dir, mrpc_dir  # noqa: F401  (fixtures: a tiny BERT with tokenizer, MRPC files)

@pytest.fixture(scope="module")
def study():
    return load_benchmark("glue_study")


def write_spec(tmp_path, model_dir, mrpc_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mrpc").symlink_to(mrpc_dir)
    spec = {
        "name": "tiny", "model": str(model_dir), "data_dir": str(tmp_path / "data"),
        "results": str(tmp_path / "results"), "work": str(tmp_path / "work"), "seeds": [0, 1],
        "common": {"batch_size": 16, "eval_steps": 3, "warmup_steps": 1},
        "tasks": {"mrpc": {"max_steps": 6}},
        "arms": {
            "lora": {"method": "lora", "options": {"r": 2, "alpha": 4.0}, "grid": {"lr": [1e-4, 5e-3]}},
            "aroma": {"method": "aroma", "options": {"lr": 5e-3, "eps_in": None, "check_interval": 1,
                                                     "max_inner_steps": "0.5*T", "restart_warmup_steps": 1}},
            "aroma-no-reset": {"from": "aroma", "options": {"reset": "none"}},
        },
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_tunes_then_runs_seeds_then_skips_what_is_done(study, model_dir, mrpc_dir, tmp_path):  # noqa: F811
    path = write_spec(tmp_path, model_dir, mrpc_dir)
    assert study.main([str(path), "--jobs", "2", "--threads", "1"]) == 0
    runs = sorted(p.parent.relative_to(tmp_path / "results" / "runs").as_posix()
                  for p in (tmp_path / "results" / "runs").glob("*/*/*/study_run.json"))
    finals = {r: json.loads((tmp_path / "results" / "runs" / r / "final_metrics.json").read_text()) for r in runs}
    # lora: two trials at seed 0, then seed 1 of the better one; aroma: one trial, two seeds; the
    # ablation: aroma's chosen trial with reset=none, two seeds.
    lora_tune = {r: f for r, f in finals.items() if r.startswith("mrpc/lora/") and r.endswith("-s0")}
    assert len(lora_tune) == 2 and len([r for r in runs if r.startswith("mrpc/lora/")]) == 3
    best = max(lora_tune, key=lambda r: (finals[r]["metrics"]["accuracy"], r))  # independent argmax
    lora_seed1 = [r for r in runs if r.startswith("mrpc/lora/") and r.endswith("-s1")]
    if len({f["metrics"]["accuracy"] for f in lora_tune.values()}) == 2:  # no tie: the winner is unique
        assert lora_seed1 == [best[:-3] + "-s1"]
    assert len([r for r in runs if r.startswith("mrpc/aroma/")]) == 2
    no_reset = [r for r in runs if r.startswith("mrpc/aroma-no-reset/")]
    assert len(no_reset) == 2
    configs = [json.loads((tmp_path / "results" / "runs" / r / "config.json").read_text()) for r in no_reset]
    assert all(c["method_options"]["reset"] == "none" and c["method_options"]["max_inner_steps"] == 3 for c in configs)
    assert all(f["steps"] == 6 for f in finals.values())
    # Done runs are not run again; the report lists every arm with its seeds.
    assert study.runnable(study.load_spec(path), ["mrpc"], ["lora", "aroma", "aroma-no-reset"]) == []
    report = (tmp_path / "results" / "results.md").read_text()
    for arm in ("lora", "aroma", "aroma-no-reset"):
        assert f"| {arm} |" in report
    assert "| aroma-no-reset | reset=none |" in report  # an ablation's row names what it changes
    assert "(2 seeds)" in report and "Majority class" in report
    # The aroma row's final train loss: the mean over its two seeds of metrics.jsonl's last train_loss.
    last = [json.loads((tmp_path / "results" / "runs" / r / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
            for r in runs if r.startswith("mrpc/aroma/")]
    row = next(line for line in report.splitlines() if line.startswith("| aroma |") and "(2 seeds)" in line)
    assert row.split(" | ")[5] == f"{sum(last) / 2:.3f}"
    for figure in ("mrpc_curves.png", "mrpc_trainable.png", "mrpc_ranks.png"):
        assert (tmp_path / "results" / figure).stat().st_size > 0
    data = json.loads((tmp_path / "results" / "results.json").read_text())
    assert len(data["runs"]) == 7
    # Fig. 4: the first components are trained before any Reset, so with and without Reset (same
    # seed) they are the same: cosine 1; the later ones differ.
    cos = json.loads((tmp_path / "results" / "mrpc_cosine_aroma-no-reset.json").read_text())
    assert abs(cos["diagonal_mean"][0] - 1) < 1e-6 and len(cos["diagonal_mean"]) >= 2
    assert (tmp_path / "results" / "mrpc_cosine_aroma-no-reset.png").stat().st_size > 0
    assert "Appendix E (Fig. 4) analogue" in report
    assert cos["seed"] == 0
    # Its factors, recomputed here with numpy from the two adapters: the mean over modules of the
    # k-th a's (b's) cosine, and the component cosine as the product of the two, module by module.
    adapters = [read_adapter(tmp_path / "work" / r / "adapter")[2] for r in sorted(runs)
                if r.startswith(("mrpc/aroma/", "mrpc/aroma-no-reset/")) and r.endswith("-s0")]
    unit = lambda x, axis: x / np.linalg.norm(x, axis=axis, keepdims=True)  # noqa: E731
    for k in range(len(cos["diagonal_mean"])):
        ca, cb = [], []
        for key in adapters[0]:
            if key.endswith(".merged_A"):
                name = key[: -len(".merged_A")]
                a1, a2 = (np.asarray(t[key], dtype=np.float64) for t in adapters)
                b1, b2 = (np.asarray(t[name + ".merged_B"], dtype=np.float64) for t in adapters)
                if min(len(a1), len(a2)) > k:
                    ca.append(float(unit(a1, 1)[k] @ unit(a2, 1)[k]))
                    cb.append(float(unit(b1, 0)[:, k] @ unit(b2, 0)[:, k]))
        assert cos["diagonal_a"][k] == pytest.approx(np.mean(ca), abs=1e-9)
        assert cos["diagonal_b"][k] == pytest.approx(np.mean(cb), abs=1e-9)
        assert cos["diagonal_mean"][k] == pytest.approx(np.mean(np.multiply(ca, cb)), abs=1e-9)
    assert cos["diagonal_a"][0] == pytest.approx(1) and cos["diagonal_b"][0] == pytest.approx(1)
    assert "the output factors `b` (from 0)" in report
    # --reproduce trains a finished run again into its work folder and leaves its summary alone; with
    # seed 0's adapter gone, Fig. 4 is drawn from the first seed whose two adapters are on disk.
    (aroma_s0,) = [r for r in runs if r.startswith("mrpc/aroma/") and r.endswith("-s0")]
    shutil.rmtree(tmp_path / "work" / aroma_s0)
    summary = {f.name: f.read_bytes() for f in (tmp_path / "results" / "runs" / aroma_s0).iterdir()}
    with pytest.raises(ValueError, match=r"--reproduce mrpc/aroma/nope-s0: no finished run there"):
        study.main([str(path), "--reproduce", aroma_s0, "mrpc/aroma/nope-s0"])
    assert not (tmp_path / "work" / aroma_s0).exists()  # refused before any compute
    (tmp_path / "results" / "mrpc_cosine_aroma-no-reset.json").unlink()
    study.main([str(path), "--report"])
    assert json.loads((tmp_path / "results" / "mrpc_cosine_aroma-no-reset.json").read_text())["seed"] == 1
    assert study.main([str(path), "--reproduce", aroma_s0, "--threads", "1"]) == 0  # the same final metric
    assert {f.name: f.read_bytes() for f in (tmp_path / "results" / "runs" / aroma_s0).iterdir()} == summary
    again = json.loads((tmp_path / "work" / aroma_s0 / "final_metrics.json").read_text())
    assert again["metrics"] == finals[aroma_s0]["metrics"]
    study.main([str(path), "--report"])
    assert json.loads((tmp_path / "results" / "mrpc_cosine_aroma-no-reset.json").read_text()) == cos
    # With the finished run's folder (and its last checkpoint) still there, a reproduction trains again
    # from step 0 rather than resuming at the end: the folder is made anew.
    assert (tmp_path / "work" / aroma_s0 / "checkpoint").is_dir()
    (tmp_path / "work" / aroma_s0 / "marker").write_text("from the last reproduction")
    assert study.main([str(path), "--reproduce", aroma_s0, "--threads", "1"]) == 0
    assert not (tmp_path / "work" / aroma_s0 / "marker").exists()


def test_a_bad_spec_names_the_field(study, tmp_path):
    path = tmp_path / "spec.json"
    base = {"model": "m", "data_dir": "d", "results": "r", "work": "w", "seeds": [0], "tasks": {"mrpc": {"max_steps": 0}},
            "arms": {}}
    path.write_text(json.dumps(base))
    with pytest.raises(ValueError, match=r"tasks.mrpc.max_steps must be a positive integer"):
        study.load_spec(path)
    path.write_text(json.dumps(base | {"tasks": {"mrpc": {"max_steps": 5}}, "arms": {"x": {"from": "y"}}}))
    with pytest.raises(ValueError, match=r"arms.x.from='y' must name an arm"):
        study.load_spec(path)


def test_a_task_tuned_on_another_runs_only_the_seeds_of_that_tasks_choice(study, tmp_path):
    spec = {"model": "m", "data_dir": "d", "results": str(tmp_path / "results"), "work": str(tmp_path / "work"),
            "seeds": [0, 1], "tasks": {"mrpc": {"max_steps": 10}, "rte": {"max_steps": 20, "tune_on": "mrpc"}},
            "arms": {"lora": {"method": "lora", "grid": {"lr": [1e-4, 5e-3]}},
                     "no-reset": {"from": "lora", "options": {"reset": "none"}}}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    spec = study.load_spec(path)
    keys = lambda runs: sorted(r.key for r in runs)  # noqa: E731
    assert all(r.task == "mrpc" for r in study.runnable(spec, ["mrpc", "rte"], ["lora", "no-reset"]))  # rte waits
    for lr, acc in ((1e-4, 0.6), (5e-3, 0.7)):  # mrpc's tuning finishes: lr 5e-3 wins
        run = study.make_run(spec, "mrpc", "lora", {"lr": lr}, 0)
        study.summary_dir(spec, run).mkdir(parents=True)
        (study.summary_dir(spec, run) / "final_metrics.json").write_text(
            json.dumps({"main_metric": "accuracy", "metrics": {"accuracy": acc}}))
    rte = [r for r in study.runnable(spec, ["rte"], ["lora", "no-reset"])]
    assert [(r.arm, r.trial, r.seed) for r in rte] == [("lora", {"lr": 5e-3}, 0), ("lora", {"lr": 5e-3}, 1),
                                                       ("no-reset", {"lr": 5e-3}, 0), ("no-reset", {"lr": 5e-3}, 1)]
    assert all(r.options["max_steps"] == 20 and "tune_on" not in r.options for r in rte)  # rte's own budget
    assert keys(study.runnable(spec, ["rte"], ["lora"])) == keys(rte[:2])
    for bad in ("rte", "qnli", "mrpc"):  # itself, not a task of the spec, a task that is itself tuned on another
        tasks = {"mrpc": {"max_steps": 10, **({"tune_on": "rte"} if bad == "mrpc" else {})},
                 "rte": {"max_steps": 20, "tune_on": bad}}
        path.write_text(json.dumps(json.loads(path.read_text()) | {"tasks": tasks}))
        with pytest.raises(ValueError, match=r"tasks.(rte|mrpc).tune_on=.* must name another task"):
            study.load_spec(path)


def test_an_arm_from_another_shows_the_options_it_ran_with(study):
    """A ``from`` arm that overrides a key of the trial it takes shows its own value, not the trial's."""
    spec = {"arms": {"aroma": {"method": "aroma", "grid": {"eps_out": [5e-3, 1e-2]}},
                     "aroma-update": {"from": "aroma", "options": {"outer_criterion": "update", "eps_out": 0.15}}},
            "tasks": {"mrpc": {"max_steps": 8}}, "common": {"max_inner_steps": "0.5*T"}}
    run = study.make_run(spec, "mrpc", "aroma-update", {"eps_out": 5e-3}, 0)
    row = {"arm": run.arm, "trial": run.trial, "options": run.options}
    assert run.options["eps_out"] == 0.15  # what the run trains with
    assert study.shown_options(spec, row) == {"eps_out": 0.15, "outer_criterion": "update"}
    base = study.make_run(spec, "mrpc", "aroma", {"eps_out": 5e-3}, 0)
    assert study.shown_options(spec, {"arm": "aroma", "trial": base.trial, "options": base.options}) == {"eps_out": 5e-3}


def test_fractions_of_T_become_step_counts(study):
    assert study.resolve({"max_inner_steps": "0.125*T", "lr": 1e-3}, 920) == {"max_inner_steps": 115, "lr": 1e-3}


@pytest.mark.parametrize("task", ["mrpc", "rte", "sst2", "cola"])
@pytest.mark.parametrize("arm, method", [("aroma", "aroma"), ("lora-r8", "lora")])
def test_the_small_cpu_presets_are_the_studys_choices(study, task, arm, method):
    """The small-cpu preset of each studied task is the trial the committed study chose, at its budget."""
    import dataclasses

    from aroma_peft.methods import MethodOptions
    from aroma_peft.presets import SMALL_CPU

    spec = study.load_spec(study.ROOT / "benchmarks" / "studies" / "minilm_glue.json")
    trial = study.chosen_trial(spec, task, arm)
    assert trial is not None, f"the study has not chosen a trial of {arm} on {task}"
    run = study.make_run(spec, task, arm, trial, spec["tune_seed"])
    defaults = {f.name: f.default for f in dataclasses.fields(MethodOptions)}  # what a run without them uses
    preset = SMALL_CPU[task][method]
    assert preset == {k: run.options.get(k, defaults.get(k)) for k in preset}


def test_max_runs_starts_that_many_and_the_next_call_goes_on(study, model_dir, mrpc_dir, tmp_path):  # noqa: F811
    path = write_spec(tmp_path, model_dir, mrpc_dir)
    done = lambda: sorted(p.parent.name for p in (tmp_path / "results" / "runs").glob("mrpc/aroma/*/study_run.json"))
    assert study.main([str(path), "--arms", "aroma", "--jobs", "2", "--threads", "1", "--max-runs", "1"]) == 0
    assert [d[-3:] for d in done()] == ["-s0"]  # one run, though two could run at once
    assert study.main([str(path), "--arms", "aroma", "--jobs", "2", "--threads", "1", "--max-runs", "1"]) == 0
    assert [d[-3:] for d in done()] == ["-s0", "-s1"]
    with pytest.raises(SystemExit):
        study.main([str(path), "--max-runs", "0"])


def test_stop_starting_after_starts_nothing_once_the_time_is_up(study, model_dir, mrpc_dir, tmp_path):  # noqa: F811
    path = write_spec(tmp_path, model_dir, mrpc_dir)
    assert study.main([str(path), "--arms", "aroma", "--jobs", "2", "--threads", "1", "--stop-starting-after", "0"]) == 0
    assert not list((tmp_path / "results" / "runs").glob("*/*/*/study_run.json"))
    # with time left it runs, on the device it is given, which the run's config records
    assert study.main([str(path), "--arms", "aroma", "--jobs", "2", "--threads", "1", "--max-runs", "1",
                       "--device", "cpu", "--stop-starting-after", "600"]) == 0
    configs = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("mrpc/aroma/*/config.json")]
    assert len(configs) == 1 and configs[0]["device"] == "cpu"
    with pytest.raises(SystemExit):
        study.main([str(path), "--stop-starting-after", "-1"])


def test_against_the_reference_is_welchs_test_by_hand(study):
    """The difference of the means and Welch's p, checked against the textbook formula."""
    from scipy.stats import t as student_t

    a, b = [0.80, 0.82, 0.81], [0.83, 0.85, 0.82, 0.84]
    va, vb = (sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1) for v in (a, b))
    se2 = va / len(a) + vb / len(b)
    tstat = (sum(a) / len(a) - sum(b) / len(b)) / se2 ** 0.5
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    p = 2 * student_t.sf(abs(tstat), df)
    cell = study.against([{"final": x} for x in a], [{"final": x} for x in b])
    assert cell == f"{100 * (sum(a) / 3 - sum(b) / 4):+.2f} (p {p:.2g})" and cell.startswith("-2.")
    assert study.against([{"final": 0.8}], [{"final": x} for x in b]) == "-"  # one seed: nothing to test
    assert study.against([{"final": 0.8}] * 2, [{"final": 0.7}] * 3) == "+10.00 (no spread)"


def test_a_reference_that_is_not_an_arm_is_named(study, tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"model": "m", "data_dir": "d", "results": "r", "work": "w", "seeds": [0],
                                "tasks": {"mrpc": {"max_steps": 4}}, "reference": "lora-r16",
                                "arms": {"lora": {"method": "lora"}}}))
    with pytest.raises(ValueError, match="reference='lora-r16' must name an arm"):
        study.load_spec(path)


def test_loss_vs_dev_ranks_the_runs_above_the_floor_only(study, tmp_path):
    """Spearman's rho of final dev metric against final training loss; runs at the floor are left out."""
    def row(method, loss, final):
        return {"task": "cola", "method": method, "main_metric": "mcc", "majority": {"mcc": 0.0},
                "final": final, "curve": [[10, 0.0, 0.7], [20, final, loss]]}

    # AROMA: dev falls exactly as the loss rises (rho -1). The others: one swap in five; by hand, the
    # losses' ranks 1..5 against the dev ranks reversed, 4,5,3,2,1, give sum d^2 = 38 and
    # rho = 1 - 6*38/(5*24) = -0.90.
    aroma = [row("aroma", 0.40 + 0.01 * i, 0.30 - 0.01 * i) for i in range(5)]
    others = [row("lora", loss, final) for loss, final in
              [(0.30, 0.29), (0.31, 0.30), (0.32, 0.28), (0.33, 0.27), (0.34, 0.26)]]
    at_floor = [row("lora", 0.10, 0.0), row("aroma", 0.90, 0.005)]  # at / within a point of the floor
    lines = study.loss_vs_dev(aroma + others + at_floor, "cola", tmp_path)
    text = "\n".join(lines)
    assert "AROMA's arms alone rho = -1.00" in text and "5 runs" in text
    assert "the other methods rho = -0.90" in text
    assert "10 runs)" in text  # the two floor runs are not counted
    assert (tmp_path / "cola_loss_vs_dev.png").is_file()
    assert study.loss_vs_dev(aroma[:4], "cola", tmp_path) == []  # too few runs to rank


def test_seeds_leaves_the_other_seeds_to_another_process(study, tmp_path, capsys):
    spec = {"model": "m", "data_dir": "d", "results": str(tmp_path / "results"), "work": str(tmp_path / "work"),
            "seeds": [0, 1, 2], "tasks": {"mrpc": {"max_steps": 10}},
            "arms": {"lora": {"method": "lora", "grid": {"lr": [1e-4]}}}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    listed = lambda: [line.split()[0] for line in capsys.readouterr().out.splitlines()]  # noqa: E731
    assert study.main([str(path), "--seeds", "1", "2", "--dry-run"]) == 0
    assert listed() == []  # the tuning run (seed 0) is the other process's; until it ends nothing is chosen
    loaded = study.load_spec(path)
    done = study.summary_dir(loaded, study.make_run(loaded, "mrpc", "lora", {"lr": 1e-4}, 0))
    done.mkdir(parents=True)
    (done / "final_metrics.json").write_text(json.dumps({"main_metric": "accuracy", "metrics": {"accuracy": 0.6}}))
    assert study.main([str(path), "--seeds", "2", "1", "--dry-run"]) == 0
    assert [k[-3:] for k in listed()] == ["-s1", "-s2"]
    assert study.main([str(path), "--dry-run"]) == 0
    assert [k[-3:] for k in listed()] == ["-s1", "-s2"]  # seed 0 is done
    with pytest.raises(SystemExit):
        study.main([str(path), "--seeds", "3"])
    assert "--seeds: [3] not in the spec (its seeds are 0, 1, 2)" in capsys.readouterr().err


def test_the_report_names_an_arm_the_spec_no_longer_has(study, tmp_path):
    """Runs of an arm that is not in the spec stop the report with the arm's name, not a KeyError."""
    import shutil

    committed = study.ROOT / "benchmarks" / "results" / "glue_study" / "runs" / "cola" / "aroma-longer-loops" / "tac1776de-s0"
    run_dir = tmp_path / "results" / "runs" / "cola" / "gone" / "tac1776de-s0"
    shutil.copytree(committed, run_dir)
    run = json.loads((run_dir / "study_run.json").read_text())
    (run_dir / "study_run.json").write_text(json.dumps(run | {"arm": "gone"}))
    spec = {"model": "m", "data_dir": "d", "results": str(tmp_path / "results"), "work": str(tmp_path / "work"),
            "seeds": [0], "tasks": {"cola": {"max_steps": 2400}}, "arms": {"lora": {"method": "lora"}}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"holds runs of arm\(s\) gone that the spec .*spec.json does not name"):
        study.write_report(study.reloaded(path))
    spec["arms"]["gone"] = {"from": "lora"}  # the arm back in the spec: the report is written
    path.write_text(json.dumps(spec))
    assert study.write_report(study.reloaded(path)).read_text().count("| gone |") >= 1


def test_inner_loops_vs_dev_ranks_aromas_runs_of_the_tasks_budget_only(study):
    """Spearman's rho of AROMA's final dev metric against its first inner loop and its number of loops."""
    def row(loops, final, method="aroma", max_steps=2400):
        return {"task": "cola", "method": method, "main_metric": "mcc", "majority": {"mcc": 0.0}, "final": final,
                "options": {"max_steps": max_steps}, "inner_loops": loops}

    # dev rises exactly with the first loop (rho 1). The numbers of loops 14, 9, 12, 7, 6 against dev
    # ranks 1..5: their ranks 5, 3, 4, 2, 1, by hand sum d^2 = 16 + 1 + 1 + 4 + 16 = 38,
    # rho = 1 - 6*38/(5*24) = -0.90.
    kept = [row([100 + 50 * i] + [100] * (n - 1), 0.20 + 0.01 * i) for i, n in enumerate([14, 9, 12, 7, 6])]
    left_out = [row([900], 0.05, max_steps=9600),  # another budget
                row([800, 100], 0.005),  # within a point of the floor
                row([], 0.40, method="lora"), row([50], 0.50, method="lora")]  # not AROMA
    text = "\n".join(study.inner_loops_vs_dev(kept + left_out, "cola", 2400))
    assert "5 runs more than 1 point above the floor" in text
    assert "first inner loop: Spearman rho = 1.00" in text
    assert "number of inner loops: rho = -0.90" in text
    assert study.inner_loops_vs_dev(kept[:4] + left_out, "cola", 2400) == []  # too few runs to rank
