"""The wrappers of each kind of layer: Linear (and GPT-2's Conv1D), Embedding, Conv1d / Conv2d.

output = base(x) + sum over active adapters of scaling * B(A(dropout(x)))   (Hu et al., 2021)

What they share (adapters by name, active set, merge, DoRA hooks) is `LoraLayer` in
layer_base.py; here each kind's shapes of A and B, its delta, and LoraLinear's fast path
(fused.py). `wrapper_for` picks the class for a kind from targets.adaptable_kind.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import dora
from .fused import Adapter, autocast_on, lora_linear
from .init_schemes import olora_pair, pissa_pair
from .layer_base import LoraLayer, _precise
from .targets import QUANTIZED_KINDS, adaptable_kind

__all__ = ["LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear", "wrapper_for"]


class LoraLinear(LoraLayer):
    """nn.Linear, or Transformers' Conv1D (weight stored (in, out): fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = adaptable_kind(base_layer) == "conv1d_transposed"
        weight = base_layer.weight
        self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.out_dim = 1 if self.fan_in_fan_out else 0
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def pair_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.in_features), (self.out_features, rank)

    def _store_pair(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_A[name] = _linear_holding(a).train(self.training)
        self.lora_B[name] = _linear_holding(b).train(self.training)

    def _drop_pair(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _base_weight_oi(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def pissa(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b, residual = pissa_pair(self._base_weight_oi(), rank, scaling)
        return a, b, (residual.T.contiguous() if self.fan_in_fan_out else residual)

    def olora(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b, residual = olora_pair(self._base_weight_oi(), rank, scaling)
        return a, b, (residual.T.contiguous() if self.fan_in_fan_out else residual)

    def delta_from(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        delta = (_precise(b) @ _precise(a)) * scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.pair(name)
        return F.linear(F.linear(x.to(a.dtype), a), b) * self.scaling[name]

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._base_weight_oi())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:
            return self.routing.forward(self, x)
        prepared = self._prepared or self._prepare()
        if not prepared.live:
            return self.base_layer(x)
        base = self.base_layer
        adapters = prepared.adapters
        if (
            adapters is None
            or x.dtype != prepared.dtype
            or base._forward_hooks
            or base._forward_pre_hooks
            or autocast_on(x.device.type)
        ):
            return self.reference_forward(x)
        if prepared.dora:
            return self._dora_forward(prepared.live, x)
        return lora_linear(x, base.weight, base.bias, adapters, self.fan_in_fan_out, self.training)

    def _prepare(self) -> _Prepared:
        """The live adapters, and for `fused.lora_linear` their tensors, or None where only the
        reference is exact: a base class other than Linear / Conv1D (its own forward), or adapters
        of another dtype than the base weight. Hooks, the input's dtype and autocast are checked
        on every call."""
        live = self._live()
        base = self.base_layer
        dtype = base.weight.dtype
        adapters: list[Adapter] | None = []
        if type(base) is not nn.Linear and not self.fan_in_fan_out:
            adapters = None
        for name in live if adapters is not None else ():
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            if a.dtype != dtype or b.dtype != dtype:
                adapters = None
                break
            adapters.append(Adapter(a, b, self.scaling[name], self.dropout[name]))
        self._prepared = _Prepared(live, adapters, dtype, any(self.is_dora(n) for n in live))
        return self._prepared

    def _dora_forward(self, live: list[str], x: torch.Tensor) -> torch.Tensor:
        """DoRA's fast path (dora.py) for one live DoRA adapter without dropout; otherwise the reference."""
        name = live[0]
        if len(live) == 1 and not (self.training and self.dropout[name]):
            return dora.linear_forward(self, name, x)
        return self.reference_forward(x)


class LoraEmbedding(LoraLayer):
    """nn.Embedding: A (r, num_embeddings) is looked up like the table, B (dim, r) expands it."""

    lookup_table = True
    out_dim = 1  # the table is (num_embeddings, dim): DoRA's norm is per dimension

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def pair_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num, dim = self.base_layer.weight.shape
        return (rank, num), (dim, rank)

    def _store_pair(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)

    def _drop_pair(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def delta_from(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        return (_precise(b) @ _precise(a)).T * scaling  # (num, dim)

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.pair(name)
        base = self.base_layer
        rows = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (rows @ b.T) * self.scaling[name]


class LoraConv(LoraLayer):
    """nn.Conv1d / nn.Conv2d: A is a conv with the base's kernel into r channels, B a 1x1 conv."""

    channels_first = True

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on a grouped convolution (groups={base_layer.groups}) is not supported")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _conv(self, weight: torch.Tensor, like_base: bool) -> nn.Module:
        base = self.base_layer
        conv = type(base)(
            weight.shape[1],
            weight.shape[0],
            weight.shape[2:],
            stride=base.stride if like_base else 1,
            padding=base.padding if like_base else 0,
            dilation=base.dilation if like_base else 1,
            bias=False,
            padding_mode=base.padding_mode if like_base else "zeros",
            device="meta",
        )
        conv.weight = nn.Parameter(weight)
        return conv

    def pair_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        w = self.base_layer.weight  # (out, in, *kernel)
        ones = (1,) * (w.dim() - 2)
        return (rank, w.shape[1], *w.shape[2:]), (w.shape[0], rank, *ones)

    def _store_pair(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_A[name] = self._conv(a, like_base=True).train(self.training)
        self.lora_B[name] = self._conv(b, like_base=False).train(self.training)

    def _drop_pair(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_from(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        b2 = _precise(b).flatten(1)  # (out, r): B is 1x1
        return torch.einsum("or,r...->o...", b2, _precise(a)) * scaling

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x = x.to(self.pair(name)[0].dtype)
        return self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.base_layer.weight, None)

    def magnitude_shape(self) -> tuple[int, ...]:
        w = self.base_layer.weight  # PEFT keeps a conv's magnitude as (1, out, 1, ...)
        return (1, w.shape[0]) + (1,) * (w.dim() - 2)


class _Prepared(NamedTuple):
    """What LoraLinear.forward needs, built when the adapters or their state change."""

    live: list[str]
    adapters: list[Adapter] | None  # None: only the reference path is exact
    dtype: torch.dtype
    dora: bool  # a live adapter is DoRA's: dora.linear_forward, not fused.lora_linear


def _linear_holding(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear whose weight is exactly `weight` (no init work, no copy)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight)
    return layer


def wrapper_for(kind: str) -> type[LoraLayer]:
    """The wrapper class for a kind reported by `targets.adaptable_kind`."""
    if kind in QUANTIZED_KINDS:
        from .quantized_layer import LoraQuantLinear  # it builds on this file

        return LoraQuantLinear
    return {"linear": LoraLinear, "conv1d_transposed": LoraLinear, "embedding": LoraEmbedding, "conv": LoraConv}[kind]
