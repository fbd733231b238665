"""Many adapters over one base model: registered by folder, loaded on first use, kept within a
byte budget, least recently used evicted first, some pinned.

Registering reads only the folder's adapter_config.json and checks it against the base model,
so thousands of folders register in moments. Loading is `load_adapter`'s transaction: a bad
folder fails its own load with an AdapterFileError naming the file, and nothing else changes.
The budget is in bytes, not a count: adapters' sizes differ by orders of magnitude with rank.
Loading and evicting cost O(the adapter's size), however many adapters are loaded (the model
walks in lorakit skip the adapters' own modules; see module_tree.base_modules). A PiSSA
adapter is loaded as the plain LoRA adapter it equals (`load_adapter(as_lora=True)`): its
residual must not replace base weights that every other adapter and base request shares.

Torch only, like the core: the HTTP server (app.py) drives a store, and so can any program.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..adapting.manage import delete_adapter
from ..adapting.registry import adapters
from ..config import LoraConfig
from ..files import peft_format as fmt
from ..files.adapter_file import (
    AdapterFileError,
    adapter_state_dict,
    load_adapter,
    read_adapter_config,
    read_tensor_shapes,
)
from ..files.expert_layout import per_expert_parameters
from ..files.peft_params import not_adaptable, targeted_parameters
from ..files.peft_targets import config_targets

# check(folder, config, facts) -> extra facts kept with the entry (e.g. label names); raises
# AdapterFileError when the adapter does not fit what is being served.
Check = Callable[[Path, LoraConfig, dict[str, Any]], dict[str, Any]]


@dataclass
class Entry:
    """A registered adapter."""

    name: str
    folder: Path
    config: LoraConfig
    facts: dict[str, Any]  # read_adapter_config's facts, plus what the store's check added
    pinned: bool = False
    loaded_bytes: int = 0  # the adapter's tensors while loaded; 0 when not
    file_bytes: int = 0  # the weight file's size, known before loading
    loads: int = 0
    error: str | None = field(default=None)  # the last failed load's message


class AdapterStore:
    """Adapters of `model` by name, loaded on demand within `max_loaded_bytes` (None: no limit).

    Not thread-safe: one thread (the server's model thread) drives a store and its model.
    """

    def __init__(self, model: nn.Module, max_loaded_bytes: int | None = None, check: Check | None = None) -> None:
        if max_loaded_bytes is not None and max_loaded_bytes < 0:
            raise ValueError(f"max_loaded_bytes must be >= 0 or None, got {max_loaded_bytes}")
        self.model = model
        self.max_loaded_bytes = max_loaded_bytes
        self.check = check
        self.entries: dict[str, Entry] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()  # loaded names, least recently used first
        self._bytes = 0  # of the loaded adapters
        self.loads = self.evictions = self.failures = 0

    # -- registering -------------------------------------------------------------------------
    def register(self, name: str, folder: str | os.PathLike, *, pin: bool = False) -> Entry:
        """Register adapter `folder` as `name`, reading only its config; AdapterFileError when it
        cannot serve on this base model (nothing is registered then)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.entries:
            raise ValueError(f"an adapter named {name!r} is already registered (from {self.entries[name].folder})")
        folder = Path(folder)
        config, facts = read_adapter_config(folder)
        where = folder / fmt.CONFIG_FILE
        if config.bias != "none":
            raise AdapterFileError(
                f"{where}: bias={config.bias!r} trains the base model's biases; adapters served together share "
                "one base model, so only bias='none' can be served"
            )
        try:  # the modules loading will want, by PEFT's rules (peft_targets.py)
            found = config_targets(self.model, config, facts)
        except ValueError as err:
            raise AdapterFileError(f"{where}: {err}") from None
        parameters = targeted_parameters(self.model, config.target_parameters)  # fused MoE experts
        per_expert = per_expert_parameters(self.model, facts.get("target_modules"))  # or vLLM's layout of them
        other = not_adaptable(self.model, parameters)
        if config.target_parameters and (not parameters or other):
            what = f"selects {other[0]!r}, which lorakit cannot adapt" if other else "selects no parameter of it"
            raise AdapterFileError(
                f"{where}: the adapter does not fit this base model: target_parameters="
                f"{config.target_parameters!r} {what}"
            )
        if found == [] and not parameters and not per_expert:
            raise AdapterFileError(
                f"{where}: the adapter does not fit this base model: target_modules={facts.get('target_modules')!r}"
                f"{'' if config.layers is None else f', layers_to_transform={config.layers}'} "
                "selects none of its modules"
            )
        if self.check is not None:
            facts = {**facts, **self.check(folder, config, facts)}
        weights = folder / fmt.WEIGHTS_FILE
        entry = Entry(
            name, folder, config, facts, pinned=pin, file_bytes=weights.stat().st_size if weights.is_file() else 0
        )
        self.entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Forget adapter `name`, unloading it first."""
        self._entry(name)
        if name in self._recent:
            self._unload(name)
        del self.entries[name]

    def pin(self, name: str, pinned: bool = True) -> None:
        """A pinned adapter, once loaded, is never evicted."""
        self._entry(name).pinned = pinned

    # -- loading -----------------------------------------------------------------------------
    @property
    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._recent)

    @property
    def loaded_bytes(self) -> int:
        return self._bytes

    def acquire(self, names: Iterable[str]) -> dict[str, Exception]:
        """Make `names` loaded for the next forward and mark them used; then evict, least
        recently used first, until the loaded bytes fit the budget again (never one of `names`
        or a pinned adapter, so a batch that needs more than the budget runs over it until the
        next call). Returns the names whose load failed, with the error (an AdapterFileError
        for a bad folder; any other error is one adapter's too, and leaves the model as it was);
        the others are loaded."""
        wanted = list(dict.fromkeys(names))
        failed: dict[str, Exception] = {}
        for name in wanted:
            try:
                self.load(name)
            except Exception as err:
                failed[name] = err
        self._evict(keep=set(wanted))
        return failed

    def load(self, name: str) -> Entry:
        """Load adapter `name` if it is not loaded, and mark it the most recently used."""
        entry = self._entry(name)
        if name in self._recent:
            self._recent.move_to_end(name)
            return entry
        try:
            _refuse_base_tensors(entry.folder)
            load_adapter(
                self.model, entry.folder, name, as_lora=True
            )  # a PiSSA adapter leaves the shared base as it is
        except Exception as err:
            entry.error = str(err)
            self.failures += 1
            raise
        entry.error = None
        entry.loads += 1
        entry.loaded_bytes = sum(t.numel() * t.element_size() for t in adapter_state_dict(self.model, name).values())
        self._recent[name] = None
        self._bytes += entry.loaded_bytes
        self.loads += 1
        return entry

    def _evict(self, keep: set[str]) -> None:
        if self.max_loaded_bytes is None:
            return
        for name in list(self._recent):
            if self._bytes <= self.max_loaded_bytes:
                break
            if self.entries[name].pinned or name in keep:
                continue
            self._unload(name)
            self.evictions += 1

    def _unload(self, name: str) -> None:
        if name in adapters(self.model):
            delete_adapter(self.model, name)
        del self._recent[name]
        self._bytes -= self.entries[name].loaded_bytes
        self.entries[name].loaded_bytes = 0

    def _entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise KeyError(f"no adapter named {name!r} is registered")
        return self.entries[name]


def _refuse_base_tensors(folder: Path) -> None:
    """A file that replaces base tensors (a whole embedding table) would change the base model
    that every other adapter shares."""
    for key in read_tensor_shapes(folder):
        if key.endswith("." + fmt.BASE_WEIGHT):
            raise AdapterFileError(
                f"{folder / fmt.WEIGHTS_FILE}: key {key!r} replaces a base model tensor; adapters served "
                "together share one base model, so such an adapter cannot be served"
            )
