"""Rows of a generation batch on Transformers' KV cache: padding prompts, dropping rows that
finished, joining a freshly prefilled group to the running batch, and cutting columns that no
row attends to any more.

A batch is left-padded: every row's cache ends in the same column, padding sits on the left and
the attention mask hides it; each row's position ids count its own tokens, so a row computes what
it would alone. Joining pads the narrower cache on the left; nothing a row attends to moves.
"""

from __future__ import annotations

from typing import Any

import torch


def pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of the rows padded to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Each row's position ids under its attention mask: its own tokens count from 0 (padding 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def select_rows(past: Any, index: torch.Tensor) -> None:
    """Keep only rows `index` of a Transformers KV cache, in place."""
    if hasattr(past, "batch_select_indices"):
        past.batch_select_indices(index)
    else:
        past.reorder_cache(index)


def _tensors(past: Any) -> list[Any]:
    """The cache's layers, each with `keys` and `values` of (rows, heads, columns, head_dim).
    Only plain growing layers (DynamicLayer): a sliding-window or static layer keeps columns by
    other rules, so joining one is refused (the engine then runs those rows alone)."""
    layers = getattr(past, "layers", None)
    if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        raise NotImplementedError(
            f"joining KV caches needs Transformers' DynamicCache of DynamicLayer "
            f"layers; this model's cache is {type(past).__name__}"
        )
    return layers


def join(past: Any, mask: torch.Tensor, other: Any, other_mask: torch.Tensor) -> torch.Tensor:
    """Append the rows of cache `other` to cache `past` (in place), both left-padded to the wider;
    the joint attention mask (rows of `past`, then of `other`)."""
    width = max(mask.shape[1], other_mask.shape[1])
    for layer, extra in zip(_tensors(past), _tensors(other)):
        layer.keys = torch.cat([_widen(layer.keys, width), _widen(extra.keys, width)])
        layer.values = torch.cat([_widen(layer.values, width), _widen(extra.values, width)])
    return torch.cat([_widen_mask(mask, width), _widen_mask(other_mask, width)])


def trim(past: Any, mask: torch.Tensor) -> torch.Tensor:
    """Cut the leading columns that every row masks (left by rows that left the batch); the mask
    without them. A row's result does not change: masked columns weigh nothing."""
    used = mask.any(0).nonzero()
    cut = int(used[0]) if len(used) else mask.shape[1]
    if cut == 0:
        return mask
    for layer in _tensors(past):
        layer.keys = layer.keys[:, :, cut:]
        layer.values = layer.values[:, :, cut:]
    return mask[:, cut:]


def _widen(t: torch.Tensor, width: int) -> torch.Tensor:
    short = width - t.shape[2]
    if short == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], short, t.shape[3]), t], dim=2)


def _widen_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    short = width - mask.shape[1]
    return mask if short == 0 else torch.cat([mask.new_zeros(mask.shape[0], short), mask], dim=1)
