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
- each row's own low-rank pair, gathered once per batch shape (every step of `generate` reuses
  it) into per-row stacks A (rows, r, in) and w s B (rows, out, r), the route's weight and the
  adapter's scaling riding on B;
- two batched matmuls, x A^T then (.) (w s B)^T: when every row has an adapter there, the
  second writes the delta together with the bias and the base matmul accumulates onto it
  (`_delta_then_base`, one pass over the output fewer than adding the delta afterwards); else
  over the gathered rows, added back to the base output (`index_add_`).
Rows are batched by rank, so each adapter keeps its own rank (nothing is padded to the
largest). Measured on a 2-core CPU at MiniLM's and at hidden-2048 shapes (bench/serving.py),
the per-row batched matmul beats sorting rows by adapter into segments (`torch._grouped_mm`,
on CPU a C++ loop of one mm per segment, or a Python loop): the rank-r products of one short
segment each are too small for the matmul kernel, while one batched call keeps it busy.

Embeddings, convolutions and other cases (autocast, dtypes that differ) take the plain path:
per adapter, its rows through the layer's own delta (`layer.adapter_delta`). So does a layer
with a DoRA adapter, whose rows rescale the base output rather than add scaling * B A:
`_fast_ok`, the one gate of both batched paths, asks dispatch.batched_linear_ok (the same
facts that choose a layer's own path), which says no for it, and `adapter_delta` gives the
whole change of those rows' output (dora.output_change). Trained copies of modules_to_save
(a classifier head per adapter) are routed per row too. A PiSSA adapter loaded as such has put
its residual into the base weights, which every row then sees (as `disabled` does); to serve
one beside others, load it with `load_adapter(..., as_lora=True)`, as the adapter store does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..layers import dispatch
from ..layers.base import LoraLayer
from ..layers.fused import Adapter, lora_linear
from ..layers.plain import LoraLinear
from .registry import adapters, cached_wrappers
from .saved_modules import SavedModule

Route = str | None | Mapping[str, float]
_Normal = tuple[tuple[str, float], ...]  # a route as ((name, weight), ...), sorted; () is the base
_MISSING = object()


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
        raise RuntimeError(
            "mixed_batch is for inference: call model.eval() first (dropout and gradients "
            "would need a per-row training path)"
        )
    found = cached_wrappers(model)
    if any(isinstance(m, LoraLayer) and m.merged for m in found):
        raise ValueError("adapters are merged into the weights; call lorakit.unmerge(model) before mixed_batch")
    if any(m.routing is not None for m in found):
        raise RuntimeError("mixed_batch: the model is already inside a mixed_batch block")
    for m in found:  # a plain attribute: nn.Module.__setattr__ would cost microseconds a module
        m.__dict__["routing"] = batch
    try:
        yield batch
    finally:
        for m in found:
            m.__dict__.pop("routing", None)


class MixedBatch:
    """The routes of one `mixed_batch` block; the wrapped layers ask it how to run each forward."""

    def __init__(self, model: nn.Module, routes: Sequence[Route]) -> None:
        self._known = adapters(model)
        self.routes = self._normalise(routes)
        self._plans: dict[int, _RowPlan] = {}  # by the number of rows a forward sees

    def reroute(self, routes: Sequence[Route]) -> None:
        """New routes for the following forwards (e.g. after rows left a generation batch)."""
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
                    f"routes[{row}]: no adapter named {name!r}; the model has {sorted(self._known) or 'none'}"
                )
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
                    f"inside the block must have one row per route, or a whole multiple (generate's copies)"
                )
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
        plan = self._plans.get(x.shape[0]) or self._plan(x.shape[0], layer)
        fast = self._fast_ok(layer, x)
        if plan.uniform is not None:
            return self._uniform(layer, x, plan.uniform, fast)
        groups = [g for g in plan.groups if g.name in layer.scaling]
        if not groups:
            return layer.base_layer(x)
        if fast:
            return self._linear(layer, x, plan, groups)
        return _plain(layer, x, groups)

    def _uniform(self, layer: LoraLayer, x: torch.Tensor, route: _Normal, fast: bool) -> torch.Tensor:
        """Every row has the same route: the layer's own path for those adapters."""
        adapters_ = layer.forward_cache.get(route, _MISSING)  # kept on the layer until its adapters change
        if adapters_ is _MISSING:
            pairs = layer.pairs()
            live = [(pairs[n], layer.scaling[n] * w) for n, w in route if n in pairs]
            adapters_ = layer.forward_cache[route] = [Adapter(a, b, s, 0.0) for (a, b), s in live] or None
        if adapters_ is None:
            return layer.base_layer(x)
        if fast:
            base = layer.base_layer
            return lora_linear(x, base.weight, base.bias, adapters_, layer.fan_in_fan_out, False)
        result = layer.base_layer(x)
        for name, weight in ((n, w) for n, w in route if n in layer.scaling):
            delta = layer.adapter_delta(x, name)
            result = result + (delta if weight == 1.0 else delta * weight)
        return result

    @staticmethod
    def _fast_ok(layer: LoraLayer, x: torch.Tensor) -> bool:
        """Whether the batched linear paths are exact for `layer` here: dispatch.py decides."""
        return dispatch.batched_linear_ok(layer, x)

    # -- the adapted linear ------------------------------------------------------------------
    def _linear(self, layer: LoraLinear, x: torch.Tensor, plan: _RowPlan, groups: list[_Group]) -> torch.Tensor:
        rows = x.shape[0]
        x3 = x.reshape(rows, -1, x.shape[-1])  # (rows, tokens per row, in)
        segments = plan.segments.get(id(layer))
        if segments is None:
            segments = plan.segments[id(layer)] = _segments(layer, plan, groups, x.device)
        if segments[0].rows is None:  # every row adapted: the delta and the bias first, then the base matmul
            y3 = _delta_then_base(layer, x3, segments[0])
            y = y3.view(*x.shape[:-1], y3.shape[-1])
            segments = segments[1:]
        else:  # base rows stay bitwise the base model's: its output first, the deltas added to the others
            y = layer.base_layer(x).contiguous()
            y3 = y.view(rows, x3.shape[1], -1)  # (rows, tokens per row, out)
        for seg in segments:
            xa = torch.bmm(x3 if seg.rows is None else x3.index_select(0, seg.rows), seg.a.transpose(1, 2))
            if seg.factors is not None:  # (n, tokens, r): the scaling is cheapest on the rank-r side
                xa.mul_(seg.factors)
            if seg.rows is None:  # every row: no gather, the delta accumulates into y in place
                y3.baddbmm_(xa, seg.b.transpose(1, 2), alpha=seg.scale)
            else:
                y3.index_add_(0, seg.rows, torch.bmm(xa, seg.b.transpose(1, 2)), alpha=seg.scale)
        return y

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
                f"{type(module.original).__name__} returned {type(out).__name__}"
            )
        routed = out.clone()
        for g in groups:
            rows = g.rows_on(out.device)  # index_copy_ / index_add_ want the index on the output's device
            sub_args, sub_kwargs = _take_rows((args, kwargs), rows, first.shape[0])
            copy_out = module.copies[g.name](*sub_args, **sub_kwargs)
            if g.pure:  # rows routed to this adapter alone, weight 1: its copy's output as it is
                routed.index_copy_(0, rows, copy_out)
            else:
                change = (copy_out - out.index_select(0, rows)) * g.weights_like(copy_out)
                routed.index_add_(0, rows, change.to(routed.dtype))
        return routed


