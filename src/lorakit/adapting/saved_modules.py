"""Modules trained in full next to the adapters (`modules_to_save`, e.g. a classifier head).

Each adapter gets its own copy of the module; the original stays frozen and untouched, so
with adapters disabled the model is exactly the base model.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class SavedModule(nn.Module):
    is_saved_module = True
    routing = None  # inside lorakit.mixed_batch: the batch's per-row routes (mixed.MixedBatch)

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.enabled = True

    def new_copy(self) -> nn.Module:
        """A trainable copy of the original, built aside (the caller attaches it)."""
        clone = copy.deepcopy(self.original)
        for p in clone.parameters():
            p.requires_grad_(True)
        return clone

    @property
    def current(self) -> nn.Module:
        if self.enabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routing is not None:
            return self.routing.forward_saved(self, args, kwargs)
        return self.current(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Code that reads attributes of the wrapped module (e.g. `head.weight`) keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original", "copies", "active", "enabled", "routing"):
                raise
            return getattr(self.current, name)
