"""What lorakit keeps on the user's model: its adapters by name, the active set, and the
parameters' own requires_grad flags (restored when the last adapter goes).

The bookkeeping lives in attributes set with object.__setattr__, so it is not a submodule or
a parameter: the model's state dict and module tree stay the user's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LoraConfig
from ..layers.base import LoraLayer
from ..module_tree import base_modules, is_wrapper, set_module, within
from .saved_modules import SavedModule

_REGISTRY = "_lorakit_adapters"  # attribute on the user's model: name -> AdapterRecord
_ACTIVE = "_lorakit_active"  # attribute on the user's model: active adapter names
_GRAD = "_lorakit_requires_grad"  # parameter name -> requires_grad before the first adapter
_WRAPPERS = "_lorakit_wrappers"  # the wrappers, found once per change of the module tree
_DISABLED = "_lorakit_disabled"  # how many lorakit.disabled blocks are open on the model


@dataclass
class AdapterRecord:
    config: LoraConfig
    modules: list[str]  # paths of the adapted modules
    saved: list[str] = field(default_factory=list)  # paths of its modules_to_save
    trainable: bool = True
    # PiSSA: module path -> its starting (A0, B0) on the CPU, in float32; that module's base weight
    # holds W - scaling * B0 A0 while the adapter exists (pissa.py).
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Base parameters the adapter's file replaced (an embedding table, trained biases), each with its
    # value before, on the CPU: delete_adapter and unload(merge=False) put it back.
    replaced: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)


def adapters(model: nn.Module) -> dict[str, AdapterRecord]:
    """The model's adapters by name (empty when none)."""
    return getattr(model, _REGISTRY, {})


def active_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, _ACTIVE, []))


def activate(model: nn.Module, names: list[str]) -> None:
    object.__setattr__(model, _ACTIVE, names)
    for _, module in wrappers(model):
        module.active = [n for n in names if n in names_in(module)]
    refresh_trainable(model)


def refresh_trainable(model: nn.Module) -> None:
    """Only the active, trainable adapters (their pairs, copies and chosen biases) learn."""
    registry = adapters(model)
    live = [n for n in active_adapters(model) if registry[n].trainable]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in wrappers(model):
        if isinstance(module, LoraLayer):
            for n in live:
                if n in module.adapter_names:
                    for p in module.adapter_parameters(n).values():
                        p.requires_grad_(True)
                    if registry[n].config.bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                        module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, SavedModule):
            for n in live:
                if n in module.copies:
                    module.copies[n].requires_grad_(True)
    if any(registry[n].config.bias == "all" for n in live):
        for _, p in base_biases(model):
            p.requires_grad_(True)


def base_biases(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every bias of the base model (what bias="all" trains), not those of modules_to_save copies."""
    inside = [p for p, m in wrappers(model) if isinstance(m, SavedModule)]
    return [(name, p) for name, p in model.named_parameters() if name.endswith("bias") and not within(name, inside)]


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for _, m in wrappers(model) if isinstance(m, LoraLayer)]


def names_in(module: nn.Module) -> list[str]:
    return module.adapter_names if isinstance(module, LoraLayer) else list(module.copies)


def forget(model: nn.Module) -> None:
    """Drop lorakit's bookkeeping and restore the parameters' requires_grad flags."""
    flags = getattr(model, _GRAD, {})
    for pname, p in model.named_parameters():
        p.requires_grad_(flags.get(pname, True))
    for attr in (_REGISTRY, _ACTIVE, _GRAD, _WRAPPERS):
        if hasattr(model, attr):
            object.__delattr__(model, attr)


def register(model: nn.Module, name: str, record: AdapterRecord) -> None:
    """Record adapter `name` (the first one also records the parameters' requires_grad flags)."""
    if not hasattr(model, _GRAD):
        object.__setattr__(model, _GRAD, {n: p.requires_grad for n, p in model.named_parameters()})
    registry = adapters(model)
    registry[name] = record
    object.__setattr__(model, _REGISTRY, registry)


def wrappers(model: nn.Module) -> list[tuple[str, LoraLayer | SavedModule]]:
    """(path, wrapper) for every lorakit wrapper, in module order."""
    return [(p, m) for p, m in base_modules(model) if is_wrapper(m)]


def cached_wrappers(model: nn.Module) -> list[LoraLayer | SavedModule]:
    """The wrappers, remembered until lorakit next swaps a module (`structure_changed`): for
    what runs per batch (mixed_batch), not a walk each time."""
    found = model.__dict__.get(_WRAPPERS)
    if found is None:
        found = [m for _, m in wrappers(model)]
        object.__setattr__(model, _WRAPPERS, found)
    return found


def structure_changed(model: nn.Module) -> None:
    model.__dict__.pop(_WRAPPERS, None)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path`; the remembered wrappers are walked again next time."""
    set_module(model, path, new)
    structure_changed(model)


def disabled_depth(model: nn.Module) -> int:
    """How many `lorakit.disabled` blocks are open on the model (0: adapters on)."""
    return getattr(model, _DISABLED, 0)


def set_disabled_depth(model: nn.Module, depth: int) -> None:
    if depth:
        object.__setattr__(model, _DISABLED, depth)
    elif hasattr(model, _DISABLED):
        object.__delattr__(model, _DISABLED)


def check_new_name(model: nn.Module, name: str) -> None:
    """Refuse a name a new adapter cannot take on this model, before anything changes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    # Each wrapper keeps its adapters in an nn.ModuleDict / nn.ParameterDict keyed by name, and
    # those refuse the names of their own attributes; caught here, before anything changes.
    taken = next((d for d in (nn.ModuleDict(), nn.ParameterDict()) if hasattr(d, name)), None)
    if taken is not None:
        raise ValueError(
            f"adapter name {name!r} is the name of an attribute of torch's {type(taken).__name__}, "
            "which holds each layer's adapters by name; pick another name"
        )
    if name in adapters(model):
        raise ValueError(f"the model already has an adapter named {name!r}; delete_adapter it or pick another name")


def refuse_if_merged(model: nn.Module, doing: str) -> None:
    """Refuse `doing` (a phrase: "switching adapters") while adapters are merged into the weights."""
    if any(layer.merged for layer in lora_layers(model)):
        raise ValueError(f"adapters are merged into the weights; call lorakit.unmerge(model) before {doing}")
