"""The pretrained model a run starts from: check its folder, then load it with its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

CAUSAL_LM, SEQ2SEQ_LM = "causal-lm", "seq2seq-lm"


def check_model_folder(path: str) -> None:
    """A local ``--model`` folder holds a config, a tokenizer and readable weights (cheap: headers only).

    A path that does not exist is an error unless it reads as a hub id (``name`` or ``org/name``).
    """
    local = Path(path)
    if not local.exists():
        looks_like_path = local.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1 \
            or os.sep != "/" and os.sep in path
        if looks_like_path or not path.strip():
            raise FileNotFoundError(f"--model {path}: no such folder (expected a local model folder with "
                                    "config.json, a tokenizer and the weights, or a hub id such as roberta-base)")
        return
    if not local.is_dir():
        raise FileNotFoundError(f"--model {path}: not a folder (expected a model folder with config.json)")
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no config.json in this folder")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
    if not any((local / f).is_file() for f in tokenizer_files):
        raise FileNotFoundError(f"--model {path}: no tokenizer in this folder (looked for {', '.join(tokenizer_files)})")
    from safetensors import SafetensorError, safe_open

    for weights in sorted(local.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass  # opening checks the header against the file's size
        except (SafetensorError, OSError) as err:
            raise ValueError(f"--model {path}: {weights} is not a readable safetensors file (truncated or "
                             f"corrupted?): {err}") from None


def check_model_kind(path: str, head: int | str, family: str) -> None:
    """Refuse, from the config alone, a model that cannot be loaded with ``head`` (before any weight is read).

    ``head``: the number of labels of a sequence classifier, ``"causal-lm"`` or ``"seq2seq-lm"``.
    """
    if isinstance(head, int) or not Path(path).is_dir():
        return
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    config = AutoConfig.from_pretrained(path)
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if head == CAUSAL_LM else MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    if config.model_type not in names:
        kinds = {CAUSAL_LM: "a causal LM (decoder: Llama, GPT-2, SmolLM2, ...)",
                 SEQ2SEQ_LM: "a seq2seq LM (encoder-decoder: BART, T5, ...)"}
        other = [k for k in kinds if k != head and config.model_type in
                 (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if k == CAUSAL_LM else MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)]
        hint = f" (it is {kinds[other[0]]}{'; pass --decoder-only' if family == 'summarization' else ''})" if other else ""
        raise ValueError(f"--model {path}: a {config.model_type!r} model is not {kinds[head]}, which the {family} "
                         f"task needs{hint}")


def load_model_and_tokenizer(path: str, head: int | str):
    """The model and its tokenizer from a local folder (or a hub id when online).

    ``head``: the number of labels of a sequence classifier (GLUE), ``"causal-lm"`` or ``"seq2seq-lm"``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, \
        AutoTokenizer

    check_model_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if head == CAUSAL_LM:
            model = AutoModelForCausalLM.from_pretrained(path)
        elif head == SEQ2SEQ_LM:
            model = AutoModelForSeq2SeqLM.from_pretrained(path)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=head)
    except OSError as err:
        raise FileNotFoundError(f"--model {path}: cannot load a model and tokenizer ({err})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
