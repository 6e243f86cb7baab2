"""The ``aroma`` command line end to end on a tiny random-initialized model saved with a tokenizer."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_bert
from transformers import AutoModelForSequenceClassification, BertTokenizerFast

from aroma_peft.cli import main

WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    tiny_bert().save_pretrained(d)
    return d


def write_mrpc(d, n_train: int, n_dev: int = 32):
    """MRPC-format files in ``d``: label 1 iff both sentences name the same animal (learnable)."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i in range(n):
            a, b = (["cat", "dog"][int(torch.randint(2, (1,), generator=g))] for _ in range(2))
            lines.append(f"{int(a == b)}\t{i}\t{i + 1000}\tthe {a} sat on the mat\ta {b} ran under the log")
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def mrpc_dir(tmp_path_factory):
    return write_mrpc(tmp_path_factory.mktemp("mrpc"), 96)


def train(model_dir, data_dir, out, method="aroma", *extra):
    argv = ["train", "glue", "--task", "mrpc", "--model", str(model_dir), "--method", method, "--data-dir",
            str(data_dir), "--out", str(out), "--max-steps", "12", "--eval-steps", "6", "--batch-size", "16",
            "--warmup-steps", "2", "--lr", "5e-3", "--no-progress", *extra]
    return main(argv)


@pytest.mark.parametrize("method", ["aroma", "relora", "lora", "dora", "adalora", "full", "bitfit"])
def test_train_writes_the_run_directory(model_dir, mrpc_dir, tmp_path, method):
    extra = ["--max-inner-steps", "4", "--check-interval", "2"] if method in ("aroma", "relora") else []
    if method == "adalora":
        extra = ["--tinit", "2", "--tfinal", "4", "--delta-t", "2"]
    assert train(model_dir, mrpc_dir, tmp_path / "run", method, *extra) == 0
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "rank_history.json", "ranks.json", "final_metrics.json", "report.md",
                 "figures/fig1_training.png", "figures/fig3_rank_distribution.png"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["method"] == method and final["steps"] <= 12 and set(final["metrics"]) == {"accuracy", "f1"}
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == ([6, 12] if final["steps"] == 12 else [6, final["steps"]])
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 5e-3 and config["resolved_max_steps"] == 12
    ranks = json.loads((run / "ranks.json").read_text())["modules"]
    assert (len(ranks) == 12) == (method not in ("full", "bitfit"))


def test_preset_then_overrides(model_dir, mrpc_dir, tmp_path):
    assert train(model_dir, mrpc_dir, tmp_path / "run", "aroma", "--preset", "small-cpu", "--eps-out", "0.02") == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["preset"] == "small-cpu"
    assert config["method_options"]["eps_out"] == 0.02  # command line beats the preset
    assert (config["method_options"]["max_inner_steps"], config["method_options"]["eps_in"]) == (400, 0.05)  # preset
    assert config["max_steps"] == 12 and config["epochs"] is None


