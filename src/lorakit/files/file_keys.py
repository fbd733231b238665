"""What an adapter file's keys mean on a model: LoRA pairs, DoRA magnitudes, base tensors and
trained module copies, each key checked against the config that came with it.

PEFT's matching rules decide which modules the config targets (peft_targets.py); a file must hold
exactly those pairs (PEFT would skip the others in silence), the biases its `bias` mode trains,
and values that fit their modules. Every problem is an AdapterFileError naming the file and the
first key, module or field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapting.given import check_shape, check_values, get_adapted
from ..adapting.plan import saved_module_paths
from ..adapting.registry import base_biases
from ..adapting.saved_modules import SavedModule
from ..adapting.token_rows import CONFIG_KEY, ROWS_KEY, check_entry, indices_by_module, rows_replacing
from ..config import LoraConfig
from ..errors import LorakitError
from ..layers.experts import expert_parameters
from ..module_tree import base_modules, saved_name_matches, unwrapped, within
from ..targets import adaptable_kind
from . import peft_format as fmt
from .expert_layout import gather_per_expert
from .peft_params import not_adaptable, pair_from_file, targeted_parameters, wrapper_paths
from .peft_targets import config_targets, peft_saved_modules

CONFIG_FILE = fmt.CONFIG_FILE
_PEFT_SAVED_INSIDE = ("modules_to_save.", "original_module.")  # PEFT's names inside its modules_to_save wrapper


class AdapterFileError(LorakitError, ValueError):
    """An adapter folder that cannot be loaded onto this model; the message names file and key."""


@dataclass
class FileTensors:
    """An adapter file's tensors by what they are on the model, as `add_adapter_from_tensors` takes them."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A, B)
    magnitudes: dict[str, torch.Tensor]  # module path -> DoRA's m
    base: dict[str, torch.Tensor]  # parameter name -> value replacing the base's (biases, token rows)
    saved: dict[str, dict[str, torch.Tensor]]  # modules_to_save path -> its state dict


def file_tensors(
    model: nn.Module, config: LoraConfig, facts: dict, tensors: dict[str, torch.Tensor], where: str
) -> FileTensors:
    """The file's `tensors` on `model`, every key checked; sets config.modules_to_save to the
    modules the file trains in full (`where`: the file)."""
    try:
        config.modules_to_save = _saved_paths(model, _present_saved_modules(model, config, tensors), tensors)
        saved_paths = saved_module_paths(model, config.modules_to_save)
    except ValueError as err:
        raise AdapterFileError(f"{where}: {err}") from None
    rows = _token_rows(model, facts, tensors, where)
    tensors = {k: v for k, v in tensors.items() if not k.endswith("." + ROWS_KEY)}
    params = expert_keys(model, config, where)
    found = _sort_keys(model, config, tensors, saved_paths, where, params)
    try:  # vLLM's per-expert layout (expert_layout.py) of a fused expert parameter
        found.pairs, gathered = gather_per_expert(model, config, found.pairs)
    except ValueError as err:
        raise AdapterFileError(f"{where}: {err}") from None
    params |= {p: p for p in gathered}
    both = sorted(set(rows) & set(found.base))
    if both:
        raise AdapterFileError(f"{where}: {both[0]!r} is both saved whole and given token rows")
    found.base.update(rows)
    _check_targets(model, config, facts, found.pairs, where, params)
    _check_biases(model, config, found.pairs, found.base, saved_paths, where)
    return found


def expert_keys(model: nn.Module, config: LoraConfig, where: str) -> dict[str, str]:
    """Parameter name -> the module path its pair is under in the file, for every parameter the
    config's target_parameters selects by PEFT's rule (peft_params.py); each one must be a fused
    expert weight lorakit adapts."""
    params = targeted_parameters(model, config.target_parameters)
    config_file = Path(where).with_name(CONFIG_FILE)
    if config.target_parameters and not params:
        raise AdapterFileError(
            f"{config_file}: target_parameters={config.target_parameters!r} selects no parameter of this model"
        )
    other = not_adaptable(model, params)
    if other:
        raise AdapterFileError(
            f"{config_file}: target_parameters selects {other[0]!r}, which lorakit cannot adapt "
            "(LoRA on parameters is for the fused 3-D expert weights of MoE models)"
        )
    return wrapper_paths(model, params)


