"""The engine (engine.py): micro-batches, gradient accumulation, device and mixed precision through Accelerate."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import model_dir, mrpc_dir  # noqa: F401  (fixtures: a tiny BERT with tokenizer, MRPC files)
from test_train_resume import options

from aroma_peft import train as T
from aroma_peft.cli import build_parser, train_options_from_args
from aroma_peft.engine import micro_batches


class TestMicroBatches:
    def test_one_process_one_part_is_the_whole_batch_with_weight_one(self):
        rows = list(range(5))
        assert micro_batches(rows, 0, 1, 1) == [([0, 1, 2, 3, 4], 1.0, 1.0)]

    def test_parts_weigh_their_share_of_the_global_batch(self):
        rows = list(range(10))
        # process 1 of 2 holds rows 1, 3, 5, 7, 9; in 2 parts of ceil(5/2) = 3 and 2 rows
        assert micro_batches(rows, 1, 2, 2) == [([1, 3, 5], 3 * 2 / 10, 3 / 5), ([7, 9], 2 * 2 / 10, 2 / 5)]

    def test_a_part_without_rows_runs_a_stand_in_of_weight_zero(self):
        assert micro_batches([7, 8], 0, 1, 3) == [([7], 0.5, 0.5), ([8], 0.5, 0.5), ([7], 0.0, 0.0)]

    def test_the_gradient_weights_of_all_processes_and_parts_sum_to_world(self):
        rows, world = list(range(13)), 4
        total = sum(w for r in range(world) for _, w, _ in micro_batches(rows, r, world, 2))
        assert total == pytest.approx(world)


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))  # the native format (2)


def test_gradient_accumulation_takes_the_steps_of_the_whole_batch(model_dir, mrpc_dir, tmp_path):
    T.run(options(model_dir, mrpc_dir, tmp_path / "one", save_steps=None))
    T.run(options(model_dir, mrpc_dir, tmp_path / "acc", save_steps=None, grad_accum=4))
    ref = json.loads((tmp_path / "one" / "adapter" / "aroma_controller.json").read_text())
    got = json.loads((tmp_path / "acc" / "adapter" / "aroma_controller.json").read_text())
    assert got["history"] == ref["history"] and len(ref["history"]) > 2  # the same merges at the same steps
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "acc")
    for key in a:  # four quarter-batch gradients summed round differently from one (as under DDP)
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=5e-6, msg=key)
    assert json.loads((tmp_path / "acc" / "config.json").read_text())["grad_accum"] == 4


def test_bf16_autocasts_the_forward_on_cpu(model_dir, mrpc_dir, tmp_path, monkeypatch):
    dtypes = []
    prepare = T.prepare

    def prepare_and_watch(*args, **kwargs):
        run = prepare(*args, **kwargs)
        linear = next(m for m in run.model.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        return run
    monkeypatch.setattr(T, "prepare", prepare_and_watch)
    final = T.run(options(model_dir, mrpc_dir, tmp_path / "run", max_steps=6, warmup_steps=1, mixed_precision="bf16"))
    assert final["steps"] == 6 and set(dtypes) == {torch.bfloat16}  # training and evaluation forwards
    tensors = _adapter(tmp_path / "run")
    weights = {k: t for k, t in tensors.items() if not k.endswith(".active")}  # "active": a per-module flag
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())  # fp32 master weights


def test_device_auto_without_a_gpu_trains_on_cpu(model_dir, mrpc_dir, tmp_path):
    T.run(options(model_dir, mrpc_dir, tmp_path / "run", max_steps=3, warmup_steps=1, device="auto"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"] == "cpu"


def no_model_loading(monkeypatch):
    def load(*args):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(T, "load_model_and_tokenizer", load)


@pytest.mark.parametrize("change, cuda, bf16_gpu, match", [
    ({"device": "cuda"}, False, False, r"--device cuda: no CUDA device is available here"),
    ({"mixed_precision": "fp16"}, False, False, r"--fp16 needs a CUDA device"),
    ({"device": "auto", "mixed_precision": "bf16"}, True, False, r"--bf16: this GPU \(Old GPU\) cannot compute in "
                                                                 r"bfloat16"),
    ({"grad_accum": 17}, False, False, r"--grad-accum 17 splits each process's share of --batch-size 16"),
    ({"grad_accum": 0}, False, False, r"--grad-accum must be a positive integer, got 0"),
    ({"device": "tpu"}, False, False, r"--device 'tpu' is unknown"),
])
def test_a_device_or_precision_this_machine_cannot_give_is_named_before_compute(
        model_dir, mrpc_dir, tmp_path, monkeypatch, change, cuda, bf16_gpu, match):
    no_model_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")
    with pytest.raises(ValueError, match=match):
        T.run(options(model_dir, mrpc_dir, tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()


def test_the_engine_flags_reach_the_options(model_dir, mrpc_dir):
    argv = ["train", "glue", "--task", "mrpc", "--model", str(model_dir), "--data-dir", str(mrpc_dir),
            "--max-steps", "4", "--device", "auto", "--bf16", "--grad-accum", "2"]
    opts = train_options_from_args(build_parser().parse_args(argv))
    assert (opts.device, opts.mixed_precision, opts.grad_accum, opts.family) == ("auto", "bf16", 2, "glue")
    plain = train_options_from_args(build_parser().parse_args(argv[:8]))
    assert (plain.device, plain.mixed_precision, plain.grad_accum) == ("cpu", "no", 1)
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv + ["--fp16"])  # --bf16 and --fp16 exclude each other
