"""Mixed-adapter batches: each row of a batch through its own adapters, in one forward.

One base model in memory serves many adapters at once (S-LoRA, Sheng et al., 2023,
arXiv:2311.03285; Punica, Chen et al., 2023, arXiv:2310.18547). Inside
`mixed_batch(model, routes)` row i of every forward goes through routes[i]: an adapter name,
None (the base model), or {name: weight} (base + the weighted sum of those adapters' deltas).
Transformers' `generate` works inside the block: when it grows the batch by a whole multiple
(num_return_sequences, beams) each row's copies follow that row's route.

How an adapted linear layer computes it (`_linear`):
- the base output for the whole batch, exactly as the base model computes it, so a base row
  is bitwise the base model's;
- the rows that have adapters are gathered, sorted by adapter (the sort is made once per batch
  shape, not per layer call), and pushed through one segment matmul per rank:
  x_s A_g^T, then (s_g B_g)^T, with `torch._grouped_mm` (on CPU a C++ loop of mm over the
  segments, exact) or, where that is missing, a Python loop of the same products;
- the deltas are added back to their rows (`index_add_`).
Each adapter keeps its own rank; a rank is only rounded up to the grouped matmul's alignment
(4 floats, 8 halves) with zero rows, which add exact zeros. The weight stacks are built once
per context and reused by every later forward (the steps of `generate`).

Embeddings, convolutions and other cases (autocast, dtypes that differ) take the plain path:
per adapter, its rows through the layer's own delta. Trained copies of modules_to_save (a
classifier head per adapter) are routed per row too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from .fused import Adapter, autocast_on, lora_linear
from .layers import LoraLayer, LoraLinear
from .registry import adapters, wrappers
from .saved_modules import SavedModule

Route = Union[str, None, Mapping[str, float]]
_Normal = tuple[tuple[str, float], ...]  # a route as ((name, weight), ...), sorted; () is the base

_GROUPED_MM = getattr(torch, "_grouped_mm", None)
_ALIGN_BYTES = 16  # what the grouped matmul needs of every leading dimension


@contextlib.contextmanager
def mixed_batch(model: nn.Module, routes: Sequence[Route]) -> Iterator[MixedBatch]:
    """Inside the block, row i of each forward of `model` goes through `routes[i]`.

    A route is an adapter name, None (the base model alone) or {name: weight, ...} (the base
    plus the weighted sum of those adapters' deltas). Unknown names are a ValueError listing
    the model's adapters, raised before anything changes. Inference only: the model must be in
    eval mode, with no adapter merged. Yields the `MixedBatch`, whose `reroute` changes the
    routes between forwards (rows leaving a generation batch).
    """
    batch = MixedBatch(model, routes)
    if model.training:
        raise RuntimeError("mixed_batch is for inference: call model.eval() first (dropout and gradients "
                           "would need a per-row training path)")
    found = [m for _, m in wrappers(model)]
    if any(isinstance(m, LoraLayer) and m.merged for m in found):
        raise ValueError("adapters are merged into the weights; call lorakit.unmerge(model) before mixed_batch")
    if any(m.routing is not None for m in found):
        raise RuntimeError("mixed_batch: the model is already inside a mixed_batch block")
    for m in found:
        m.routing = batch
    try:
        yield batch
    finally:
        for m in found:
            m.routing = None


class MixedBatch:
    """The routes of one `mixed_batch` block; the wrapped layers ask it how to run each forward."""

    def __init__(self, model: nn.Module, routes: Sequence[Route]) -> None:
        self._known = adapters(model)
        self.routes = self._normalise(routes)
        self._plans: dict[int, _RowPlan] = {}  # by the number of rows a forward sees
        self._stacks: dict[tuple[int, int, bool], _Stack] = {}  # by (layer, padded rank, grouped)

    def reroute(self, routes: Sequence[Route]) -> None:
        """New routes for the following forwards (the weight stacks are kept where they fit)."""
        self.routes = self._normalise(routes)
        self._plans.clear()

    def _normalise(self, routes: Sequence[Route]) -> list[_Normal]:
        if isinstance(routes, (str, Mapping)) or not isinstance(routes, Sequence) or not routes:
            raise ValueError(f"routes must be a non-empty list with one route per row, got {routes!r}")
        return [self._normal(route, i) for i, route in enumerate(routes)]

    def _normal(self, route: Route, row: int) -> _Normal:
        if route is None:
            return ()
        items = [(route, 1.0)] if isinstance(route, str) else None
        if isinstance(route, Mapping):
            items = list(route.items())
        if items is None:
            raise ValueError(f"routes[{row}]: expected an adapter name, None or {{name: weight}}, got {route!r}")
        normal = []
        for name, weight in items:
            if name not in self._known:
                raise ValueError(
                    f"routes[{row}]: no adapter named {name!r}; the model has {sorted(self._known) or 'none'}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"routes[{row}]: the weight of {name!r} must be a finite number, got {weight!r}")
            if weight:
                normal.append((name, float(weight)))
        return tuple(sorted(normal))

    # -- what a forward of N rows means ------------------------------------------------------
    def _plan(self, rows: int, module: nn.Module) -> _RowPlan:
        plan = self._plans.get(rows)
        if plan is None:
            n = len(self.routes)
            if rows % n:
                raise ValueError(
                    f"mixed_batch: {type(module).__name__} got {rows} rows, but there are {n} routes; a forward "
                    f"inside the block must have one row per route, or a whole multiple (generate's copies)")
            plan = self._plans[rows] = _RowPlan([self.routes[r // (rows // n)] for r in range(rows)])
        return plan

    def forward(self, layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        """An adapted layer's output, each row through its own route."""
        if layer.training:
            raise RuntimeError("mixed_batch is for inference: call model.eval() first")
        if layer.merged:
            raise ValueError("adapters are merged into the weights; call lorakit.unmerge(model) before mixed_batch")
        if not layer.enabled or x.dim() == 0:
            return layer.base_layer(x)
        plan = self._plan(x.shape[0], layer)
        if plan.uniform is not None:
            return self._uniform(layer, x, plan.uniform)
        groups = [g for g in plan.groups if g.name in layer.scaling]
        if not groups:
            return layer.base_layer(x)
        if isinstance(layer, LoraLinear) and self._fast_ok(layer, x):
            return self._linear(layer, x, plan, groups)
        return _plain(layer, x, groups)

    def _uniform(self, layer: LoraLayer, x: torch.Tensor, route: _Normal) -> torch.Tensor:
        """Every row has the same route: the layer's own path for those adapters."""
        live = [(n, w) for n, w in route if n in layer.scaling]
        if not live:
            return layer.base_layer(x)
        if isinstance(layer, LoraLinear) and self._fast_ok(layer, x):
            key = (id(layer), 0, False)  # the uniform path's Adapter list, kept like the stacks
            stack = self._stacks.get(key)
            if stack is None or stack.names != tuple(live):
                fast = [Adapter(*layer.pair(n), layer.scaling[n] * w, 0.0) for n, w in live]
                stack = self._stacks[key] = _Stack(tuple(live), fast, None, 0)
            base = layer.base_layer
            return lora_linear(x, base.weight, base.bias, stack.a, layer.fan_in_fan_out, False)
        result = layer.base_layer(x)
        for name, weight in live:
            delta = layer._delta(x, name)
            result = result + (delta if weight == 1.0 else delta * weight)
        return result

    @staticmethod
    def _fast_ok(layer: LoraLinear, x: torch.Tensor) -> bool:
        """Whether the linear's grouped path is exact here (as LoraLinear.forward decides for its own)."""
        base = layer.base_layer
        if type(base) is not nn.Linear and not layer.fan_in_fan_out:
            return False
        if base._forward_hooks or base._forward_pre_hooks or autocast_on(x.device.type):
            return False
        return x.dtype == base.weight.dtype

    # -- the adapted linear ------------------------------------------------------------------
    def _linear(self, layer: LoraLinear, x: torch.Tensor, plan: _RowPlan, groups: list[_Group]) -> torch.Tensor:
        y = layer.base_layer(x).contiguous()
        rows = x.shape[0]
        x3 = x.reshape(rows, -1, x.shape[-1])  # (rows, tokens per row, in)
        per_row = x3.shape[1]
        for segments in self._segments(layer, plan, groups, x):
            xs = x3.index_select(0, segments.rows).reshape(-1, x3.shape[-1])  # (entries * tokens, in)
            delta = segments.delta(xs, per_row)  # (entries * tokens, out)
            y.view(rows, -1).index_add_(0, segments.rows, delta.view(segments.rows.numel(), -1))
        return y

    def _segments(self, layer: LoraLinear, plan: _RowPlan, groups: list[_Group], x: torch.Tensor) -> list[_Segments]:
        """The layer's adapter rows, one `_Segments` per padded rank, made once per batch shape."""
        cached = plan.segments.get(id(layer))
        if cached is not None:
            return cached
        align = _ALIGN_BYTES // x.element_size()
        grouped = (
            _GROUPED_MM is not None
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and layer.in_features % align == 0
            and layer.out_features % align == 0
        )
        by_rank: dict[int, list[_Group]] = {}
        for g in groups:
            rank = layer.rank(g.name)
            by_rank.setdefault(-(-rank // align) * align if grouped else rank, []).append(g)
        found = []
        for padded, members in sorted(by_rank.items()):
            names = tuple(g.name for g in members)
            key = (id(layer), padded, grouped)
            stack = self._stacks.get(key)
            if stack is None or not set(names) <= set(stack.names):
                stack = self._stacks[key] = _build_stack(layer, names, padded if grouped else 0)
            found.append(_Segments(stack, members, grouped, x.device))
        plan.segments[id(layer)] = found
        return found

    # -- modules_to_save ---------------------------------------------------------------------
    def forward_saved(self, module: SavedModule, args: tuple, kwargs: dict) -> Any:
        """A trained module copy per row: a row's adapter's copy, the original for base rows and
        adapters without one; a weighted route gives original + sum of w * (copy - original)."""
        if module.training:
            raise RuntimeError("mixed_batch is for inference: call model.eval() first")
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim()), None)
        if not module.enabled or first is None:
            return module.original(*args, **kwargs)
        plan = self._plan(first.shape[0], module)
        if plan.uniform is not None and len(plan.uniform) == 1 and plan.uniform[0][1] == 1.0:
            name = plan.uniform[0][0]
            return (module.copies[name] if name in module.copies else module.original)(*args, **kwargs)
        groups = [g for g in plan.groups if g.name in module.copies]
        out = module.original(*args, **kwargs)
        if not groups:
            return out
        if not isinstance(out, torch.Tensor) or out.shape[:1] != first.shape[:1]:
            raise TypeError(
                f"mixed_batch routes modules_to_save whose output is one tensor with a row per input row; "
                f"{type(module.original).__name__} returned {type(out).__name__}")
        routed = out.clone()
        for g in groups:
            sub_args, sub_kwargs = _take_rows((args, kwargs), g.rows, first.shape[0])
            copy_out = module.copies[g.name](*sub_args, **sub_kwargs)
            if g.pure:  # rows routed to this adapter alone, weight 1: its copy's output as it is
                routed.index_copy_(0, g.rows, copy_out)
            else:
                change = (copy_out - out.index_select(0, g.rows)) * g.weights_like(copy_out)
                routed.index_add_(0, g.rows, change.to(routed.dtype))
        return routed


class _Group:
    """The rows of one adapter in a batch shape, with their weights."""

    def __init__(self, name: str, rows: list[int], weights: list[float], pure: bool) -> None:
        self.name = name
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.weights = weights  # one per row
        self.unweighted = all(w == 1.0 for w in weights)
        self.pure = pure  # each of these rows is routed to this adapter alone, weight 1
        self._like: dict[tuple, torch.Tensor] = {}

    def weights_like(self, t: torch.Tensor) -> torch.Tensor:
        """The row weights shaped to multiply `t` (rows first)."""
        key = (t.dim(), t.dtype, t.device)
        if key not in self._like:
            self._like[key] = torch.tensor(self.weights, dtype=t.dtype, device=t.device).view(-1, *[1] * (t.dim() - 1))
        return self._like[key]


class _RowPlan:
    """One batch shape's routes: the same for every row (uniform), or rows grouped by adapter."""

    def __init__(self, routes: list[_Normal]) -> None:
        self.uniform = routes[0] if all(r == routes[0] for r in routes) else None
        members: dict[str, tuple[list[int], list[float], bool]] = {}
        for row, route in enumerate(routes):
            for name, weight in route:
                rows, weights, _ = members.setdefault(name, ([], [], True))
                rows.append(row)
                weights.append(weight)
                if len(route) > 1 or weight != 1.0:
                    members[name] = (rows, weights, False)
        self.groups = [_Group(n, *members[n]) for n in sorted(members)]
        self.segments: dict[int, list[_Segments]] = {}  # by layer, made on its first forward


class _Stack:
    """One layer's adapters of one padded rank as stacked weights: A (G, r_pad, in) and s*B
    (G, out, r_pad), zero-padded; for the loop, lists of A and s*B; for the uniform path, the
    Adapter list in `a`."""

    def __init__(self, names: tuple, a: Any, b: Any, padded: int) -> None:
        self.names, self.a, self.b, self.padded = names, a, b, padded


def _build_stack(layer: LoraLinear, names: tuple[str, ...], padded: int) -> _Stack:
    """A (G, r_pad, in) and s*B (G, out, r_pad) for the grouped matmul; with padded=0, the
    per-adapter (A, s*B) pairs for the loop."""
    if not padded:
        pairs = [layer.pair(n) for n in names]
        return _Stack(names, [a for a, _ in pairs], [b * layer.scaling[n] for (_, b), n in zip(pairs, names)], 0)
    weight = layer.lora_A[names[0]].weight
    a = weight.new_zeros(len(names), padded, layer.in_features)
    b = weight.new_zeros(len(names), layer.out_features, padded)
    with torch.no_grad():
        for g, name in enumerate(names):
            pa, pb = layer.pair(name)
            a[g, : pa.shape[0]] = pa
            torch.mul(pb, layer.scaling[name], out=b[g, :, : pb.shape[1]])
    return _Stack(names, a, b, padded)


class _Segments:
    """The rows of the adapters of one stack, sorted by adapter, and how to get their deltas."""

    def __init__(self, stack: _Stack, groups: list[_Group], grouped: bool, device: torch.device) -> None:
        self.stack, self.grouped = stack, grouped
        by_name = {g.name: g for g in groups}
        ordered = [by_name.get(n) for n in stack.names]  # stack order; None: not in this batch
        self.sizes = [g.rows.numel() if g is not None else 0 for g in ordered]
        present = [g for g in ordered if g is not None]
        self.rows = torch.cat([g.rows for g in present]).to(device)
        weights = [w for g in present for w in g.weights]
        self.weights = None if all(w == 1.0 for w in weights) else torch.tensor(weights)
        self._per_tokens: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _by_tokens(self, per_row: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cumulative segment ends in tokens, int32; weight per token or None) for rows of `per_row` tokens."""
        if per_row not in self._per_tokens:
            ends = torch.tensor(self.sizes, dtype=torch.int64).cumsum(0).mul_(per_row).to(torch.int32)
            weights = None
            if self.weights is not None:
                weights = self.weights.to(like.dtype).repeat_interleave(per_row).view(-1, 1).to(like.device)
            self._per_tokens[per_row] = (ends, weights)
        return self._per_tokens[per_row]

    def delta(self, xs: torch.Tensor, per_row: int) -> torch.Tensor:
        """(entries * tokens, out): each entry's tokens through its adapter, scaled and weighted."""
        ends, weights = self._by_tokens(per_row, xs)
        stack = self.stack
        if self.grouped:
            xa = _GROUPED_MM(xs, stack.a.transpose(1, 2), offs=ends)  # (tokens, r_pad)
            if weights is not None:
                xa.mul_(weights)
            return _GROUPED_MM(xa, stack.b.transpose(1, 2), offs=ends)
        out = xs.new_empty(xs.shape[0], stack.b[0].shape[0])
        start = 0
        for a, b, end in zip(stack.a, stack.b, ends.tolist()):
            if end > start:
                xa = xs[start:end] @ a.t()
                if weights is not None:
                    xa.mul_(weights[start:end])
                torch.mm(xa, b.t(), out=out[start:end])
            start = end
        return out


def _plain(layer: LoraLayer, x: torch.Tensor, groups: list[_Group]) -> torch.Tensor:
    """Any adapted layer: per adapter, its rows through the layer's own delta, added to the base output."""
    y = layer.base_layer(x).contiguous()
    rows = x.shape[0]
    for g in groups:
        rows_g = g.rows.to(x.device)
        delta = layer._delta(x.index_select(0, rows_g), g.name)
        if not g.unweighted:
            delta = delta * g.weights_like(delta)
        y.view(rows, -1).index_add_(0, rows_g, delta.to(y.dtype).reshape(rows_g.numel(), -1))
    return y


def _take_rows(call: tuple[tuple, dict], rows: torch.Tensor, batch: int) -> tuple[tuple, dict]:
    """The call's arguments with every batch-sized tensor cut to `rows`."""
    args, kwargs = call

    def take(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch:
            return a.index_select(0, rows.to(a.device))
        return a

    return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}
