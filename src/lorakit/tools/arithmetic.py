"""Adapter arithmetic: a new adapter from weighted trained ones (task arithmetic on LoRA deltas).

With weights w_i and each source's delta dW_i = s_i B_i A_i, `combine` builds, per module:

- "cat":    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1 B_2 ...]: rank r_1 + r_2 + ..., and exactly
            the weighted sum of the deltas.
- "linear": A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i (all of one rank):
            the sources' rank, but not their weighted sum (the cross terms B_i A_j remain).
- "svd":    D = sum_i w_i dW_i, cut to `rank` by truncated SVD (B = U S, A = V^T).
- "ties":   TIES-merging (Yadav et al., 2023, arXiv:2306.01708) of the deltas: each keeps its
            `density` fraction of largest |entries|; each entry's sign is elected by the sum of the
            kept values; the weighted entries that agree with it are averaged; then SVD to `rank`.
- "dare":   DARE (Yu et al., 2023, arXiv:2311.03099): each delta keeps an entry with probability
            `density` and is rescaled by 1 / density (random from `seed`); the weighted sum, then
            SVD to `rank`.

The new adapter has scaling 1 (alpha = rank), no dropout, and is added like a loaded one
(`add_adapter_from_tensors`, not trainable, not made active), so it saves as a normal adapter.
TIES and DARE are defined on whole weight updates, so they prune the deltas, not the factors.
PEFT's `add_weighted_adapter` gives the same outputs for its "cat", "linear" and "svd", and for
"ties_svd" / "dare_linear_svd" (ours "ties" / "dare", with its random stream seeded the same).

The report gives, per module, how far the new delta is from the one the method aims at (the
weighted sum; for ties and dare the merged delta before the SVD), relative in Frobenius norm:
what the low rank (or, for "linear", the factor-wise sum) loses.

Trained copies of modules_to_save combine the same way as deltas: original + sum w_i (copy_i -
original). DoRA adapters and adapters that train biases are refused: a magnitude rescales the
whole weight and a trained bias lives in the base model, so neither is a delta that adds up.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapting.manage import add_adapter_from_tensors
from ..adapting.registry import adapters, check_new_name, lora_layers, refuse_if_merged, wrappers
from ..config import LoraConfig
from ..layers.base import LoraLayer
from ..layers.experts import ExpertSlice, LoraExpertParam

METHODS = ("linear", "cat", "svd", "ties", "dare")


@dataclass
class CombineReport:
    """What `combine` built: the new adapter's name, method and rank, and its error per module."""

    name: str
    method: str
    rank: int
    errors: dict[str, float] = field(default_factory=dict)  # module path -> relative Frobenius error

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / max(len(self.errors), 1)