def _token_rows(model: nn.Module, facts: dict, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The base weights that new tokens' trained rows replace (token_rows.py): parameter name ->
    the weight with those rows in place. PEFT writes no rows for a head tied to the embedding."""
    entry = facts.get(CONFIG_KEY)
    keys = sorted(k for k in tensors if k.endswith("." + ROWS_KEY))
    if entry is None:
        if keys:
            raise AdapterFileError(f"{where}: key {keys[0]!r} holds token rows, but {CONFIG_FILE} has no {CONFIG_KEY}")
        return {}
    config_file = str(Path(where).with_name(CONFIG_FILE))
    try:
        check_entry(entry, config_file)
        by_module = indices_by_module(model, entry, config_file)
    except ValueError as err:
        raise AdapterFileError(str(err)) from None
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied head's weight too
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    base: dict[str, torch.Tensor] = {}
    for path, ids in by_module.items():
        key, weight = fmt.key(path, ROWS_KEY), params.get(f"{path}.weight")
        if weight is None:
            raise AdapterFileError(f"{config_file}: {CONFIG_KEY} names {path!r}, which has no weight")
        if key not in tensors:
            tied = embedding is not None and weight is embedding.weight
            if tied and model.get_submodule(path) is not embedding:
                continue  # a head tied to the embedding takes the embedding's rows
            raise AdapterFileError(f"{where}: missing key {key!r} (the rows of the tokens {CONFIG_KEY} gives {path!r})")
        _check_values(key, tensors[key], where, None)
        try:
            base[f"{path}.weight"] = rows_replacing(weight, ids, tensors[key], f"key {key!r}")
        except ValueError as err:
            raise AdapterFileError(f"{where}: {err}") from None
    unexpected = [k for k in keys if k[len(fmt.PREFIX) : -len(ROWS_KEY) - 1] not in by_module]
    if unexpected:
        raise AdapterFileError(f"{where}: unexpected key {unexpected[0]!r} ({CONFIG_KEY} names no such module)")
    return base


def _sort_keys(
    model: nn.Module,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    saved_paths: list[str],
    where: str,
    wrapped: dict[str, str],
) -> FileTensors:
    """Split the file's keys into LoRA pairs and DoRA magnitudes (by module), base tensors (by
    parameter name: trained biases, embedding tables) and modules_to_save states (by module);
    every key must find a place; `wrapped`: expert parameter -> the module path its keys use."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    base: dict[str, torch.Tensor] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {p: {} for p in saved_paths}
    repeated: dict[str, tuple[str, str, str]] = {}  # key -> (module, tensor, where in PEFT's wrapper)
    params: dict[str, nn.Parameter] = {}  # filled on the first base key: most files have none
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
            params = params or dict(
                model.named_parameters(remove_duplicate=False)
            )  # a tied lm_head.weight has its own name
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
        if (
            same is None
            or same.shape != tensors[key].shape
            or not torch.equal(same.to(tensors[key].dtype), tensors[key])
        ):
            what = "the trained copy's value" if inside == "modules_to_save" else "the model's own value"
            raise AdapterFileError(
                f"{where}: key {key!r} differs from {what} for {owner}.{tensor_name} (modules_to_save)"
            )
    experts = {path: param for param, path in wrapped.items()}
    pairs = {
        experts[m]: _expert_pair(model, config, experts[m], m, half, where)
        for m, half in halves.items()
        if m in experts
    }
    pairs |= {m: _pair(model, m, half, config.use_dora, where) for m, half in halves.items() if m not in experts}
    magnitudes = {module: half[fmt.MAGNITUDE] for module, half in halves.items() if fmt.MAGNITUDE in half}
    return FileTensors(pairs, magnitudes, base, saved)


