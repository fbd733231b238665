"""The grouped computation of an adapted experts module (layers/experts.py): the (token, expert)
pairs sorted by expert, one grouped matmul per projection, each expert's rank-r update on the
same pairs (never a full delta weight), as Transformers' `grouped_mm` experts implementation runs
the frozen experts.

`_ExpertsLora` is the whole experts computation as one autograd node, for the usual case (frozen
expert weights, no dropout). It keeps only the layer's input (tokens, hidden), the routing weights,
the first projection's output (pairs, 2I) and the rank-r products (pairs, r): the input pairs are
gathered again and the gate recomputed in backward, and the routing weights' gradient comes from
the down projection's input gradient (<d/dy, y> = <d/dh, h>), so the expert outputs need not be
kept either. `_ExpertProjection` (one projection per node) serves the rest.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def projections(experts: nn.Module) -> tuple[str, str]:
    """The (first, second) projection parameters, in the order the forward uses them."""
    return ("gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"), "down_proj"


class Pairs(NamedTuple):
    """The (token, expert) pairs of a forward, sorted by expert."""

    perm: torch.Tensor  # pair i is flat (token, slot) perm[i]
    token_of_pair: torch.Tensor
    expert_ids: torch.Tensor  # sorted
    offsets: torch.Tensor  # int32 cumulative counts (grouped_mm's offs)
    counts: torch.Tensor


Terms = dict[str, list[tuple[torch.Tensor, torch.Tensor, float, float]]]


def grouped_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    terms: Terms,
) -> torch.Tensor:
    """The experts' output with low-rank terms, computed as Transformers' grouped_mm experts do:
    the (token, expert) pairs sorted by expert, one grouped matmul per projection over them, the
    adapters' x A^T and (.) B^T grouped the same way (rank r per pair), weighted and summed back.

    Frozen expert weights and biases and no dropout (the usual case): one autograd node for the
    whole experts computation (`_ExpertsLora`); otherwise one per projection (`_ExpertProjection`)
    with autograd's own ops between them."""
    top_k = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    # index_select, not advanced indexing: the same copy, and its backward is an index_add (a fifth
    # of the time on CPU of the accumulating index_put that x[idx] backpropagates through).
    token_of_pair = perm // top_k
    counts = torch.bincount(expert_ids, minlength=experts.num_experts)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    pairs = Pairs(perm, token_of_pair, expert_ids, offsets, counts)
    first, second = projections(experts)
    weights = [getattr(experts, first), getattr(experts, second)]
    biases = [getattr(experts, n + "_bias") for n in (first, second)] if experts.has_bias else [None, None]
    frozen = not any(t is not None and t.requires_grad for t in weights + biases)
    if frozen and not any(p for t in terms.values() for *_, p in t):
        t1, t2 = terms.get(first, ()), terms.get(second, ())
        flat = [f for a, b, _, _ in list(t1) + list(t2) for f in (a.transpose(1, 2), b.transpose(1, 2))]
        w1, w2 = (w if experts.is_transposed else w.transpose(1, 2) for w in weights)
        gate = experts._apply_gate if experts.has_gate else experts.act_fn
        return _ExpertsLora.apply(
            hidden_states,
            top_k_weights,
            w1,
            w2,
            *biases,
            pairs,
            gate,
            tuple(t[2] for t in t1),
            tuple(t[2] for t in t2),
            *flat,
        )
    return _stepwise(experts, hidden_states, top_k_weights, pairs, terms)


def _stepwise(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_weights: torch.Tensor, pairs: Pairs, terms: Terms
) -> torch.Tensor:
    """grouped_forward with autograd's ops between one node per projection (dropout, trained
    expert weights or biases)."""
    perm, token_of_pair, expert_ids, offsets, counts = pairs
    x = torch.index_select(hidden_states, 0, token_of_pair)  # (pairs, in), sorted by expert
    first, second = projections(experts)
    bias = (
        (lambda n: torch.index_select(getattr(experts, n + "_bias"), 0, expert_ids))
        if experts.has_bias
        else (lambda n: None)
    )
    h = _project(x, getattr(experts, first), offsets, counts, bias(first), experts.is_transposed, terms.get(first, ()))
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    h = _project(
        h, getattr(experts, second), offsets, counts, bias(second), experts.is_transposed, terms.get(second, ())
    )
    h = h * torch.index_select(top_k_weights.reshape(-1), 0, perm).unsqueeze(-1)
    return _sum_back(h, pairs, hidden_states)


def _sum_back(h: torch.Tensor, pairs: Pairs, like: torch.Tensor) -> torch.Tensor:
    """Each token's weighted pairs summed into its row (tokens, hidden)."""
    perm, token_of_pair = pairs.perm, pairs.token_of_pair
    tokens = like.shape[0]
    if h.device.type == "cpu":  # in place, by token (index_add is deterministic on CPU)
        return torch.zeros_like(like).index_add_(0, token_of_pair, h.to(like.dtype))
    back = torch.empty_like(perm)  # elsewhere (atomic adds on GPUs): back to token order, then a sum
    back[perm] = torch.arange(perm.numel(), device=perm.device)
    return torch.index_select(h, 0, back).view(tokens, -1, h.shape[1]).sum(dim=1).to(like.dtype)


