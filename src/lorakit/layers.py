"""The wrapping LoRA layers: a frozen base layer plus named low-rank adapters.

output = base(x) + sum over active adapters of scaling * B(A(dropout(x)))   (Hu et al., 2021)

Each wrapper holds the original module as `base_layer` and knows its adapters by name. Merge
is explicit: `merge()` adds scaling * B A into the base weight, `unmerge()` takes it out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused import Adapter, autocast_on, lora_linear
from .init_schemes import init_pair, pissa_pair
from .targets import QUANTIZED_KINDS, adaptable_kind


class LoraLayer(nn.Module):
    """What every wrapper shares: adapters by name, the active set, merge state, enable flag."""

    is_lora_layer = True  # how targets.py knows a wrapper without importing this file
    lookup_table = False  # A is indexed by token ids (embeddings), which changes its init and file keys

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.enabled = True

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

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A in the base weight's layout (float32)."""
        raise NotImplementedError

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def rank(self, name: str) -> int:
        return self.pair(name)[0].shape[0]

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

    def attach(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float) -> None:
        """Add adapter `name` from ready tensors (no validation: the caller checked)."""
        self._store_pair(name, a, b)
        self.scaling[name] = scaling
        self.dropout[name] = dropout

    def detach_adapter(self, name: str) -> None:
        self._drop_pair(name)
        del self.scaling[name], self.dropout[name]
        self.active = [n for n in self.active if n != name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s parameters by role ("A", "B"); peft_format maps roles to file keys."""
        a, b = self.pair(name)
        return {"A": a, "B": b}

    def _live(self) -> list[str]:
        """Active adapters not folded into the base weight: the ones forward must add."""
        if not self.enabled:
            return []
        return [n for n in self.active if n not in self.merged]

    def check_merge(self, requantize: bool = False) -> None:
        """Raise ValueError if `merge` cannot fold the active adapters in (nothing changes here).

        Only a quantized base refuses: merging into it re-quantizes, which must be asked for
        with `requantize=True` (quantized_layer.py).
        """

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        weight = self.base_layer.weight
        if not self.merged and weight.dtype != torch.float32:
            # Half-precision rounding would keep merge + unmerge from giving the weight back.
            self._unmerged_weight = weight.detach().clone()
        for name in self.active:
            if name not in self.merged:
                self._add_to_base(self.delta_weight(name))
                self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            self._add_to_base(-self.delta_weight(self.merged.pop()))
        saved = self.__dict__.pop("_unmerged_weight", None)
        if saved is not None:
            self.base_layer.weight.copy_(saved)

    def _add_to_base(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        if weight.dtype == torch.float32:
            weight.data.add_(delta)
        else:  # add in float32, round once
            weight.data.copy_(weight.data.float() + delta)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain computation the fast path must reproduce."""
        result = self.base_layer(x)
        for name in self._live():
            result = result + self._delta(x, name)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference_forward(x)

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.adapter_names}
        return f"adapters={ranks}, active={self.active}, merged={self.merged}"


class LoraLinear(LoraLayer):
    """nn.Linear, or Transformers' Conv1D (weight stored (in, out): fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = adaptable_kind(base_layer) == "conv1d_transposed"
        weight = base_layer.weight
        self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def pair_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.in_features), (self.out_features, rank)

    def _store_pair(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_A[name] = _linear_holding(a)
        self.lora_B[name] = _linear_holding(b)

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

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.pair(name)
        delta = (b.float() @ a.float()) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.pair(name)
        x = x.to(a.dtype)
        x = F.dropout(x, self.dropout[name], self.training) if self.dropout[name] else x
        return F.linear(F.linear(x, a), b) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        live = self._live()
        if not live:
            return self.base_layer(x)
        adapters = self._fast_adapters(live, x)
        if adapters is None:
            return self.reference_forward(x)
        return self._fast_forward(x, adapters)

    def _fast_forward(self, x: torch.Tensor, adapters: list[Adapter]) -> torch.Tensor:
        base = self.base_layer
        return lora_linear(x, base.weight, base.bias, adapters, self.fan_in_fan_out, self.training)

    def _fast_adapters(self, live: list[str], x: torch.Tensor) -> list[Adapter] | None:
        """The live adapters for `fused.lora_linear`, or None where only the reference is exact:
        a base class other than Linear / Conv1D (its own forward), hooks on the base layer, mixed
        dtypes, autocast."""
        base = self.base_layer
        if type(base) is not nn.Linear and not self.fan_in_fan_out:
            return None
        if base._forward_hooks or base._forward_pre_hooks:
            return None
        dtype = base.weight.dtype
        if x.dtype != dtype or autocast_on(x.device.type):
            return None
        adapters = []
        for name in live:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            if a.dtype != dtype or b.dtype != dtype:
                return None
            adapters.append(Adapter(a, b, self.scaling[name], self.dropout[name]))
        return adapters


class LoraEmbedding(LoraLayer):
    """nn.Embedding: A (r, num_embeddings) is looked up like the table, B (dim, r) expands it."""

    lookup_table = True

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

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.pair(name)
        return (b.float() @ a.float()).T * self.scaling[name]  # (num, dim)

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # Dropout does not apply: the input is token ids.
        a, b = self.pair(name)
        base = self.base_layer
        rows = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (rows @ b.T) * self.scaling[name]


class LoraConv(LoraLayer):
    """nn.Conv1d / nn.Conv2d: A is a conv with the base's kernel into r channels, B a 1x1 conv."""

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
        self.lora_A[name] = self._conv(a, like_base=True)
        self.lora_B[name] = self._conv(b, like_base=False)

    def _drop_pair(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.pair(name)
        b2 = b.float().flatten(1)  # (out, r): B is 1x1
        return torch.einsum("or,r...->o...", b2, a.float()) * self.scaling[name]

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x = x.to(self.pair(name)[0].dtype)
        x = F.dropout(x, self.dropout[name], self.training) if self.dropout[name] else x
        return self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]


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
