"""PEFT's adapter format, in one place: file names, tensor key names, and adapter_config.json.

A PEFT LoRA adapter folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensor
keys are `base_model.model.<module path>.<suffix>`: `lora_A.weight` / `lora_B.weight` for a
linear or convolution layer, `lora_embedding_A` / `lora_embedding_B` for an embedding,
`lora_magnitude_vector` for a DoRA adapter's magnitude (any layer kind), `base_layer.bias` for a
trained bias of an adapted layer, `base_layer.weight` for a whole embedding table, and
`<parameter>` for the trained copy of a module in modules_to_save, and
`token_adapter.trainable_tokens_delta` for the trained rows of new tokens (token_rows.py).
PEFT drops the adapter's name from every key; the file holds one adapter.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..config import LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Key suffix of each of a layer's adapter tensors, by role, for the two families of layers
# ("m": DoRA's magnitude vector, only in DoRA adapters).
MAGNITUDE = "lora_magnitude_vector"
LINEAR_KEYS = {"A": "lora_A.weight", "B": "lora_B.weight", "m": MAGNITUDE}
EMBEDDING_KEYS = {"A": "lora_embedding_A", "B": "lora_embedding_B", "m": MAGNITUDE}
PAIR_SUFFIXES = tuple(dict.fromkeys([*LINEAR_KEYS.values(), *EMBEDDING_KEYS.values()]))
BASE_WEIGHT = "base_layer.weight"  # a whole embedding table saved next to its adapter
BASE_BIAS = "base_layer.bias"  # the trained bias of an adapted layer (bias="lora_only" / "all")


def pair_keys(embedding: bool) -> dict[str, str]:
    """Role ("A", "B", "m") -> key suffix for a layer of this family."""
    return EMBEDDING_KEYS if embedding else LINEAR_KEYS


def key(module_path: str, suffix: str) -> str:
    """The file key of tensor `suffix` of module `module_path`."""
    return f"{PREFIX}{module_path}.{suffix}"


def split_pair_key(rest: str) -> tuple[str, str] | None:
    """(module path, suffix) when `rest` (a key without PREFIX) is one of a layer's adapter tensors
    (A, B, or a DoRA magnitude), else None."""
    for suffix in PAIR_SUFFIXES:
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
    return None


# ---- adapter_config.json ---------------------------------------------------------------------

# Fields lorakit writes (PEFT's names) and the values it can honour when reading.
_PEFT_FALSE_FIELDS = ("lora_bias", "use_qalora")
_PEFT_NULL_FIELDS = (
    "layer_replication",
    "megatron_config",
    "loftq_config",
    "eva_config",
    "corda_config",
    "alora_invocation_tokens",
    "arrow_config",
)
_PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# PEFT inits that only choose where A and B start and leave the base weights alone: an adapter
# trained from them is plain LoRA (eva's eva_config only says how its start was computed).
_PEFT_PLAIN_INITS = ("orthogonal", "mica", "eva")
# Fields whose value, when not null, must have a JSON type (a string "false" would read as true).
_PEFT_TYPED_FIELDS = (
    ("use_rslora", bool, "true or false"),
    ("use_dora", bool, "true or false"),
    ("fan_in_fan_out", bool, "true or false"),
    ("task_type", str, "a string (e.g. 'CAUSAL_LM', 'SEQ_CLS')"),
    ("base_model_name_or_path", str, "a string (a model folder or hub id)"),
    ("layers_pattern", (str, list), "a block-list name or a list of them"),
)
# LoraConfig's names for the fields of adapter_config.json that are named otherwise there.
_FIELD_IN_FILE = {
    "rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "rslora": "use_rslora",
    "targets": "target_modules",
    "layers": "layers_to_transform",
    "init": "init_lora_weights",
}


def to_peft_dict(
    config: LoraConfig,
    module_names: list[str],
    *,
    parameter_names: list[str] = (),
    fan_in_fan_out: bool,
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    """PEFT's adapter_config.json for an adapter on exactly `module_names`.

    target_modules is the exact list of adapted module paths (not the preset), so PEFT adapts
    the same modules, and target_parameters the exact list of adapted expert parameters (null
    when none; target_modules is then [] rather than null, which would make PEFT pick its own
    defaults for the model type); `layers` is already applied to both lists, and written as
    layers_to_transform / layers_pattern for the record (PEFT takes a whole module name in
    target_modules as it is, without the layer filter).
    """
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(module_names),
        "target_parameters": sorted(parameter_names) or None,
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": config.bias,
        "use_rslora": config.rslora,
        "modules_to_save": list(config.modules_to_save) or None,
        "init_lora_weights": _PEFT_INIT[config.init],
        "layers_to_transform": config.layers,
        "layers_pattern": config.layers_pattern,
        **_written_patterns(config, [*module_names, *parameter_names]),
        "use_dora": config.use_dora,
        "lora_bias": False,
        "use_qalora": False,
    }


def _written_patterns(config: LoraConfig, module_names: list[str]) -> dict[str, dict[str, Any]]:
    """rank_pattern and alpha_pattern as the file must hold them.

    A reader (PEFT or lorakit) gives a module the value of the first key that matches it, and the
    file's keys are sorted (PEFT writes its own that way too). Where sorting changes which key wins
    for one of `module_names` (`{"q_proj": 4, "layers.0.self_attn.q_proj": 32}`), each module's
    value is written under its own exact name instead, so the file means what the config meant.
    """
    written = {"rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern)}
    as_read = dataclasses.replace(config, **{k: dict(sorted(v.items())) for k, v in written.items()})
    if all(
        (as_read.rank_for(m), as_read.alpha_for(m)) == (config.rank_for(m), config.alpha_for(m)) for m in module_names
    ):
        return written
    return {
        "rank_pattern": {re.escape(m): config.rank_for(m) for m in module_names if config.rank_for(m) != config.rank},
        "alpha_pattern": {
            re.escape(m): config.alpha_for(m) for m in module_names if config.alpha_for(m) != config.alpha
        },
    }


def from_peft_dict(raw: Any, where: str) -> tuple[LoraConfig, dict[str, Any]]:
    """LoraConfig from a parsed adapter_config.json; `where` names the file for errors.

    Returns the config and the raw fields lorakit keeps as facts (base model, task type,
    target_modules as written). Anything asking for what lorakit does not do is an error.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type is {peft_type!r}; lorakit reads only 'LORA' adapters")
    for key in _PEFT_FALSE_FIELDS:
        if raw.get(key):
            raise ValueError(f"{where}: {key}={raw[key]!r} is not supported by lorakit (only false)")
    init = raw.get("init_lora_weights", True)
    for key in _PEFT_NULL_FIELDS:
        if raw.get(key) and not (key == "eva_config" and init == "eva"):
            raise ValueError(f"{where}: {key}={raw[key]!r} is not supported by lorakit (only null/empty)")
    inits = {peft: init for init, peft in _PEFT_INIT.items()} | {False: "default"}
    inits |= {name: "default" for name in _PEFT_PLAIN_INITS}
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        raise ValueError(
            f"{where}: init_lora_weights={init!r} (PiSSA from a randomized SVD) cannot be loaded onto the "
            "original base: the residual it trained on depends on the random state at the time, and PEFT "
            "too rebuilds a different one. Convert it to plain LoRA where it was trained (PEFT: "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...); lorakit: "
            "save_adapter(..., as_lora=True))"
        )
    if not isinstance(init, (bool, str)) or init not in inits:
        raise ValueError(
            f"{where}: init_lora_weights={init!r} is not supported by lorakit "
            f"(true, false, 'gaussian', 'pissa', 'olora' or {', '.join(map(repr, _PEFT_PLAIN_INITS))})"
        )
    for key, kinds, wanted in _PEFT_TYPED_FIELDS:
        if raw.get(key) is not None and not isinstance(raw[key], kinds):
            raise ValueError(f"{where}: {key}={raw[key]!r} must be {wanted}")
    if "r" not in raw:
        raise ValueError(f"{where}: missing key 'r' (the adapter rank)")
    parameters = _target_parameters(raw, where)
    targets = raw.get("target_modules")
    if parameters and targets in (None, []):
        targets = []  # only parameters (PEFT's null would add its defaults: the file's keys say which)
    elif targets is None or targets == []:
        targets = "all-linear"  # the real targets come from the weight file's keys
    try:
        config = LoraConfig(
            rank=raw["r"],
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0) or 0.0,
            targets=targets,
            rslora=raw.get("use_rslora") or False,
            init=inits[init],
            bias=raw.get("bias", "none"),
            modules_to_save=raw.get("modules_to_save") or [],
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
            layers=_layers(raw.get("layers_to_transform")),
            use_dora=raw.get("use_dora") or False,  # PEFT's older files may hold null
            layers_pattern=_layers_pattern(raw.get("layers_pattern"), raw.get("layers_to_transform")),
            target_parameters=parameters,
        )
    except ValueError as err:
        word = re.match(r"\w+", str(err))  # LoraConfig names its own field first: say the file's name too
        field = _FIELD_IN_FILE.get(word.group(0)) if word else None
        raise ValueError(f"{where}: {f'{field}: ' if field else ''}{err}") from None
    exclude = raw.get("exclude_modules")
    if (
        exclude is not None
        and not isinstance(exclude, str)
        and not (isinstance(exclude, list) and all(isinstance(e, str) for e in exclude))
    ):
        raise ValueError(f"{where}: exclude_modules={exclude!r} must be a regex or a list of module names")
    facts = {
        "exclude_modules": exclude or [],
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "task_type": raw.get("task_type"),
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out", False)),
        "trainable_token_indices": raw.get("trainable_token_indices"),  # token_rows.py; checked there
    }
    return config, facts


def _target_parameters(raw: dict[str, Any], where: str) -> list[str]:
    """target_parameters as PEFT takes it: null, or a list of parameter names (PEFT refuses a
    string, and DoRA on a parameter: `lora.ParamWrapper`)."""
    value = raw.get("target_parameters")
    if value is None or value == []:
        return []
    if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        raise ValueError(f"{where}: target_parameters={value!r} must be a list of parameter names (or null)")
    if raw.get("use_dora"):
        raise ValueError(
            f"{where}: use_dora=true with target_parameters: DoRA on a parameter is refused by PEFT "
            "(lora.ParamWrapper) and by lorakit"
        )
    return list(value)


def _layers(value: Any) -> list[int] | None:
    if value is None or value == []:  # PEFT: every block
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return value
    raise ValueError(f"layers_to_transform must be an integer or a list, got {value!r}")


def _layers_pattern(value: Any, layers: Any) -> str | list[str] | None:
    # PEFT treats "" and [] as no pattern, and a pattern without layers_to_transform as nothing to count.
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ValueError(f"layers_pattern {value!r} must be a block-list name or a list of them")
    return value if value and layers not in (None, []) else None
