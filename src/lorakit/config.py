"""LoRA configuration, validated when built (its file form is in peft_format.py).

LoRA (Hu et al., 2021, arXiv:2106.09685) writes a weight update as delta W = B A with rank r,
scaled by alpha / r; rsLoRA (Kalajdzievskiy, 2023, arXiv:2312.03732) scales by alpha / sqrt(r).
DoRA (Liu et al., 2024, arXiv:2402.09353) adds a trained magnitude per output feature (dora.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

INIT_MODES = ("default", "gaussian", "pissa", "olora")
BIAS_MODES = ("none", "all", "lora_only")
PRESETS = ("attention", "attention+mlp", "all-linear")


@dataclass
class LoraConfig:
    rank: int = 8  # r: inner dimension of B A
    alpha: float = 16.0  # the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input, in [0, 1)
    targets: str | list[str] = "attention"  # suffix list, regex, or a preset name
    rslora: bool = False  # scale by alpha / sqrt(rank)
    init: str = "default"  # "default" (A kaiming, B zero), "gaussian", "pissa", "olora"
    bias: str = "none"  # which base biases train: "none", "all", "lora_only"
    modules_to_save: list[str] = field(default_factory=list)  # trained in full, saved with the adapter
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name pattern -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module-name pattern -> alpha
    layers: list[int] | None = None  # transformer block indices to adapt; None: all
    # With `layers`: the name of the block list whose index counts ("blocks" in Swin's
    # layers.N.blocks.M), or several tried in order; PEFT's layers_pattern. None: the first block list.
    layers_pattern: str | list[str] | None = None
    use_dora: bool = False  # DoRA: W' = m (W + s B A) / ||W + s B A||, m trained per output feature
    # Fused expert parameters to adapt, PEFT's target_parameters: "mlp.experts.gate_up_proj" names every
    # parameter whose full name is it or ends with "." + it (experts.py). The presets attention+mlp and
    # all-linear add every expert parameter of an MoE model by themselves.
    target_parameters: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_rank(self.rank, "rank")
        _check_alpha(self.alpha, "alpha")
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):  # "no" would be true
            raise ValueError(f"rslora must be True or False, got {self.rslora!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {', '.join(INIT_MODES)}; got {self.init!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {', '.join(BIAS_MODES)}; got {self.bias!r}")
        if self.target_parameters is None:
            self.target_parameters = []
        if not (
            isinstance(self.target_parameters, (list, tuple))
            and all(isinstance(t, str) and t for t in self.target_parameters)
        ):
            raise ValueError(f"target_parameters must be a list of parameter names, got {self.target_parameters!r}")
        self.target_parameters = list(self.target_parameters)
        if isinstance(self.targets, (list, tuple)) and not self.targets and self.target_parameters:
            self.targets = []  # only the expert parameters, as PEFT's target_modules=[]
        else:
            self.targets = check_targets(self.targets)
        for what, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            patterns = getattr(self, what)
            if not isinstance(patterns, dict):
                raise ValueError(f"{what} must be a dict of module-name pattern -> value, got {patterns!r}")
            for key, value in patterns.items():
                _check_regex(key, f"{what} key")
                check(value, f"{what}[{key!r}]")
        if self.layers is not None:
            if not (
                isinstance(self.layers, (list, tuple))
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
            ):
                raise ValueError(f"layers must be a list of block indices >= 0, got {self.layers!r}")
            self.layers = list(self.layers)
        if self.layers_pattern is not None:
            self.layers_pattern = _check_layers_pattern(self.layers_pattern, self.layers)
        if self.modules_to_save is None:
            self.modules_to_save = []
        # A plain string would be taken letter by letter.
        if not (
            isinstance(self.modules_to_save, (list, tuple))
            and all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            raise ValueError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        self.modules_to_save = list(self.modules_to_save)

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.rank)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        rank, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def check_targets(targets: Any) -> str | list[str]:
    """`targets` as a config holds it (a list of names, a regex, or a preset); ValueError saying
    what is valid otherwise. The one check, for `LoraConfig` and `targets.resolve_targets`."""
    if isinstance(targets, (list, tuple)):
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"targets must be a non-empty list of module names, got {targets!r}")
        return list(targets)
    if not isinstance(targets, str) or not targets:
        raise ValueError(
            f"targets must be a list of module names, a regex, or one of {', '.join(PRESETS)}; got {targets!r}"
        )
    if targets not in PRESETS:
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"targets {targets!r} is not a valid regex: {err}") from None
    return targets


def _check_rank(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")


def _check_alpha(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{what} must be a number > 0, got {value!r}")


def _check_regex(pattern: Any, what: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{what} {pattern!r} must be a non-empty string (a regex over module names)")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {err}") from None


def _check_layers_pattern(value: Any, layers: list[int] | None) -> str | list[str]:
    patterns = [value] if isinstance(value, str) else value
    if not (isinstance(patterns, (list, tuple)) and patterns and all(isinstance(p, str) and p for p in patterns)):
        raise ValueError(f"layers_pattern must be a block-list name or a non-empty list of them, got {value!r}")
    if layers is None:
        raise ValueError(f"layers_pattern={value!r} needs layers (the block indices it counts)")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"layers_pattern {pattern!r} is not a valid regex: {err}") from None
    return value if isinstance(value, str) else list(value)


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    # PEFT's rule: a key matches when it ends the module name at a "." boundary (as a regex).
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
            return value
    return default
