"""How an adapted layer computes its output: the one place that chooses.

Every wrapper's forward is `forward(layer, x)` (`LoraLayer.forward` calls it), which takes the
first of these that applies:

1. inside a `mixed_batch` block: the block's routes, each row through its own adapters (mixed.py);
2. no live adapter (none active, all merged, or disabled): the base layer alone;
3. a fast kernel, where it computes what the reference computes;
4. the plain reference, `layer.reference_forward`, which the tests pin every kernel to.

A kind of layer names the kernels that may compute it (`LoraLayer.kernels`): `LoraLinear`
`LINEAR_LORA` (fused.lora_linear) and `LINEAR_DORA` (dora.linear_forward), `LoraQuantLinear`
`QUANT_LORA` (quantized_fused.qlora_linear); embeddings and convolutions none. A kernel answers
two questions: `prepare`, once per change of the layer's adapters (what it needs for these
live adapters, or None where it cannot reproduce them), and `accepts`, on every call (whether
this input and the base layer's present mode allow it). Before asking, the chooser checks what
holds for every kernel: the base layer has no hooks (only its own call runs them) and autocast
is off (it changes the dtypes the reference computes in).

mixed.py asks `batched_linear_ok` whether its batched per-row computation is exact for a layer.
As with vLLM's PunicaWrapper, the layers see this one small interface and no kernel.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import nn

from ..quant.bnb import compute_dtype, dequantize, quantized_kind, relaid_out
from . import torch_internals
from .dora import linear_forward as dora_linear_forward
from .fused import Adapter, lora_linear
from .quantized_fused import qlora_linear

if TYPE_CHECKING:
    from .base import LoraLayer

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class Kernel(Protocol):
    """A fast computation of some kinds of layer, equal to their `reference_forward` where it
    takes them (pinned by tests)."""

    def prepare(self, layer: LoraLayer, live: list[str]) -> Any | None:
        """What `run` needs for these live adapters, or None if it cannot compute them exactly."""

    def accepts(self, layer: LoraLayer, x: torch.Tensor, state: Any) -> bool:
        """Whether this input and the base layer's present mode allow the kernel."""

    def run(self, layer: LoraLayer, x: torch.Tensor, state: Any) -> torch.Tensor:
        """The layer's output on `x`."""


class _Choice(NamedTuple):
    """What `forward` chose for a layer's present adapters, kept in its `forward_cache`."""

    live: list[str]
    kernel: Kernel | None  # None: only the reference is exact for these adapters
    state: Any  # the kernel's `prepare` answer


_CHOICE = "dispatch"  # this module's key in `LoraLayer.forward_cache`


