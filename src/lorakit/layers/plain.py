"""The wrappers of each kind of layer: Linear (and GPT-2's Conv1D), Embedding, Conv1d / Conv2d.

output = base(x) + sum over active adapters of scaling * B(A(dropout(x)))   (Hu et al., 2021)

What they share (adapters by name, active set, merge, DoRA hooks, forward) is `LoraLayer` in
base.py; here each kind's shapes of A and B, its delta, and the fast kernels that may
compute it (dispatch.py chooses). The quantized linear is quantized.py; kinds.py maps
each kind of module (targets.adaptable_kind) to its class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import adaptable_kind
from . import dispatch, torch_internals
from .base import LoraLayer
from .init_schemes import olora_pair, pissa_pair
from .precision import precise

__all__ = ["LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear"]


class LoraLinear(LoraLayer):
    """nn.Linear, or Transformers' Conv1D (weight stored (in, out): fan_in_fan_out)."""

    kernels = (dispatch.LINEAR_LORA, dispatch.LINEAR_DORA)

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
        delta = (precise(b) @ precise(a)) * scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.pair(name)
        return F.linear(F.linear(x.to(a.dtype), a), b) * self.scaling[name]

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._base_weight_oi())


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
        return (precise(b) @ precise(a)).T * scaling  # (num, dim)

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.pair(name)
        base = self.base_layer
        rows = F.embedding(
            x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
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
        b2 = precise(b).flatten(1)  # (out, r): B is 1x1
        return torch.einsum("or,r...->o...", b2, precise(a)) * scaling

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x = x.to(self.pair(name)[0].dtype)
        return self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return torch_internals.conv_without_bias(self.base_layer, x)

    def magnitude_shape(self) -> tuple[int, ...]:
        w = self.base_layer.weight  # PEFT keeps a conv's magnitude as (1, out, 1, ...)
        return (1, w.shape[0]) + (1,) * (w.dim() - 2)


def _linear_holding(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear whose weight is exactly `weight` (no init work, no copy)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight)
    return layer