def test_report_compare_and_exports(model_dir, mrpc_dir, tmp_path, capsys):
    aroma, lora = tmp_path / "aroma", tmp_path / "lora"
    assert train(model_dir, mrpc_dir, aroma, "aroma", "--max-inner-steps", "4", "--check-interval", "2") == 0
    assert train(model_dir, mrpc_dir, lora, "lora", "--r", "8") == 0
    (aroma / "report.md").unlink()
    assert main(["report", str(aroma)]) == 0 and (aroma / "report.md").is_file()
    capsys.readouterr()
    assert main(["compare", str(aroma), str(lora), "--out", str(tmp_path / "table.md")]) == 0
    table = capsys.readouterr().out
    assert "aroma" in table and "lora" in table and (tmp_path / "table.md").read_text().strip() == table.strip()

    # The merged export and the LoRA export both reproduce the trained AROMA model's logits.
    from peft import PeftModel

    from aroma_peft.model import AromaModel
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    trained = AromaModel.from_pretrained(base, aroma / "adapter").eval()
    ids = torch.tensor([[2, 5, 7, 9, 3, 5, 8, 10, 3]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    assert main(["export", str(aroma), str(tmp_path / "merged"), "--format", "merged"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert main(["export", str(aroma), str(tmp_path / "lora-export"), "--format", "lora"]) == 0
    peft_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2), tmp_path / "lora-export").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_missing_data_file_is_named(model_dir, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert train(model_dir, tmp_path / "data", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "aroma: error:" in err and "train" in err and str(tmp_path / "data") in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_malformed_row_is_named_with_its_line(model_dir, mrpc_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.tsv").write_text((mrpc_dir / "train.tsv").read_text(encoding="utf-8") + "1\tonly three\tcolumns\n",
                                   encoding="utf-8")
    (bad / "dev.tsv").write_text((mrpc_dir / "dev.tsv").read_text(encoding="utf-8"), encoding="utf-8")
    assert train(model_dir, bad, tmp_path / "run") == 2
    assert f"{bad / 'train.tsv'}, line 98: expected 5 tab-separated columns" in capsys.readouterr().err


def test_model_folder_without_tokenizer(mrpc_dir, tmp_path, capsys):
    d = tmp_path / "no-tok"
    tiny_bert().save_pretrained(d)
    assert train(d, mrpc_dir, tmp_path / "run") == 2
    assert "no tokenizer in this folder" in capsys.readouterr().err


def test_preset_that_does_not_fit_the_model(model_dir, mrpc_dir, tmp_path, capsys):
    assert train(model_dir, mrpc_dir, tmp_path / "run", "aroma", "--preset", "roberta-base") == 2
    assert "--preset roberta-base does not fit this model" in capsys.readouterr().err


def test_unknown_task_and_method_are_rejected_by_the_parser(model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["train", "glue", "--task", "wnli", "--model", str(model_dir)])
    assert "invalid choice: 'wnli'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "glue", "--task", "rte", "--model", str(model_dir), "--method", "vera"])
    assert "invalid choice: 'vera'" in capsys.readouterr().err


def test_export_lora_of_a_method_without_one(model_dir, mrpc_dir, tmp_path, capsys):
    assert train(model_dir, mrpc_dir, tmp_path / "run", "bitfit") == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "x"), "--format", "lora"]) == 2
    assert "a bitfit run has no standard LoRA adapter" in capsys.readouterr().err


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "aroma_peft", "train", "glue", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--eps-out" in out.stdout and "--preset" in out.stdout


def test_help_shows_each_options_real_default_and_never_none():
    """--help used to print "(default: None)" for --lr, whose built-in default is 5e-4."""
    import dataclasses

    from aroma_peft.cli import METHOD_OPTIONS, RUN_OPTIONS, build_parser
    from aroma_peft.config import AromaConfig
    from aroma_peft.methods import MethodOptions
    from aroma_peft.train import TrainOptions

    glue = build_parser()._subparsers._group_actions[0].choices["train"]._subparsers._group_actions[0].choices["glue"]
    text = " ".join(glue.format_help().split())
    assert "(default: None)" not in text
    assert "--lr LR peak learning rate (built-in default: 0.0005)" in text
    assert "--eps-out EPS_OUT AROMA outer tolerance, eq. (6) (built-in default: 0.005)" in text
    assert "--max-inner-steps MAX_INNER_STEPS AROMA T_in (ReLoRA: cycle length) (built-in default: 200)" in text
    # every flag is a field of the options, and every option a user sets has a flag
    fields = {f.name for f in dataclasses.fields(TrainOptions) + dataclasses.fields(MethodOptions)}
    flags = {flag.replace("-", "_") for flag, _ in RUN_OPTIONS + METHOD_OPTIONS}
    assert flags <= fields
    assert {f.name for f in dataclasses.fields(MethodOptions)} - flags == {
        "target_modules", "modules_to_save", "train_heads_after_convergence"}  # the first two have their own flags
    # one default for AROMA's options: AromaConfig's
    aroma = {f.name: f.default for f in dataclasses.fields(AromaConfig)}
    for f in dataclasses.fields(MethodOptions):
        if f.name in aroma and f.name not in ("target_modules", "modules_to_save"):
            assert f.default == aroma[f.name], f.name


def test_a_flag_takes_its_fields_type(capsys):
    from aroma_peft.cli import build_parser

    args = build_parser().parse_args(["train", "glue", "--task", "mrpc", "--model", "m", "--max-inner-steps", "30",
                                      "--eps-in", "0.2", "--reset", "zero"])
    assert (args.max_inner_steps, args.eps_in, args.reset) == (30, 0.2, "zero")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "glue", "--task", "mrpc", "--model", "m", "--max-inner-steps", "2.5"])
    assert "--max-inner-steps: invalid int value: '2.5'" in capsys.readouterr().err


