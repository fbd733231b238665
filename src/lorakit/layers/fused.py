"""The fast path of the adapted linear: base matmul and low-rank delta in one autograd node, and
the rank-r pieces the other kernels (dora.py, quantized_fused.py) are built from.

y = x W^T + b + sum_i s_i * (dropout_i(x) A_i^T) B_i^T        (Hu et al., 2021, arXiv:2106.09685)

The plain composition (`LoraLayer.reference_forward`) builds a full (tokens, out) tensor per
adapter, scales it, adds it, and lets autograd keep whatever each op saves. Here:

- With many tokens (see `fold_pays`) and float32/64, the adapters without dropout ride inside
  the base matmul: x (W + s B A)^T costs what x W^T costs, and forming W + s B A is a rank-r
  update of one weight-sized buffer, rebuilt on every call and never kept, so nothing can go
  stale and the base weight is never written. Backward rebuilds it for x's gradient. Not in
  bf16/fp16: rounding W + s B A to that precision would lose much of the small update.
  (Stacking [W; A] into one matmul to get x A^T for free measured no faster here, and it
  hands the model a strided output.)
- Otherwise the delta is accumulated into the base output in place (`addmm_`), the scaling
  riding on the rank-r product (`alpha=s`) instead of a full-size multiply.
- Backward keeps what the math needs: the input x (one tensor for sibling projections that
  read it, e.g. query/key/value), the (tokens, r) intermediates and the weights. When x is
  the output of an op that keeps its own inputs (GELU; the product act(gate) * up of a
  SwiGLU MLP), those are kept instead and x is recomputed in backward
  (`torch_internals.recompute_recipe`, which checks at import that torch still keeps them).
- A dropout mask is not stored: the RNG state before it is, and backward draws it again.
- B's gradient is computed as (xa^T g)^T, which streams g row by row (the g^T xa order that
  autograd uses is several times slower on CPU for a wide layer).

Adapters come in as `Adapter` objects; inside one call each is a `Term`, which also carries
what forward leaves for backward. They are flattened to tensors only where autograd needs
them: the autograd Function's inputs (A_0, B_0, A_1, B_1, ...) and `save_terms`.
`lora_linear` is a pure function on tensors; dispatch.py calls it for LoraLinear.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import torch_internals

# Below this many weights folding gains nothing (see fold_pays).
_FOLD_MIN_WEIGHTS = 64 * 64


class Adapter:
    """One live adapter as a kernel sees it: A (r, in), B (out, r), scaling, dropout p."""

    __slots__ = ("a", "b", "scaling", "dropout")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float) -> None:
        self.a, self.b, self.scaling, self.dropout = a, b, float(scaling), float(dropout)


class Term:
    """One adapter inside one call of a kernel: A, B, scaling, its dropout in this call (none
    outside training), whether it rides in the folded weight, and what forward leaves for
    backward: x A^T where B's gradient needs it, the RNG state its dropout mask came from."""

    __slots__ = ("a", "b", "scaling", "dropout", "folded", "xa", "rng_state")

    def __init__(
        self, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float = 0.0, folded: bool = False
    ) -> None:
        self.a, self.b, self.scaling, self.dropout, self.folded = a, b, scaling, dropout, folded
        self.xa: torch.Tensor | None = None
        self.rng_state: torch.Tensor | None = None


def terms_of(adapters: Sequence[Adapter], training: bool) -> list[Term]:
    """The adapters for one call; their dropout applies only when `training`."""
    return [Term(ad.a, ad.b, ad.scaling, ad.dropout if training else 0.0) for ad in adapters]


def flat(terms: Sequence[Term]) -> list[torch.Tensor]:
    """The terms' A and B as autograd's inputs: A_0, B_0, A_1, B_1, ..."""
    return [t for term in terms for t in (term.a, term.b)]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: Sequence[Adapter],
    fan_in_fan_out: bool = False,
    training: bool = False,
) -> torch.Tensor:
    """base(x) + the adapters' deltas; an adapter's dropout applies only when `training`.

    `weight` is (out, in), or (in, out) with `fan_in_fan_out` (Transformers' Conv1D).
    """
    terms = terms_of(adapters, training)
    mark_folded(terms, fold_pays(x, weight, [t.dropout for t in terms]))
    tensors = flat(terms)
    if torch.is_grad_enabled() and (
        x.requires_grad
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or any(t.requires_grad for t in tensors)
    ):
        return _LoraLinear.apply(x, weight, bias, fan_in_fan_out, terms, *tensors)
    if not torch.is_grad_enabled():  # inference: no context to enter (a few microseconds a call)
        return _forward(x, weight, bias, fan_in_fan_out, terms, False)[0]
    with torch.no_grad():
        return _forward(x, weight, bias, fan_in_fan_out, terms, False)[0]


