"""Adapter folders in PEFT's layout: save_adapter, load_adapter, and reading their parts.

The names (files, keys, config fields) are PEFT's and live in peft_format.py. Loading reads and
validates the whole folder, then hands the tensors to `model.add_adapter_from_tensors`, which
adds them as one transaction: on any error the model is left as it was. Writing is atomic, file
by file (weights first, config last); a new folder appears whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import peft_format as fmt
from .atomic import make_temp_dir, write_atomic, write_json_atomic
from .config import LoraConfig
from .json_file import read_json
from .model import add_adapter_from_tensors
from .plan import saved_module_paths
from .registry import adapters, base_biases, named_base_modules
from .targets import adaptable_kind, resolve_targets

CONFIG_FILE = fmt.CONFIG_FILE
WEIGHTS_FILE = fmt.WEIGHTS_FILE


class AdapterFileError(ValueError):
    """An adapter folder that cannot be loaded onto this model; the message names file and key."""


# ---- saving --------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (what save_adapter writes)."""
    record = _record(model, name)
    state: dict[str, torch.Tensor] = {}
    for path in record.modules:
        layer = model.get_submodule(path)
        keys = fmt.pair_keys(layer.lookup_table)
        for role, p in layer.adapter_parameters(name).items():
            state[fmt.key(path, keys[role])] = p
        bias = getattr(layer.base_layer, "bias", None)
        if record.config.bias == "lora_only" and bias is not None:
            state[fmt.key(path, fmt.BASE_BIAS)] = bias
    if record.config.bias == "all":
        for pname, p in base_biases(model):
            state[fmt.PREFIX + pname] = p
    for path in record.saved:
        for key, value in model.get_submodule(path).copies[name].state_dict().items():
            state[fmt.key(path, key)] = value
    return {k: v.detach() for k, v in state.items()}


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write adapter `name` to folder `path` in PEFT's layout; `extra_files` are more JSON files.

    Returns the folder. A new folder appears whole (built aside, then renamed); in an existing
    one each file is replaced atomically.
    """
    record = _record(model, name)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    fan_in_fan_out = any(getattr(model.get_submodule(p), "fan_in_fan_out", False) for p in record.modules)
    config = fmt.to_peft_dict(
        record.config,
        record.modules,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )
    # Copies: safetensors refuses tensors that share memory, and the file must not alias the model.
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in adapter_state_dict(model, name).items()}
    for fname in extra_files or {}:
        if fname in (CONFIG_FILE, WEIGHTS_FILE) or not fname.endswith(".json") or "/" in fname:
            raise ValueError(f"extra file name {fname!r} must be a plain '*.json' name other than {CONFIG_FILE}")
    folder = Path(path)
    target = folder
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        target = make_temp_dir(folder.parent, folder.name)
    try:
        write_atomic(target / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        for fname, obj in (extra_files or {}).items():
            write_json_atomic(target / fname, obj)
        write_json_atomic(target / CONFIG_FILE, config)
        if target != folder:
            os.rename(target, folder)
    except BaseException:
        if target != folder:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return folder


# ---- loading -------------------------------------------------------------------------------


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, Any]]:
    """(LoraConfig, facts) of an adapter folder; facts hold base model, task type, targets."""
    file = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise AdapterFileError(f"{path}: no such adapter folder")
    if not file.is_file():
        raise AdapterFileError(f"{file}: missing (an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    raw = read_json(file, AdapterFileError)
    try:
        config, facts = fmt.from_peft_dict(raw, str(file))
    except ValueError as err:
        raise AdapterFileError(str(err)) from None
    facts["target_modules"] = raw.get("target_modules")
    return config, facts


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the folder's weight file; a clear error for a missing, pickled or broken file."""
    with _open_weights(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """The shape of every tensor in the folder's weight file, read from its header alone."""
    with _open_weights(path) as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


@contextlib.contextmanager
def _open_weights(path: str | os.PathLike):
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (Path(path) / n).exists()]
        hint = f"; found {pickled[0]}, a pickle file, which lorakit never loads" if pickled else ""
        raise AdapterFileError(f"{file}: missing{hint}")
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as err:  # safetensors raises its own types for every kind of damage
        raise AdapterFileError(f"{file}: not a readable safetensors file ({err})") from None
    try:
        with handle as f:
            yield f
    except AdapterFileError:
        raise
    except Exception as err:
        raise AdapterFileError(f"{file}: not a readable safetensors file ({err})") from None


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *, trainable: bool = False) -> nn.Module:
    """Load a PEFT-layout adapter folder onto `model` as adapter `name`.

    The adapter becomes active if no other adapter is. Everything is validated first: on any
    error the model is left exactly as it was.
    """
    config, facts = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    where = str(Path(path) / WEIGHTS_FILE)
    config.modules_to_save = _present_saved_modules(model, config, tensors)
    try:
        saved_paths = saved_module_paths(model, config.modules_to_save)
    except ValueError as err:
        raise AdapterFileError(f"{where}: {err}") from None
    pairs, base, saved = _sort_keys(model, config, tensors, saved_paths, where)
    _check_targets(model, config, facts, pairs, where)
    try:
        add_adapter_from_tensors(model, name, config, pairs, saved=saved, base=base, trainable=trainable)
    except ValueError as err:
        raise AdapterFileError(f"{where}: {err}") from None
    return model


