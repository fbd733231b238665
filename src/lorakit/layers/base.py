"""The base of every LoRA wrapper: a frozen base layer plus named low-rank adapters.

output = base(x) + sum over active adapters of scaling * B(A(dropout(x)))   (Hu et al., 2021)

`LoraLayer` holds the original module as `base_layer` and knows its adapters by name: the active
set, merge state, enable flag, DoRA magnitudes (their math is in dora.py) and what forward
caches. Merge is explicit: `merge()` adds scaling * B A into the base weight, `unmerge()` takes
it out. Each kind of layer (plain.py, quantized.py) supplies the per-kind pieces and
names the fast kernels that may compute it (`kernels`).

`forward` asks dispatch.py, the one place that chooses how a layer computes its output: the
plain `reference_forward` below, or a fast kernel that tests pin to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, dora
from .init_schemes import init_pair
from .precision import precise


class LoraLayer(nn.Module):
    """What every wrapper shares: adapters by name, the active set, merge state, enable flag."""

    is_lora_layer = True  # how targets.py knows a wrapper without importing this file
    supports_dora = True  # False where the base weight cannot take DoRA's norm (a quantized one)
    lookup_table = False  # A is indexed by token ids (embeddings), which changes its init and file keys
    out_dim = 0  # the base weight's axis of output features (DoRA's norm is one per output)
    channels_first = False  # outputs carry their features on axis 1 (convolutions), not last
    routing = None  # inside lorakit.mixed_batch: the batch's per-row routes (mixed.MixedBatch)
    kernels: tuple[dispatch.Kernel, ...] = ()  # the fast computations of this kind (dispatch.py)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        # What the forward paths (dispatch.py, mixed.py) work out for the present adapters, each
        # under its own keys; emptied whenever the adapters, active set, merge state or tensors change.
        self.forward_cache: dict = {}
        self._pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {}  # see pairs()
        self.dora_norms = dora.NormCache()  # DoRA: each adapter's weight norm, while unchanged
        self.dora_merged: dict[str, torch.Tensor] = {}  # DoRA: g of each merged adapter, for unmerge
        self.active: list[str] = []
        self.merged: list[str] = []
        self.enabled = True
        # Parameters replaced by load_state_dict(assign=True) must not stay in the cache.
        self.register_load_state_dict_post_hook(_loaded)

    # -- what forward caches, and what clears it ---------------------------------------------
    @property
    def active(self) -> list[str]:
        return self._active

    @active.setter
    def active(self, names: list[str]) -> None:
        self._active = names
        self._changed()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._enabled = on
        self._changed()

    def _changed(self) -> None:
        """The adapters, the active set, the merge state or the tensors changed: rebuild on next forward."""
        self.forward_cache = {}

    def _tensors_changed(self) -> None:
        """The adapters' tensors may be new objects: forget every cached reference to them."""
        self._pairs = None
        self._changed()

    def _apply(self, fn, recurse: bool = True):
        self._tensors_changed()  # .to(), .half(), .cuda() may give new tensors of another dtype
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # A copy holds its own tensors, not these.
        return dict(self.__dict__, _pairs=None, forward_cache={})

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every adapter's (A, B) by name; kept up to date as adapters come and go, so that
        reading it costs a dict lookup per adapter (what mixed_batch does per layer)."""
        if self._pairs is None:
            self._pairs = {name: self.pair(name) for name in self.scaling}
        return self._pairs

    # -- per-kind pieces -------------------------------------------------------------------
    def pair_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of A and B for an adapter of `rank` on this layer."""
        raise NotImplementedError

    def _store_pair(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        raise NotImplementedError

    def _drop_pair(self, name: str) -> None:
        raise NotImplementedError

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) parameters of adapter `name`, in PEFT's layout."""
        raise NotImplementedError

    def delta_from(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """scaling * B A in the base weight's layout (float32, or float64 for a float64 layer)."""
        raise NotImplementedError

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """scaling * B(A(x)) of adapter `name`, no dropout: what it adds to the output."""
        raise NotImplementedError

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output on `x` without its bias (DoRA rescales it)."""
        raise NotImplementedError

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.forward(self, x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain computation every fast kernel must reproduce: the base layer's own output,
        then each live adapter in turn (a LoRA adapter adds its delta; a DoRA adapter rescales
        what came before it, dora.reference_step)."""
        result = self.base_layer(x)
        for name in self.live_adapters():
            if self.is_dora(name):
                result = dora.reference_step(self, name, x, result)
            else:
                result = result + self.adapter_delta(x, name)
        return result

    def live_adapters(self) -> list[str]:
        """Active adapters not folded into the base weight: the ones forward must add."""
        if not self.enabled:
            return []
        return [n for n in self.active if n not in self.merged]

    def adapter_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """What adapter `name` alone adds to the base output, its dropout applied while training
        (for DoRA the change of the whole output, dora.output_change: what mixed.py routes)."""
        p = self.dropout[name] if self.training and not self.lookup_table else 0.0  # no dropout on token ids
        if p:
            x = F.dropout(x.to(self.pair(name)[0].dtype), p, True)
        if self.is_dora(name):
            return dora.output_change(self, name, x)
        return self.lora_delta(x, name)

    _delta = adapter_delta  # the name tests/adapting/test_manage.py still calls

    # -- shared ------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def rank(self, name: str) -> int:
        return self.pair(name)[0].shape[0]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A of adapter `name` in the base weight's layout (see `delta_from`)."""
        a, b = self.pair(name)
        return self.delta_from(a, b, self.scaling[name])

    # -- DoRA --------------------------------------------------------------------------------
    @property
    def lora_magnitude(self) -> nn.ParameterDict:
        """DoRA adapters' magnitude vectors by name (created with the first one)."""
        if "lora_magnitude" not in self._modules:
            return nn.ParameterDict()
        return self._modules["lora_magnitude"]

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude

    def magnitude_shape(self) -> tuple[int, ...]:
        """The shape of a DoRA magnitude vector on this layer (PEFT's file shape)."""
        return (self.base_layer.weight.shape[self.out_dim],)

    def initial_magnitude(
        self, a: torch.Tensor, b: torch.Tensor, scaling: float, base_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """DoRA's m for a new (A, B): ||W + s B A|| per output, W the base weight (or `base_weight`)."""
        weight = self.base_layer.weight if base_weight is None else base_weight
        return dora.initial_magnitude(self, a, b, scaling, weight)

    def adapter_placement(self) -> tuple[torch.device, torch.dtype]:
        """Where new adapter tensors live: the base weight's device and dtype."""
        w = self.base_layer.weight
        return w.device, w.dtype

    def _new_pair(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty (A, B) tensors of this layer's shapes, where `adapter_placement` says."""
        device, dtype = self.adapter_placement()
        return tuple(torch.empty(shape, device=device, dtype=dtype) for shape in self.pair_shapes(rank))

    def build_pair(self, rank: int, init: str) -> tuple[torch.Tensor, torch.Tensor]:
        """New (A, B) for `init` in "default" / "gaussian"; built aside, not yet attached."""
        a, b = self._new_pair(rank)
        init_pair(init, a, b, embedding=self.lookup_table)
        return a, b

    def pissa(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, residual base weight) for PiSSA init; the caller swaps the residual in."""
        raise ValueError(f"init='pissa' needs a linear layer, not {type(self.base_layer).__name__}")

    def olora(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, residual base weight) for OLoRA init; the caller swaps the residual in."""
        raise ValueError(f"init='olora' needs a linear layer, not {type(self.base_layer).__name__}")

    def attach(
        self,
        name: str,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        dropout: float,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        """Add adapter `name` from ready tensors (no validation: the caller checked); with a
        `magnitude` it is a DoRA adapter."""
        self._store_pair(name, a, b)
        self.scaling[name] = scaling
        self.dropout[name] = dropout
        if magnitude is not None:
            if "lora_magnitude" not in self._modules:
                self.lora_magnitude = nn.ParameterDict()
            self.lora_magnitude[name] = nn.Parameter(magnitude)
        if self._pairs is not None:
            self._pairs[name] = self.pair(name)
        self._changed()

    def detach_adapter(self, name: str) -> None:
        self._drop_pair(name)
        del self.scaling[name], self.dropout[name]
        if self.is_dora(name):
            del self.lora_magnitude[name]
        if self._pairs is not None:
            self._pairs.pop(name, None)
        self.active = [n for n in self.active if n != name]  # clears the cache too
        self.dora_norms.clear()

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s parameters by role ("A", "B", DoRA's "m"); peft_format maps roles to file keys."""
        a, b = self.pair(name)
        if self.is_dora(name):
            return {"A": a, "B": b, "m": self.lora_magnitude[name]}
        return {"A": a, "B": b}

    def check_merge(self, requantize: bool = False) -> None:
        """Raise ValueError if `merge` cannot fold the active adapters in (nothing changes here).

        Only a quantized base refuses: merging into it re-quantizes, which must be asked for
        with `requantize=True` (quantized.py).
        """

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        weight = self.base_layer.weight
        if not self.merged and weight.dtype != torch.float32:
            # Half-precision rounding would keep merge + unmerge from giving the weight back.
            self._unmerged_weight = weight.detach().clone()
        todo = [n for n in self.active if n not in self.merged]
        # DoRA's norms come from the weight before anything is folded in, as in forward.
        unmerged = precise(weight.detach()).clone() if any(self.is_dora(n) for n in todo) else None
        for name in todo:
            if self.is_dora(name):
                dora.merge(self, name, unmerged)
            else:
                self._add_to_base(self.delta_weight(name))
            self.merged.append(name)
        self.dora_norms.clear()
        self._changed()

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            if name in self.dora_merged:
                dora.unmerge(self, name)
            else:
                self._add_to_base(-self.delta_weight(name))
        saved = self.__dict__.pop("_unmerged_weight", None)
        if saved is not None:
            self.base_layer.weight.copy_(saved)
        self.dora_norms.clear()
        self._changed()

    def _add_to_base(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        if weight.dtype == torch.float32:
            weight.data.add_(delta)
        else:  # add in float32, round once
            weight.data.copy_(precise(weight.data) + delta)

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.adapter_names}
        doras = [n for n in self.adapter_names if self.is_dora(n)]
        return f"adapters={ranks}, active={self.active}, merged={self.merged}" + (f", dora={doras}" if doras else "")


def _loaded(module: LoraLayer, _keys) -> None:
    module._tensors_changed()