def _pair(
    model: nn.Module, path: str, half: dict[str, torch.Tensor], use_dora: bool, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the tensors the file holds for module `path`, of the family the module needs;
    a DoRA adapter (`use_dora`) also holds the magnitude, any other must not."""
    embedding = any(k in fmt.EMBEDDING_KEYS.values() for k in half if k != fmt.MAGNITUDE)
    keys = {role: k for role, k in fmt.pair_keys(embedding).items() if role != "m" or use_dora}
    for suffix in list(keys.values()) + list(half):
        if suffix == fmt.MAGNITUDE and not use_dora and suffix in half:
            raise AdapterFileError(
                f"{where}: unexpected key {fmt.key(path, suffix)} (a DoRA magnitude, but the config has use_dora false)"
            )
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


def _expert_pair(
    model: nn.Module, config: LoraConfig, param: str, path: str, half: dict[str, torch.Tensor], where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """lorakit's per-expert (A, B) of expert parameter `param` from its PEFT keys under `path`."""
    keys = (fmt.LINEAR_KEYS["A"], fmt.LINEAR_KEYS["B"])
    for suffix in [*keys, *half]:
        if suffix not in half or suffix not in keys:
            raise AdapterFileError(
                f"{where}: {'missing' if suffix not in half else 'unexpected'} key "
                f"{fmt.key(path, suffix)} (parameter {param!r})"
            )
    try:
        return pair_from_file(
            model,
            param,
            half[keys[0]],
            half[keys[1]],
            config.rank_for(param),
            (fmt.key(path, keys[0]), fmt.key(path, keys[1])),
        )
    except ValueError as err:
        raise AdapterFileError(f"{where}: {err}") from None


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


def _check_targets(
    model: nn.Module, config: LoraConfig, facts: dict, pairs: dict, where: str, params: dict[str, str]
) -> None:
    """The file's pairs must be exactly the modules (and expert parameters, `params`) its config
    targets on this model.

    PEFT skips pairs its config does not target and leaves targets without weights at their
    start; either way the loaded model would not be the trained one. A config that names no
    target modules (null or []) leaves the file's keys to say which modules, unless it has
    target_parameters: then [] means none (PEFT's null would add its defaults for the model type).
    """
    if not pairs:
        raise AdapterFileError(f"{where}: holds no LoRA weights")
    missing = [p for p in params if p not in pairs]
    if missing:
        raise AdapterFileError(
            f"{where}: missing key {fmt.key(params[missing[0]], fmt.LINEAR_KEYS['A'])} "
            f"(target_parameters selects {missing[0]!r})"
        )
    config_file = Path(where).with_name(CONFIG_FILE)
    try:
        expected = config_targets(model, config, facts)
    except ValueError as err:
        raise AdapterFileError(f"{config_file}: {err}") from None
    if expected is None and params and facts.get("target_modules") == []:
        expected = []
    if expected is None:
        return
    for path in sorted(pairs):
        if path not in expected and path not in params:
            try:
                module = get_adapted(model, path)
            except ValueError as err:  # first say that the module is not there at all
                raise AdapterFileError(f"{where}: {_unknown_module(model, path, config, err)}") from None
            suffix = fmt.pair_keys(adaptable_kind(module) == "embedding")["A"]
            raise AdapterFileError(
                f"{where}: unexpected key {fmt.key(path, suffix)!r}: {config_file} does not target module "
                f"{path!r} ({_targets_text(config, facts)}), so PEFT would skip it"
            )
    missing = [p for p in expected if p not in pairs]
    if missing:
        suffix = fmt.pair_keys(adaptable_kind(model.get_submodule(missing[0])) == "embedding")["A"]
        raise AdapterFileError(
            f"{where}: missing key {fmt.key(missing[0], suffix)} (the config targets {missing[0]!r})"
        )


def _unknown_module(model: nn.Module, path: str, config: LoraConfig, err: ValueError) -> str:
    """What is wrong with a pair under `path`, a module LoRA cannot adapt: where PEFT would have
    written a target_parameters pair there (an experts module, a `.base_layer` of it), say so."""
    owner = path
    while owner.endswith(".base_layer"):
        owner = owner[: -len(".base_layer")]
    held = [p for p in expert_parameters(model) if p.rpartition(".")[0] == owner]
    if not held:
        return str(err)
    return (
        f"key {fmt.key(path, fmt.LINEAR_KEYS['A'])!r} is where PEFT writes a pair of target_parameters on "
        f"{owner!r} (which holds {', '.join(p.rpartition('.')[2] for p in held)}), but the config's "
        f"target_parameters={config.target_parameters!r} puts none there"
    )


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
        wanted = [n for n, _ in base_biases(model) if not within(n, saved_paths)]
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
    return unwrapped(module)


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
    held = [k[len(fmt.PREFIX) :] for k in tensors if k.startswith(fmt.PREFIX)]
    return [p for p in peft_saved_modules(model, entries) if p in own or any(k.startswith(p + ".") for k in held)]


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
    names = [p for p, _ in base_modules(model) if p]
    keys = [k[len(fmt.PREFIX) :] for k in tensors if k.startswith(fmt.PREFIX)]

    def known(entry: str) -> bool:
        owners = [*names, *(k.rsplit(".", 1)[0] for k in keys)]
        return any(saved_name_matches(p, entry) for p in owners)

    return [e for e in config.modules_to_save if known(e)]