def test_checkpoint_and_fault_flags_reach_the_options(model_dir, mrpc_dir, tmp_path):
    from aroma_peft.cli import build_parser, train_options_from_args

    args = build_parser().parse_args(["train", "glue", "--task", "mrpc", "--model", str(model_dir), "--data-dir",
                                      str(mrpc_dir), "--out", str(tmp_path / "run"), "--save-steps", "7",
                                      "--max-nonfinite-steps", "3", "--resume"])
    opts = train_options_from_args(args)
    assert (opts.save_steps, opts.max_nonfinite_steps, opts.resume) == (7, 3, True)
    assert train_options_from_args(build_parser().parse_args(
        ["train", "glue", "--task", "mrpc", "--model", str(model_dir)])).resume is False


def test_a_run_stopped_by_nonfinite_steps_is_a_clean_error(model_dir, mrpc_dir, tmp_path, monkeypatch, capsys):
    import aroma_peft.train as T

    def stopped(_opts):
        raise FloatingPointError("3 steps skipped for a non-finite loss or gradient (steps 4, 5, 6)")

    monkeypatch.setattr(T, "run", stopped)
    assert train(model_dir, mrpc_dir, tmp_path / "run") == 2
    assert "aroma: error: 3 steps skipped" in capsys.readouterr().err