def forward(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The output of the adapted `layer` on `x` (see the module docstring for the order)."""
    if layer.routing is not None:
        return layer.routing.forward(layer, x)
    choice = layer.forward_cache.get(_CHOICE) or _choose(layer)
    if not choice.live:
        return layer.base_layer(x)
    kernel = choice.kernel
    if kernel is not None and plain_call(layer.base_layer, x) and kernel.accepts(layer, x, choice.state):
        return kernel.run(layer, x, choice.state)
    return layer.reference_forward(x)


def _choose(layer: LoraLayer) -> _Choice:
    live = layer.live_adapters()
    for kernel in layer.kernels if live else ():
        state = kernel.prepare(layer, live)
        if state is not None:
            break
    else:
        kernel = state = None
    choice = layer.forward_cache[_CHOICE] = _Choice(live, kernel, state)
    return choice


def plain_call(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether calling `base` on `x` would do nothing beyond its own forward: no hooks on it and
    no autocast (the condition every kernel shares)."""
    return not torch_internals.has_forward_hooks(base) and not autocast_on(x.device.type)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for `device_type`."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def linear_adapters(layer: LoraLayer, names: list[str]) -> list[Adapter] | None:
    """Adapters `names` of a LoraLinear for a kernel, or None where only the reference is exact:
    a base other than nn.Linear / Conv1D (it has its own forward), or an adapter in another
    dtype than the base weight."""
    base = layer.base_layer
    if type(base) is not nn.Linear and not layer.fan_in_fan_out:
        return None
    return _adapters_in(layer, names, base.weight.dtype)


def _adapters_in(layer: LoraLayer, names: list[str], dtype: torch.dtype) -> list[Adapter] | None:
    """Adapters `names` for a kernel, or None if one of their tensors is not of `dtype`."""
    adapters = []
    for name in names:
        a, b = layer.pair(name)
        if a.dtype != dtype or b.dtype != dtype:
            return None
        adapters.append(Adapter(a, b, layer.scaling[name], layer.dropout[name]))
    return adapters


class _LinearLora:
    """fused.lora_linear: nn.Linear / Conv1D, LoRA adapters in the weight's dtype, x in it too."""

    def prepare(self, layer: LoraLayer, live: list[str]) -> list[Adapter] | None:
        if any(layer.is_dora(name) for name in live):
            return None
        return linear_adapters(layer, live)

    def accepts(self, layer: LoraLayer, x: torch.Tensor, adapters: list[Adapter]) -> bool:
        return x.dtype == adapters[0].a.dtype

    def run(self, layer: LoraLayer, x: torch.Tensor, adapters: list[Adapter]) -> torch.Tensor:
        base = layer.base_layer
        return lora_linear(x, base.weight, base.bias, adapters, layer.fan_in_fan_out, layer.training)


class _LinearDora:
    """dora.linear_forward: one live DoRA adapter on nn.Linear / Conv1D, no dropout in this call."""

    def prepare(self, layer: LoraLayer, live: list[str]) -> tuple[str, torch.dtype] | None:
        if len(live) != 1 or not layer.is_dora(live[0]):
            return None
        adapters = linear_adapters(layer, live)
        return None if adapters is None else (live[0], adapters[0].a.dtype)

    def accepts(self, layer: LoraLayer, x: torch.Tensor, state: tuple[str, torch.dtype]) -> bool:
        name, dtype = state
        return x.dtype == dtype and not (layer.training and layer.dropout[name])

    def run(self, layer: LoraLayer, x: torch.Tensor, state: tuple[str, torch.dtype]) -> torch.Tensor:
        return dora_linear_forward(layer, state[0], x)


class _QuantLora:
    """quantized_fused.qlora_linear: a bitsandbytes base, adapters all of one dtype. Not for an
    8-bit layer in eval mode (bitsandbytes then multiplies in int8), a weight in bitsandbytes'
    CPU inference layout, or dropout on adapters of another dtype than the input (the kernel
    casts x for them only without dropout). These depend on the base's mode and on the layout
    bitsandbytes keeps the weight in, which change without the adapters changing: `accepts`."""

    def prepare(self, layer: LoraLayer, live: list[str]) -> list[Adapter] | None:
        return _adapters_in(layer, live, layer.pair(live[0])[0].dtype)

    def accepts(self, layer: LoraLayer, x: torch.Tensor, adapters: list[Adapter]) -> bool:
        base = layer.base_layer
        if x.dtype not in _FLOATS or compute_dtype(base, x.dtype) not in _FLOATS:
            return False
        kind = quantized_kind(base)
        if (kind == "linear8bit" and not base.training) or (kind == "linear4bit" and relaid_out(base)):
            return False
        return adapters[0].a.dtype == x.dtype or not (layer.training and any(ad.dropout for ad in adapters))

    def run(self, layer: LoraLayer, x: torch.Tensor, adapters: list[Adapter]) -> torch.Tensor:
        base = layer.base_layer
        weight = partial(dequantize, base)  # dtype -> a fresh buffer, on each call
        return qlora_linear(x, weight, compute_dtype(base, x.dtype), base.bias, adapters, layer.training)


LINEAR_LORA: Kernel = _LinearLora()
LINEAR_DORA: Kernel = _LinearDora()
QUANT_LORA: Kernel = _QuantLora()


def batched_linear_ok(layer: LoraLayer, x: torch.Tensor) -> bool:
    """Whether mixed.py's batched per-row computation is exact for `layer` on `x`: a layer that
    `LINEAR_LORA` computes, x in its weight's dtype, every adapter on it LoRA in that dtype (a
    DoRA adapter's rows rescale the base output) and a plain call of the base (`plain_call`)."""
    key = ("batched", x.dtype)
    static = layer.forward_cache.get(key)
    if static is None:
        static = layer.forward_cache[key] = (
            LINEAR_LORA in layer.kernels
            and x.dtype == layer.base_layer.weight.dtype
            and not any(layer.is_dora(name) for name in layer.adapter_names)
            and linear_adapters(layer, layer.adapter_names) is not None
        )
    return static and plain_call(layer.base_layer, x)