def combine(
    model: nn.Module,
    weights: dict[str, float],
    name: str,
    method: str = "svd",
    *,
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
) -> CombineReport:
    """Add adapter `name`, the `weights`-weighted combination of the model's adapters (see above).

    `rank`: the new rank for "svd", "ties" and "dare" (default: the largest source rank; a module
    narrower than that keeps its full rank). `density` in (0, 1]: the fraction kept by "ties" and
    "dare". `seed`: DARE's random stream. Everything is checked before the model changes.
    """
    sources = _check(model, weights, name, method, rank, density)
    known = adapters(model)
    layers = {p: m for p, m in wrappers(model) if isinstance(m, LoraLayer)}
    modules = [p for p in layers if any(p in known[n].modules for n in sources)]  # model order
    target_rank = rank or max(layers[p].rank(n) for p in modules for n in sources if n in layers[p].adapter_names)
    generator = torch.Generator().manual_seed(seed) if method == "dare" else None
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    for path in modules:
        layer = layers[path]
        present = [(n, sources[n]) for n in sources if n in layer.adapter_names]
        a, b, aim = _combine_any(layer, present, method, target_rank, density, generator)
        pairs[path] = (a, b)
        got = torch.bmm(_precise(b), _precise(a)) if isinstance(layer, LoraExpertParam) else _delta(a, b, 1.0)
        errors[path] = _relative_error(got, aim)
    ranks = {
        p: layers[p].rank_of(a) if isinstance(layers[p], LoraExpertParam) else a.shape[0] for p, (a, _) in pairs.items()
    }
    common = Counter(ranks.values()).most_common(1)[0][0]
    odd = {p: r for p, r in ranks.items() if r != common}  # scaling 1 everywhere: alpha follows rank
    saved_paths = list(dict.fromkeys(p for n in sources for p in known[n].saved))
    on_experts = [p for p in modules if isinstance(layers[p], LoraExpertParam)]
    config = LoraConfig(
        rank=common,
        alpha=common,
        targets=[p for p in modules if p not in on_experts],
        target_parameters=on_experts,
        rank_pattern=odd,
        alpha_pattern=dict(odd),
        modules_to_save=saved_paths,
    )
    saved = {p: _combine_copies(model.get_submodule(p), sources) for p in saved_paths}
    add_adapter_from_tensors(model, name, config, pairs, saved=saved, trainable=False)
    return CombineReport(name=name, method=method, rank=common, errors=errors)


# ---- checks --------------------------------------------------------------------------------