# ---------------------------------------------------------------------- bad input: named, before compute, nothing changed
def snapshot(run_dir) -> dict:
    """Every file under ``run_dir`` (TensorBoard's too): its bytes and modification time."""
    return {p.relative_to(run_dir): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(model_dir, mrpc_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train(model_dir, mrpc_dir, run, "aroma", "--max-inner-steps", "4", "--check-interval", "2") == 0
    return run


def truncated_model(model_dir, d):
    shutil.copytree(model_dir, d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return d


BASE_FLAGS = {"--task": "mrpc", "--method": "aroma", "--max-steps": "12", "--eval-steps": "6", "--batch-size": "16",
              "--warmup-steps": "2", "--lr": "5e-3"}


@pytest.mark.parametrize("flags, match", [
    ({"--model": "MISSING"}, r"--model {MISSING}: no such folder"),
    ({"--model": "TRUNCATED"}, r"--model {TRUNCATED}: {TRUNCATED}/model.safetensors is not a readable safetensors file"),
    ({"--max-steps": "-1"}, r"--max-steps must be an integer >= 0 \(0: evaluate the model as loaded, zero-shot\), got -1"),
    ({"--max-steps": "0"}, r"--max-steps 0 \(zero-shot\) needs a language-model task: a GLUE classifier's head is untrained"),
    ({"--max-steps": None, "--epochs": "-1"}, r"--epochs must be a finite number > 0, got -1.0"),
    ({"--train-limit": "-5"}, r"--train-limit must be a positive integer, got -5"),
    ({"--eval-limit": "-1"}, r"--eval-limit must be a positive integer, got -1"),
    ({"--eps-out": "-1", "--model": "TRUNCATED"}, r"--eps-out must be a finite number > 0, got -1.0"),
    ({"--eps-out": "-1", "--model": "TRUNCATED", "--preset": "small-cpu"}, r"--eps-out must be a finite number > 0"),
    ({"--lr": "-1e-3"}, r"--lr must be a finite number > 0, got -0.001"),
], ids=["missing-model", "truncated-weights", "max-steps-negative", "max-steps-0-on-glue", "epochs-negative", "train-limit-negative",
        "eval-limit-negative", "eps-out-before-model", "eps-out-before-preset", "lr-negative-exponent"])
def test_bad_input_is_named_before_compute_and_changes_nothing(model_dir, mrpc_dir, finished_run, tmp_path,
                                                                monkeypatch, capsys, flags, match):
    import aroma_peft.train as T

    paths = {"MISSING": tmp_path / "no-such-model", "TRUNCATED": truncated_model(model_dir, tmp_path / "truncated")}
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)  # a run directory already there: the bad command must not touch it
    before = snapshot(run)

    def load(*args):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(T, "load_model_and_tokenizer", load)
    merged = BASE_FLAGS | {"--model": str(model_dir), "--data-dir": str(mrpc_dir), "--out": str(run)} | flags
    merged = {k: str(paths.get(v, v)) for k, v in merged.items() if v is not None}
    argv = ["train", "glue", *[x for kv in merged.items() for x in kv], "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("aroma: error: ") and re.search(match.format(**paths), err), err
    assert snapshot(run) == before


def test_negative_numbers_reach_their_flag():
    from aroma_peft.cli import attach_negative_numbers, build_parser

    argv = ["train", "glue", "--task", "rte", "--model", "m", "--lr", "-1e-3", "--seed", "-2", "--eps-out", "-.5"]
    args = build_parser().parse_args(attach_negative_numbers(argv))
    assert (args.lr, args.seed, args.eps_out) == (-1e-3, -2, -0.5)  # each value reaches validation, which names it
    assert attach_negative_numbers(["--out", "-1e-3", "--lr", "--seed"]) == ["--out", "-1e-3", "--lr", "--seed"]


class TestExport:
    def test_a_truncated_lora_adapter_is_refused_and_nothing_is_written(self, finished_run, tmp_path, capsys):
        run = tmp_path / "run"
        shutil.copytree(finished_run, run)
        weights = run / "lora" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
        assert main(["export", str(run), str(tmp_path / "out"), "--format", "lora"]) == 2
        assert f"{weights}: not a readable safetensors file" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no target, no temporary folder left

    @pytest.mark.parametrize("fmt", ["lora", "merged"])
    def test_an_existing_non_empty_target_is_refused_and_left_as_it_was(self, finished_run, tmp_path, capsys, fmt):
        target = tmp_path / "out"
        target.mkdir()
        (target / "adapter_model.safetensors").write_bytes(b"stale")
        before = snapshot(target)
        assert main(["export", str(finished_run), str(target), "--format", fmt]) == 2
        assert f"{target}: already exists and is not an empty folder" in capsys.readouterr().err
        assert snapshot(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    def test_an_empty_target_folder_receives_the_export(self, finished_run, tmp_path):
        from safetensors.torch import load_file

        (tmp_path / "out").mkdir()
        assert main(["export", str(finished_run), str(tmp_path / "out"), "--format", "lora"]) == 0
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
            p.name for p in (finished_run / "lora").iterdir())
        assert load_file(str(tmp_path / "out" / "adapter_model.safetensors")).keys() == \
            load_file(str(finished_run / "lora" / "adapter_model.safetensors")).keys()


def test_export_lora_of_a_run_whose_modules_all_converged_at_rank_0_says_so(model_dir, mrpc_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(model_dir, mrpc_dir, run, "aroma", "--max-inner-steps", "4", "--check-interval", "2",
                 "--eps-out", "10") == 0
    assert {m["rank"] for m in json.loads((run / "ranks.json").read_text())["modules"]} == {0}
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "lora"]) == 2
    err = capsys.readouterr().err
    assert "did the run finish" not in err
    assert "every adapted module (12 of 12) converged by eq. (6) at its first outer check, at step 4" in err
    ratios = [m["last_ratio"] for m in json.loads((run / "adapter" / "aroma_controller.json").read_text())["loop"]["modules"]]
    assert f"ratios {min(ratios):.2e} to {max(ratios):.2e}, below eps_out=10" in err
    assert "lower eps_out" in err and "outer_criterion='update'" in err and "--format merged" in err
    assert not (tmp_path / "out").exists()


def test_a_run_whose_inner_loops_all_reach_t_in_is_warned_of(model_dir, mrpc_dir, tmp_path):
    # eps_in 1e-9: a growing norm never meets eq. (5), so every inner loop runs T_in = 4 steps.
    with pytest.warns(UserWarning, match=r"eq\. \(5\) ended no inner loop: every one ran T_in = 4 steps"):
        assert train(model_dir, mrpc_dir, tmp_path / "run", "aroma", "--max-inner-steps", "4", "--check-interval", "2",
                     "--eps-in", "1e-9") == 0
    checks = json.loads((tmp_path / "run" / "rank_history.json").read_text())["outer_checks"]
    assert [c["inner_steps"] for c in checks] == [4, 4, 4] and not any(c["ended_by_eq5"] for c in checks)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "- 3 inner loops ended: 0 by eq. (5), 3 at T_in = 4 steps." in report
    assert "- **Warning: eq. (5) ended no inner loop" in report
