"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

    W' = m * (W + s B A) / ||W + s B A||_c

The norm is taken per output feature (over every other axis of the weight) and is a constant
for the gradient (the paper's section 4.3); m, one trained value per output feature, starts at
that norm, so a new adapter changes nothing. With g = m / norm an adapted layer computes

    y = bias + g * (base(x) - bias) + g * s * lora(x)                   no dropout, or eval
    y = base(x) + (g - 1) * base_nobias(xd) + g * s * lora(xd)          training with dropout

(xd = dropout(x)), PEFT's convention, so PEFT's DoRA adapters give the same outputs here. With
several active adapters each applies in turn to what came before it (PEFT's order too).

This file holds the math; the layers (plain.py) keep the magnitudes and call it:
- `weight_norm`: the norm, cached per adapter until the base weight, A, B or the scaling change
  (`NormCache`, keyed by the tensors' identities and version counters);
- `reference_step`: the plain composition for every layer kind, which the tests pin the rest to;
- `merge` / `unmerge`: the weight becomes g * (W + s B A), exactly what forward computes;
- `linear_forward` / `dora_linear`: the fast path for nn.Linear and Conv1D, riding fused.py's
  pieces. The base output is not computed twice: x (W + s B A)^T is one matmul when folding
  pays (fused.fold_pays), and g rescales it in the same pass that adds the bias. In backward
  g folds into the weights instead of the (tokens, out) gradient: x's gradient is
  gy (g * (W + s B A)), A's and B's are LoRA's with B replaced by g * B; m's gradient is the one
  extra pass, sum over tokens of gy * x (W + s B A)^T, which is why that product is kept.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import torch_internals
from .fused import Term, fold_pays, folded_weight, grad_a, grad_b, keep_input, kept_input, project
from .precision import precise

# ---- the norm --------------------------------------------------------------------------------


class NormCache:
    """Each adapter's norm, kept while the tensors it came from are unchanged.

    A cached norm is used only if the base weight, A and B are the same tensor objects, at the
    same storage and the same version counter (bumped by every in-place write: optimizer steps,
    load_state_dict, copy_), with the same scaling. Writes through `.data` bypass version
    counters; lorakit's own (merge, unmerge) clear the cache. Where torch's counters cannot be
    trusted (`torch_internals.version`), nothing is cached.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, torch.Tensor]] = {}

    @staticmethod
    def _key(tensors: tuple[torch.Tensor, ...], scaling: float) -> tuple | None:
        versions = [torch_internals.version(t) for t in tensors]
        if any(v is None for v in versions):  # no version counter to trust: no caching
            return None
        return tuple((weakref.ref(t), v, t.data_ptr()) for t, v in zip(tensors, versions)) + (scaling,)

    def get(self, name: str, tensors: tuple[torch.Tensor, ...], scaling: float) -> torch.Tensor | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        key, norm = entry
        *parts, cached_scaling = key
        if cached_scaling != scaling or len(parts) != len(tensors):
            return None
        for (ref, version, ptr), t in zip(parts, tensors):
            if ref() is not t or torch_internals.version(t) != version or t.data_ptr() != ptr:
                return None
        return norm

    def put(self, name: str, tensors: tuple[torch.Tensor, ...], scaling: float, norm: torch.Tensor) -> None:
        key = self._key(tensors, scaling)
        if key is not None:
            self._entries[name] = (key, norm)

    def clear(self) -> None:
        self._entries.clear()

    # A copy or a pickled model starts with an empty cache (weak references do not travel).
    def __deepcopy__(self, memo: dict) -> NormCache:
        return NormCache()

    def __getstate__(self) -> dict:
        return {"_entries": {}}


def _row_norms(weight: torch.Tensor, out_dim: int) -> torch.Tensor:
    """L2 norm per output feature (`out_dim` of `weight`), over every other axis, at least in float32."""
    dims = tuple(d for d in range(weight.dim()) if d != out_dim)
    return torch.linalg.vector_norm(precise(weight), dim=dims)


@torch.no_grad()
def norm_of(layer, name: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """||W + s B A||_c of adapter `name` (one value per output, at least float32), computed afresh.

    `base_weight` stands in for the layer's current base weight (merge passes the weight as it
    was before any adapter was folded in).
    """
    weight = layer.base_layer.weight if base_weight is None else base_weight
    return _row_norms(precise(weight) + layer.delta_weight(name), layer.out_dim)


def weight_norm(layer, name: str) -> torch.Tensor:
    """The norm of adapter `name`, from the layer's cache when nothing changed since."""
    a, b = layer.pair(name)
    tensors, scaling = (layer.base_layer.weight, a, b), layer.scaling[name]
    norm = layer.dora_norms.get(name, tensors, scaling)
    if norm is None:
        norm = norm_of(layer, name)
        layer.dora_norms.put(name, tensors, scaling, norm)
    return norm


def initial_magnitude(
    layer, a: torch.Tensor, b: torch.Tensor, scaling: float, base_weight: torch.Tensor
) -> torch.Tensor:
    """m for a new adapter (A, B) over `base_weight`: the norm itself, in the magnitude's file shape."""
    with torch.no_grad():
        delta = layer.delta_from(a, b, scaling)
        norm = _row_norms(precise(base_weight) + delta, layer.out_dim)
    return norm.reshape(layer.magnitude_shape()).to(base_weight.dtype)


def _scale(layer, name: str, norm: torch.Tensor) -> torch.Tensor:
    """g = m / norm, flat (out,)."""
    m = layer.lora_magnitude[name]
    return m.reshape(-1) / norm.to(m.dtype)


# ---- the plain composition -----------------------------------------------------------------


def reference_step(layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` (the output so far) with DoRA adapter `name` applied: the formulas above."""
    g = _scale(layer, name, weight_norm(layer, name)).view(_output_view(layer, result))
    p = layer.dropout[name] if layer.training and not layer.lookup_table else 0.0
    if p:
        xd = F.dropout(x.to(layer.pair(name)[0].dtype), p, True)
        return result + (g - 1) * layer.base_without_bias(xd) + g * layer.lora_delta(xd, name)
    bias = getattr(layer.base_layer, "bias", None)
    base = result if bias is None else result - bias.view(_output_view(layer, result))
    return result + (g - 1) * base + g * layer.lora_delta(x, name)


def output_change(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """What DoRA adapter `name` alone adds to the base layer's output on `x`: (g - 1) W x + g s B A x
    (the bias is not rescaled). A mixed batch adds it to the rows routed to `name`."""
    delta = layer.lora_delta(x, name)
    view = _output_view(layer, delta)
    g = _scale(layer, name, weight_norm(layer, name)).view(view)
    base, bias = layer.base_layer(x), getattr(layer.base_layer, "bias", None)
    if bias is not None:
        base = base - bias.view(view)
    return (g - 1) * base.to(delta.dtype) + g * delta


def _output_view(layer, result: torch.Tensor) -> tuple[int, ...]:
    """How a per-output vector broadcasts over the layer's output: last axis, or a conv's channels."""
    spatial = layer.base_layer.weight.dim() - 2 if layer.channels_first else 0
    return (-1,) + (1,) * spatial


# ---- merge ---------------------------------------------------------------------------------


def _weight_view(layer) -> tuple[int, ...]:
    """How a per-output vector broadcasts over the base weight."""
    shape = [1] * layer.base_layer.weight.dim()
    shape[layer.out_dim] = -1
    return tuple(shape)


@torch.no_grad()
def merge(layer, name: str, unmerged: torch.Tensor) -> None:
    """Fold adapter `name` into the base weight: W <- g * (W + s B A).

    g comes from the norm over `unmerged`, the weight before any adapter was folded in, as
    forward computes it; it is kept for `unmerge`.
    """
    weight = layer.base_layer.weight
    g = precise(_scale(layer, name, norm_of(layer, name, unmerged)))
    merged = g.view(_weight_view(layer)) * (precise(weight) + layer.delta_weight(name))
    weight.copy_(merged)
    layer.dora_merged[name] = g


@torch.no_grad()
def unmerge(layer, name: str) -> None:
    """Take adapter `name` back out: W <- W / g - s B A."""
    g = layer.dora_merged.pop(name)
    weight = layer.base_layer.weight
    weight.copy_(precise(weight) / g.view(_weight_view(layer)) - layer.delta_weight(name))


# ---- the fast path for nn.Linear / Conv1D ------------------------------------------------------


def linear_forward(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """LoraLinear's output with its one live adapter, `name`, a DoRA adapter without dropout."""
    a, b = layer.pair(name)
    base = layer.base_layer
    weight, scaling, fifo = base.weight, layer.scaling[name], layer.fan_in_fan_out
    norm = layer.dora_norms.get(name, (weight, a, b), scaling)
    folded = None
    if norm is None:
        with torch.no_grad():
            if weight.dtype in (torch.float32, torch.float64):
                # W + s B A, built once for the norm and reused for the forward matmul.
                folded = folded_weight(weight, [Term(a, b, scaling, folded=True)], fifo)
                norm = _row_norms(folded, layer.out_dim)
            else:  # half precision: the norm in float32, the matmul unfolded
                norm = norm_of(layer, name)
        layer.dora_norms.put(name, (weight, a, b), scaling, norm)
    magnitude = layer.lora_magnitude[name].reshape(-1)
    call = DoraCall(norm.to(magnitude.dtype), scaling, fifo, fold_pays(x, weight, (0.0,)), folded)
    return _dora_linear(x, weight, base.bias, a, b, magnitude, call)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    magnitude: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    norm: torch.Tensor,
    fold: bool | None = None,
) -> torch.Tensor:
    """g * (x (W + s B A)^T) + bias with g = magnitude / norm (norm a constant for the gradient).

    `weight` is (out, in), or (in, out) with `fan_in_fan_out`; `magnitude` and `norm` are (out,).
    `fold` forces the folded (True) or the in-place (False) computation; by default
    fused.fold_pays decides.
    """
    if fold is None:
        fold = fold_pays(x, weight, (0.0,))
    call = DoraCall(norm.to(magnitude.dtype), float(scaling), fan_in_fan_out, fold, None)
    return _dora_linear(x, weight, bias, a, b, magnitude, call)


class DoraCall(NamedTuple):
    """What one call of the DoRA kernel fixes besides its differentiable tensors."""

    norm: torch.Tensor  # ||W + s B A|| per output, (out,), a constant for the gradient
    scaling: float
    fan_in_fan_out: bool  # W is (in, out) (Transformers' Conv1D)
    fold: bool  # x (W + s B A)^T as one matmul, forward and backward (fused.fold_pays)
    folded: torch.Tensor | None  # W + s B A, when the caller built it for the norm


def _dora_linear(x, weight, bias, a, b, magnitude, call: DoraCall) -> torch.Tensor:
    # x, the weights and the magnitude are the tensors autograd tracks; `call` holds the rest.
    tensors = (x, weight, bias, a, b, magnitude)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _DoraLinear.apply(x, weight, bias, a, b, magnitude, call)
    with torch.no_grad():
        g = magnitude / call.norm
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        fifo = call.fan_in_fan_out
        if call.fold or call.folded is not None:
            w = call.folded if call.folded is not None else _folded(weight, a, b, call)
            w.mul_(g if fifo else g[:, None])  # the merged weight, in a fresh buffer
            w_t = w if fifo else w.t()  # (in, out)
            y = torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t
        else:
            y = _unfolded(x2, weight, a, b, call)[0].mul_(g)
            if bias is not None:
                y.add_(bias)
        return y.view(*x.shape[:-1], y.shape[-1])


def _folded(weight, a, b, call: DoraCall) -> torch.Tensor:
    """W + s B A in W's layout, a fresh buffer."""
    return folded_weight(weight, [Term(a, b, call.scaling, folded=True)], call.fan_in_fan_out)


def _unfolded(x2, weight, a, b, call: DoraCall) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + s (x A^T) B^T, x A^T): the base matmul with the rank-r update added in place."""
    y = x2 @ (weight if call.fan_in_fan_out else weight.t())
    xa = project(x2, a)
    y.addmm_(xa, b.t(), alpha=call.scaling)
    return y, xa


def _scaled_weight(weight, a, b, call: DoraCall, g) -> torch.Tensor:
    """g * (W + s B A) as (out, in), a fresh buffer."""
    w = _folded(weight, a, b, call)
    w = w.t() if call.fan_in_fan_out else w
    return w.mul_(g[:, None])


class _DoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, magnitude, call):
        need = ctx.needs_input_grad  # x, weight, bias, A, B, magnitude, call
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        g = magnitude / call.norm
        fifo = call.fan_in_fan_out
        v = call.folded if call.folded is not None else (_folded(weight, a, b, call) if call.fold else None)
        xa = None
        if v is not None:
            y0 = x2 @ (v if fifo else v.t())  # x (W + s B A)^T: (tokens, out)
            if need[4]:
                xa = project(x2, a)  # for B's gradient
        else:
            y0, xa = _unfolded(x2, weight, a, b, call)
        y = torch.addcmul(bias, y0, g) if bias is not None else y0 * g
        ctx.call = call._replace(norm=None, folded=None)  # the tensors go through save_for_backward
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        need_x = need[1] or need[3]  # x is kept for A's or the weight's gradient
        kept = keep_input(ctx, x, x2, need_x)
        ctx.save_for_backward(
            *kept, weight, a, b, magnitude, call.norm, xa if need[4] else None, y0 if need[5] else None
        )
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        kept = saved[: ctx.n_kept]
        weight, a, b, magnitude, norm, xa, y0 = saved[ctx.n_kept :]
        need = ctx.needs_input_grad
        call = ctx.call
        s, fifo = call.scaling, call.fan_in_fan_out
        g = magnitude / norm  # (out,)
        gy = grad_y.reshape(-1, grad_y.shape[-1])  # (tokens, out)
        x2 = kept_input(ctx, kept)

        # G = gy * g never needs to exist when the weight is folded: g rides on W and B instead.
        gg = gy * g if (need[1] or (need[0] and not call.fold)) else None
        grad_x = grad_w = gb = None
        if need[0]:
            if call.fold:
                grad_x = gy @ _scaled_weight(weight, a, b, call, g)  # (tokens, in)
            else:
                grad_x = gg @ (weight.t() if fifo else weight)
        if need[3] or (need[0] and not call.fold):
            gb = (gy @ (b * g[:, None])).mul_(s)  # s G B: (tokens, r)
            if grad_x is not None and not call.fold:
                grad_x.addmm_(gb, a)
        grad_a_ = grad_a(gb, x2) if need[3] else None
        grad_b_ = grad_b(xa, gy, s) * g[:, None] if need[4] else None  # s G^T (x A^T)
        grad_m = torch.linalg.vecdot(gy, y0, dim=0) / norm if need[5] else None
        if need[1]:
            grad_w = x2.t() @ gg if fifo else gg.t() @ x2
        grad_bias = gy.sum(0) if ctx.has_bias and need[2] else None
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_w, grad_bias, grad_a_, grad_b_, grad_m, None