def fold_pays(x: torch.Tensor, weight: torch.Tensor, dropouts: Sequence[float]) -> bool:
    """Whether to fold the dropout-free adapters into the weight for this call.

    Forming W + s B A touches a weight-sized buffer; the in-place path instead makes extra
    passes over x and y. Measured on CPU, folding wins from about 1.5 d_in d_out / (d_in + d_out)
    tokens on (e.g. 290 for 384 x 384, 3,000 for 4096 x 4096). Below a 64 x 64 weight both
    paths cost what their calls cost; the in-place one is then kept, as it adds the delta to
    the base output exactly as the reference does.
    """
    if weight.dtype not in (torch.float32, torch.float64) or all(dropouts):
        return False
    d_a, d_b = weight.shape
    if d_a * d_b < _FOLD_MIN_WEIGHTS:
        return False
    tokens = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    return tokens * (d_a + d_b) >= 1.5 * d_a * d_b


def mark_folded(terms: Sequence[Term], fold: bool) -> None:
    """With `fold`, every dropout-free term rides in the folded weight."""
    for term in terms:
        term.folded = fold and not term.dropout


def folded_weight(weight: torch.Tensor, terms: Sequence[Term], fan_in_fan_out: bool) -> torch.Tensor:
    """W + sum of s B A over the folded terms, in W's own layout (W itself if none is)."""
    out = weight
    for term in terms:
        if not term.folded:
            continue
        if fan_in_fan_out:  # W is (in, out)
            out = torch.addmm(out, term.a.t(), term.b.t(), alpha=term.scaling)
        else:
            out = torch.addmm(out, term.b, term.a, alpha=term.scaling)
    return out


# The rank-r products, one function each (bench/ablate.py times them one by one).


