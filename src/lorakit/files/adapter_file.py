"""Adapter folders in PEFT's layout: save_adapter, load_adapter, and reading their parts.

The names (files, keys, config fields) are PEFT's and live in peft_format.py. Loading reads and
validates the whole folder, then hands the tensors to `model.add_adapter_from_tensors`, which
adds them as one transaction: on any error the model is left as it was. Writing is atomic, file
by file (weights first, config last); a new folder appears whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..adapting.given import TensorError
from ..adapting.manage import add_adapter_from_tensors
from ..adapting.pissa import RESIDUAL_INITS, as_plain_lora, plain_pairs
from ..adapting.registry import adapters, base_biases
from ..adapting.token_rows import CONFIG_KEY, ROWS_KEY, config_entry, token_rows
from ..config import LoraConfig
from ..targets import adaptable_kind
from . import peft_format as fmt
from .atomic import make_temp_dir, write_atomic, write_json_atomic
from .file_keys import AdapterFileError, file_tensors
from .json_file import read_json
from .peft_targets import peft_saved_modules

CONFIG_FILE = fmt.CONFIG_FILE
WEIGHTS_FILE = fmt.WEIGHTS_FILE


# ---- saving --------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, name: str = "default", *, as_lora: bool = False) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (what save_adapter writes); `as_lora` as there."""
    record = _record(model, name)
    state = _state(model, name, record)
    return as_plain_lora(model, record, state)[1] if as_lora and record.config.init in RESIDUAL_INITS else state


def _state(model: nn.Module, name: str, record) -> dict[str, torch.Tensor]:
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
    # PEFT trains in full every module whose name ends with an entry (DistilBERT's pre_classifier
    # for "classifier") and needs its weights: those the adapter leaves alone go in as they are.
    for path in peft_saved_modules(model, record.saved):
        if path not in record.saved:
            module = model.get_submodule(path)
            for key, value in getattr(module, "original", module).state_dict().items():
                state[fmt.key(path, key)] = value
    # New tokens' rows (token_rows.py), under PEFT's TrainableTokens keys.
    for path, module in token_rows(model).items():
        state[fmt.key(path, ROWS_KEY)] = module.rows
    return {k: v.detach() for k, v in state.items()}


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    extra_files: dict[str, Any] | None = None,
    as_lora: bool = False,
) -> Path:
    """Write adapter `name` to folder `path` in PEFT's layout; `extra_files` are more JSON files.

    `as_lora=True` writes a PiSSA or OLoRA adapter as a plain LoRA adapter of twice the rank that
    reproduces the trained model on the original base weights (by lorakit or PEFT; pissa.py);
    saved as it is, such an adapter is the trained A, B, loaded by recomputing the residual.
    For any other adapter it changes nothing.

    Returns the folder. A new folder appears whole (built aside, then renamed); in an existing
    one each file is replaced atomically.
    """
    _check_path(path)
    record = _record(model, name)
    config, state = record.config, _state(model, name, record)
    for fname, obj in (extra_files or {}).items():
        try:
            json.dumps(obj)
        except (TypeError, ValueError) as err:
            raise ValueError(f"extra file {fname!r}: not JSON ({err})") from None
    for fname in extra_files or {}:
        if fname in (CONFIG_FILE, WEIGHTS_FILE) or not fname.endswith(".json") or "/" in fname:
            raise ValueError(f"extra file name {fname!r} must be a plain '*.json' name other than {CONFIG_FILE}")
    if as_lora and config.init in RESIDUAL_INITS:
        config, state = as_plain_lora(model, record, state)
    # The modules trained in full by their exact names: PEFT's suffix rule would read "norm" as
    # every "...layernorm" too.
    config = dataclasses.replace(config, modules_to_save=list(record.saved))
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    fan_in_fan_out = any(getattr(model.get_submodule(p), "fan_in_fan_out", False) for p in record.modules)
    peft_config = fmt.to_peft_dict(
        config,
        record.modules,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )
    tokens = config_entry(model)
    if tokens is not None:
        peft_config[CONFIG_KEY] = tokens
    # Copies: safetensors refuses tensors that share memory, and the file must not alias the model.
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in state.items()}
    folder = Path(path)
    target = folder
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        target = make_temp_dir(folder.parent, folder.name)
    try:
        write_atomic(target / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        for fname, obj in (extra_files or {}).items():
            write_json_atomic(target / fname, obj)
        write_json_atomic(target / CONFIG_FILE, peft_config)
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
    file = _adapter_file(path, CONFIG_FILE, f"an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
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


def _adapter_file(folder: str | os.PathLike, name: str, hint: str) -> Path:
    """`folder`/`name`, which must be a readable file; AdapterFileError naming it otherwise."""
    file = Path(folder) / name
    try:
        if not Path(folder).is_dir():
            what = "not a folder" if Path(folder).exists() else "no such adapter folder"
            raise AdapterFileError(f"{folder}: {what}")
        if file.is_file():
            return file
        what = "not a file" if file.exists() else "missing"
    except OSError as err:  # an unreadable folder: is_dir and exists raise rather than say False
        raise AdapterFileError(f"{file}: cannot be read ({err.strerror or err})") from None
    raise AdapterFileError(f"{file}: {what}{f' ({hint})' if hint else ''}")


@contextlib.contextmanager
def _open_weights(path: str | os.PathLike):
    pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if _exists(Path(path) / n)]
    hint = f"found {pickled[0]}, a pickle file, which lorakit never loads" if pickled else ""
    file = _adapter_file(path, WEIGHTS_FILE, hint)
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


def _exists(file: Path) -> bool:
    try:
        return file.exists()
    except OSError:
        return False


def load_adapter(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, trainable: bool = False, as_lora: bool = False
) -> nn.Module:
    """Load a PEFT-layout adapter folder onto `model` as adapter `name`.

    The adapter becomes active if no other adapter is. Everything is validated first: on any
    error the model is left exactly as it was. The file's pairs must be exactly the modules its
    config targets on this model (PEFT's matching rules, peft_targets.py), every value finite
    and floating-point. A PiSSA adapter gets its residual base weights back (pissa.py); with
    `as_lora=True` it is loaded instead as the plain LoRA adapter of twice the rank that acts the
    same on the unchanged base, which other adapters can then share.
    """
    _check_path(path)
    config, facts = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    where = str(Path(path) / WEIGHTS_FILE)
    found = file_tensors(model, config, facts, tensors, where)
    pairs = found.pairs
    try:
        if as_lora and config.init in RESIDUAL_INITS:
            config, pairs = plain_pairs(model, config, pairs)
        add_adapter_from_tensors(
            model,
            name,
            config,
            pairs,
            saved=found.saved,
            base=found.base,
            magnitudes=found.magnitudes or None,
            trainable=trainable,
        )
    except TensorError as err:  # say which key of the file it is
        embedding = adaptable_kind(model.get_submodule(err.module)) == "embedding"
        key = fmt.key(err.module, fmt.pair_keys(embedding)[err.role])
        raise AdapterFileError(f"{where}: key {key!r}: {err}") from None
    except ValueError as err:
        raise AdapterFileError(f"{where}: {err}") from None
    return model


def _check_path(path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"an adapter folder is a path (str or os.PathLike), got {type(path).__name__} {path!r}")


def _record(model: nn.Module, name: str):
    known = adapters(model)
    if name not in known:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(known) or 'none'}")
    return known[name]
