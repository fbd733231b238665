"""Adapters over a whole model: inject, add, switch, delete, disable, merge, unload.

The user's model keeps its class: each chosen submodule is replaced in place by a wrapper
holding it (layers/plain.py). Adding an adapter is a transaction: everything is validated and built
aside first, then swapped in (plan.py), so a bad request leaves the model as it was.
`add_adapter` builds fresh weights; `add_adapter_from_tensors` takes given ones (what loading an
adapter file comes down to, adapter_file.py).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..config import LoraConfig
from ..layers import experts
from ..layers.base import LoraLayer
from ..module_tree import base_modules, within
from ..quant.bnb import logical_numel
from ..targets import resolve_targets
from . import pissa
from .given import check_shape, check_values, get_adapted, load_copy
from .plan import (
    build_plan,
    commit,
    saved_module_paths,
    saved_wrapper_paths,
    unwrap,
)
from .registry import (
    AdapterRecord,
    activate,
    active_adapters,
    adapters,
    check_new_name,
    disabled_depth,
    forget,
    lora_layers,
    refuse_if_merged,
    replace_module,
    set_disabled_depth,
    wrappers,
)
from .saved_modules import SavedModule

# ---- public API ----------------------------------------------------------------------------


def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to `model` in place, make it the active one, freeze the rest."""
    add_adapter(model, name, config)
    set_adapter(model, name)
    return model


def add_adapter(model: nn.Module, name: str, config: LoraConfig) -> nn.Module:
    """Add adapter `name` (active only if no other adapter is); see `set_adapter`."""
    check_new_name(model, name)
    _check_config(config)
    refuse_if_merged(model, "adding an adapter")
    exclude = list(config.modules_to_save) + saved_wrapper_paths(model)
    parameters = experts.resolve_parameters(model, config, exclude)
    modules = _resolve_modules(model, config, exclude) if config.targets or not parameters else []
    modules += parameters
    # Nothing inside a module trained in full gets an adapter as well.
    whole = saved_wrapper_paths(model) + saved_module_paths(model, config.modules_to_save)
    modules = [m for m in modules if not within(m, whole)]
    if not modules:
        raise ValueError(f"targets {config.targets!r} match only modules inside modules_to_save")
    commit(model, build_plan(model, name, config, modules))
    return model


