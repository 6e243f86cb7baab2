"""Adapter files: save/load (safetensors + JSON, no pickle) and export to a standard PEFT LoRA adapter."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import AromaConfig
from .dtensor import copy_full_, full_tensor

# Format 2 is also a PEFT adapter folder: PEFT's two file names, its "base_model.model." keys.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
ADAPTER_META = "aroma_adapter.json"
CONTROLLER_STATE = "aroma_controller.json"
CONTROLLER_TENSORS = "aroma_controller.safetensors"  # reinit="gradient": the gradient sketches
FORMAT_VERSION = 2
V1_WEIGHTS = "aroma_adapter.safetensors"  # format 1: keys "{module}.lora_A", "modules_to_save.{param}"
PEFT_KEY_PREFIX = "base_model.model."
# Per module; the last three (reinit="offset") are absent from older files: zeros, and rank // r components.
LAYER_TENSORS = ("lora_A", "lora_B", "merged_A", "merged_B", "active", "offset_A", "offset_B", "merged_count")


def fsync_dir(directory: Path) -> None:
    """Make the renames inside ``directory`` durable (they live in the directory's own entry)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename over ``path`` and flush the folder: a
    crash, a kill or a power loss leaves the old file or the new one, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def refuse_non_empty_folder(out: Path, hint: str) -> None:
    """A folder about to be written whole must not exist yet, or be empty: nothing is overwritten."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not an empty folder; {hint} (nothing was written)")


def write_folder_then_rename(out: Path, write) -> None:
    """Call ``write(tmp)`` on a folder beside ``out``, check every safetensors file in it reads back, then
    rename it into place: ``out`` appears complete or not at all (an empty ``out`` is replaced)."""
    tmp = out.parent / f".{out.name}.export-tmp"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        verify_safetensors(tmp)
        if out.exists():
            out.rmdir()  # empty (checked before anything was written)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, allow_nan=False)))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter weights not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None


def verify_safetensors(directory: Path) -> None:
    """Every ``*.safetensors`` file under ``directory`` reads back whole (else a ValueError naming it)."""
    for path in sorted(Path(directory).rglob("*.safetensors")):
        _read_safetensors(path)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return obj


# ---------------------------------------------------------------------- native format
def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter of an ``AromaModel`` under the keys of the ``PeftModel`` that wraps it: per module the
    live factors, the merged components and whether the module is live (with ``reinit="offset"`` also
    the live offset and the count of trained components merged: in every other mode they are zeros and
    ``rank // r``, which the reader restores, so the file is as small as before); the
    ``modules_to_save`` whole."""
    keys = ("lora_A", "lora_B", "merged_A", "merged_B")
    if model.aroma_config.reinit == "offset":
        keys += ("offset_A", "offset_B", "merged_count")
    tensors = {}
    for name, layer in model.aroma_layers.items():
        for key in keys:
            tensors[f"{PEFT_KEY_PREFIX}{name}.{key}"] = getattr(layer, key).detach()
        tensors[f"{PEFT_KEY_PREFIX}{name}.active"] = torch.tensor(layer.active)
    for key, value in model.modules_to_save_state().items():
        tensors[f"{PEFT_KEY_PREFIX}{key}"] = value
    return {k: full_tensor(v.detach()).to("cpu").contiguous() for k, v in tensors.items()}


def save_adapter(model, directory: str | Path, controller=None) -> None:
    """Write ``adapter_model.safetensors``, ``adapter_config.json``, ``aroma_adapter.json`` (last, with
    the weights' sha256) and, given a controller, ``aroma_controller.json``.

    The folder is a PEFT adapter too: ``PeftModel.from_pretrained(base, directory)`` loads it."""
    directory = Path(directory)
    modules = {name: {"rank": layer.rank, "active": layer.active} for name, layer in model.aroma_layers.items()}
    tensors = adapter_tensors(model)
    weights = directory / ADAPTER_WEIGHTS
    atomic_write(weights, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    base_config = getattr(model.base_model, "config", None)
    peft_config = model.aroma_config.to_dict() | {
        "base_model_name_or_path": model.aroma_config.base_model_name_or_path
        or getattr(base_config, "_name_or_path", None) or None, "inference_mode": True}
    write_json(directory / PEFT_CONFIG, peft_config)
    if controller is not None:
        state = controller.state_dict()
        sketches = state.pop("grad_sketch", None)
        if sketches:
            atomic_write(directory / CONTROLLER_TENSORS, lambda p: save_file(
                {f"{name}.{key}": value.contiguous() for name, s in sketches.items() for key, value in s.items()}, str(p)))
        write_json(directory / CONTROLLER_STATE, state)
    write_json(directory / ADAPTER_META, {
        "format_version": FORMAT_VERSION,
        "config": model.aroma_config.hyperparameters(),
        "modules": modules,
        "modules_to_save": model.modules_to_save_names,
        "weights_sha256": sha256_file(weights),
    })


def expect_tensor(tensors: dict, key: str, shape: tuple, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{path}: tensor {key!r} is missing")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, this model needs {tuple(shape)}")
    return t


def read_adapter(directory: Path) -> tuple[dict, AromaConfig, dict[str, torch.Tensor], Path]:
    """Metadata, config and tensors of a saved adapter (format 1 or 2), the weights checked against
    their sha256; tensors keyed ``"{module}.lora_A"`` ... and ``"modules_to_save.{param}"``."""
    meta_path = directory / ADAPTER_META
    meta = read_json(meta_path)
    version = meta.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"{meta_path}: format_version {version!r}, expected 1 or {FORMAT_VERSION}")
    weights_path = directory / (V1_WEIGHTS if version == 1 else ADAPTER_WEIGHTS)
    try:
        config = AromaConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{meta_path}: bad 'config': {err}") from None
    tensors = _read_safetensors(weights_path)
    if meta.get("weights_sha256") != sha256_file(weights_path):
        raise ValueError(f"{weights_path}: content does not match the sha256 recorded in {meta_path} "
                         "(the file was changed or only partly written)")
    if version == FORMAT_VERSION:
        tensors = {_v1_key(k.removeprefix(PEFT_KEY_PREFIX), meta["modules"]): v for k, v in tensors.items()}
    return meta, config, tensors, weights_path


def _v1_key(key: str, modules: dict) -> str:
    module, _, tensor = key.rpartition(".")
    return key if module in modules and tensor in LAYER_TENSORS else f"modules_to_save.{key}"


def check_modules(meta: dict, names: list[str], meta_path: Path) -> None:
    if set(names) != set(meta["modules"]):
        missing = sorted(set(meta["modules"]) - set(names))
        extra = sorted(set(names) - set(meta["modules"]))
        raise ValueError(f"{meta_path}: adapter modules do not match the model (in the file only: {missing[:5]}, "
                         f"in the model only: {extra[:5]})")


def checked_factors(tensors: dict, meta: dict, name: str, r: int, n_in: int, n_out: int, path: Path) -> list:
    """lora_A, lora_B, merged_A, merged_B, offset_A, offset_B and merged_count of module ``name``; a file
    written before ``reinit="offset"`` has no offset (zeros) and ``rank // r`` trained components."""
    rank = int(meta["modules"][name]["rank"])
    factors = [expect_tensor(tensors, f"{name}.{key}", shape, path) for key, shape in (
        ("lora_A", (r, n_in)), ("lora_B", (n_out, r)), ("merged_A", (rank, n_in)), ("merged_B", (n_out, rank)))]
    if f"{name}.offset_A" not in tensors:
        return factors + [torch.zeros(r, n_in), torch.zeros(n_out, r), torch.tensor(rank // r)]
    return factors + [expect_tensor(tensors, f"{name}.{key}", shape, path) for key, shape in (
        ("offset_A", (r, n_in)), ("offset_B", (n_out, r)), ("merged_count", ()))]


@torch.no_grad()
def apply_adapter(aroma, meta: dict, checked: dict, saved: dict) -> None:
    """Write checked tensors into an ``AromaModel`` (its merged components, if any, are replaced)."""
    for name, layer in aroma.aroma_layers.items():
        lora_a, lora_b, merged_a, merged_b, offset_a, offset_b, count = checked[name]
        copy_full_(layer.lora_A, lora_a)
        copy_full_(layer.lora_B, lora_b)
        layer.load_components(merged_b, merged_a, int(count))
        copy_full_(layer.offset_A, offset_a)
        copy_full_(layer.offset_B, offset_b)
        layer.set_active(bool(meta["modules"][name]["active"]))
    for key, param in aroma.modules_to_save_state().items():
        copy_full_(param, saved[key])


def load_adapter_into(aroma, directory: str | Path, replace: bool = False) -> None:
    """Load a saved adapter into ``aroma``, an ``AromaModel`` just built with the same config
    (to resume a run), or with ``replace`` one that has trained since (its merged components are
    taken out of W0 and replaced: the best checkpoint at the end of training). Everything is checked
    before the model is touched."""
    directory = Path(directory)
    meta, config, tensors, weights_path = read_adapter(directory)
    if not replace and any(layer.rank for layer in aroma.aroma_layers.values()):
        raise ValueError("load_adapter_into needs a freshly wrapped model: this one already merged components")
    ours = aroma.aroma_config.hyperparameters()
    for key, value in config.hyperparameters().items():
        if ours.get(key) != value:
            raise ValueError(f"{directory / ADAPTER_META}: AromaConfig.{key}={value!r} in the file, "
                             f"{ours.get(key)!r} in this model; resume with the same configuration")
    checked, saved = checked_adapter(
        meta, tensors, config.r, directory, weights_path,
        {name: (layer.in_features, layer.out_features) for name, layer in aroma.aroma_layers.items()},
        {key: tuple(p.shape) for key, p in aroma.modules_to_save_state().items()})
    apply_adapter(aroma, meta, checked, saved)


def checked_adapter(meta: dict, tensors: dict, r: int, directory: Path, weights_path, layers: dict, heads: dict):
    """Every tensor of a read adapter checked against the model, before anything is written into it:
    ``layers`` maps each adapted module to its (in, out) features, ``heads`` each ``modules_to_save``
    parameter to its shape. Returns (factors per module, head tensors) for ``apply_adapter``."""
    check_modules(meta, list(layers), Path(directory) / ADAPTER_META)
    checked = {name: checked_factors(tensors, meta, name, r, n_in, n_out, weights_path)
               for name, (n_in, n_out) in layers.items()}
    saved = {key: expect_tensor(tensors, f"modules_to_save.{key}", shape, weights_path) for key, shape in heads.items()}
    return checked, saved


def load_controller_state(directory: str | Path) -> dict:
    """The controller state saved beside an adapter (pass it to ``AromaController.load_state_dict``)."""
    state = read_json(Path(directory) / CONTROLLER_STATE)
    path = Path(directory) / CONTROLLER_TENSORS
    if path.is_file():  # reinit="gradient": each module's gradient sketch, keyed "{module}.{y,z}"
        sketches: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in _read_safetensors(path).items():
            name, _, part = key.rpartition(".")
            sketches.setdefault(name, {})[part] = value
        state["grad_sketch"] = sketches
    return state


# ---------------------------------------------------------------------- optimizer and schedule (resume)
OPTIMIZER_TENSORS = "optimizer.safetensors"
TRAINING_STATE = "training_state.json"


def save_training_state(directory: str | Path, optimizer: torch.optim.Optimizer, scheduler=None,
                        extra: dict | None = None, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the optimizer's and the scheduler's state, with ``extra`` (JSON) and ``tensors`` (RNG
    states, say), as ``optimizer.safetensors`` + ``training_state.json``: no pickle."""
    directory = Path(directory)
    state = optimizer.state_dict()
    flat, numbers = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                flat[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                numbers[f"{idx}.{key}"] = value
    for key, value in (tensors or {}).items():
        flat[f"extra.{key}"] = value.detach().to("cpu").contiguous()
    atomic_write(directory / OPTIMIZER_TENSORS, lambda p: save_file(flat, str(p), metadata={"format": "pt"}))
    write_json(directory / TRAINING_STATE, {
        "param_groups": state["param_groups"], "state_numbers": numbers,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "tensors_sha256": sha256_file(directory / OPTIMIZER_TENSORS), "extra": extra or {}})


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer,
                        scheduler=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore what ``save_training_state`` wrote; returns its ``extra`` and ``tensors``."""
    directory = Path(directory)
    meta = read_json(directory / TRAINING_STATE)
    flat = _read_safetensors(directory / OPTIMIZER_TENSORS)
    if meta.get("tensors_sha256") != sha256_file(directory / OPTIMIZER_TENSORS):
        raise ValueError(f"{directory / OPTIMIZER_TENSORS}: content does not match the sha256 recorded in "
                         f"{directory / TRAINING_STATE}")
    state: dict = {}
    for key, value in flat.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["state_numbers"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    if sum(len(g["params"]) for g in meta["param_groups"]) != n_params:
        raise ValueError(f"{directory / TRAINING_STATE}: the optimizer state is for "
                         f"{sum(len(g['params']) for g in meta['param_groups'])} parameters, this optimizer has {n_params}")
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    extra_tensors = {k[len("extra."):]: v for k, v in flat.items() if k.startswith("extra.")}
    return meta["extra"], extra_tensors


# ---------------------------------------------------------------------- PEFT LoRA export
def lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the layer's whole update, merged components then the live one (if active)."""
    a, b = layer.merged_A, layer.merged_B
    if layer.active:
        a = torch.cat([a, full_tensor(layer.lora_A.detach())], dim=0)
        b = torch.cat([b, full_tensor(layer.lora_B.detach())], dim=1)
    return a, b


def export_lora(model, directory: str | Path) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's LoRA format.

    Each module gets its own rank (``rank_pattern``) and ``lora_alpha = s * rank``
    (``alpha_pattern``), so PEFT's scaling ``lora_alpha / rank`` equals AROMA's ``s`` and the
    exported model computes exactly ``W0 x + s B A x``. Modules of rank 0 are left out.
    The files are read back and checked before returning.
    """
    from peft import LoraConfig

    directory = Path(directory)
    tensors, rank_pattern, alpha_pattern, targets, fan_in_fan_out = {}, {}, {}, [], False
    for name, layer in model.aroma_layers.items():
        a, b = lora_factors(layer)
        if a.shape[0] == 0:
            continue
        targets.append(name)
        rank_pattern[re.escape(name)] = a.shape[0]
        alpha_pattern[re.escape(name)] = layer.scaling * a.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        fan_in_fan_out |= layer.is_conv1d
    if not targets:
        raise ValueError(f"export_lora: {rank_zero_message(model.aroma_config, heads=model.modules_to_save_names)}")
    for key, value in model.modules_to_save_state().items():
        tensors[f"base_model.model.{key}"] = value
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    base_config = getattr(model.base_model, "config", None)
    lora_config = LoraConfig(
        r=max(rank_pattern.values()),
        lora_alpha=max(alpha_pattern.values()),
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=list(model.modules_to_save_names) or None,
        base_model_name_or_path=getattr(base_config, "_name_or_path", None) or None,
    )
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    # LoraConfig holds target_modules as a set; JSON has lists (PEFT's own save_pretrained converts too).
    config_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}
    write_json(directory / "adapter_config.json", config_dict | {"peft_type": "LORA"})
    _check_export(directory, tensors, rank_pattern, alpha_pattern)


def rank_zero_message(config: AromaConfig, modules: list[dict] | None = None, heads=()) -> str:
    """What an adapter whose every module has rank 0 means, and what to try.

    ``modules``: the dual loop's per-module states (``aroma_controller.json``'s ``loop.modules``),
    for the steps and eq. (6) ratios at which they converged; ``heads``: ``modules_to_save``.
    """
    converged = [m for m in modules or [] if m.get("converged")]
    if converged:
        steps = sorted({m["finished_at"] for m in converged})
        ratios = [m["last_ratio"] for m in converged if m.get("last_ratio") is not None]
        what = (f"every adapted module ({len(converged)} of {len(modules)}) converged by eq. (6) at its first outer "
                f"check, at step {steps[0]}" + (f" to {steps[-1]}" if len(steps) > 1 else "")
                + (f" (ratios {min(ratios):.2e} to {max(ratios):.2e}, below eps_out={config.eps_out:g})" if ratios else ""))
    else:
        what = ("every adapted module has rank 0: eq. (6) converged each one at its first outer check "
                f"(ratio below eps_out={config.eps_out})")
    text = (f"{what}, and a converged module's last component is discarded (converged_component='discard', the "
            "paper's rule), so the adapter leaves every weight as it was: there is no LoRA update to export. "
            "To keep components, lower eps_out below those ratios (docs/algorithm.md, 'Setting eps_out'), or use "
            "outer_criterion='update' (a module always keeps its first component) or converged_component='merge'")
    if heads:
        text += f". The trained modules_to_save ({', '.join(heads)}) are in the merged model: aroma export --format merged"
    return text


def saved_rank_zero_message(directory: str | Path) -> str | None:
    """``rank_zero_message`` for the adapter saved in ``directory`` when every module in it has
    rank 0 and is frozen (None otherwise, or when there is no readable adapter there)."""
    directory = Path(directory)
    try:
        meta = read_json(directory / ADAPTER_META)
        config = AromaConfig.from_dict(meta["config"])
        if any(m["rank"] or m["active"] for m in meta["modules"].values()):
            return None
    except (OSError, KeyError, TypeError, ValueError):
        return None
    try:
        modules = read_json(directory / CONTROLLER_STATE)["loop"]["modules"]
    except (OSError, KeyError, TypeError, ValueError):
        modules = None
    return rank_zero_message(config, modules, heads=meta.get("modules_to_save") or ())


def _check_export(directory: Path, tensors: dict, rank_pattern: dict, alpha_pattern: dict) -> None:
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    reread = _read_safetensors(directory / "adapter_model.safetensors")
    for key, value in tensors.items():
        if key not in reread or not torch.equal(reread[key], value):
            raise RuntimeError(f"{directory}: exported tensor {key!r} did not read back identically")
    config = LoraConfig.from_pretrained(str(directory))
    for key, rank in rank_pattern.items():
        name = re.sub(r"\\(.)", r"\1", key)
        if get_pattern_key(config.rank_pattern.keys(), name) != key or config.rank_pattern[key] != rank \
                or config.alpha_pattern[key] / rank != alpha_pattern[key] / rank:
            raise RuntimeError(f"{directory}: PEFT resolves the rank or alpha of {name!r} differently than exported")
