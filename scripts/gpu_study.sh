#!/usr/bin/env bash
# The MiniLM study (benchmarks/glue_study.py) on a lent GPU machine, in two back-to-back calls of the
# device tool on one warm machine (what the study needs is more than one call carries; see
# scripts/gpu_study_prepare.sh, run here first):
#
#   run(command="bash scripts/gpu_study.sh stash", carry=[".gpu_s1"], timeout_s=240)
#   run(command="bash scripts/gpu_study.sh run", carry=[".gpu_s2"], timeout_s=600)   # at once
#
# stash: keeps .gpu_s1 in /tmp (it stays while the machine is warm), installs the pinned wheels
#        there and checks that the package imports and sees the GPU.
# run:   rebuilds the real MiniLM-L6 (fp32, exact on the study's texts) and runs the study's missing
#        runs on CUDA in fp32, several study processes at once (one per task, each with its own
#        jobs), starting none after STOP seconds; each finished run's summary files are archived
#        into $OUT as they land, so a call cut off at its limit still returns every finished run.
# Back here: tar -xzf study_runs.tar.gz (the summaries go to benchmarks/results/glue_study/runs/),
# then `python benchmarks/glue_study.py benchmarks/studies/minilm_glue.json --report`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STASH=/tmp/aroma_stash
OUT=${OUT:-/tmp/gpu_study_out}
STOP=${STOP:-330}   # seconds after which no run starts
HARD=${HARD:-540}   # seconds after which the study is stopped (runs in flight are lost)
# CHECK=1: a check of this script on a CPU machine (after prepare and stash here): the venv's python,
# 4 steps a run, results in /tmp/gpu_study_check, never in the repository's results (so RTE, whose
# trial is chosen on MRPC's results, has nothing to run there). Checked 2026-12-05 on 2 CPU cores:
# 12 runs of cola/mrpc/sst2 in 293 s, and the rebuilt MiniLM's hidden states equal to the package's.
CHECK=${CHECK:-0}
PY=python3 DEVICE=cuda RESULTS=benchmarks/results/glue_study
if [ "$CHECK" = 1 ]; then PY=$PWD/.venv/bin/python DEVICE=cpu RESULTS=/tmp/gpu_study_check/results; fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:/tmp/site"

case "${1:-}" in
stash)
    mkdir -p "$STASH" && cp -r .gpu_s1/. "$STASH/"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$STASH"/wheels/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || [ "$CHECK" = 1 ]
    $PY -c "import torch, transformers, peft, aroma_peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'aroma_peft', aroma_peft.__file__)"
    nproc
    echo "stash: ready"
    ;;
run)
    [ -d "$STASH/wheels" ] && [ -d /tmp/site/transformers ] || {
        echo "run: $STASH or /tmp/site is missing: the stash call did not run on this machine" >&2; exit 3; }
    exec > >(tee "$OUT/gpu_study.log") 2>&1
    $PY - "$STASH/embedding_rows.safetensors" .gpu_s2/minilm /tmp/minilm <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
rows_file, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
dst.mkdir(parents=True, exist_ok=True)
with safe_open(rows_file, "pt") as f:
    meta = f.metadata()
part = load_file(rows_file)
tensors = load_file(src / "rest.safetensors")
emb = torch.zeros(int(meta["vocab"]), part["values"].shape[1], dtype=part["values"].dtype)
emb[part["rows"]] = part["values"]  # the rows no study text uses stay 0: never read
tensors[meta["key"]] = emb
save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
for p in src.iterdir():
    if p.name != "rest.safetensors":
        shutil.copy2(p, dst / p.name)
print(f"minilm: {sum(t.numel() for t in tensors.values()) / 1e6:.1f}M parameters, "
      f"{len(part['rows'])} embedding rows carried")
EOF
    $PY - "$CHECK" "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path
check, results = sys.argv[1] == "1", sys.argv[2]
spec = json.loads(Path("benchmarks/studies/minilm_glue.json").read_text())
spec |= {"model": "/tmp/minilm", "data_dir": str(Path(".gpu_s2/data/glue").resolve()), "work": "/tmp/study_work"}
if check:  # a check of the script: tiny runs, results outside the repository
    spec["results"] = results
    for t in spec["tasks"].values():
        t |= {"max_steps": 4, "eval_steps": 4}
    spec["common"]["eval_batch_size"] = 512
Path("/tmp/minilm_glue_device.json").write_text(json.dumps(spec, indent=1))
EOF
    mkdir -p "$RESULTS/runs"
    touch /tmp/study_start
    # One study process per task, with a share of the 16 cores; arms in order of priority. An arm
    # the spec does not have is left out (the list is the same for every checkout).
    groups=(
        "cola 6 aroma-offset aroma-init2 lora-r2 lora-r1-alpha8 aroma-update"
        "mrpc 4 adalora-r8 lora-r2 aroma-no-reset aroma-offset aroma-init2"
        "rte 3 lora-r1 relora-1x8 aroma-no-reset adalora-r8 lora-r2 aroma-offset"
        "sst2 2 lora-r2 aroma-offset aroma-init2"
    )
    pids=()
    for g in "${groups[@]}"; do
        set -- $g
        task=$1 jobs=$2; shift 2
        arms=$($PY -c "import json,sys; s=json.load(open('/tmp/minilm_glue_device.json')); print(' '.join(a for a in sys.argv[1:] if a in s['arms']))" "$@")
        echo "group $task (jobs $jobs): $arms"
        timeout "$HARD" $PY benchmarks/glue_study.py /tmp/minilm_glue_device.json --device "$DEVICE" --tasks "$task" \
            --arms $arms --jobs "$jobs" --threads 1 --stop-starting-after "$STOP" > "$OUT/study_$task.log" 2>&1 &
        pids+=($!)
    done
    archive() {  # every summary written since the start, replaced whole
        (cd "$RESULTS" && find runs -newer /tmp/study_start -name study_run.json -printf '%h\n' \
            | sort > /tmp/new_runs.txt
         tar -czf "$OUT/.study_runs.tmp" -T /tmp/new_runs.txt 2>/dev/null && mv "$OUT/.study_runs.tmp" "$OUT/study_runs.tar.gz")
        tar -czf "$OUT/.logs.tmp" -C /tmp/study_work logs 2>/dev/null && mv "$OUT/.logs.tmp" "$OUT/logs.tar.gz" || true
    }
    alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
    while alive; do  # until every group has ended
        sleep 15
        archive
        echo "$(( $(date +%s) - $(stat -c %Y /tmp/study_start) )) s: $(wc -l < /tmp/new_runs.txt) runs done;" \
            "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || echo no GPU)"
    done
    for p in "${pids[@]}"; do wait "$p" || echo "a study group ended with $?"; done
    archive
    grep -h "^done\|^FAILED" "$OUT"/study_*.log || true
    echo "gpu_study: $(wc -l < /tmp/new_runs.txt) runs in $OUT/study_runs.tar.gz"
    ;;
*)
    echo "usage: bash scripts/gpu_study.sh stash|run" >&2; exit 2 ;;
esac
