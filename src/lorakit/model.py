"""Adapters over a whole model: inject, add, switch, delete, disable, merge, unload.

The user's model keeps its class: each chosen submodule is replaced in place by a wrapper
holding it (layers.py). Adding an adapter is a transaction: everything is validated and built
aside first (`_plan`), then swapped in (`_commit`), so a bad request leaves the model as it was.
`add_adapter` builds fresh weights; `add_adapter_from_tensors` takes given ones (what loading an
adapter file comes down to, adapter_file.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import LoraConfig
from .layers import LoraLayer, wrapper_for
from .saved_modules import SavedModule
from .targets import adaptable_kind, resolve_targets

_REGISTRY = "_lorakit_adapters"  # attribute on the user's model: name -> AdapterRecord
_ACTIVE = "_lorakit_active"  # attribute on the user's model: active adapter names
_GRAD = "_lorakit_requires_grad"  # parameter name -> requires_grad before the first adapter


@dataclass
class AdapterRecord:
    config: LoraConfig
    modules: list[str]  # paths of the adapted modules
    saved: list[str] = field(default_factory=list)  # paths of its modules_to_save
    trainable: bool = True


@dataclass
class _Plan:
    name: str
    record: AdapterRecord
    wrappers: list[tuple[str, nn.Module]] = field(default_factory=list)  # (path, new wrapper)
    pairs: list[tuple[LoraLayer, torch.Tensor, torch.Tensor, float, float]] = field(default_factory=list)
    residuals: list[tuple[LoraLayer, torch.Tensor]] = field(default_factory=list)  # PiSSA bases
    copies: list[tuple[SavedModule, nn.Module]] = field(default_factory=list)
    base_values: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)  # replaced base tensors


# ---- public API ----------------------------------------------------------------------------


def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to `model` in place, make it the active one, freeze the rest."""
    add_adapter(model, name, config)
    set_adapter(model, name)
    return model


def add_adapter(model: nn.Module, name: str, config: LoraConfig) -> nn.Module:
    """Add adapter `name` (active only if no other adapter is); see `set_adapter`."""
    _check_new_name(model, name)
    _refuse_if_merged(model, "adding an adapter")
    exclude = list(config.modules_to_save) + _saved_module_paths(model)
    modules = resolve_targets(model, config.targets, config.layers, exclude=exclude)
    # Nothing inside a module trained in full gets an adapter as well.
    whole = _saved_module_paths(model) + saved_module_paths(model, config.modules_to_save)
    modules = [m for m in modules if not any(m.startswith(w + ".") for w in whole)]
    if not modules:
        raise ValueError(f"targets {config.targets!r} match only modules inside modules_to_save")
    _commit(model, _plan(model, name, config, modules))
    return model


def add_adapter_from_tensors(
    model: nn.Module,
    name: str,
    config: LoraConfig,
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    saved: dict[str, dict[str, torch.Tensor]] | None = None,
    base: dict[str, torch.Tensor] | None = None,
    trainable: bool = True,
) -> nn.Module:
    """Add adapter `name` with given weights, as one transaction.

    `pairs`: module path -> (A, B), in PEFT's layout and of the rank `config` gives that module.
    `saved`: module path -> state dict of its trained copy, one for each of config.modules_to_save.
    `base`: parameter name -> a value that replaces a base parameter (trained biases, a whole
    embedding table). Everything is checked before anything changes; a ValueError names the
    module, parameter or tensor at fault. The adapter becomes active if no other adapter is.
    """
    _check_new_name(model, name)
    _refuse_if_merged(model, "loading an adapter")
    if not pairs:
        raise ValueError("no LoRA weights given (pairs is empty)")
    for path in pairs:
        if not isinstance(path, str):
            raise ValueError(f"pairs must be keyed by module path, got {path!r}")
        _get_adapted(model, path)
    order = {p: i for i, (p, _) in enumerate(model.named_modules())}
    modules = sorted(pairs, key=lambda p: order[p])
    plan = _plan(model, name, config, modules, tensors=pairs)
    saved = saved or {}
    for (_, clone), path in zip(plan.copies, plan.record.saved):
        _load_copy(clone, saved.get(path), path)
    unknown = sorted(set(saved) - set(plan.record.saved))
    if unknown:
        raise ValueError(f"saved: {unknown[0]!r} is not one of the modules_to_save {plan.record.saved}")
    params = dict(model.named_parameters())
    for pname, value in (base or {}).items():
        if pname not in params:
            raise ValueError(f"base: the model has no parameter named {pname!r}")
        param = params[pname]
        _check_shape(f"{pname!r}", value, param.shape)
        plan.base_values.append((param, value.to(param.device, param.dtype)))
    plan.record.trainable = trainable
    _commit(model, plan)
    return model


def adapters(model: nn.Module) -> dict[str, AdapterRecord]:
    """The model's adapters by name (empty when none)."""
    return getattr(model, _REGISTRY, {})