def _project(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    counts: torch.Tensor,
    bias: torch.Tensor | None,
    transposed: bool,
    terms,
) -> torch.Tensor:
    """x through each pair's expert weight (+ bias), plus scaling * B[e] A[e] x for each term."""
    weight_t = weight if transposed else weight.transpose(1, 2)  # (E, in, out)
    if terms:
        p = max(t[3] for t in terms)
        x_lora = F.dropout(x, p, True) if p else None  # one mask for the adapters of this projection
        flat = [t for a, b, _, _ in terms for t in (a.transpose(1, 2), b.transpose(1, 2))]
        out = _ExpertProjection.apply(x, x_lora, weight_t, offsets, counts, tuple(t[2] for t in terms), *flat)
    else:
        out = _grouped(x, weight_t, offsets, counts)
    if bias is not None:
        out = out + bias
    return out


class _ExpertProjection(torch.autograd.Function):
    """x W_e^T + sum_i s_i (x A_ie^T) B_ie^T over the sorted (token, expert) pairs, one node:
    each low-rank product lands in the base product's buffer (no (pairs, out) temporary summed
    afterwards), and backward adds the rank-r path's input gradient into the base one's likewise.
    Saves x and each (pairs, r) x A^T; the frozen weight is read, never copied."""

    @staticmethod
    def forward(ctx, x, x_lora, weight_t, offsets, counts, scalings, *factors):
        src = x if x_lora is None else x_lora
        out = _grouped(x, weight_t, offsets, counts)
        projected = []
        for i, scaling in enumerate(scalings):
            a_t, b_t = factors[2 * i], factors[2 * i + 1]  # (E, in, r), (E, r, out)
            xa = _grouped(src, a_t, offsets, counts).mul_(scaling)  # (pairs, r)
            out.add_(_grouped(xa, b_t, offsets, counts))
            projected.append(xa)
        ctx.save_for_backward(src, weight_t, offsets, counts, *factors, *projected)
        ctx.scalings, ctx.split = scalings, x_lora is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        src, weight_t, offsets, counts, *rest = ctx.saved_tensors
        n = len(ctx.scalings)
        factors, projected = rest[: 2 * n], rest[2 * n :]
        grad = grad.contiguous()
        grad_x = _grouped(grad, weight_t.transpose(1, 2), offsets, counts) if ctx.needs_input_grad[0] else None
        grad_lora = None
        grads = []
        for i, scaling in enumerate(ctx.scalings):
            a_t, b_t = factors[2 * i], factors[2 * i + 1]
            grad_b = _grouped_outer(projected[i], grad, offsets, counts)  # (E, r, out)
            grad_xa = _grouped(grad, b_t.transpose(1, 2), offsets, counts).mul_(scaling)  # (pairs, r)
            grad_a = _grouped_outer(src, grad_xa, offsets, counts)  # (E, in, r)
            to_x = _grouped(grad_xa, a_t.transpose(1, 2), offsets, counts)
            if ctx.split:
                grad_lora = to_x if grad_lora is None else grad_lora.add_(to_x)
            elif grad_x is not None:
                grad_x.add_(to_x)
            grads += [grad_a, grad_b]
        return (grad_x, grad_lora, None, None, None, None, *grads)


