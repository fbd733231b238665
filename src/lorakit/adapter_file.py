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

from . import peft_format as fmt
from .atomic import make_temp_dir, write_atomic, write_json_atomic
from .config import LoraConfig
from .json_file import read_json
from .layers import LoraLayer
from .model import add_adapter_from_tensors
from .peft_targets import peft_saved_modules, targeted_modules
from .pissa import as_plain_lora
from .plan import TensorError, check_shape, check_values, get_adapted, saved_module_paths
from .registry import adapters, base_biases
from .saved_modules import SavedModule
from .targets import adaptable_kind

CONFIG_FILE = fmt.CONFIG_FILE
WEIGHTS_FILE = fmt.WEIGHTS_FILE
_PEFT_SAVED_INSIDE = ("modules_to_save.", "original_module.")  # PEFT's names inside its modules_to_save wrapper


class AdapterFileError(ValueError):
    """An adapter folder that cannot be loaded onto this model; the message names file and key."""


# ---- saving --------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, name: str = "default", *, as_lora: bool = False) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (what save_adapter writes); `as_lora` as there."""
    record = _record(model, name)
    state = _state(model, name, record)
    return as_plain_lora(model, record, state)[1] if as_lora and record.config.init == "pissa" else state


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

    `as_lora=True` writes a PiSSA adapter as a plain LoRA adapter of twice the rank that
    reproduces the trained model on the original base weights (by lorakit or PEFT; pissa.py);
    saved as it is, a PiSSA adapter is the trained A, B, loaded by recomputing the residual.
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
    if as_lora and config.init == "pissa":
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
    # Copies: safetensors refuses tensors that share memory, and the file must not alias the model.
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in state.items()}
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


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *, trainable: bool = False) -> nn.Module:
    """Load a PEFT-layout adapter folder onto `model` as adapter `name`.

    The adapter becomes active if no other adapter is. Everything is validated first: on any
    error the model is left exactly as it was. The file's pairs must be exactly the modules its
    config targets on this model (PEFT's matching rules, peft_targets.py), every value finite
    and floating-point. A PiSSA adapter gets its residual base weights back (pissa.py).
    """
    _check_path(path)
    config, facts = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    where = str(Path(path) / WEIGHTS_FILE)
    try:
        config.modules_to_save = _saved_paths(model, _present_saved_modules(model, config, tensors), tensors)
        saved_paths = saved_module_paths(model, config.modules_to_save)
    except ValueError as err:
        raise AdapterFileError(f"{where}: {err}") from None
    pairs, base, saved = _sort_keys(model, config, tensors, saved_paths, where)
    _check_targets(model, config, facts, pairs, where)
    _check_biases(model, config, pairs, base, saved_paths, where)
    try:
        add_adapter_from_tensors(model, name, config, pairs, saved=saved, base=base, trainable=trainable)
    except TensorError as err:  # say which key of the file it is
        embedding = adaptable_kind(model.get_submodule(err.module)) == "embedding"
        key = fmt.key(err.module, fmt.pair_keys(embedding)[err.role])
        raise AdapterFileError(f"{where}: key {key!r}: {err}") from None
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
    repeated: dict[str, tuple[str, str, str]] = {}  # key -> (module, tensor, where in PEFT's wrapper)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head.weight has its own name
    for key in sorted(tensors):
        if not key.startswith(fmt.PREFIX):
            raise AdapterFileError(f"{where}: unexpected key {key!r} (PEFT keys start with {fmt.PREFIX!r})")
        rest = key[len(fmt.PREFIX) :]
        pair_key = fmt.split_pair_key(rest)
        owner = next((p for p in saved_paths if rest.startswith(p + ".")), None)
        like = _saved_tensor(model, owner, rest) if owner is not None and pair_key is None else None
        _check_values(key, tensors[key], where, like)
        if pair_key is not None:
            module, suffix = pair_key
            halves.setdefault(module, {})[suffix] = tensors[key]
        elif owner is not None and rest[len(owner) + 1 :].startswith(_PEFT_SAVED_INSIDE):
            # bias="all" makes PEFT write the trained copy's biases twice ("modules_to_save.") and
            # the untrained original's ("original_module."): each must equal what it duplicates.
            inside, _, tensor_name = rest[len(owner) + 1 :].partition(".")
            repeated[key] = (owner, tensor_name, inside)
        elif owner is not None:
            saved[owner][rest[len(owner) + 1 :]] = tensors[key]
        elif rest.endswith("." + fmt.BASE_WEIGHT) or (rest.endswith("bias") and config.bias != "none"):
            # PEFT saves a whole embedding table next to its adapter when the vocabulary may have
            # changed; it replaces the base table on load. Trained biases replace the base biases.
            plain = rest.replace(".base_layer.", ".")
            name = rest if rest in params else plain
            if name not in params:
                raise AdapterFileError(f"{where}: key {key!r} names no parameter of this model")
            try:
                check_shape(f"key {key!r}", tensors[key], params[name].shape)
            except ValueError as err:
                raise AdapterFileError(f"{where}: {err}") from None
            base[name] = tensors[key]
        else:
            raise AdapterFileError(f"{where}: unexpected key {key!r}")
    for key, (owner, tensor_name, inside) in repeated.items():
        if inside == "modules_to_save":
            same = saved[owner].get(tensor_name)
        else:
            same = _saved_tensor(model, owner, f"{owner}.{tensor_name}")
        if same is None or same.shape != tensors[key].shape or not torch.equal(same.to(tensors[key].dtype), tensors[key]):
            what = "the trained copy's value" if inside == "modules_to_save" else "the model's own value"
            raise AdapterFileError(f"{where}: key {key!r} differs from {what} for {owner}.{tensor_name} (modules_to_save)")
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


