#!/usr/bin/env bash
# The device check of issue 11, one script: on a GPU machine lent by the device tool,
#
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu_carry"], timeout_s=540)
#
# after `bash scripts/gpu_prepare.sh` here. It installs the pinned packages from the carried wheels
# over the machine's own torch, builds random-initialized MiniLM-L6- and SmolLM2-135M-shaped models
# from the carried configs and tokenizers (their weights do not fit in what the tool carries), then:
#   1. aroma train glue (MRPC) with AROMA and LoRA r=8, bf16 autocast on CUDA, 300 steps;
#   2. aroma train commonsense (BoolQ, log-likelihood scoring of 200 test questions) with AROMA
#      and LoRA r=8, bf16, 200 steps;
#   3. benchmarks/step_time.py on CUDA with a bf16 base, every variant, RoBERTa-base shape.
# Random weights: the accuracies say only that the path runs end to end; the times are real.
# Everything lands in $OUT (gpu_check.tar.gz and the log). DEVICE=cpu STEPS=4 LM_STEPS=2 TIMED=2 EVAL_LIMIT=4
# runs the same script on CPU, as a check of the script itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-300}
LM_STEPS=${LM_STEPS:-200}
TIMED=${TIMED:-30}
EVAL_LIMIT=${EVAL_LIMIT:-200}
OUT=${OUT:-/tmp/gpu_check_out}
C=.gpu_carry
W=/tmp/gpu_check
mkdir -p "$OUT" "$W"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [ "$DEVICE" = cuda ]; then
    PY=$W/venv/bin/python
    if [ ! -x "$PY" ]; then
        python3 -m venv --system-site-packages "$W/venv"
        $PY -m pip install --quiet --no-index --find-links "$C/wheels" transformers==4.57.6 tokenizers==0.22.2 \
            huggingface_hub==0.36.2 peft==0.21.2 aenum rouge_score nltk
        $PY -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
    PY=.venv/bin/python
fi
AROMA="$PY -m aroma_peft"
$PY - "$C/models" "$W/models" <<'EOF'
import sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

src, dst = map(Path, sys.argv[1:])
for name, cls in (("minilm", AutoModelForSequenceClassification), ("smollm2", AutoModelForCausalLM)):
    if (dst / name / "config.json").is_file():
        continue
    torch.manual_seed(0)
    model = cls.from_config(AutoConfig.from_pretrained(src / name))
    model.save_pretrained(dst / name)
    AutoTokenizer.from_pretrained(src / name).save_pretrained(dst / name)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random init")
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

for method in aroma lora; do
    extra=(); [ "$method" = lora ] && extra=(--r 8 --alpha 16)
    $AROMA train glue --task mrpc --model "$W/models/minilm" --data-dir "$C/data/glue" --method $method \
        --preset small-cpu --device "$DEVICE" --bf16 --max-steps "$STEPS" --eval-steps "$STEPS" --no-progress \
        --out "$W/runs/glue-mrpc-$method" "${extra[@]}"
    $AROMA train commonsense --model "$W/models/smollm2" --data-dir "$C/data/commonsense" --method $method \
        --train-tasks boolq --eval-tasks boolq --eval-mode loglik --eval-limit "$EVAL_LIMIT" --device "$DEVICE" --bf16 \
        --max-steps "$LM_STEPS" --eval-steps "$LM_STEPS" --batch-size 16 --max-seq-len 256 --lr 2e-4 \
        --warmup-steps $((LM_STEPS / 10)) --no-progress --out "$W/runs/commonsense-boolq-$method" "${extra[@]}"
done

dtype=bfloat16; [ "$DEVICE" = cpu ] && dtype=float32
$PY benchmarks/step_time.py --model roberta-base-shape --device "$DEVICE" --dtype $dtype \
    --steps "$TIMED" --warmup 3 --out-dir "$W/step_time"

# Each run's report and metrics, and the step-time tables: one archive (the tool returns 8 files at most).
tar -czf "$OUT/gpu_check.tar.gz" -C "$W" step_time \
    $(cd "$W" && find runs -maxdepth 2 \( -name '*.json' -o -name '*.jsonl' -o -name 'report.md' \) | sort)
echo "gpu_check: done, $(du -h "$OUT/gpu_check.tar.gz" | cut -f1) in $OUT"
