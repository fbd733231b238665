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
import re
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
from ..layers.experts import expert_parameters, from_peft
from ..targets import adaptable_kind
from . import peft_format as fmt
from .atomic import make_temp_dir, write_atomic, write_json_atomic
from .expert_layout import LAYOUTS, expert_paths, per_expert_pairs
from .file_keys import AdapterFileError, file_tensors
from .json_file import read_json
from .peft_params import pair_to_file, wrapper_paths
from .peft_targets import peft_saved_modules

CONFIG_FILE = fmt.CONFIG_FILE
WEIGHTS_FILE = fmt.WEIGHTS_FILE


# ---- saving --------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, name: str = "default", *, as_lora: bool = False) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (what save_adapter writes); `as_lora` as there.
    The live tensors, but for expert pairs (copies in PEFT's layout): write with copy_adapter_state."""
    record = _record(model, name)
    state = _state(model, name, record)
    return as_plain_lora(model, record, state)[1] if as_lora and record.config.init in RESIDUAL_INITS else state


def copy_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy `state` (as adapter_state_dict gives it, say from a checkpoint) into adapter `name`'s
    live tensors; an expert pair goes back from PEFT's flattened layout to lorakit's."""
    record = _record(model, name)
    with torch.no_grad():
        for param, path in wrapper_paths(model, expert_paths(model, record)).items():
            layer = model.get_submodule(param)
            pair = from_peft(
                state[fmt.key(path, fmt.LINEAR_KEYS["A"])],
                state[fmt.key(path, fmt.LINEAR_KEYS["B"])],
                layer.num_experts,
            )
            for live, value in zip(layer.pair(name), pair):
                live.copy_(value)
        for key, tensor in _state(model, name, record, fused_experts=False).items():
            tensor.copy_(state[key])  # _state hands out the live tensors (detached views)


def _state(model: nn.Module, name: str, record, *, fused_experts: bool = True) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    # Expert parameters: PEFT's flattened pair under its (nested) wrapper's path (peft_params.py);
    # without `fused_experts`, none (save_adapter writes them per expert, expert_layout.py).
    experts = wrapper_paths(model, expert_paths(model, record))
    for path, module_path in experts.items() if fused_experts else ():
        a, b = pair_to_file(*model.get_submodule(path).pair(name))
        state[fmt.key(module_path, fmt.LINEAR_KEYS["A"])] = a
        state[fmt.key(module_path, fmt.LINEAR_KEYS["B"])] = b
    for path in record.modules:
        if path in experts:
            continue
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
    expert_layout: str = "fused",
) -> Path:
    """Write adapter `name` to folder `path` in PEFT's layout; `extra_files` are more JSON files.

    `as_lora=True` writes a PiSSA or OLoRA adapter as a plain LoRA adapter of twice the rank that
    reproduces the trained model on the original base weights (by lorakit or PEFT; pissa.py);
    saved as it is, such an adapter is the trained A, B, loaded by recomputing the residual.
    For any other adapter it changes nothing.

    `expert_layout` says how pairs on fused expert parameters are written: "fused" (PEFT's
    `target_parameters` layout, which PEFT and lorakit read, and vLLM for gpt-oss-like models) or
    "per-expert" (one 2-D pair per expert and projection under the names of the model's own
    checkpoint, which vLLM reads for Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, DeepSeek; expert_layout.py).

    Returns the folder. A new folder appears whole (built aside, then renamed); in an existing
    one each file is replaced atomically.
    """
    _check_path(path)
    if expert_layout not in LAYOUTS:
        raise ValueError(f"expert_layout must be one of {', '.join(LAYOUTS)}; got {expert_layout!r}")
    record = _record(model, name)
    parameters = expert_paths(model, record)
    per_expert = expert_layout == "per-expert" and bool(parameters)
    config, state = record.config, _state(model, name, record, fused_experts=not per_expert)
    modules = [m for m in record.modules if m not in parameters]
    if per_expert:  # every check before anything is written
        split = per_expert_pairs(model, name, parameters)
        for module, (_, a, b) in split.items():
            state[fmt.key(module, fmt.LINEAR_KEYS["A"])] = a
            state[fmt.key(module, fmt.LINEAR_KEYS["B"])] = b
        config = _exact_patterns(config, {m: m for m in modules} | {m: p for m, (p, _, _) in split.items()})
        modules, parameters = modules + list(split), []
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
        modules,
        parameter_names=parameters,
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


def _exact_patterns(config: LoraConfig, sources: dict[str, str]) -> LoraConfig:
    """`config` with rank / alpha patterns naming each written module exactly (`sources`: written
    module -> the adapted module or parameter whose rank and alpha it has)."""
    ranks = {re.escape(m): config.rank_for(s) for m, s in sources.items() if config.rank_for(s) != config.rank}
    alphas = {re.escape(m): config.alpha_for(s) for m, s in sources.items() if config.alpha_for(s) != config.alpha}
    # (targets is not written, target_modules is: [] would only be valid with target_parameters)
    return dataclasses.replace(
        config, rank_pattern=ranks, alpha_pattern=alphas, target_parameters=[], targets=config.targets or "all-linear"
    )


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
        experts = wrapper_paths(model, [p for p in pairs if p in set(expert_parameters(model))])
        if err.module in experts:
            key = fmt.key(experts[err.module], fmt.LINEAR_KEYS[err.role])
        else:
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
