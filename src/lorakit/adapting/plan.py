"""Adding an adapter as a transaction: validate and build everything aside (`plan`), then swap
it in (`commit`), so a bad request leaves the model as it was."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import pissa
from ..config import LoraConfig
from ..errors import LorakitError
from ..layers import experts
from ..layers.base import LoraLayer
from .registry import (
    AdapterRecord,
    activate,
    active_adapters,
    disabled_depth,
    named_base_modules,
    register,
    structure_changed,
)
from .saved_modules import SavedModule
from ..targets import adaptable_kind
from ..layers.kinds import wrapper_for


class TensorError(LorakitError, ValueError):
    """A given A, B or DoRA magnitude ("m") that does not fit its module; `module` and `role` say which."""

    user_fixable = False  # the caller's tensors, given in Python; the CLI's come from files (AdapterFileError)

    def __init__(self, message: str, module: str, role: str) -> None:
        super().__init__(message)
        self.module, self.role = module, role


@dataclass
class Plan:
    name: str
    record: AdapterRecord
    wrappers: list[tuple[str, nn.Module]] = field(default_factory=list)  # (path, new wrapper)
    pairs: list[tuple[LoraLayer, torch.Tensor, torch.Tensor, float, float]] = field(default_factory=list)
    residuals: list[tuple[LoraLayer, torch.Tensor]] = field(default_factory=list)  # PiSSA / OLoRA bases
    magnitudes: dict[int, torch.Tensor] = field(default_factory=dict)  # DoRA: index in `pairs` -> m
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
        if config.use_dora:
            if not layer.supports_dora:
                raise ValueError(f"module {path!r}: DoRA needs a full-precision base weight, and this one is "
                                 f"{type(layer.base_layer).__name__}; train plain LoRA on it, or dequantize the model")
            if magnitudes is not None:
                plan.magnitudes[len(plan.pairs)] = given_magnitude(layer, path, magnitudes.get(path))
            else:
                plan.magnitudes[len(plan.pairs)] = layer.initial_magnitude(a, b, scaling, residual)
        plan.pairs.append((layer, a, b, scaling, config.dropout))
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
        raise ValueError(f"parameter {path!r}: DoRA on fused expert weights is not supported (its norm per "
                         "output feature of each expert is not implemented; PEFT refuses it too); train plain LoRA "
                         "there, or leave the experts out of the targets")
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
    for i, (layer, a, b, scaling, dropout) in enumerate(plan.pairs):
        layer.attach(plan.name, a, b, scaling, dropout, plan.magnitudes.get(i))
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
        for layer, *_ in plan.pairs:
            for p in layer.adapter_parameters(plan.name).values():
                p.requires_grad_(False)
        for _, clone in plan.copies:
            clone.requires_grad_(False)
    else:
        activate(model, [plan.name])


def saved_module_paths(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths matching each modules_to_save entry (exact name or '.'-suffix)."""
    paths: list[str] = []
    modules = named_base_modules(model)
    wrappers = [p for p, m in modules if isinstance(m, (LoraLayer, SavedModule))]
    for entry in names:
        found = [
            p
            for p, m in modules
            if p and (p == entry or p.endswith("." + entry)) and not any(p.startswith(w + ".") for w in wrappers)
        ]
        if not found:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
        paths += [p for p in found if p not in paths]
    return paths


def saved_wrapper_paths(model: nn.Module) -> list[str]:
    """Paths of existing modules_to_save wrappers: never LoRA targets themselves."""
    return [p for p, m in named_base_modules(model) if isinstance(m, SavedModule)]


def given_pair(
    layer: LoraLayer, path: str, rank: int, pair: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A given (A, B), checked against the layer and the rank, where the layer keeps its adapters."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
        raise ValueError(f"module {path!r}: expected a pair of tensors (A, B)")
    a, b = pair
    axis = 1 if isinstance(layer, experts.LoraExpertParam) else 0  # experts: A is (E, r, in)
    given = a.shape[axis] if a.dim() > axis else 0
    if given != rank:
        raise TensorError(f"module {path!r}: A has rank {given}, but the config gives rank {rank} for {path!r}", path, "A")
    for role, tensor, shape in zip(("A", "B"), (a, b), layer.pair_shapes(rank)):
        try:
            check_shape(f"module {path!r}: {role}", tensor, shape)
            check_values(f"module {path!r}: {role}", tensor)
        except ValueError as err:
            raise TensorError(str(err), path, role) from None
    device, dtype = layer.adapter_placement()
    return a.to(device, dtype), b.to(device, dtype)


def given_magnitude(layer: LoraLayer, path: str, magnitude: torch.Tensor | None) -> torch.Tensor:
    """A given DoRA magnitude vector, checked against the layer, on the base weight's device and dtype."""
    if not isinstance(magnitude, torch.Tensor):
        raise ValueError(f"module {path!r}: no DoRA magnitude given (the config has use_dora)")
    try:
        check_shape(f"module {path!r}: the DoRA magnitude", magnitude, layer.magnitude_shape())
        check_values(f"module {path!r}: the DoRA magnitude", magnitude)
    except ValueError as err:
        raise TensorError(str(err), path, "m") from None
    weight = layer.base_layer.weight
    return magnitude.to(weight.device, weight.dtype)


def load_copy(clone: nn.Module, state: dict[str, torch.Tensor] | None, path: str) -> None:
    """Fill a modules_to_save copy from `state`, which must match it key for key and shape for shape."""
    if state is None:
        raise ValueError(f"saved: no weights given for {path!r} (modules_to_save)")
    expected = clone.state_dict()
    for k, v in expected.items():
        if k not in state:
            raise ValueError(f"missing key {path}.{k!r} (modules_to_save)")
        check_shape(f"'{path}.{k}'", state[k], v.shape)
        check_values(f"'{path}.{k}'", state[k], like=v)
    for k in state:
        if k not in expected:
            raise ValueError(f"unexpected key {path}.{k!r} (modules_to_save {path!r})")
    clone.load_state_dict(state)


def check_shape(what: str, tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{what} has shape {tuple(tensor.shape)}, but this model needs {tuple(shape)} "
            "(was the adapter trained on another base model?)"
        )


def check_values(what: str, tensor: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Refuse integer or boolean values where the model holds floats (`like`: the tensor they
    replace; default a float one), and NaN or infinite values anywhere."""
    if (like is None or like.is_floating_point()) and not tensor.is_floating_point():
        raise ValueError(f"{what} has dtype {tensor.dtype}, but this model needs floating-point values")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{what} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}")


def get_adapted(model: nn.Module, path: str) -> nn.Module | None:
    """The module at `path`, which must exist and be able to carry an adapter (None for an
    expert parameter, which can)."""
    if experts.host_and_layer(model, path) is not None:
        return None
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the adapter names module {path!r}, which this model does not have") from None
    if adaptable_kind(module) is None:
        raise ValueError(f"module {path!r} ({type(module).__name__}) cannot carry a LoRA adapter")
    return module


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the model has no module named {path!r}") from None


def unwrap(model: nn.Module, path: str, wrapper: LoraLayer) -> None:
    """Put back what the adapter-less `wrapper` at `path` stands in for."""
    if isinstance(wrapper, experts.LoraExpertParam):
        experts.unwrap(model, path, wrapper, replace_module)
    else:
        replace_module(model, path, wrapper.base_layer)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
    structure_changed(model)
