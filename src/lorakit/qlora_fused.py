"""The fast path of an adapted quantized linear (QLoRA): dequantize, matmul, low-rank delta, in one
autograd node.

y = x deq(W)^T + b + sum_i s_i * (dropout_i(x) A_i^T) B_i^T      (Dettmers et al., 2023,
arXiv:2305.14314; Hu et al., 2021, arXiv:2106.09685)

The plain composition (`LoraQuantLinear.reference_forward`, and PEFT) runs the bitsandbytes
layer, then builds a full (tokens, out) tensor per adapter, scales it, casts it and adds it. Here,
with the ideas of fused.py:

- The weight is dequantized into a fresh buffer for each call and dropped after it; backward
  dequantizes again (what bitsandbytes' own backward does), so no full-precision weight is
  ever kept and the memory of a step stays that of a 4-bit base.
- Because that buffer is ours, with a float32 compute dtype and many tokens the dropout-free
  adapters are added into it in place (W + s B A, one rank-r update) and ride inside the one
  matmul, forward and backward: no extra weight-sized tensor at all.
- Otherwise (bf16 compute, few tokens, dropout) the delta is accumulated into the output in
  place, the scaling riding on the rank-r product.
- Backward keeps x (or what GELU / SwiGLU keep anyway, see fused._recipe), the (tokens, r)
  products and the adapters; dropout masks are drawn again, not stored.

The base part reproduces the bitsandbytes layer's forward bit for bit (tests pin it): the weight
dequantized straight into the compute dtype, `F.linear` on the input cast to it, the result
cast back to the input's dtype. The adapters compute in their own dtype: the input's, or float32
on a bf16 / fp16 input (PEFT's default), x then cast for them and each delta cast back to the
output's dtype before it is added, as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .fused import (
    Adapter,
    _fold_pays,
    _grad_a,
    _grad_b,
    _project,
    _project_grad,
    adapter_grads,
    add_deltas,
    keep_input,
    kept_input,
)

Dequantize = Callable[[torch.dtype], torch.Tensor]  # dtype -> a fresh (out, in) weight


def qlora_linear(
    x: torch.Tensor,
    dequantize: Dequantize,
    compute_dtype: torch.dtype,
    bias: torch.Tensor | None,
    adapters: Sequence[Adapter],
    training: bool = False,
) -> torch.Tensor:
    """base(x) + the adapters' deltas, computed in the adapters' dtype (the same for all of them;
    when it is not x's, no adapter may have dropout).

    `dequantize(dtype)` gives the base weight, (out, in), as a new tensor the caller may write.
    """
    dropouts = tuple(a.dropout if training else 0.0 for a in adapters)
    scalings = tuple(a.scaling for a in adapters)
    tensors = [a.a for a in adapters] + [a.b for a in adapters]
    if torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad) or any(t.requires_grad for t in tensors)
    ):
        return _QLoraLinear.apply(x, bias, dequantize, compute_dtype, scalings, dropouts, *tensors)
    with torch.no_grad():
        return _forward(x, bias, dequantize, compute_dtype, tensors, scalings, dropouts, None, False)[0]


def _fold(w: torch.Tensor, tensors, scalings, dropouts) -> None:
    """w += s B A for every dropout-free adapter, in place (w is a fresh dequantized buffer)."""
    k = len(scalings)
    for i in range(k):
        if not dropouts[i]:
            w.addmm_(tensors[k + i], tensors[i], alpha=scalings[i])


def _forward(x, bias, dequantize, compute_dtype, tensors, scalings, dropouts, rng_states, keep_xa):
    """(y, x as (tokens, in), [rank-r intermediates or None], folded)."""
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    w = dequantize(compute_dtype)  # (out, in), ours to write
    fold = compute_dtype == x.dtype == tensors[0].dtype and _fold_pays(x2, w, dropouts)
    if fold:
        _fold(w, tensors, scalings, dropouts)
    xc = x2 if x2.dtype == compute_dtype else x2.to(compute_dtype)
    b = bias if bias is None or bias.dtype == compute_dtype else bias.to(compute_dtype)
    y = torch.addmm(b, xc, w.t()) if b is not None else xc @ w.t()  # (tokens, out)
    del w
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if tensors[0].dtype == x.dtype:
        xas = add_deltas(y, x, x2, tensors, scalings, dropouts, fold, rng_states, keep_xa)
    else:
        xas = _add_cast_deltas(y, x2, tensors, scalings)
    return y.view(*x.shape[:-1], y.shape[-1]), x2, xas, fold


# Adapters in another dtype than x (float32 adapters on a bf16 model, PEFT's default): each delta
# is computed in the adapters' dtype from x cast to it, then cast to the output's dtype and added,
# as the reference does. The cast of x is not kept: backward casts again (exact). No dropout here.


def _add_cast_deltas(y, x2, tensors, scalings) -> list[torch.Tensor]:
    k = len(scalings)
    xc = x2.to(tensors[0].dtype)
    xas = []
    for i in range(k):
        xa = _project(xc, tensors[i])
        y.add_(torch.mm(xa, tensors[k + i].t()).mul_(scalings[i]).to(y.dtype))
        xas.append(xa)
    return xas


def _cast_adapter_grads(ctx, g, x2, grad_x, a_s, b_s, xas, need_a, need_b):
    """adapter_grads (fused.py) for adapters in another dtype than x."""
    gc = g.to(a_s[0].dtype)
    xc = x2.to(a_s[0].dtype) if any(need_a) else None
    grad_a, grad_b = [None] * len(a_s), [None] * len(a_s)
    for i, (a, b, xa, s) in enumerate(zip(a_s, b_s, xas, ctx.scalings)):
        if need_b[i]:
            grad_b[i] = _grad_b(xa, gc, s)
        if need_a[i] or grad_x is not None:
            gb = _project_grad(gc, b, s)
            if need_a[i]:
                grad_a[i] = _grad_a(gb, xc)
            if grad_x is not None:
                grad_x.add_((gb @ a).to(grad_x.dtype))
    return grad_a, grad_b


class _QLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, dequantize, compute_dtype, scalings, dropouts, *tensors):
        k = len(scalings)
        rng_states: list[torch.Tensor] = []
        keep_xa = any(t.requires_grad for t in tensors[k:])
        y, x2, xas, fold = _forward(x, bias, dequantize, compute_dtype, tensors, scalings, dropouts, rng_states, keep_xa)
        ctx.dequantize, ctx.compute_dtype, ctx.fold = dequantize, compute_dtype, fold
        ctx.scalings, ctx.dropouts, ctx.rng_states = scalings, dropouts, rng_states
        ctx.x_shape, ctx.x_stride = x.shape, x.stride()
        ctx.bias_dtype = None if bias is None else bias.dtype
        need_x = any(t.requires_grad for t in tensors[:k])  # x is needed for A's gradient only
        kept = keep_input(ctx, x, x2, need_x)
        xas = [xa if xa is not None else x2.new_empty(0) for xa in xas]
        ctx.save_for_backward(*kept, *tensors, *xas)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        kept, rest = saved[: ctx.n_kept], saved[ctx.n_kept :]
        k = len(ctx.scalings)
        a_s, b_s, xas = rest[:k], rest[k : 2 * k], rest[2 * k :]
        need = ctx.needs_input_grad  # x, bias, dequantize, compute_dtype, scalings, dropouts, *A, *B
        x2 = kept_input(ctx, kept)
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (tokens, out)

        grad_x = None
        if need[0]:
            # The same weight as forward: dequantized again, the same adapters folded in.
            w = ctx.dequantize(ctx.compute_dtype)
            if ctx.fold:
                _fold(w, rest[: 2 * k], ctx.scalings, ctx.dropouts)
            gc = g if g.dtype == ctx.compute_dtype else g.to(ctx.compute_dtype)
            grad_x = gc @ w  # (tokens, in)
            del w
            if grad_x.dtype != grad_y.dtype:
                grad_x = grad_x.to(grad_y.dtype)
        grad_bias = g.sum(0).to(ctx.bias_dtype) if need[1] else None

        grads = adapter_grads if a_s[0].dtype == grad_y.dtype else _cast_adapter_grads
        grad_a, grad_b = grads(ctx, g, x2, grad_x, a_s, b_s, xas, need[6 : 6 + k], need[6 + k :])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, grad_bias, None, None, None, None, *grad_a, *grad_b)
