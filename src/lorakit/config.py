"""LoRA configuration, validated when built, and its mapping to PEFT's adapter_config.json.

LoRA (Hu et al., 2021, arXiv:2106.09685) writes a weight update as delta W = B A with rank r,
scaled by alpha / r; rsLoRA (Kalajdzievskiy, 2023, arXiv:2312.03732) scales by alpha / sqrt(r).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

INIT_MODES = ("default", "gaussian", "pissa")
BIAS_MODES = ("none", "all", "lora_only")
PRESETS = ("attention", "attention+mlp", "all-linear")


@dataclass
class LoraConfig:
    rank: int = 8  # r: inner dimension of B A
    alpha: float = 16.0  # the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input, in [0, 1)
    targets: str | list[str] = "attention"  # suffix list, regex, or a preset name
    rslora: bool = False  # scale by alpha / sqrt(rank)
    init: str = "default"  # "default" (A kaiming, B zero), "gaussian", "pissa"
    bias: str = "none"  # which base biases train: "none", "all", "lora_only"
    modules_to_save: list[str] = field(default_factory=list)  # trained in full, saved with the adapter
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name pattern -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module-name pattern -> alpha
    layers: list[int] | None = None  # transformer block indices to adapt; None: all

    def __post_init__(self) -> None:
        _check_rank(self.rank, "rank")
        _check_alpha(self.alpha, "alpha")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {', '.join(INIT_MODES)}; got {self.init!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {', '.join(BIAS_MODES)}; got {self.bias!r}")
        if isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"targets must be a non-empty list of module names, got {self.targets!r}")
            self.targets = list(self.targets)
        elif not isinstance(self.targets, str) or not self.targets:
            raise ValueError(
                f"targets must be a list of module names, a regex, or one of {', '.join(PRESETS)}; "
                f"got {self.targets!r}"
            )
        elif self.targets not in PRESETS:
            try:
                re.compile(self.targets)
            except re.error as err:
                raise ValueError(f"targets {self.targets!r} is not a valid regex: {err}") from None
        for key, value in self.rank_pattern.items():
            _check_rank(value, f"rank_pattern[{key!r}]")
        for key, value in self.alpha_pattern.items():
            _check_alpha(value, f"alpha_pattern[{key!r}]")
        if self.layers is not None:
            if not all(isinstance(i, int) and i >= 0 for i in self.layers):
                raise ValueError(f"layers must be a list of block indices >= 0, got {self.layers!r}")
            self.layers = list(self.layers)
        self.modules_to_save = list(self.modules_to_save or [])

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.rank)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        rank, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_rank(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")


def _check_alpha(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{what} must be a number > 0, got {value!r}")


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    # PEFT's rule: a key matches when it ends the module name at a "." boundary (as a regex).
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
            return value
    return default


# ---- PEFT's adapter_config.json ------------------------------------------------------------

# Fields lorakit writes (PEFT's names) and the values it can honour when reading.
_PEFT_FALSE_FIELDS = ("use_dora", "lora_bias", "use_qalora")
_PEFT_NULL_FIELDS = (
    "layer_replication",
    "megatron_config",
    "loftq_config",
    "eva_config",
    "corda_config",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
)
_PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}


def to_peft_dict(
    config: LoraConfig,
    module_names: list[str],
    *,
    fan_in_fan_out: bool,
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    """PEFT's adapter_config.json for an adapter on exactly `module_names`.

    target_modules is the exact list of adapted module paths (not the preset), so PEFT adapts
    the same modules; `layers` is already applied to that list.
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
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": config.bias,
        "use_rslora": config.rslora,
        "modules_to_save": list(config.modules_to_save) or None,
        "init_lora_weights": _PEFT_INIT[config.init],
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "use_dora": False,
        "lora_bias": False,
        "use_qalora": False,
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
    for key in _PEFT_NULL_FIELDS:
        if raw.get(key):
            raise ValueError(f"{where}: {key}={raw[key]!r} is not supported by lorakit (only null/empty)")
    init = raw.get("init_lora_weights", True)
    inits = {True: "default", False: "default", "gaussian": "gaussian", "pissa": "pissa"}
    if not isinstance(init, (bool, str)) or init not in inits:
        raise ValueError(
            f"{where}: init_lora_weights={init!r} is not supported by lorakit "
            "(true, false, 'gaussian' or 'pissa')"
        )
    if "r" not in raw:
        raise ValueError(f"{where}: missing key 'r' (the adapter rank)")
    targets = raw.get("target_modules")
    if targets is None or targets == []:
        targets = "all-linear"  # the real targets come from the weight file's keys
    try:
        config = LoraConfig(
            rank=raw["r"],
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0) or 0.0,
            targets=targets,
            rslora=bool(raw.get("use_rslora", False)),
            init=inits[init],
            bias=raw.get("bias", "none"),
            modules_to_save=list(raw.get("modules_to_save") or []),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            layers=_layers(raw.get("layers_to_transform"), where),
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    exclude = raw.get("exclude_modules")
    if exclude is not None and not (isinstance(exclude, list) and all(isinstance(e, str) for e in exclude)):
        raise ValueError(f"{where}: exclude_modules={exclude!r} is not supported by lorakit (only a list of names)")
    facts = {
        "exclude_modules": exclude or [],
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "task_type": raw.get("task_type"),
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out", False)),
    }
    return config, facts


def _layers(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return value
    raise ValueError(f"{where}: layers_to_transform must be an integer or a list, got {value!r}")
