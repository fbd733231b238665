"""Which modules an adapter_config.json targets on a given model, by PEFT's own rules.

Loading compares this set with the modules the weight file holds pairs for, both ways: a pair
the config does not target (PEFT would skip it without a word) and a target without weights are
both refused. lorakit's own `targets` (targets.py) choose modules for a new adapter and may be
smarter; a file on disk means what PEFT makes of it. PEFT's rules (its
`check_target_module_exists` and all-linear expansion, as of 0.21), restated:

- `exclude_modules`: a string is a regex over the whole module name; a list names a module by
  its whole name or by a dotted suffix. Modules inside `modules_to_save` are never targets.
- `target_modules` as a string: "all-linear" (every Linear and Conv1D but the output layer; for
  SEQ_CLS without one, but the `score` / `classifier` head) or a regex over the whole name.
- as a list: an entry equal to the whole name selects it outright; otherwise an entry must be a
  dotted suffix, and `layers_to_transform` then filters by block index: the number after the
  first segment matching `layers_pattern`, or without one the first "<segment>.<number>." that
  has a segment before it. A name with no index is not selected.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..module_tree import (
    base_modules,
    is_wrapper,
    name_matches,
    output_embeddings,
    saved_name_matches,
    unwrapped,
    within,
)
from ..targets import CLASSIFIER_HEADS, adaptable_modules, layer_index

ALL_LINEAR = "all-linear"
# Without layers_pattern, PEFT takes the first "<segment>.<number>." after at least one segment.
_FIRST_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


def targeted_modules(
    model: nn.Module,
    target_modules: Any,
    *,
    layers: list[int] | None = None,
    layers_pattern: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    modules_to_save: list[str] = (),
    task_type: str | None = None,
) -> list[str] | None:
    """The adaptable modules the config selects, in model order; None when it names no targets
    (null or empty target_modules), where the file's own keys are all there is to go by."""
    if target_modules is None or target_modules == []:
        return None
    names = adaptable_modules(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        skip = _output_layers(model, task_type)
        linear = {n for n in names if _is_linear(model.get_submodule(n))}
        chosen = [n for n in names if n in linear and n not in skip]
    elif isinstance(target_modules, str):
        chosen = [n for n in names if re.fullmatch(target_modules, n)]
    else:
        chosen = [n for n in names if _listed(n, list(target_modules), layers, layers_pattern)]
    return [n for n in chosen if not _excluded(n, exclude, modules_to_save)]


def config_targets(model: nn.Module, config: Any, facts: dict[str, Any]) -> list[str] | None:
    """`targeted_modules` for an adapter file: its `adapter_config.json` as read (`facts`) and as a
    `LoraConfig` (`config`: layers, layers_pattern, modules_to_save). ValueError naming the keys
    when target_modules or exclude_modules is no valid regex."""
    try:
        return targeted_modules(
            model,
            facts.get("target_modules"),
            layers=config.layers,
            layers_pattern=config.layers_pattern,
            exclude=facts.get("exclude_modules"),
            modules_to_save=config.modules_to_save,
            task_type=facts.get("task_type"),
        )
    except re.error as err:
        raise ValueError(f"target_modules or exclude_modules is not a valid regex: {err}") from None


def peft_saved_modules(model: nn.Module, entries: list[str]) -> list[str]:
    """The modules PEFT trains in full for `modules_to_save` entries, in model order.

    PEFT's rule is a plain string suffix: "classifier" takes DistilBERT's "pre_classifier" too, and
    "norm" every "...layernorm". Where such modules nest, the outer one is taken (PEFT wraps it
    first). Nothing inside a lorakit wrapper counts.
    """
    chosen: list[str] = []
    modules = base_modules(model)  # not the adapters' own modules: O(the base), however many are loaded
    for name, _ in modules:
        if not name or within(name, chosen):
            continue
        if any(saved_name_matches(name, entry) for entry in entries):
            chosen.append(name)
    wrappers = [n for n, m in modules if is_wrapper(m)]
    return [c for c in chosen if not within(c, wrappers)]


def _listed(name: str, entries: list[str], layers: list[int] | None, pattern: str | list[str] | None) -> bool:
    if name in entries:
        return True  # a whole name: no layer filter
    if not any(name_matches(name, e) for e in entries):
        return False
    if not layers:  # None or [] mean every block
        return True
    if pattern:
        index = layer_index(name, pattern)
    else:
        found = _FIRST_INDEX.match(name)
        index = int(found.group(1)) if found else None
    return index is not None and index in layers


def _excluded(name: str, exclude: str | list[str] | None, modules_to_save: list[str]) -> bool:
    if isinstance(exclude, str):
        if re.fullmatch(exclude, name):
            return True
    elif exclude and any(name_matches(name, e) for e in exclude):
        return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _is_linear(module: nn.Module) -> bool:
    base = unwrapped(module)
    return isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D"


def _output_layers(model: nn.Module, task_type: str | None) -> set[str]:
    """The module PEFT's all-linear leaves out: the output embedding, else a SEQ_CLS head."""
    out = output_embeddings(model)
    if out is None and task_type == "SEQ_CLS":
        out = next((getattr(model, n) for n in CLASSIFIER_HEADS if getattr(model, n, None) is not None), None)
    if not isinstance(out, nn.Module):
        return set()
    return {name for name, module in base_modules(model) if module is out}