def _grouped_outer(u: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per expert e, u_e^T v_e over its rows: (E, u's width, v's width) (a weight's gradient)."""
    if u.dtype in _GROUPED_DTYPES and _grouped_mm_ok(u) and _aligned(u.t()) and _aligned(v):
        return F.grouped_mm(u.t(), v, offs=offsets)
    return torch.stack(
        [u_e.t() @ v_e for u_e, v_e in zip(torch.split(u, counts.tolist()), torch.split(v, counts.tolist()))]
    )


def _grouped(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x's rows, sorted by expert, each times its expert's (in, out) matrix of `weight` (E, in, out)."""
    weight = weight.to(x.dtype) if weight.dtype != x.dtype else weight
    if x.dtype in _GROUPED_DTYPES and _grouped_mm_ok(x):
        if not _aligned(weight):  # B^T of a rank that is no multiple of 4 (fp32): a small copy
            weight = weight.contiguous()
        if _aligned(weight) and _aligned(x):
            return F.grouped_mm(x, weight, offs=offsets)
    # float64 (tests' reference precision) and devices without the kernel: one matmul per expert.
    parts = [x_e @ weight[e] for e, x_e in enumerate(torch.split(x, counts.tolist()))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[2])


def _aligned(t: torch.Tensor) -> bool:
    """torch's grouped_mm kernel wants 16-byte aligned data and strides (but the unit one)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


class _ExpertsLora(torch.autograd.Function):
    """The experts with their low-rank terms, frozen weights, one node (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, routing, w1, w2, b1, b2, pairs: Pairs, gate, scal1, scal2, *factors):
        perm, token, expert_ids, offsets, counts = pairs
        f1, f2 = factors[: 2 * len(scal1)], factors[2 * len(scal1) :]
        x = torch.index_select(hidden, 0, token)
        gu, xa1 = _lora_project(x, w1, b1, expert_ids, offsets, counts, scal1, f1)
        y, xa2 = _lora_project(gate(gu), w2, b2, expert_ids, offsets, counts, scal2, f2)
        y.mul_(torch.index_select(routing.reshape(-1), 0, perm).unsqueeze(-1).to(y.dtype))
        ctx.save_for_backward(hidden, routing, w1, w2, b1, b2, gu, *factors, *xa1, *xa2)
        ctx.pairs, ctx.gate, ctx.scal1, ctx.scal2 = pairs, gate, scal1, scal2
        return _sum_back(y, pairs, hidden)

    @staticmethod
    def backward(ctx, grad):
        hidden, routing, w1, w2, _, b2, gu, *rest = ctx.saved_tensors
        perm, token, expert_ids, offsets, counts = ctx.pairs
        n1, n2 = len(ctx.scal1), len(ctx.scal2)
        f1, f2 = rest[: 2 * n1], rest[2 * n1 : 2 * (n1 + n2)]
        xa1, xa2 = rest[2 * (n1 + n2) : 2 * (n1 + n2) + n1], rest[2 * (n1 + n2) + n1 :]
        g_y = torch.index_select(grad.contiguous(), 0, token)  # d/d(w y) per pair (pairs, hidden)
        w = torch.index_select(routing.reshape(-1), 0, perm).unsqueeze(-1).to(g_y.dtype)  # (pairs, 1)
        with torch.enable_grad():
            gu_ = gu.detach().requires_grad_()
            h_ = ctx.gate(gu_)
        h = h_.detach()
        # Down projection, before the routing weight: g_h = d/dh of <g_y, y>.
        g_h = _grouped(g_y, w2.transpose(1, 2), offsets, counts)
        grads2 = []
        for i, scaling in enumerate(ctx.scal2):
            a_t, b_t = f2[2 * i], f2[2 * i + 1]
            g_xa = _grouped(g_y, b_t.transpose(1, 2), offsets, counts).mul_(scaling)  # (pairs, r)
            g_h.add_(_grouped(g_xa, a_t.transpose(1, 2), offsets, counts))
            grads2 += [_grouped_outer(h, g_xa * w, offsets, counts), _grouped_outer(xa2[i] * w, g_y, offsets, counts)]
        grad_routing = None
        if ctx.needs_input_grad[1]:
            d_w = (g_h * h).sum(-1)  # <g_y, y - b2> = <g_h, h>
            if b2 is not None:
                d_w += (g_y * torch.index_select(b2, 0, expert_ids).to(g_y.dtype)).sum(-1)
            grad_routing = torch.empty_like(d_w).index_copy_(0, perm, d_w).view(routing.shape).to(routing.dtype)
        (g_gu,) = torch.autograd.grad(h_, gu_, g_h.mul_(w))
        # First projection.
        x = torch.index_select(hidden, 0, token)
        g_x = _grouped(g_gu, w1.transpose(1, 2), offsets, counts)
        grads1 = []
        for i, scaling in enumerate(ctx.scal1):
            a_t, b_t = f1[2 * i], f1[2 * i + 1]
            g_xa = _grouped(g_gu, b_t.transpose(1, 2), offsets, counts).mul_(scaling)
            g_x.add_(_grouped(g_xa, a_t.transpose(1, 2), offsets, counts))
            grads1 += [_grouped_outer(x, g_xa, offsets, counts), _grouped_outer(xa1[i], g_gu, offsets, counts)]
        grad_hidden = torch.zeros_like(hidden).index_add_(0, token, g_x.to(hidden.dtype))
        return (grad_hidden, grad_routing, None, None, None, None, None, None, None, None, *grads1, *grads2)


def _lora_project(x, weight_t, bias, expert_ids, offsets, counts, scalings, factors):
    """x W_e (+ b_e) + sum_i (s_i x A_ie^T) B_ie^T over the sorted pairs, and each (pairs, r) s_i x A^T."""
    out = _grouped(x, weight_t, offsets, counts)
    if bias is not None:
        out.add_(torch.index_select(bias, 0, expert_ids).to(out.dtype))
    projected = []
    for i, scaling in enumerate(scalings):
        xa = _grouped(x, factors[2 * i], offsets, counts).mul_(scaling)
        out.add_(_grouped(xa, factors[2 * i + 1], offsets, counts))
        projected.append(xa)
    return out, projected