def _delta_then_base(layer: LoraLinear, x3: torch.Tensor, seg: _Segment) -> torch.Tensor:
    """bias + s (x A^T) B^T + x W^T for a segment of every row, (rows, tokens, out).

    The base layer's addmm would first copy the bias into its output and then accumulate the
    matmul there; writing the rank-r delta together with that bias copy (one baddbmm) saves a
    whole read and write of the output, which adding the delta afterwards costs (the rank-8
    products are memory-bound). Equal to base + delta up to the order of the additions.
    """
    base = layer.base_layer
    xa = torch.bmm(x3, seg.a.transpose(1, 2))  # (rows, tokens, r)
    if seg.factors is not None:  # the per-row scaling is cheapest on the rank-r side
        xa.mul_(seg.factors)
    bt = seg.b.transpose(1, 2)
    if base.bias is None:
        y3 = torch.bmm(xa.mul_(seg.scale) if seg.scale != 1.0 else xa, bt)
    else:
        y3 = torch.baddbmm(base.bias, xa, bt, alpha=seg.scale)
    weight = base.weight if layer.fan_in_fan_out else base.weight.t()  # (in, out)
    y3.view(-1, y3.shape[-1]).addmm_(x3.reshape(-1, x3.shape[-1]), weight)
    return y3


