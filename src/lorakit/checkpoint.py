"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (embeddings:
`.lora_embedding_A` / `.lora_embedding_B`), `<module>.base_layer.bias` for trained biases and
`<module>.<param>` for modules_to_save. Loading validates the whole folder against the model
before touching it; writing is atomic, file by file (weights first, config last).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import make_temp_dir, write_atomic, write_json_atomic
from .config import LoraConfig, from_peft_dict, to_peft_dict
from .json_file import read_json
from .layers import LoraLayer, wrapper_for
from .model import (
    _check_new_name,
    _commit,
    _plan,
    _refuse_if_merged,
    _saved_paths,
    adapters,
    base_biases,
)
from .saved_modules import SavedModule
from .targets import adaptable_kind, resolve_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter folder that cannot be loaded onto this model; the message names file and key."""


# ---- saving --------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (what save_adapter writes)."""
    record = _record(model, name)
    state: dict[str, torch.Tensor] = {}
    for path in record.modules:
        layer = model.get_submodule(path)
        for suffix, p in layer.adapter_parameters(name).items():
            state[f"{PREFIX}{path}.{suffix}"] = p
        bias = getattr(layer.base_layer, "bias", None)
        if record.config.bias == "lora_only" and bias is not None:
            state[f"{PREFIX}{path}.base_layer.bias"] = bias
    if record.config.bias == "all":
        for pname, p in base_biases(model):
            state[PREFIX + pname] = p
    for path in record.saved:
        for key, value in model.get_submodule(path).copies[name].state_dict().items():
            state[f"{PREFIX}{path}.{key}"] = value
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
    config = to_peft_dict(
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
        config, facts = from_peft_dict(raw, str(file))
    except ValueError as err:
        raise AdapterFileError(str(err)) from None
    facts["target_modules"] = raw.get("target_modules")
    return config, facts


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the folder's weight file; a clear error for a missing, pickled or broken file."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (Path(path) / n).exists()]
        hint = f"; found {pickled[0]}, a pickle file, which lorakit never loads" if pickled else ""
        raise AdapterFileError(f"{file}: missing{hint}")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own types for every kind of damage
        raise AdapterFileError(f"{file}: not a readable safetensors file ({err})") from None


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *, trainable: bool = False) -> nn.Module:
    """Load a PEFT-layout adapter folder onto `model` as adapter `name`.

    The adapter becomes active if no other adapter is. Everything is validated first: on any
    error the model is left exactly as it was.
    """
    config, facts = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    where = str(Path(path) / WEIGHTS_FILE)
    try:
        _check_new_name(model, name)
        _refuse_if_merged(model, "loading an adapter")
    except ValueError as err:
        raise AdapterFileError(f"{path}: {err}") from None
    config.modules_to_save = _present_saved_modules(model, config, tensors)
    pairs, base_tensors, saved = _sort_keys(model, config, tensors, where)
    _check_targets(model, config, facts, pairs, where)
    plan = _plan(model, name, config, sorted(pairs, key=_model_order(model)), tensors=pairs)
    for (_, clone), saved_path in zip(plan.copies, plan.record.saved):
        clone.load_state_dict(saved[saved_path])
    plan.record.trainable = trainable
    _commit(model, plan)  # also sets the trainable flags, from plan.record.trainable
    with torch.no_grad():
        for param, value in base_tensors:
            param.copy_(value)
    return model