def project(x2: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x A^T: (tokens, r)."""
    return x2 @ a.t()


def project_grad(g: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s g B: (tokens, r), the scaling applied on the rank-r side."""
    return (g @ b).mul_(s)


def grad_b(xa: torch.Tensor, g: torch.Tensor, s: float) -> torch.Tensor:
    """B's gradient s (xa^T g)^T: (out, r), in the order that streams g (module docstring)."""
    return torch.mm(xa.t(), g).mul_(s).t()


def grad_a(gb: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
    """A's gradient gb^T x: (r, in)."""
    return gb.t() @ xd


def _forward(x, weight, bias, fan_in_fan_out, terms, record) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x as (tokens, in)); with `record`, the terms keep what backward needs."""
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    w = folded_weight(weight, terms, fan_in_fan_out)
    w_t = w if fan_in_fan_out else w.t()  # (in, out)
    y = torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t  # (tokens, out)
    add_deltas(y, x, x2, terms, record)
    return y.view(*x.shape[:-1], y.shape[-1]), x2


def add_deltas(y: torch.Tensor, x: torch.Tensor, x2: torch.Tensor, terms: Sequence[Term], record: bool) -> None:
    """Add the terms not folded into the weight to y (tokens, out) in place. With `record`
    (an autograd forward), each term keeps x A^T where B's gradient needs it and the RNG state
    its dropout mask is drawn from."""
    for term in terms:
        keep_xa = record and term.b.requires_grad
        if term.folded:
            if keep_xa:
                term.xa = project(x2, term.a)  # for B's gradient
            continue
        if term.dropout:
            if record:
                term.rng_state = _rng_state(x.device)
            xd = F.dropout(x, term.dropout, True).reshape(x2.shape)
        else:
            xd = x2
        xa = project(xd, term.a)
        y.addmm_(xa, term.b.t(), alpha=term.scaling)
        if keep_xa:
            term.xa = xa


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, terms, *tensors):
        # `tensors` is flat(terms), handed to apply so that autograd tracks A and B.
        y, x2 = _forward(x, weight, bias, fan_in_fan_out, terms, True)
        ctx.fan_in_fan_out, ctx.has_bias = fan_in_fan_out, bias is not None
        ctx.x_layout = (x.shape, x.stride())
        # x is needed for A's (or the weight's) gradient only.
        need_x = weight.requires_grad or any(term.a.requires_grad for term in terms)
        kept = keep_input(ctx, x, x2, need_x)
        save_terms(ctx, (*kept, weight), terms)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        front, terms = saved_terms(ctx)
        kept, weight = front[:-1], front[-1]
        need = ctx.needs_input_grad  # x, weight, bias, fan_in_fan_out, terms, A_0, B_0, A_1, ...
        fifo = ctx.fan_in_fan_out
        x2 = kept_input(ctx, kept)
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (tokens, out)

        grad_x = None
        if need[0]:
            w = folded_weight(weight, terms, fifo)
            grad_x = g @ (w.t() if fifo else w)  # (tokens, in)
        grad_w = None
        if need[1]:
            grad_w = x2.t() @ g if fifo else g.t() @ x2
        grad_bias = g.sum(0) if ctx.has_bias and need[2] else None

        grads = adapter_grads(g, x2, grad_x, terms, need[5:], ctx.x_layout)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_layout[0])
        return (grad_x, grad_w, grad_bias, None, None, *grads)


def adapter_grads(
    g: torch.Tensor,
    x2: torch.Tensor | None,
    grad_x: torch.Tensor | None,
    terms: Sequence[Term],
    needs: Sequence[bool],
    x_layout: tuple[torch.Size, tuple[int, ...]],
) -> list[torch.Tensor | None]:
    """The terms' gradients in autograd's order (A_0, B_0, A_1, ...; None where `needs` says
    not needed); adds their share of x's gradient into `grad_x` (tokens, in) in place, unless
    folded into the weight. `x_layout` is x's (shape, stride): a dropout mask is drawn again
    for a tensor of that layout."""
    grads: list[torch.Tensor | None] = []
    for term, need_a, need_b in zip(terms, needs[0::2], needs[1::2]):
        s, p = term.scaling, term.dropout
        noise = _dropout_noise(term.rng_state, x_layout, p, g) if p else None
        ga = gb = None
        if need_b:
            gb = grad_b(term.xa, g, s)
        shares_x = grad_x is not None and not term.folded  # folded: x's gradient already holds it
        if need_a or shares_x:
            g_proj = project_grad(g, term.b, s)
            if need_a:
                ga = grad_a(g_proj, x2 if noise is None else x2 * noise)
            if shares_x:
                if noise is None:
                    grad_x.addmm_(g_proj, term.a)
                else:
                    grad_x.addcmul_(g_proj @ term.a, noise)
        grads += (ga, gb)
    return grads


# ---- what a kernel keeps for backward ----------------------------------------------------------


def save_terms(ctx: Any, front: tuple[torch.Tensor | None, ...], terms: list[Term]) -> None:
    """save_for_backward of `front`, then each term's A, B and x A^T, so that autograd guards
    them (saved-tensor hooks pack them, version checks catch in-place writes); the terms stay on
    ctx with their numbers only. `saved_terms` gives both back."""
    tensors = list(front)
    for term in terms:
        tensors += (term.a, term.b, term.xa)
        term.a = term.b = term.xa = None
    ctx.save_for_backward(*tensors)
    ctx.terms, ctx.n_front = terms, len(front)


def saved_terms(ctx: Any) -> tuple[tuple[torch.Tensor | None, ...], list[Term]]:
    """(front, terms) as `save_terms` took them."""
    saved, n = ctx.saved_tensors, ctx.n_front
    for i, term in enumerate(ctx.terms):
        term.a, term.b, term.xa = saved[n + 3 * i : n + 3 * i + 3]
    return saved[:n], ctx.terms


def keep_input(ctx: Any, x: torch.Tensor, x2: torch.Tensor, need_x: bool) -> tuple[torch.Tensor, ...]:
    """The tensors to save for x (x2 is x as (tokens, in)): none, x itself, or what GELU /
    SwiGLU keep anyway (torch_internals.recompute_recipe); notes on ctx how `kept_input` gets
    x back."""
    recipe = torch_internals.recompute_recipe(x) if need_x else None
    ctx.recompute = recipe[1] if recipe is not None else None
    kept = recipe[0] if recipe is not None else ((x2,) if need_x else ())
    ctx.n_kept, ctx.in_features = len(kept), x.shape[-1]
    return kept


def kept_input(ctx: Any, kept: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """x as (tokens, in) in backward, from what `keep_input` saved (None if nothing)."""
    if not kept:
        return None
    x2 = kept[0] if ctx.recompute is None else ctx.recompute(*kept)
    return x2.reshape(-1, ctx.in_features)


# ---- dropout masks, drawn again in backward ----------------------------------------------------


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _dropout_noise(
    state: torch.Tensor, x_layout: tuple[torch.Size, tuple[int, ...]], p: float, like: torch.Tensor
) -> torch.Tensor:
    """The mask (scaled by 1/(1-p)) that F.dropout drew from `state`, drawn again, as (tokens, in)."""
    shape, stride = x_layout
    device = like.device
    current = _rng_state(device)
    _set_rng_state(device, state)
    try:
        # F.dropout draws its mask for a tensor of x's shape and strides; ones give the mask itself.
        ones = torch.empty_strided(shape, stride, dtype=like.dtype, device=device).fill_(1)
        noise = F.dropout(ones, p, True)
    finally:
        _set_rng_state(device, current)
    return noise.reshape(-1, shape[-1])