def _sort_keys(
    model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], saved_paths: list[str], where: str
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Split the file's keys into LoRA pairs (by module), base tensors (by parameter name: trained
    biases, embedding tables) and modules_to_save states (by module); every key must find a place."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    base: dict[str, torch.Tensor] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {p: {} for p in saved_paths}
    params: dict[str, nn.Parameter] = {}  # filled on the first base key: most files have none
    for key in sorted(tensors):
        if not key.startswith(fmt.PREFIX):
            raise AdapterFileError(f"{where}: unexpected key {key!r} (PEFT keys start with {fmt.PREFIX!r})")
        rest = key[len(fmt.PREFIX) :]
        pair_key = fmt.split_pair_key(rest)
        owner = next((p for p in saved_paths if rest.startswith(p + ".")), None)
        if pair_key is not None:
            module, suffix = pair_key
            halves.setdefault(module, {})[suffix] = tensors[key]
        elif owner is not None:
            saved[owner][rest[len(owner) + 1 :]] = tensors[key]
        elif rest.endswith("." + fmt.BASE_WEIGHT) or (rest.endswith("bias") and config.bias != "none"):
            # PEFT saves a whole embedding table next to its adapter when the vocabulary may have
            # changed; it replaces the base table on load. Trained biases replace the base biases.
            plain = rest.replace(".base_layer.", ".")
            params = params or dict(model.named_parameters())
            name = rest if rest in params else plain
            if name not in params:
                raise AdapterFileError(f"{where}: key {key!r} names no parameter of this model")
            base[name] = tensors[key]
        else:
            raise AdapterFileError(f"{where}: unexpected key {key!r}")
    pairs = {module: _pair(model, module, half, where) for module, half in halves.items()}
    return pairs, base, saved


def _pair(model: nn.Module, path: str, half: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the two halves the file holds for module `path`, of the family the module needs."""
    embedding = any(k in fmt.EMBEDDING_KEYS.values() for k in half)
    keys = fmt.pair_keys(embedding)
    for suffix in list(keys.values()) + list(half):
        if suffix not in half or suffix not in keys.values():
            missing = suffix not in half
            raise AdapterFileError(f"{where}: {'missing' if missing else 'unexpected'} key {fmt.key(path, suffix)}")
    try:
        kind = adaptable_kind(model.get_submodule(path))
    except AttributeError:
        kind = None  # model.add_adapter_from_tensors names the missing module
    if kind is not None and (kind == "embedding") != embedding:
        raise AdapterFileError(f"{where}: module {path!r} is {kind}, but the file holds {keys['A']} for it")
    return half[keys["A"]], half[keys["B"]]


def _check_targets(model: nn.Module, config: LoraConfig, facts: dict, pairs: dict, where: str) -> None:
    """Every module the config targets must have weights in the file (all-linear is lenient)."""
    if not pairs:
        raise AdapterFileError(f"{where}: holds no LoRA weights")
    if config.targets == "all-linear":
        return
    exclude = config.modules_to_save + list(facts.get("exclude_modules") or [])
    try:
        expected = resolve_targets(model, config.targets, config.layers, exclude=exclude)
    except ValueError as err:
        raise AdapterFileError(f"{where}: the config's target_modules do not fit this model: {err}") from None
    missing = [p for p in expected if p not in pairs]
    if missing:
        suffix = fmt.pair_keys(adaptable_kind(model.get_submodule(missing[0])) == "embedding")["A"]
        raise AdapterFileError(f"{where}: missing key {fmt.key(missing[0], suffix)} (the config targets {missing[0]!r})")


def _present_saved_modules(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """modules_to_save entries that this model has or the file holds weights for.

    PEFT writes both `classifier` and `score` for any sequence-classification adapter; the one
    the model lacks (and the file has no weights for) is dropped, as PEFT does.
    """
    names = [p for p, _ in named_base_modules(model) if p]
    keys = [k[len(fmt.PREFIX):] for k in tensors if k.startswith(fmt.PREFIX)]

    def known(entry: str) -> bool:
        found = lambda p: p == entry or p.endswith("." + entry)
        return any(found(p) for p in names) or any(found(k.rsplit(".", 1)[0]) for k in keys)

    return [e for e in config.modules_to_save if known(e)]


def _record(model: nn.Module, name: str):
    known = adapters(model)
    if name not in known:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(known) or 'none'}")
    return known[name]