def _sort_keys(
    model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], where: str
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[tuple[nn.Parameter, torch.Tensor]], dict[str, dict]]:
    """Split the file's keys into LoRA pairs, base tensors (biases, embedding tables) and modules_to_save; check every shape."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    base_tensors: list[tuple[nn.Parameter, torch.Tensor]] = []
    saved_paths = _saved_paths_or_error(model, config, where)
    saved: dict[str, dict[str, torch.Tensor]] = {p: {} for p in saved_paths}
    params = dict(model.named_parameters())
    suffixes = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
    for key in sorted(tensors):
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{where}: unexpected key {key!r} (PEFT keys start with {PREFIX!r})")
        rest = key[len(PREFIX):]
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        owner = next((p for p in saved_paths if rest.startswith(p + ".")), None)
        if suffix is not None:
            halves.setdefault(rest[: -len(suffix) - 1], {})[suffix] = tensors[key]
        elif owner is not None:
            saved[owner][rest[len(owner) + 1:]] = tensors[key]
        elif rest.endswith(".base_layer.weight"):
            # PEFT saves a whole embedding table next to its adapter when the vocabulary may
            # have changed; it replaces the base table on load.
            param = _param(params, rest, rest.replace(".base_layer.weight", ".weight"))
            if param is None:
                raise AdapterFileError(f"{where}: key {key!r} names no weight of this model")
            _check_shape(where, key, tensors[key], param.shape)
            base_tensors.append((param, tensors[key].to(param.device, param.dtype)))
        elif rest.endswith("bias") and config.bias != "none":
            param = _param(params, rest, rest.replace(".base_layer.bias", ".bias"))
            if param is None:
                raise AdapterFileError(f"{where}: key {key!r} names no bias of this model")
            _check_shape(where, key, tensors[key], param.shape)
            base_tensors.append((param, tensors[key].to(param.device, param.dtype)))
        else:
            raise AdapterFileError(f"{where}: unexpected key {key!r}")
    pairs = {p: _check_pair(model, config, p, h, where) for p, h in halves.items()}
    for path in saved_paths:
        module = model.get_submodule(path)
        expected = (module.original if isinstance(module, SavedModule) else module).state_dict()
        for k, v in expected.items():
            if k not in saved[path]:
                raise AdapterFileError(f"{where}: missing key {PREFIX}{path}.{k!r} (modules_to_save)")
            _check_shape(where, f"{PREFIX}{path}.{k}", saved[path][k], v.shape)
        for k in saved[path]:
            if k not in expected:
                raise AdapterFileError(f"{where}: unexpected key {PREFIX}{path}.{k!r}")
    return pairs, base_tensors, saved


def _check_pair(
    model: nn.Module, config: LoraConfig, path: str, half: dict[str, torch.Tensor], where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    embedding = any("embedding" in k for k in half)
    names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    for key in list(names) + list(half):
        if key not in half or key not in names:
            raise AdapterFileError(f"{where}: {'missing' if key not in half else 'unexpected'} key {PREFIX}{path}.{key}")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise AdapterFileError(f"{where}: key {PREFIX}{path}.{names[0]!r} names module {path!r}, which this model does not have") from None
    kind = adaptable_kind(module)
    if kind is None:
        raise AdapterFileError(f"{where}: module {path!r} ({type(module).__name__}) cannot carry a LoRA adapter")
    if (kind == "embedding") != embedding:
        raise AdapterFileError(f"{where}: module {path!r} is {kind}, but the file holds {names[0]} for it")
    a, b = half[names[0]], half[names[1]]
    rank = a.shape[0] if a.dim() else 0
    if rank != config.rank_for(path):
        raise AdapterFileError(
            f"{where}: {PREFIX}{path}.{names[0]} has rank {rank}, but the config gives rank {config.rank_for(path)} for {path!r}"
        )
    probe = module if isinstance(module, LoraLayer) else wrapper_for(kind)(module)
    weight = probe.base_layer.weight
    expect_a, expect_b = (t.shape for t in probe._new_pair(rank))
    _check_shape(where, f"{PREFIX}{path}.{names[0]}", a, expect_a)
    _check_shape(where, f"{PREFIX}{path}.{names[1]}", b, expect_b)
    return a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype)


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
        raise AdapterFileError(f"{where}: missing key {PREFIX}{missing[0]}.lora_A.weight (the config targets {missing[0]!r})")


def _param(params: dict[str, nn.Parameter], *names: str) -> nn.Parameter | None:
    for n in names:
        if n in params:
            return params[n]
    return None


def _present_saved_modules(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """modules_to_save entries that this model has or the file holds weights for.

    PEFT writes both `classifier` and `score` for any sequence-classification adapter; the one
    the model lacks (and the file has no weights for) is dropped, as PEFT does.
    """
    names = [p for p, _ in model.named_modules() if p]
    keys = [k[len(PREFIX):] for k in tensors if k.startswith(PREFIX)]

    def known(entry: str) -> bool:
        found = lambda p: p == entry or p.endswith("." + entry)
        return any(found(p) for p in names) or any(found(k.rsplit(".", 1)[0]) for k in keys)

    return [e for e in config.modules_to_save if known(e)]


def _saved_paths_or_error(model: nn.Module, config: LoraConfig, where: str) -> list[str]:
    try:
        return _saved_paths(model, config.modules_to_save)
    except ValueError as err:
        raise AdapterFileError(f"{where}: {err}") from None


def _check_shape(where: str, key: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise AdapterFileError(
            f"{where}: {key!r} has shape {tuple(tensor.shape)}, but this model needs {tuple(shape)} "
            "(was the adapter trained on another base model?)"
        )


def _model_order(model: nn.Module):
    order = {p: i for i, (p, _) in enumerate(model.named_modules())}
    return lambda p: order.get(p, len(order))


def _record(model: nn.Module, name: str):
    known = adapters(model)
    if name not in known:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(known) or 'none'}")
    return known[name]
