"""benchmarks/step_time.py: the bf16-base and CUDA options (the GPU run of issue 11 uses them)."""

import json

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def st():
    return load_benchmark("step_time")


@pytest.mark.parametrize("variant", ["lora-r8", "aroma-p1", "aroma-16merged"])
def test_a_bf16_base_keeps_float32_adapters_and_trains(st, variant):
    base = st.build_base_model("tiny", dtype="bfloat16")
    batch = st.make_batch(base, batch_size=2, seq_len=8)
    v = st.build_variant(variant, base)
    frozen = [p for n, p in v.model.named_parameters() if not p.requires_grad and "encoder.layer" in n]
    trained = [p for n, p in v.model.named_parameters() if p.requires_grad and "classifier" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trained and all(p.dtype == torch.float32 for p in trained)
    before = [p.detach().clone() for p in trained]
    v.step(batch, record=True)
    v.step(batch, record=True)
    assert len(v.times["step"]) == 2 and all(t > 0 for t in v.times["step"])
    # The adapters moved (b starts at 0; after two AdamW steps the trained factors have moved).
    assert any(not torch.equal(a, b) for a, b in zip(before, trained))
    assert all(torch.isfinite(p).all() for p in trained)


def test_the_run_records_device_and_dtype_and_keeps_cpu_float32_file_names(st, tmp_path):
    args = st.parse_args(["--model", "tiny", "--dtype", "bfloat16", "--steps", "2", "--warmup", "1", "--seq-len", "8",
                          "--batch-size", "2", "--variants", "floor,lora-r8,aroma-p1", "--out-dir", str(tmp_path)])
    st.run_timing(args)
    result = json.loads((tmp_path / "step_time_tiny_cpu_bfloat16.json").read_text())
    assert (result["device"], result["dtype"]) == ("cpu", "bfloat16")
    assert [r["variant"] for r in result["rows"]] == ["floor", "lora-r8", "aroma-p1"]
    assert "(bfloat16 base, cpu)" in (tmp_path / "step_time_tiny_cpu_bfloat16.md").read_text()
    assert st._suffix(st.parse_args(["--model", "tiny"])) == ""  # step_time_minilm.json stays what it was


def test_cuda_without_a_device_and_memory_on_cuda_are_named_errors(st, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        st.parse_args(["--device", "cuda"])
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        st.parse_args(["--device", "cuda", "--memory"])
    assert "--memory measures the peak RSS of CPU processes" in capsys.readouterr().err
