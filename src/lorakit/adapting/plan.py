"""Adding an adapter as a transaction: validate and build everything aside (`plan`), then swap
it in (`commit`), so a bad request leaves the model as it was."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LoraConfig
from ..layers import experts
from ..layers.base import LoraLayer
from ..layers.kinds import wrapper_for
from ..module_tree import base_modules, get_module, is_wrapper, name_matches, within
from ..targets import adaptable_kind
from . import pissa
from .given import given_magnitude, given_pair
from .registry import (
    AdapterRecord,
    activate,
    active_adapters,
    disabled_depth,
    register,
    replace_module,
)
from .saved_modules import SavedModule


@dataclass
class NewPair:
    """One layer's part of a new adapter, as `LoraLayer.attach` takes it."""

    layer: LoraLayer
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    dropout: float
    magnitude: torch.Tensor | None = None  # DoRA's m


@dataclass
class Plan:
    name: str
    record: AdapterRecord
    wrappers: list[tuple[str, nn.Module]] = field(default_factory=list)  # (path, new wrapper)
    pairs: list[NewPair] = field(default_factory=list)
    residuals: list[tuple[LoraLayer, torch.Tensor]] = field(default_factory=list)  # PiSSA / OLoRA bases
    copies: list[tuple[SavedModule, nn.Module]] = field(default_factory=list)
    base_values: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)  # replaced base tensors


def build_plan(
    model: nn.Module,
    name: str,
    config: LoraConfig,
    modules: list[str],
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    magnitudes: dict[str, torch.Tensor] | None = None,
) -> Plan:
    """Validate and build adapter `name` on `modules` without touching the model.

    `tensors` (path -> (A, B)) gives the weights (loading), with `magnitudes` (path -> m) for a
    DoRA adapter; otherwise they are initialised. A PiSSA or OLoRA adapter's base weights get
    their residual either way (pissa.py); in a given adapter an embedding stays plain LoRA, as
    PEFT trains it.
    """
    record = AdapterRecord(config=config, modules=list(modules))
    plan = Plan(name=name, record=record)
    hosts: dict[str, nn.Module] = {}  # experts modules by path: a new LoraExperts, or the one in place
    for path in modules:
        expert = experts.host_and_layer(model, path)
        module = get_module(model, path) if expert is None else None
        kind = adaptable_kind(module) if expert is None else "experts"
        if kind is None:
            raise ValueError(f"module {path!r} ({type(module).__name__}) cannot carry a LoRA adapter")
        if expert is not None:
            layer = _expert_layer(plan, hosts, path, expert, config)
        elif isinstance(module, LoraLayer):
            layer = module
        else:
            try:
                layer = wrapper_for(kind)(module)
            except ValueError as err:  # a layer the wrapper cannot hold (grouped conv, unquantized 4-bit)
                raise ValueError(f"module {path!r}: {err}") from None
            plan.wrappers.append((path, layer))
        rank, scaling = config.rank_for(path), config.scaling_for(path)
        pissa.check_alone(model, layer, path, config)
        residual = None
        if config.init in pissa.RESIDUAL_INITS and not (tensors is not None and layer.lookup_table):
            a0, b0, residual = pissa.start(layer, path, rank, scaling, config.init)
            plan.residuals.append((layer, residual))
            record.initial[path] = (a0.to("cpu", copy=True), b0.to("cpu", copy=True))
            dtype = layer.base_layer.weight.dtype
            a, b = given_pair(layer, path, rank, tensors[path]) if tensors is not None else (a0.to(dtype), b0.to(dtype))
        elif tensors is not None:
            a, b = given_pair(layer, path, rank, tensors[path])
        else:
            a, b = layer.build_pair(rank, config.init)
        magnitude = None
        if config.use_dora:
            if not layer.supports_dora:
                raise ValueError(
                    f"module {path!r}: DoRA needs a full-precision base weight, and this one is "
                    f"{type(layer.base_layer).__name__}; train plain LoRA on it, or dequantize the model"
                )
            if magnitudes is not None:
                magnitude = given_magnitude(layer, path, magnitudes.get(path))
            else:
                magnitude = layer.initial_magnitude(a, b, scaling, residual)
        plan.pairs.append(NewPair(layer, a, b, scaling, config.dropout, magnitude))
    for path in saved_module_paths(model, config.modules_to_save):
        module = get_module(model, path)
        if isinstance(module, LoraLayer):
            raise ValueError(f"module {path!r} carries LoRA adapters and cannot also be in modules_to_save")
        saved = module if isinstance(module, SavedModule) else SavedModule(module)
        if saved is not module:
            plan.wrappers.append((path, saved))
        plan.copies.append((saved, saved.new_copy()))
        record.saved.append(path)
    return plan