def add_adapter_from_tensors(
    model: nn.Module,
    name: str,
    config: LoraConfig,
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    saved: dict[str, dict[str, torch.Tensor]] | None = None,
    base: dict[str, torch.Tensor] | None = None,
    magnitudes: dict[str, torch.Tensor] | None = None,
    trainable: bool = True,
) -> nn.Module:
    """Add adapter `name` with given weights, as one transaction.

    `pairs`: module path -> (A, B), in PEFT's layout and of the rank `config` gives that module.
    `magnitudes`: module path -> DoRA magnitude vector, for each of `pairs`, when config.use_dora.
    `saved`: module path -> state dict of its trained copy, one for each of config.modules_to_save.
    `base`: parameter name -> a value that replaces a base parameter (trained biases, a whole
    embedding table); the value it replaces is kept, and `delete_adapter` / `unload(merge=False)`
    put it back. Everything is checked before anything changes (shapes, NaN or infinite values,
    integer dtypes); a ValueError names the module, parameter or tensor at fault. The adapter
    becomes active if no other adapter is.
    """
    check_new_name(model, name)
    _check_config(config)
    refuse_if_merged(model, "loading an adapter")
    if not pairs:
        raise ValueError("no LoRA weights given (pairs is empty)")
    for path in pairs:
        if not isinstance(path, str):
            raise ValueError(f"pairs must be keyed by module path, got {path!r}")
        get_adapted(model, path)
    if magnitudes and not config.use_dora:
        raise ValueError(f"magnitudes given for {sorted(magnitudes)[0]!r}, but the config has use_dora=False")
    unknown = sorted(set(magnitudes or {}) - set(pairs))
    if unknown:
        raise ValueError(f"magnitudes: {unknown[0]!r} has no (A, B) pair in pairs")
    order = {p: i for i, (p, _) in enumerate(base_modules(model))}
    # An expert parameter not yet adapted sorts right after its experts module, in the forward's order.
    modules = sorted(
        pairs, key=lambda p: (order[p], 0) if p in order else (order[p.rpartition(".")[0]], 1 + ("down" in p))
    )
    plan = build_plan(
        model, name, config, modules, tensors=pairs, magnitudes=(magnitudes or {}) if config.use_dora else None
    )
    saved = saved or {}
    for (_, clone), path in zip(plan.copies, plan.record.saved):
        load_copy(clone, saved.get(path), path)
    unknown = sorted(set(saved) - set(plan.record.saved))
    if unknown:
        raise ValueError(f"saved: {unknown[0]!r} is not one of the modules_to_save {plan.record.saved}")
    params = (
        dict(model.named_parameters(remove_duplicate=False)) if base else {}
    )  # a tied weight answers to each of its names
    for pname, value in (base or {}).items():
        if pname not in params:
            raise ValueError(f"base: the model has no parameter named {pname!r}")
        param = params[pname]
        check_shape(f"{pname!r}", value, param.shape)
        check_values(f"{pname!r}", value)
        owner = next((n for n, r in adapters(model).items() if any(p is param for p, _ in r.replaced)), None)
        if owner is not None:
            raise ValueError(
                f"base: {pname!r} already holds the value adapter {owner!r} brought; "
                "two adapters cannot each replace it"
            )
        plan.base_values.append((param, value.to(param.device, param.dtype)))
        plan.record.replaced.append((param, param.detach().to("cpu", copy=True)))
    plan.record.trainable = trainable
    commit(model, plan)
    return model


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapters (several are summed, each once); only they are trainable.

    At least one name, each once: the base model alone is `disabled(model)`.
    """
    if not isinstance(names, (str, list, tuple)):
        raise ValueError(f"set_adapter takes an adapter name or a list of them, got {names!r}")
    names = [names] if isinstance(names, str) else list(names)
    known = adapters(model)
    if not names:
        raise ValueError(
            "set_adapter needs at least one adapter name; for the base model alone use lorakit.disabled(model)"
        )
    repeated = sorted({n for n in names if names.count(n) > 1}, key=names.index)
    if repeated:
        raise ValueError(f"adapter {repeated[0]!r} is named more than once in {names}; each active adapter counts once")
    for n in names:
        if n not in known:
            raise ValueError(f"no adapter named {n!r}; the model has {sorted(known) or 'none'}")
    refuse_if_merged(model, "switching adapters")
    for path, module in wrappers(model):
        if isinstance(module, SavedModule) and sum(n in module.copies for n in names) > 1:
            raise ValueError(
                f"adapters {[n for n in names if n in module.copies]} each train their own copy of {path!r} "
                "(modules_to_save); only one of them can be active at a time"
            )
    activate(model, names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; wrappers left with no adapter are unwrapped.

    What the adapter changed in the base (a PiSSA residual, a replaced embedding table or bias)
    is put back. If it was the only active adapter, the oldest remaining one becomes active (as
    in PEFT), so a model with adapters always has one active.
    """
    known = adapters(model)
    if name not in known:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(known) or 'none'}")
    if any(name in m.merged for m in lora_layers(model)):
        raise ValueError(f"adapter {name!r} is merged into the weights; call lorakit.unmerge(model) first")
    was_active = name in active_adapters(model)
    _give_back_base(model, known[name])
    for path, module in wrappers(model):
        if isinstance(module, LoraLayer) and name in module.adapter_names:
            module.detach_adapter(name)
            if not module.adapter_names:
                unwrap(model, path, module)
        elif isinstance(module, SavedModule) and name in module.copies:
            del module.copies[name]
            module.active = [n for n in module.active if n != name]
            if not len(module.copies):
                replace_module(model, path, module.original)
    del known[name]
    if not known:
        forget(model)
    elif was_active:  # the oldest remaining adapter takes over if none is left active (as in PEFT)
        activate(model, [n for n in active_adapters(model) if n != name] or [next(iter(known))])
    # An inactive adapter's going changes no active list and no requires_grad: nothing to redo.


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is the base model (docs/guarantees.md: PiSSA, trained biases).

    Blocks nest: adapters come back when the outermost one closes, however it closes. Adapters
    added inside a block are off until then too; merging inside one is refused.
    """
    refuse_if_merged(model, "disabling adapters")
    set_disabled_depth(model, disabled_depth(model) + 1)
    _set_enabled(model, False)
    try:
        yield model
    finally:
        set_disabled_depth(model, max(disabled_depth(model) - 1, 0))
        if disabled_depth(model) == 0:
            _set_enabled(model, True)


def merge(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Fold every active adapter into its base weight (the model then runs at base speed).

    A quantized base weight (4- or 8-bit) is merged into only with `requantize=True`: it is
    dequantized, added to and quantized again, and the largest weight error that makes is
    reported as a warning (see layers/quantized.py; `dequantize` first to merge exactly).
    """
    _refuse_if_disabled(model, "merge")
    _refuse_tied(model)
    _check_merge(model, requantize)
    for layer in lora_layers(model):
        layer.merge(requantize=requantize)
    errors = [e for e in (getattr(layer, "requantize_error", None) for layer in lora_layers(model)) if e is not None]
    if requantize and errors:
        warnings.warn(
            f"merged by re-quantizing {len(errors)} quantized weights; largest weight error {max(errors):.3g}",
            stacklevel=2,
        )
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights."""
    for layer in lora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every LoRA module and give the plain model back.

    merge=True keeps the active adapters' effect (folded into the weights, the trained copies of
    modules_to_save in place); merge=False restores the original modules, weights as they were
    (what adapters changed in the base is put back: PiSSA residuals to float rounding, replaced
    embedding tables and biases exactly).
    """
    if merge:
        _refuse_if_disabled(model, "unload(merge=True)")
        _refuse_tied(model)
        _check_merge(model, requantize=False)
    for layer in lora_layers(model):
        layer.merge() if merge else layer.unmerge()
    if not merge:
        for record in adapters(model).values():
            _give_back_base(model, record)
    for path, module in wrappers(model):
        if isinstance(module, LoraLayer):
            unwrap(model, path, module)
        elif isinstance(module, SavedModule):
            replace_module(model, path, module.current if merge else module.original)
    forget(model)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each tensor counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(logical_numel(p) for p in seen.values() if p.requires_grad)
    return trainable, sum(logical_numel(p) for p in seen.values())


