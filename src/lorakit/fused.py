"""The fast path of the adapted linear: base matmul and low-rank delta in one autograd node.

y = x W^T + b + sum_i s_i * (dropout_i(x) A_i^T) B_i^T        (Hu et al., 2021, arXiv:2106.09685)

The plain composition (`LoraLinear.reference_forward`) builds a full (tokens, out) tensor per
adapter, scales it, adds it, and lets autograd keep whatever each op saves. Here:

- With many tokens (see `_fold_pays`) and float32/64, the adapters without dropout ride inside
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
  SwiGLU MLP), those are kept instead and x is recomputed in backward (see `_recipe`).
- A dropout mask is not stored: the RNG state before it is, and backward draws it again.
- B's gradient is computed as (xa^T g)^T, which streams g row by row (the g^T xa order that
  autograd uses is several times slower on CPU for a wide layer).

`lora_linear` is a pure function on tensors; `LoraLinear.forward` calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Below this many weights folding gains nothing (see _fold_pays).
_FOLD_MIN_WEIGHTS = 64 * 64


class Adapter:
    """One live adapter as the fast path sees it: A (r, in), B (out, r), scaling, dropout p."""

    __slots__ = ("a", "b", "scaling", "dropout")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float) -> None:
        self.a, self.b, self.scaling, self.dropout = a, b, float(scaling), float(dropout)


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
    dropouts = tuple(a.dropout if training else 0.0 for a in adapters)
    scalings = tuple(a.scaling for a in adapters)
    tensors = [a.a for a in adapters] + [a.b for a in adapters]
    fold = _fold_pays(x, weight, dropouts)
    if torch.is_grad_enabled() and (
        x.requires_grad
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or any(t.requires_grad for t in tensors)
    ):
        return _LoraLinear.apply(x, weight, bias, scalings, dropouts, fan_in_fan_out, fold, *tensors)
    if not torch.is_grad_enabled():  # inference: no context to enter (a few microseconds a call)
        return _forward(x, weight, bias, tensors, scalings, dropouts, fan_in_fan_out, fold, None, False)[0]
    with torch.no_grad():
        return _forward(x, weight, bias, tensors, scalings, dropouts, fan_in_fan_out, fold, None, False)[0]


def _fold_pays(x: torch.Tensor, weight: torch.Tensor, dropouts: tuple[float, ...]) -> bool:
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


def _folded_weight(weight, tensors, scalings, dropouts, fan_in_fan_out) -> torch.Tensor:
    """W + sum of s_i B_i A_i over the dropout-free adapters, in W's own layout."""
    k = len(scalings)
    out = weight
    for i in range(k):
        if dropouts[i]:
            continue
        a, b = tensors[i], tensors[k + i]
        if fan_in_fan_out:  # W is (in, out)
            out = torch.addmm(out, a.t(), b.t(), alpha=scalings[i])
        else:
            out = torch.addmm(out, b, a, alpha=scalings[i])
    return out


# The rank-r products, one function each (bench/ablate.py times them one by one).


def _project(x2: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x A^T: (tokens, r)."""
    return x2 @ a.t()


def _project_grad(g: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s g B: (tokens, r), the scaling applied on the rank-r side."""
    return (g @ b).mul_(s)


def _grad_b(xa: torch.Tensor, g: torch.Tensor, s: float) -> torch.Tensor:
    """B's gradient s (xa^T g)^T: (out, r), in the order that streams g (module docstring)."""
    return torch.mm(xa.t(), g).mul_(s).t()


def _grad_a(gb: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
    """A's gradient gb^T x: (r, in)."""
    return gb.t() @ xd


def _forward(x, weight, bias, tensors, scalings, dropouts, fan_in_fan_out, fold, rng_states, keep_xa):
    """(y, x as (tokens, in), [rank-r intermediates or None])."""
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    w = _folded_weight(weight, tensors, scalings, dropouts, fan_in_fan_out) if fold else weight
    w_t = w if fan_in_fan_out else w.t()  # (in, out)
    y = torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t  # (tokens, out)
    xas = add_deltas(y, x, x2, tensors, scalings, dropouts, fold, rng_states, keep_xa)
    return y.view(*x.shape[:-1], y.shape[-1]), x2, xas


def add_deltas(y, x, x2, tensors, scalings, dropouts, fold, rng_states, keep_xa) -> list[torch.Tensor | None]:
    """Add the adapters not folded into the weight to y (tokens, out) in place; returns each
    adapter's x A^T (tokens, r) where backward needs it, else None."""
    k = len(scalings)
    xas: list[torch.Tensor | None] = [None] * k
    for i in range(k):
        a, b, p = tensors[i], tensors[k + i], dropouts[i]
        if fold and not p:
            if keep_xa and xas[i] is None:
                xas[i] = _project(x2, a)  # for B's gradient
            continue
        if p:
            if rng_states is not None:
                rng_states.append(_rng_state(x.device))
            xd = F.dropout(x, p, True).reshape(x2.shape)
        else:
            xd = x2
        xa = _project(xd, a)
        y.addmm_(xa, b.t(), alpha=scalings[i])
        xas[i] = xa
    return xas


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scalings, dropouts, fan_in_fan_out, fold, *tensors):
        k = len(scalings)
        rng_states: list[torch.Tensor] = []
        keep_xa = any(t.requires_grad for t in tensors[k:])
        y, x2, xas = _forward(x, weight, bias, tensors, scalings, dropouts, fan_in_fan_out, fold, rng_states, keep_xa)
        ctx.scalings, ctx.dropouts, ctx.fan_in_fan_out, ctx.fold = scalings, dropouts, fan_in_fan_out, fold
        ctx.rng_states = rng_states
        ctx.x_shape, ctx.x_stride = x.shape, x.stride()
        ctx.has_bias = bias is not None
        # x is needed for A's (or the weight's) gradient only.
        need_x = weight.requires_grad or any(t.requires_grad for t in tensors[:k])
        kept = keep_input(ctx, x, x2, need_x)
        xas = [xa if xa is not None else x2.new_empty(0) for xa in xas]
        ctx.save_for_backward(*kept, weight, *tensors, *xas)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        kept, weight, rest = saved[: ctx.n_kept], saved[ctx.n_kept], saved[ctx.n_kept + 1 :]
        k = len(ctx.scalings)
        a_s, b_s, xas = rest[:k], rest[k : 2 * k], rest[2 * k :]
        scalings, dropouts, fifo = ctx.scalings, ctx.dropouts, ctx.fan_in_fan_out
        need = ctx.needs_input_grad  # x, weight, bias, scalings, dropouts, fifo, fold, *A, *B
        x2 = kept_input(ctx, kept)
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (tokens, out)

        grad_x = None
        if need[0]:
            w = _folded_weight(weight, list(a_s) + list(b_s), scalings, dropouts, fifo) if ctx.fold else weight
            grad_x = g @ (w.t() if fifo else w)  # (tokens, in)
        grad_w = None
        if need[1]:
            grad_w = x2.t() @ g if fifo else g.t() @ x2
        grad_bias = g.sum(0) if ctx.has_bias and need[2] else None

        grad_a, grad_b = adapter_grads(ctx, g, x2, grad_x, a_s, b_s, xas, need[7 : 7 + k], need[7 + k :])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, grad_w, grad_bias, None, None, None, None, *grad_a, *grad_b)