def _check_values(key: str, tensor: torch.Tensor, where: str, like: torch.Tensor | None) -> None:
    try:
        check_values(f"key {key!r}", tensor, like=like)
    except ValueError as err:
        raise AdapterFileError(f"{where}: {err}") from None


def _saved_tensor(model: nn.Module, owner: str, rest: str) -> torch.Tensor | None:
    """The model's own tensor that a modules_to_save key replaces (an integer buffer may stay integer)."""
    module = model.get_submodule(owner)
    module = module.original if isinstance(module, SavedModule) else module  # another adapter's wrapper
    return module.state_dict().get(rest[len(owner) + 1 :])


def _check_targets(model: nn.Module, config: LoraConfig, facts: dict, pairs: dict, where: str) -> None:
    """The file's pairs must be exactly the modules its config targets on this model.

    PEFT skips pairs its config does not target and leaves targets without weights at their
    start; either way the loaded model would not be the trained one. A config that names no
    targets (null or []) leaves the file's keys to say.
    """
    if not pairs:
        raise AdapterFileError(f"{where}: holds no LoRA weights")
    try:
        expected = targeted_modules(
            model,
            facts.get("target_modules"),
            layers=config.layers,
            layers_pattern=config.layers_pattern,
            exclude=facts.get("exclude_modules"),
            modules_to_save=config.modules_to_save,
            task_type=facts.get("task_type"),
        )
    except re.error as err:
        config_file = Path(where).with_name(CONFIG_FILE)
        raise AdapterFileError(f"{config_file}: target_modules or exclude_modules is not a valid regex: {err}") from None
    if expected is None:
        return
    config_file = Path(where).with_name(CONFIG_FILE)
    for path in sorted(pairs):
        if path not in expected:
            try:
                module = get_adapted(model, path)
            except ValueError as err:  # first say that the module is not there at all
                raise AdapterFileError(f"{where}: {err}") from None
            suffix = fmt.pair_keys(adaptable_kind(module) == "embedding")["A"]
            raise AdapterFileError(
                f"{where}: unexpected key {fmt.key(path, suffix)!r}: {config_file} does not target module "
                f"{path!r} ({_targets_text(config, facts)}), so PEFT would skip it"
            )
    missing = [p for p in expected if p not in pairs]
    if missing:
        suffix = fmt.pair_keys(adaptable_kind(model.get_submodule(missing[0])) == "embedding")["A"]
        raise AdapterFileError(f"{where}: missing key {fmt.key(missing[0], suffix)} (the config targets {missing[0]!r})")


def _check_biases(
    model: nn.Module, config: LoraConfig, pairs: dict, base: dict[str, torch.Tensor], saved_paths: list[str], where: str
) -> None:
    """A file that trained biases holds each one it trained: bias="lora_only" those of the adapted
    layers, bias="all" every bias of the model (those of modules_to_save come with their copies)."""
    if config.bias == "none":
        return
    if config.bias == "lora_only":
        wanted = [f"{p}.bias" for p in pairs if getattr(_base_module(model, p), "bias", None) is not None]
    else:
        wanted = [n for n, _ in base_biases(model) if not any(n.startswith(s + ".") for s in saved_paths)]
    for name in wanted:
        plain = name.replace(".base_layer.", ".")
        if name not in base and plain not in base:
            module = plain.rsplit(".", 1)[0]
            key = fmt.key(module, fmt.BASE_BIAS) if module in pairs else fmt.PREFIX + plain
            raise AdapterFileError(f"{where}: missing key {key!r} (bias={config.bias!r} trains it)")


def _base_module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module.base_layer if isinstance(module, LoraLayer) else module


def _saved_paths(model: nn.Module, entries: list[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """The modules the file's modules_to_save entries name, by PEFT's suffix rule (peft_targets);
    one that only that rule finds and the file holds nothing for is dropped (lorakit wrote the
    file before it wrote exact names)."""
    own = []
    for entry in entries:
        try:
            own += saved_module_paths(model, [entry])
        except ValueError:
            if not peft_saved_modules(model, [entry]):
                raise
    held = [k[len(fmt.PREFIX):] for k in tensors if k.startswith(fmt.PREFIX)]
    return [p for p in peft_saved_modules(model, entries) if p in own or any(k.startswith(p + ".") for k in held)]


def _check_path(path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"an adapter folder is a path (str or os.PathLike), got {type(path).__name__} {path!r}")


def _targets_text(config: LoraConfig, facts: dict) -> str:
    text = f"target_modules={facts.get('target_modules')!r}"
    if config.layers is not None:
        text += f", layers_to_transform={config.layers}"
    if config.layers_pattern is not None:
        text += f", layers_pattern={config.layers_pattern!r}"
    if facts.get("exclude_modules"):
        text += f", exclude_modules={facts['exclude_modules']!r}"
    return text


def _present_saved_modules(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """modules_to_save entries that this model has or the file holds weights for.

    PEFT writes both `classifier` and `score` for any sequence-classification adapter; the one
    the model lacks (and the file has no weights for) is dropped, as PEFT does.
    """
    names = [p for p, _ in model.named_modules() if p]
    keys = [k[len(fmt.PREFIX):] for k in tensors if k.startswith(fmt.PREFIX)]

    def known(entry: str) -> bool:  # PEFT's rule: a plain suffix of the name (peft_targets.py)
        return any(p.endswith(entry) for p in names) or any(k.rsplit(".", 1)[0].endswith(entry) for k in keys)

    return [e for e in config.modules_to_save if known(e)]


def _record(model: nn.Module, name: str):
    known = adapters(model)
    if name not in known:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(known) or 'none'}")
    return known[name]