# ---- small helpers -------------------------------------------------------------------------


def _resolve_modules(model: nn.Module, config: LoraConfig, exclude: list[str]) -> list[str]:
    try:
        return resolve_targets(
            model, config.targets, config.layers, exclude=exclude, layers_pattern=config.layers_pattern
        )
    except ValueError as err:
        hint = experts.expert_hint(model, config.targets)
        if hint:
            raise ValueError(f"{err}\n{hint}".rstrip()) from None
        raise


def _check_config(config: LoraConfig) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakit.LoraConfig, got {type(config).__name__} {config!r}"[:200])


def _check_merge(model: nn.Module, requantize: bool) -> None:
    """Every layer's refusal (a quantized base) before any layer merges."""
    for path, layer in wrappers(model):  # the layers merge walks (lora_layers), with their paths
        if isinstance(layer, LoraLayer):
            try:
                layer.check_merge(requantize)
            except ValueError as err:
                raise ValueError(f"cannot merge into {path!r}: {err}") from None


def _refuse_if_disabled(model: nn.Module, doing: str) -> None:
    if disabled_depth(model):
        raise ValueError(f"adapters are disabled (inside lorakit.disabled(model)); {doing} after the block")


def _set_enabled(model: nn.Module, enabled: bool) -> None:
    for _, m in wrappers(model):
        m.enabled = enabled


@torch.no_grad()
def _give_back_base(model: nn.Module, record: AdapterRecord) -> None:
    """Undo what an adapter did to the base: its PiSSA residuals, the base tensors it replaced."""
    pissa.restore_base(model, record)
    for param, value in record.replaced:
        param.copy_(value)


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
                    f"cannot merge into {path!r}: its weight is tied to "
                    f"{[t for t in tied if not t.startswith(path + '.')]}, "
                    "which merging would change too; keep this adapter unmerged"
                )
