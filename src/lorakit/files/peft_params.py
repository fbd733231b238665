"""PEFT's file layout for LoRA on parameters (`target_parameters`): which parameters a config
selects on a model, under which file keys each one's pair is written, and in what shape.

PEFT 0.21 (`BaseTuner._inject_parameters`, `lora.ParamWrapper`), restated:

- Selection: every parameter a module holds itself (`named_parameters(recurse=False)`), named
  `<module path>.<parameter>`, that equals an entry or ends with "." + an entry. No
  `layers_to_transform`, no `exclude_modules`: those apply to modules only.
- Keys: one `ParamWrapper` per parameter replaces the module that holds it; a second parameter
  of the same module wraps the first wrapper. The module's parameters are wrapped in the order
  it registered them, so the first (Qwen3-MoE's `gate_up_proj`) ends innermost: its pair is
  `<module>.base_layer.lora_A.weight`, the last one's `<module>.lora_A.weight`.
- Shapes, for a 3-D parameter of E experts and rank r (r per expert): `lora_A.weight` is
  (r*E, in), expert-major (rows e*r .. e*r+r-1 are expert e's A); `lora_B.weight` is (out, r*E),
  rank-major (column k*E + e is expert e's k-th). in / out: the parameter is (E, out, in), or
  (E, in, out) where the experts module says `is_transposed` (gpt-oss). lorakit keeps A (E, r, in)
  and B (E, out, r); `layers.experts.to_peft` / `from_peft` convert.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.experts import LoraExperts, expert_parameters, from_peft, to_peft
from ..module_tree import base_modules, is_lora_layer, is_saved_module


def base_parameter_names(model: nn.Module) -> list[str]:
    """Every parameter of the base model by the name it has without lorakit's wrappers
    (`...experts.gate_up_proj`, not `...experts.base_layer.gate_up_proj`), in model order."""
    plain: dict[str, str] = {"": ""}  # module path -> its path without wrappers
    names: list[str] = []
    wrappers: dict[str, str] = {}  # wrapper path -> the child that holds the original module
    for path, module in base_modules(model):
        parent, _, child = path.rpartition(".")
        if path and wrappers.get(parent) == child:
            plain[path] = plain[parent]
        else:
            plain[path] = f"{plain[parent]}.{child}" if plain.get(parent) else child
        if is_lora_layer(module) or isinstance(module, LoraExperts):
            wrappers[path] = "base_layer"
        elif is_saved_module(module):
            wrappers[path] = "original"
        else:
            names += [f"{plain[path]}.{n}" if plain[path] else n for n, _ in module.named_parameters(recurse=False)]
    return names


def targeted_parameters(model: nn.Module, entries: list[str] | None) -> list[str]:
    """The parameters PEFT's `target_parameters` selects on `model`, in model order."""
    if not entries:
        return []
    return [n for n in base_parameter_names(model) if n in entries or any(n.endswith("." + e) for e in entries)]


def not_adaptable(model: nn.Module, parameters: list[str]) -> list[str]:
    """Those of `parameters` lorakit cannot adapt (anything but a fused 3-D expert weight)."""
    if not parameters:
        return []
    known = set(expert_parameters(model))
    return [p for p in parameters if p not in known]


def wrapper_paths(model: nn.Module, parameters: list[str]) -> dict[str, str]:
    """Parameter name -> the module path its pair's keys are written under in PEFT's file, given
    that exactly `parameters` are adapted (PEFT nests the wrappers of one module's parameters)."""
    by_owner: dict[str, list[str]] = {}
    for name in parameters:
        owner, _, short = name.rpartition(".")
        by_owner.setdefault(owner, []).append(short)
    paths: dict[str, str] = {}
    for owner, shorts in by_owner.items():
        module = model.get_submodule(owner)
        if isinstance(module, LoraExperts):
            module = module.base_layer
        order = [n for n, _ in module.named_parameters(recurse=False) if n in shorts]
        for i, short in enumerate(order):
            paths[f"{owner}.{short}"] = owner + ".base_layer" * (len(order) - 1 - i)
    return paths


def expert_shape(model: nn.Module, parameter: str) -> tuple[int, int, int]:
    """(experts, in, out) of a fused expert parameter (`parameter`: its name without wrappers)."""
    owner, _, short = parameter.rpartition(".")
    module = model.get_submodule(owner)
    experts = module.base_layer if isinstance(module, LoraExperts) else module
    count, d1, d2 = getattr(experts, short).shape
    return (count, d1, d2) if getattr(experts, "is_transposed", False) else (count, d2, d1)


def pair_from_file(
    model: nn.Module, parameter: str, a: torch.Tensor, b: torch.Tensor, rank: int, keys: tuple[str, str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """lorakit's (A (E, r, in), B (E, out, r)) from PEFT's flattened pair of `parameter`, every
    shape checked against the model and the config's `rank`; ValueError names the key at fault."""
    experts, fan_in, fan_out = expert_shape(model, parameter)
    want = {keys[0]: (rank * experts, fan_in), keys[1]: (fan_out, rank * experts)}
    for key, tensor in zip(keys, (a, b)):
        if tuple(tensor.shape) != want[key]:
            raise ValueError(
                f"key {key!r} has shape {tuple(tensor.shape)}, expected {want[key]}: parameter {parameter!r} "
                f"holds {experts} experts of {fan_in} inputs and {fan_out} outputs, rank {rank} per expert"
            )
    return from_peft(a, b, experts)


def pair_to_file(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's flattened (A (r*E, in), B (out, r*E)) of lorakit's per-expert pair."""
    return to_peft(a, b)
