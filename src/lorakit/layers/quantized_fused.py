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
- Backward keeps x (or what GELU / SwiGLU keep anyway, see torch_internals.recompute_recipe),
  the (tokens, r) products and the adapters; dropout masks are drawn again, not stored.

The base part reproduces the bitsandbytes layer's forward bit for bit (tests pin it): the weight
dequantized straight into the compute dtype, `F.linear` on the input cast to it, the result
cast back to the input's dtype. The adapters compute in their own dtype: the input's, or float32
on a bf16 / fp16 input (PEFT's default), x then cast for them and each delta cast back to the
output's dtype before it is added, as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .fused import (
    Adapter,
    Term,
    adapter_grads,
    add_deltas,
    flat,
    fold_pays,
    grad_a,
    grad_b,
    keep_input,
    kept_input,
    mark_folded,
    project,
    project_grad,
    save_terms,
    saved_terms,
    terms_of,
)

Dequantize = Callable[[torch.dtype], torch.Tensor]  # dtype -> a fresh (out, in) weight


class QuantBase(NamedTuple):
    """The frozen quantized linear as the kernel sees it (its bias is an autograd input)."""

    dequantize: Dequantize  # a fresh (out, in) weight in the dtype asked for, ours to write
    compute_dtype: torch.dtype  # the dtype bitsandbytes' own forward multiplies in


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
    base = QuantBase(dequantize, compute_dtype)
    terms = terms_of(adapters, training)
    tensors = flat(terms)
    if torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad) or any(t.requires_grad for t in tensors)
    ):
        return _QLoraLinear.apply(x, bias, base, terms, *tensors)
    with torch.no_grad():
        return _forward(x, bias, base, terms, False)[0]


def _fold_into(w: torch.Tensor, terms: Sequence[Term]) -> None:
    """w += s B A for every folded term, in place (w is a fresh dequantized buffer)."""
    for term in terms:
        if term.folded:
            w.addmm_(term.b, term.a, alpha=term.scaling)


def _forward(x, bias, base: QuantBase, terms: list[Term], record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x as (tokens, in)); with `record`, the terms keep what backward needs."""
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    compute_dtype, adapter_dtype = base.compute_dtype, terms[0].a.dtype
    w = base.dequantize(compute_dtype)  # (out, in), ours to write
    fold = compute_dtype == x.dtype == adapter_dtype and fold_pays(x2, w, [t.dropout for t in terms])
    mark_folded(terms, fold)
    _fold_into(w, terms)
    xc = x2 if x2.dtype == compute_dtype else x2.to(compute_dtype)
    b = bias if bias is None or bias.dtype == compute_dtype else bias.to(compute_dtype)
    y = torch.addmm(b, xc, w.t()) if b is not None else xc @ w.t()  # (tokens, out)
    del w
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if adapter_dtype == x.dtype:
        add_deltas(y, x, x2, terms, record)
    else:
        _add_cast_deltas(y, x2, terms, record)
    return y.view(*x.shape[:-1], y.shape[-1]), x2


# Adapters in another dtype than x (float32 adapters on a bf16 model, PEFT's default): each delta
# is computed in the adapters' dtype from x cast to it, then cast to the output's dtype and added,
# as the reference does. The cast of x is not kept: backward casts again (exact). No dropout here.


def _add_cast_deltas(y: torch.Tensor, x2: torch.Tensor, terms: list[Term], record: bool) -> None:
    xc = x2.to(terms[0].a.dtype)
    for term in terms:
        xa = project(xc, term.a)
        y.add_(torch.mm(xa, term.b.t()).mul_(term.scaling).to(y.dtype))
        if record and term.b.requires_grad:
            term.xa = xa


def _cast_adapter_grads(g, x2, grad_x, terms: list[Term], needs) -> list[torch.Tensor | None]:
    """fused.adapter_grads for adapters in another dtype than x (no dropout, nothing folded)."""
    dtype = terms[0].a.dtype
    gc = g.to(dtype)
    xc = x2.to(dtype) if any(needs[0::2]) else None
    grads: list[torch.Tensor | None] = []
    for term, need_a, need_b in zip(terms, needs[0::2], needs[1::2]):
        ga = gb = None
        if need_b:
            gb = grad_b(term.xa, gc, term.scaling)
        if need_a or grad_x is not None:
            g_proj = project_grad(gc, term.b, term.scaling)
            if need_a:
                ga = grad_a(g_proj, xc)
            if grad_x is not None:
                grad_x.add_((g_proj @ term.a).to(grad_x.dtype))
        grads += (ga, gb)
    return grads


class _QLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, base, terms, *tensors):
        # `tensors` is flat(terms), handed to apply so that autograd tracks A and B.
        y, x2 = _forward(x, bias, base, terms, True)
        ctx.base = base
        ctx.x_layout = (x.shape, x.stride())
        ctx.bias_dtype = None if bias is None else bias.dtype
        need_x = any(term.a.requires_grad for term in terms)  # x is needed for A's gradient only
        kept = keep_input(ctx, x, x2, need_x)
        save_terms(ctx, kept, terms)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        kept, terms = saved_terms(ctx)
        need = ctx.needs_input_grad  # x, bias, base, terms, A_0, B_0, A_1, ...
        x2 = kept_input(ctx, kept)
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (tokens, out)

        grad_x = None
        if need[0]:
            # The same weight as forward: dequantized again, the same adapters folded in.
            compute_dtype = ctx.base.compute_dtype
            w = ctx.base.dequantize(compute_dtype)
            _fold_into(w, terms)
            gc = g if g.dtype == compute_dtype else g.to(compute_dtype)
            grad_x = gc @ w  # (tokens, in)
            del w
            if grad_x.dtype != grad_y.dtype:
                grad_x = grad_x.to(grad_y.dtype)
        grad_bias = g.sum(0).to(ctx.bias_dtype) if need[1] else None

        if terms[0].a.dtype == grad_y.dtype:
            grads = adapter_grads(g, x2, grad_x, terms, need[4:], ctx.x_layout)
        else:
            grads = _cast_adapter_grads(g, x2, grad_x, terms, need[4:])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_layout[0])
        return (grad_x, grad_bias, None, None, *grads)