def _expert_layer(plan: Plan, hosts: dict[str, nn.Module], path: str, expert: tuple, config: LoraConfig) -> LoraLayer:
    """The LoraExpertParam of expert parameter `path`: the one in place, or a new one planned
    (with a new LoraExperts around its experts module where there is none yet)."""
    host_path, host, layer = expert
    if config.use_dora:
        raise ValueError(
            f"parameter {path!r}: DoRA on fused expert weights is not supported (its norm per "
            "output feature of each expert is not implemented; PEFT refuses it too); train plain LoRA "
            "there, or leave the experts out of the targets"
        )
    if layer is not None:
        return layer
    if host_path not in hosts:
        hosts[host_path] = host
        if not isinstance(host, experts.LoraExperts):
            hosts[host_path] = experts.LoraExperts(host)
            plan.wrappers.append((host_path, hosts[host_path]))
    try:
        layer = experts.new_layer(hosts[host_path], path.rpartition(".")[2])
    except ValueError as err:  # quantized or otherwise unusable expert weights
        raise ValueError(f"parameter {path!r}: {err}") from None
    plan.wrappers.append((path, layer))
    return layer


def commit(model: nn.Module, plan: Plan) -> None:
    """Swap in what `build_plan` built; nothing here can fail on valid input."""
    register(model, plan.name, plan.record)
    for path, wrapper in plan.wrappers:
        if not isinstance(wrapper, experts.LoraExpertParam):  # that one took its experts' mode when built
            wrapper.train(model.get_submodule(path).training)  # added to a model in eval mode, it is in eval mode
        wrapper.enabled = disabled_depth(model) == 0  # inside lorakit.disabled, new wrappers are off too
        replace_module(model, path, wrapper)
    with torch.no_grad():
        for layer, residual in plan.residuals:
            layer.base_layer.weight.copy_(residual)
        for param, value in plan.base_values:
            param.copy_(value)
    for pair in plan.pairs:
        layer = pair.layer
        layer.attach(plan.name, pair.a, pair.b, pair.scaling, pair.dropout, pair.magnitude)
        # New modules train; in an eval-mode model the adapter's dropout would then act at inference.
        # (_store_pair gives the new pair the layer's mode: a layer already right costs nothing more,
        # where train() would walk every adapter the layer holds.)
        if layer.training != layer.base_layer.training:
            layer.train(layer.base_layer.training)
    for saved, clone in plan.copies:
        saved.copies[plan.name] = clone
    if active_adapters(model):
        # The active set stays as it is, so only the new, inactive adapter's flags change:
        # O(its size), however many adapters the model holds.
        for pair in plan.pairs:
            for p in pair.layer.adapter_parameters(plan.name).values():
                p.requires_grad_(False)
        for _, clone in plan.copies:
            clone.requires_grad_(False)
    else:
        activate(model, [plan.name])


def saved_module_paths(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths matching each modules_to_save entry (exact name or '.'-suffix)."""
    paths: list[str] = []
    modules = base_modules(model)
    wrappers = [p for p, m in modules if is_wrapper(m)]
    for entry in names:
        found = [p for p, m in modules if p and name_matches(p, entry) and not within(p, wrappers)]
        if not found:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
        paths += [p for p in found if p not in paths]
    return paths


def saved_wrapper_paths(model: nn.Module) -> list[str]:
    """Paths of existing modules_to_save wrappers: never LoRA targets themselves."""
    return [p for p, m in base_modules(model) if isinstance(m, SavedModule)]


def unwrap(model: nn.Module, path: str, wrapper: LoraLayer) -> None:
    """Put back what the adapter-less `wrapper` at `path` stands in for."""
    if isinstance(wrapper, experts.LoraExpertParam):
        experts.unwrap(model, path, wrapper, replace_module)
    else:
        replace_module(model, path, wrapper.base_layer)