class _Group:
    """The rows of one adapter in a batch shape, with their weights."""

    def __init__(self, name: str, rows: list[int], weights: list[float], pure: bool) -> None:
        self.name = name
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.weights = weights  # one per row
        self.unweighted = all(w == 1.0 for w in weights)
        self.pure = pure  # each of these rows is routed to this adapter alone, weight 1
        self._like: dict[tuple, torch.Tensor] = {}
        self._rows_on: dict[torch.device, torch.Tensor] = {}

    def rows_on(self, device: torch.device) -> torch.Tensor:
        """`rows` on `device`, copied there once per batch shape, not on every layer's forward."""
        rows = self._rows_on.get(device)
        if rows is None:
            rows = self._rows_on[device] = self.rows.to(device)
        return rows

    def weights_like(self, t: torch.Tensor) -> torch.Tensor:
        """The row weights shaped to multiply `t` (rows first)."""
        key = (t.dim(), t.dtype, t.device)
        if key not in self._like:
            self._like[key] = torch.tensor(self.weights, dtype=t.dtype, device=t.device).view(-1, *[1] * (t.dim() - 1))
        return self._like[key]


class _RowPlan:
    """One batch shape's routes: the same for every row (uniform), or rows grouped by adapter."""

    def __init__(self, routes: list[_Normal]) -> None:
        self.routes = routes
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
        self.segments: dict[int, list[_Segment]] = {}  # by layer, made on its first forward
        self.layouts: dict[tuple, list] = {}  # by the adapters (name, rank, scaling) a layer holds


class _Segment:
    """Rows of one pass and one rank with their own weights: A (n, r, in) and B (n, out, r), row
    j's adapter in slot j; `rows` None means every row of the batch, in order. Each row's factor
    (its adapter's scaling times its weight) is `scale` when they are all equal, else `factors`."""

    def __init__(self, rows: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, factors: list[float]) -> None:
        self.rows, self.a, self.b = rows, a, b
        uniform = all(f == factors[0] for f in factors)
        self.scale = factors[0] if uniform else 1.0
        self.factors = None if uniform else torch.tensor(factors, dtype=a.dtype, device=a.device).view(-1, 1, 1)


def _segments(layer: LoraLinear, plan: _RowPlan, groups: list[_Group], device: torch.device) -> list[_Segment]:
    """The layer's per-row weights, made once per batch shape (every step of generate reuses them).

    Rows are taken one adapter at a time (pass 0: each row's first adapter on this layer, pass
    1: its second, for weighted mixes), and within a pass by rank, so that each batched matmul
    has one rank and no adapter is padded to another's. Which row goes where is worked out once
    per batch for all the layers that hold the same adapters; the stacks are copies (rows x the
    adapter's size), most of what a mixed batch costs beyond its matmuls.
    """
    pairs = layer.pairs()
    key = tuple((g.name, pairs[g.name][0].shape[0], layer.scaling[g.name]) for g in groups)
    layout = plan.layouts.get(key)
    if layout is None:
        layout = plan.layouts[key] = _layout(plan.routes, key, device)
    with torch.no_grad():
        return [
            _Segment(
                rows, torch.stack([pairs[n][0] for n in names]), torch.stack([pairs[n][1] for n in names]), factors
            )
            for names, rows, factors in layout
        ]


def _layout(routes: list[_Normal], key: tuple, device: torch.device) -> list[tuple[list[str], Any, list[float]]]:
    """(adapter per row, the rows or None for all, factor per row) for each pass and rank."""
    rank = {name: (r, scaling) for name, r, scaling in key}
    by_key: dict[tuple[int, int], list[tuple[int, str, float]]] = {}
    for row, route in enumerate(routes):
        for depth, (name, weight) in enumerate((n, w) for n, w in route if n in rank):
            by_key.setdefault((depth, rank[name][0]), []).append((row, name, weight * rank[name][1]))
    layout = []
    for entries in by_key.values():
        every = len(entries) == len(routes)  # then the rows are 0..n-1, in order
        rows = None if every else torch.tensor([row for row, _, _ in entries], dtype=torch.long, device=device)
        layout.append(([name for _, name, _ in entries], rows, [f for _, _, f in entries]))
    return layout


def _plain(layer: LoraLayer, x: torch.Tensor, groups: list[_Group]) -> torch.Tensor:
    """Any adapted layer: per adapter, its rows through the layer's own delta, added to the base output."""
    y = layer.base_layer(x).contiguous()
    rows = x.shape[0]
    for g in groups:
        rows_g = g.rows_on(x.device)
        delta = layer.adapter_delta(x.index_select(0, rows_g), g.name)
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
