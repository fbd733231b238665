"""The user's model as a tree of named modules, and the rules every part of lorakit reads it by.

One place for: what a lorakit wrapper is (known by a class attribute, so this file imports no
layer), the walks that never enter one, PEFT's name-suffix rule, and the output layer a model
reports. Needs only torch.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def is_lora_layer(module: nn.Module) -> bool:
    """A lorakit LoRA wrapper (`layers.base.LoraLayer`): its frozen layer is `base_layer`."""
    return getattr(type(module), "is_lora_layer", False) is True and hasattr(module, "base_layer")


def is_saved_module(module: nn.Module) -> bool:
    """A module trained in full per adapter (`adapting.saved_modules.SavedModule`)."""
    return getattr(type(module), "is_saved_module", False) is True


def is_wrapper(module: nn.Module) -> bool:
    """Whether lorakit put `module` in the model: nothing inside it is the user's to target."""
    return is_lora_layer(module) or is_saved_module(module)


def unwrapped(module: nn.Module) -> nn.Module:
    """The user's own layer: a LoRA wrapper's base layer, any other module itself."""
    return module.base_layer if is_lora_layer(module) else module


def walk(
    module: nn.Module, prefix: str = "", seen: set[int] | None = None
) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(name, module, parent) for every submodule in `named_modules` order, never entering a
    wrapper: a LoRA layer's base layer is no target of its own, and a module trained in full gets
    no adapters inside. A shared module keeps its first name, as in `named_modules`."""
    seen = {id(module)} if seen is None else seen
    for child_name, child in module.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        name = prefix + child_name
        yield name, child, module
        if not is_wrapper(child):
            yield from walk(child, name + ".", seen)


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`model.named_modules()` without the adapters' own modules (A, B, trained copies): the
    wrappers and, inside them, only the user's layer (`base_layer`, `original`).

    Walking only the base model costs the same with one adapter loaded or a thousand, which keeps
    adding, loading and deleting an adapter O(its size).
    """
    found: list[tuple[str, nn.Module]] = [("", model)]
    seen: set[int] = {id(model)}

    def visit(module: nn.Module, prefix: str) -> None:
        if is_lora_layer(module):
            children = {"base_layer": module.base_layer}
        elif is_saved_module(module):
            children = {"original": module.original}
        else:
            children = module._modules  # named_children would build a generator per module
        for child_name, child in children.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            found.append((prefix + child_name, child))
            visit(child, prefix + child_name + ".")

    visit(model, "")
    return found


def name_matches(name: str, entry: str) -> bool:
    """PEFT's rule: `entry` names the module `name` when it is the whole name or a dotted suffix."""
    return name == entry or name.endswith("." + entry)


def saved_name_matches(name: str, entry: str) -> bool:
    """PEFT's rule for a `modules_to_save` entry: a plain string suffix of the name, dot or not
    ("classifier" takes DistilBERT's "pre_classifier" too, "norm" every "...layernorm")."""
    return name.endswith(entry)


def inside(name: str, entry: str) -> bool:
    """Whether the module `name` is the one `entry` names (PEFT's rule) or sits inside it."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[:depth]), entry) for depth in range(1, len(parts) + 1))


def within(name: str, paths: list[str]) -> bool:
    """Whether the module `name` sits strictly inside one of the modules at `paths`."""
    return any(name.startswith(path + ".") for path in paths)


def output_embeddings(module: nn.Module) -> nn.Module | None:
    """The layer `module.get_output_embeddings()` reports (Transformers' models), else None."""
    getter = getattr(module, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        out = getter()
    except (NotImplementedError, AttributeError):  # backbones without an output layer
        return None
    return out if isinstance(out, nn.Module) else None


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The module at `path`; ValueError naming the path when the model has none."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the model has no module named {path!r}") from None


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path` in place of what is there."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