def active_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, _ACTIVE, []))


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapters (several are summed); only they are trainable."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapters(model)
    for n in names:
        if n not in known:
            raise ValueError(f"no adapter named {n!r}; the model has {sorted(known) or 'none'}")
    _refuse_if_merged(model, "switching adapters")
    for path, module in model.named_modules():
        if isinstance(module, SavedModule) and sum(n in module.copies for n in names) > 1:
            raise ValueError(
                f"adapters {[n for n in names if n in module.copies]} each train their own copy of {path!r} "
                "(modules_to_save); only one of them can be active at a time"
            )
    _activate(model, names)


def _activate(model: nn.Module, names: list[str]) -> None:
    object.__setattr__(model, _ACTIVE, names)
    for module in model.modules():
        if isinstance(module, (LoraLayer, SavedModule)):
            module.active = [n for n in names if n in _names_in(module)]
    _refresh_trainable(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; wrappers left with no adapter are unwrapped."""
    known = adapters(model)
    if name not in known:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(known) or 'none'}")
    if any(name in m.merged for m in _lora_layers(model)):
        raise ValueError(f"adapter {name!r} is merged into the weights; call lorakit.unmerge(model) first")
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and name in module.adapter_names:
            module.detach_adapter(name)
            if not module.adapter_names:
                _replace(model, path, module.base_layer)
        elif isinstance(module, SavedModule) and name in module.copies:
            del module.copies[name]
            module.active = [n for n in module.active if n != name]
            if not len(module.copies):
                _replace(model, path, module.original)
    del known[name]
    object.__setattr__(model, _ACTIVE, [n for n in active_adapters(model) if n != name])
    if known:
        _refresh_trainable(model)
    else:
        _forget(model)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is exactly the base model."""
    _refuse_if_merged(model, "disabling adapters")
    wrappers = [m for m in model.modules() if isinstance(m, (LoraLayer, SavedModule))]
    for m in wrappers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in wrappers:
            m.enabled = True


def merge(model: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weight (the model then runs at base speed)."""
    _refuse_tied(model)
    for layer in _lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights."""
    for layer in _lora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every LoRA module and give the plain model back.

    merge=True keeps the active adapters' effect (folded into the weights, the trained copies of
    modules_to_save in place); merge=False restores the original modules, weights as they were.
    """
    if merge:
        _refuse_tied(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge() if merge else module.unmerge()
            _replace(model, path, module.base_layer)
        elif isinstance(module, SavedModule):
            _replace(model, path, module.current if merge else module.original)
    _forget(model)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each tensor counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


# ---- plan and commit -----------------------------------------------------------------------


def _plan(
    model: nn.Module,
    name: str,
    config: LoraConfig,
    modules: list[str],
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> _Plan:
    """Validate and build adapter `name` on `modules` without touching the model.

    `tensors` (path -> (A, B)) gives the weights (loading); otherwise they are initialised.
    """
    record = AdapterRecord(config=config, modules=list(modules))
    plan = _Plan(name=name, record=record)
    for path in modules:
        module = _get(model, path)
        kind = adaptable_kind(module)
        if kind is None:
            raise ValueError(f"module {path!r} ({type(module).__name__}) cannot carry a LoRA adapter")
        if isinstance(module, LoraLayer):
            layer = module
        else:
            layer = wrapper_for(kind)(module)
            plan.wrappers.append((path, layer))
        rank, scaling = config.rank_for(path), config.scaling_for(path)
        if tensors is not None:
            a, b = _given_pair(layer, path, rank, tensors[path])
        elif config.init == "pissa":
            if layer.merged:
                raise ValueError(f"module {path!r} has merged adapters; unmerge before a PiSSA init")
            a, b, residual = layer.pissa(rank, scaling)
            plan.residuals.append((layer, residual))
        else:
            a, b = layer.build_pair(rank, config.init)
        plan.pairs.append((layer, a, b, scaling, config.dropout))
    for path in saved_module_paths(model, config.modules_to_save):
        module = _get(model, path)
        if isinstance(module, LoraLayer):
            raise ValueError(f"module {path!r} carries LoRA adapters and cannot also be in modules_to_save")
        saved = module if isinstance(module, SavedModule) else SavedModule(module)
        if saved is not module:
            plan.wrappers.append((path, saved))
        plan.copies.append((saved, saved.new_copy()))
        record.saved.append(path)
    return plan


def _commit(model: nn.Module, plan: _Plan) -> None:
    """Swap in what `_plan` built; nothing here can fail on valid input."""
    if not hasattr(model, _GRAD):
        object.__setattr__(model, _GRAD, {n: p.requires_grad for n, p in model.named_parameters()})
    for path, wrapper in plan.wrappers:
        _replace(model, path, wrapper)
    with torch.no_grad():
        for layer, residual in plan.residuals:
            layer.base_layer.weight.copy_(residual)
        for param, value in plan.base_values:
            param.copy_(value)
    for layer, a, b, scaling, dropout in plan.pairs:
        layer.attach(plan.name, a, b, scaling, dropout)
    for saved, clone in plan.copies:
        saved.copies[plan.name] = clone
    registry = adapters(model)
    registry[plan.name] = plan.record
    object.__setattr__(model, _REGISTRY, registry)
    _activate(model, active_adapters(model) or [plan.name])


def _refresh_trainable(model: nn.Module) -> None:
    """Only the active, trainable adapters (their pairs, copies and chosen biases) learn."""
    registry = adapters(model)
    live = [n for n in active_adapters(model) if registry[n].trainable]
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
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
    inside = [p for p, m in model.named_modules() if isinstance(m, SavedModule)]
    return [
        (name, p)
        for name, p in model.named_parameters()
        if name.endswith("bias") and not any(name.startswith(w + ".") for w in inside)
    ]


# ---- small helpers -------------------------------------------------------------------------


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in adapters(model):
        raise ValueError(f"the model already has an adapter named {name!r}; delete_adapter it or pick another name")


def _refuse_if_merged(model: nn.Module, doing: str) -> None:
    if any(layer.merged for layer in _lora_layers(model)):
        raise ValueError(f"adapters are merged into the weights; call lorakit.unmerge(model) before {doing}")


def _refuse_tied(model: nn.Module) -> None:
    """Merging into a weight that another module shares (tied embeddings) would change both."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for path, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and any(n not in layer.merged for n in layer.active):
            tied = owners.get(id(layer.base_layer.weight), [])
            if len(tied) > 1:
                raise ValueError(
                    f"cannot merge into {path!r}: its weight is tied to {[t for t in tied if not t.startswith(path + '.')]}, "
                    "which merging would change too; keep this adapter unmerged"
                )


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _names_in(module: nn.Module) -> list[str]:
    return module.adapter_names if isinstance(module, LoraLayer) else list(module.copies)


def saved_module_paths(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths matching each modules_to_save entry (exact name or '.'-suffix)."""
    paths: list[str] = []
    wrappers = [p for p, m in model.named_modules() if isinstance(m, (LoraLayer, SavedModule))]
    for entry in names:
        found = [
            p
            for p, m in model.named_modules()
            if p and (p == entry or p.endswith("." + entry)) and not any(p.startswith(w + ".") for w in wrappers)
        ]
        if not found:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
        paths += [p for p in found if p not in paths]
    return paths


def _saved_module_paths(model: nn.Module) -> list[str]:
    """Paths of existing modules_to_save wrappers: never LoRA targets themselves."""
    return [p for p, m in model.named_modules() if isinstance(m, SavedModule)]


def _given_pair(
    layer: LoraLayer, path: str, rank: int, pair: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A given (A, B), checked against the layer and the rank, on the base weight's device and dtype."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
        raise ValueError(f"module {path!r}: expected a pair of tensors (A, B)")
    a, b = pair
    given = a.shape[0] if a.dim() else 0
    if given != rank:
        raise ValueError(f"module {path!r}: A has rank {given}, but the config gives rank {rank} for {path!r}")
    expect_a, expect_b = layer.pair_shapes(rank)
    _check_shape(f"module {path!r}: A", a, expect_a)
    _check_shape(f"module {path!r}: B", b, expect_b)
    weight = layer.base_layer.weight
    return a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype)


def _load_copy(clone: nn.Module, state: dict[str, torch.Tensor] | None, path: str) -> None:
    """Fill a modules_to_save copy from `state`, which must match it key for key and shape for shape."""
    if state is None:
        raise ValueError(f"saved: no weights given for {path!r} (modules_to_save)")
    expected = clone.state_dict()
    for k, v in expected.items():
        if k not in state:
            raise ValueError(f"missing key {path}.{k!r} (modules_to_save)")
        _check_shape(f"'{path}.{k}'", state[k], v.shape)
    for k in state:
        if k not in expected:
            raise ValueError(f"unexpected key {path}.{k!r} (modules_to_save {path!r})")
    clone.load_state_dict(state)


def _check_shape(what: str, tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{what} has shape {tuple(tensor.shape)}, but this model needs {tuple(shape)} "
            "(was the adapter trained on another base model?)"
        )


def _get_adapted(model: nn.Module, path: str) -> nn.Module:
    """The module at `path`, which must exist and be able to carry an adapter."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the adapter names module {path!r}, which this model does not have") from None
    if adaptable_kind(module) is None:
        raise ValueError(f"module {path!r} ({type(module).__name__}) cannot carry a LoRA adapter")
    return module


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the model has no module named {path!r}") from None


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _forget(model: nn.Module) -> None:
    """Drop lorakit's bookkeeping and restore the parameters' requires_grad flags."""
    flags = getattr(model, _GRAD, {})
    for pname, p in model.named_parameters():
        p.requires_grad_(flags.get(pname, True))
    for attr in (_REGISTRY, _ACTIVE, _GRAD):
        if hasattr(model, attr):
            object.__delattr__(model, attr)