def _check(model, weights, name, method, rank, density) -> dict[str, float]:
    check_new_name(model, name)
    refuse_if_merged(model, "combining adapters")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(weights, dict) or not weights:
        raise ValueError("weights must map adapter names to numbers, e.g. {'a': 0.6, 'b': 0.4}")
    known = adapters(model)
    for n, w in weights.items():
        if n not in known:
            raise ValueError(f"no adapter named {n!r}; the model has {sorted(known) or 'none'}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"the weight of {n!r} must be a finite number, got {w!r}")
        config = known[n].config
        if config.use_dora:
            raise ValueError(
                f"adapter {n!r} is a DoRA adapter: its magnitudes rescale whole weights and do not "
                "add up like low-rank deltas; combine works on LoRA adapters (merge a DoRA one instead)"
            )
        if config.bias != "none":
            raise ValueError(
                f"adapter {n!r} trains biases (bias={config.bias!r}), which live in the base model and "
                "cannot be weighted per adapter; combine adapters trained with bias='none'"
            )
    low_rank = method in ("svd", "ties", "dare")
    if rank is not None and (not low_rank or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(
            f"rank (an integer >= 1) applies to the methods svd, ties and dare; got rank={rank!r} "
            f"with method {method!r}"
        )
    if method in ("ties", "dare"):
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(
                f"method {method!r} needs density, the fraction of each delta kept, in (0, 1]; got {density!r}"
            )
    elif density is not None:
        raise ValueError(f"density applies to the methods ties and dare, not {method!r}")
    if method == "linear":
        for layer in lora_layers(model):
            ranks = {n: layer.rank(n) for n in weights if n in layer.adapter_names}
            if len(set(ranks.values())) > 1:
                raise ValueError(
                    f"method 'linear' needs adapters of one rank, but they have ranks {ranks}; "
                    "use 'cat' (exact) or 'svd'"
                )
    return {n: float(w) for n, w in weights.items()}


# ---- per module ----------------------------------------------------------------------------


def _precise(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s B A as an (out, in...) matrix: (out, r) @ (r, in * kernel)."""
    r = a.shape[0]
    return scaling * (_precise(b).reshape(b.shape[0], r) @ _precise(a).reshape(r, -1))


def _combine_any(
    layer: LoraLayer,
    present: list[tuple[str, float]],
    method: str,
    rank: int,
    density: float | None,
    generator: torch.Generator | None,
):
    """`_combine_layer`, for fused expert parameters one expert at a time (each its own low-rank
    pair), the results stacked back to (E, r, in) / (E, out, r)."""
    if not isinstance(layer, LoraExpertParam):
        return _combine_layer(layer, present, method, rank, density, generator)
    parts = [
        _combine_layer(ExpertSlice(layer, e), present, method, rank, density, generator)
        for e in range(layer.num_experts)
    ]
    a, b, aim = (torch.stack(t) for t in zip(*parts))
    return a, b, aim


def _combine_layer(
    layer: LoraLayer,
    present: list[tuple[str, float]],
    method: str,
    rank: int,
    density: float | None,
    generator: torch.Generator | None,
):
    """(A, B, the delta the method aims at) for one module; A and B in the layer's dtype and layout."""
    dtype = layer.pair(present[0][0])[0].dtype
    factors = [(*layer.pair(n), layer.scaling[n], w) for n, w in present]
    if method == "cat":
        a = torch.cat([_precise(a) * (w * s) for a, _, s, w in factors])
        b = torch.cat([_precise(b) for _, b, _, _ in factors], dim=1)
        aim = sum(w * _delta(a_, b_, s) for a_, b_, s, w in factors)
        return a.to(dtype), b.to(dtype), aim
    if method == "linear":
        a = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * _precise(a) for a, _, s, w in factors)
        b = sum(math.sqrt(abs(w * s)) * _precise(b) for _, b, s, w in factors)
        aim = sum(w * _delta(a_, b_, s) for a_, b_, s, w in factors)
        return a.to(dtype), b.to(dtype), aim
    deltas = [_delta(a, b, s) for a, b, s, _ in factors]
    ws = [w for *_, w in factors]
    if method == "ties":
        aim = _ties(deltas, ws, density)
    elif method == "dare":
        # The random masks are drawn over each delta in the base weight's own layout, as PEFT does.
        transposed = layer.out_dim == 1
        kept = [_dare(d.T if transposed else d, density, generator) for d in deltas]
        aim = sum(w * (k.T if transposed else k) for w, k in zip(ws, kept))
    else:
        aim = sum(w * d for w, d in zip(ws, deltas))
    a_shape, b_shape = layer.pair_shapes(1)
    u, s, vh = torch.linalg.svd(aim, full_matrices=False)
    k = min(rank, s.shape[0])  # a narrower module keeps its full rank
    a = vh[:k].reshape(k, *a_shape[1:])
    b = (u[:, :k] * s[:k]).reshape(b_shape[0], k, *b_shape[2:])
    return a.to(dtype), b.to(dtype), aim


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` with all but its int(density * numel) largest |entries| zeroed."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[t.abs().flatten().topk(k).indices] = 1
    return t * mask.view(t.shape)


def _ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    kept = torch.stack([_keep_largest(d, density) for d in deltas])
    elected = torch.where(kept.sum(0) >= 0, 1.0, -1.0).to(kept.dtype)  # the sign of the kept mass
    agree = (kept.sign() == elected).to(kept.dtype)  # a zeroed entry agrees with neither sign
    weighted = kept * torch.tensor(weights, dtype=kept.dtype).view(-1, *[1] * (kept.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def _dare(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _relative_error(got: torch.Tensor, aim: torch.Tensor) -> float:
    scale = torch.linalg.norm(aim).item()
    return torch.linalg.norm(got - aim).item() / scale if scale > 0 else torch.linalg.norm(got).item()


def _combine_copies(wrapper: nn.Module, sources: dict[str, float]) -> dict[str, torch.Tensor]:
    """The state of a modules_to_save copy: original + sum w_i (copy_i - original)."""
    original = wrapper.original.state_dict()
    state = {k: _precise(v).clone() if v.is_floating_point() else v.clone() for k, v in original.items()}
    for n, w in sources.items():
        if n in wrapper.copies:
            for k, v in wrapper.copies[n].state_dict().items():
                if v.is_floating_point():
                    state[k] += w * (_precise(v) - _precise(original[k]))
    return {k: v.to(original[k].dtype) for k, v in state.items()}