def adapter_grads(ctx, g, x2, grad_x, a_s, b_s, xas, need_a, need_b):
    """The adapters' gradients (lists of A's and B's, None where not needed); adds their share of
    x's gradient into `grad_x` (tokens, in) in place, unless folded into the weight.

    `ctx` carries scalings, dropouts, fold, rng_states, x_shape and x_stride of the forward.
    """
    k = len(ctx.scalings)
    grad_a: list[torch.Tensor | None] = [None] * k
    grad_b: list[torch.Tensor | None] = [None] * k
    states = iter(ctx.rng_states)
    for i in range(k):
        a, b, xa, s, p = a_s[i], b_s[i], xas[i], ctx.scalings[i], ctx.dropouts[i]
        noise = _dropout_noise(next(states), ctx.x_shape, ctx.x_stride, p, g) if p else None
        if need_b[i]:
            grad_b[i] = _grad_b(xa, g, s)
        folded = ctx.fold and not p  # then x's gradient already holds this adapter's share
        if need_a[i] or (grad_x is not None and not folded):
            gb = _project_grad(g, b, s)
            if need_a[i]:
                xd = x2 if noise is None else x2 * noise
                grad_a[i] = _grad_a(gb, xd)
            if grad_x is not None and not folded:
                if noise is None:
                    grad_x.addmm_(gb, a)
                else:
                    grad_x.addcmul_(gb @ a, noise)
    return grad_a, grad_b


def keep_input(ctx, x: torch.Tensor, x2: torch.Tensor, need_x: bool) -> tuple[torch.Tensor, ...]:
    """The tensors to save for x (x2 is x as (tokens, in)): none, x itself, or what GELU /
    SwiGLU keep anyway (`_recipe`); notes on ctx how `kept_input` gets x back."""
    recipe = _recipe(x) if need_x else None
    ctx.recompute = recipe[1] if recipe is not None else None
    kept = recipe[0] if recipe is not None else ((x2,) if need_x else ())
    ctx.n_kept = len(kept)
    return kept


def kept_input(ctx, kept: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """x as (tokens, in) in backward, from what `keep_input` saved (None if nothing)."""
    if not kept:
        return None
    x2 = kept[0] if ctx.recompute is None else ctx.recompute(*kept)
    return x2.reshape(-1, ctx.x_shape[-1])


def _recipe(x: torch.Tensor):
    """(tensors autograd keeps anyway, how to get x back from them), or None.

    When x is GELU's output, GELU keeps its input; when x is a product a * b of two tensors
    that both need gradients (SwiGLU's act(gate) * up), the product keeps both factors.
    Holding those instead of x costs no memory, and redoing the one elementwise op gives x
    back bit for bit. Autograd checks the kept tensors' versions on access, so an in-place
    change to them fails loudly rather than silently.
    """
    fn = x.grad_fn
    kind = type(fn).__name__ if fn is not None else ""
    if kind not in ("GeluBackward0", "MulBackward0"):
        return None
    if _saved_tensor_hooks_active():
        return None  # saved tensors are packed elsewhere (checkpointing, offloading): keep x plainly
    try:
        if kind == "GeluBackward0":
            sources, approximate = (fn._saved_self,), fn._saved_approximate
            redo = lambda s: F.gelu(s, approximate=approximate)  # noqa: E731
        else:
            sources, redo = (fn._saved_self, fn._saved_other), torch.mul
    except (AttributeError, RuntimeError):
        return None
    if any(not isinstance(t, torch.Tensor) or t.dtype != x.dtype for t in sources):
        return None
    if kind == "GeluBackward0" and sources[0].shape != x.shape:
        return None
    return sources, redo


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (the fast path then defers to the reference)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _saved_tensor_hooks_active() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):  # private API; assume the worst
        return True


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
    state: torch.Tensor, shape: torch.Size, stride: tuple[int, ...], p: float, like: torch.Tensor
) -> torch.Tensor:
    """The mask (scaled by 1/(1-p)) that F.dropout drew from `state`, drawn again, as (tokens, in)."""
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
