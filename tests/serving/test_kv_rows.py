"""kv_rows: joining two left-padded caches and trimming columns no row attends to keep each row's
keys and values where its mask says, on Transformers' DynamicCache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lorakit.serving import kv_rows


def cache(rows: int, width: int, seed: int) -> DynamicCache:
    g = torch.Generator().manual_seed(seed)
    layers = [
        (torch.randn(rows, 2, width, 4, generator=g), torch.randn(rows, 2, width, 4, generator=g)) for _ in range(2)
    ]
    return DynamicCache(layers)


def attended(past: DynamicCache, mask: torch.Tensor, row: int) -> list[torch.Tensor]:
    """The keys of `row` in the columns its mask keeps, per layer."""
    return [layer.keys[row, :, mask[row].bool()] for layer in past.layers]


def test_join_pads_the_narrower_cache_on_the_left_and_keeps_what_each_row_attends():
    a, b = cache(2, 5, 0), cache(1, 3, 1)
    mask_a = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    mask_b = torch.tensor([[0, 1, 1]])
    before = [attended(a, mask_a, 0), attended(a, mask_a, 1), attended(b, mask_b, 0)]
    mask = kv_rows.join(a, mask_a, b, mask_b)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert all(layer.keys.shape == (3, 2, 5, 4) for layer in a.layers)
    for row, want in enumerate(before):
        for got, expected in zip(attended(a, mask, row), want):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_trim_cuts_the_columns_every_row_masks():
    a = cache(2, 6, 2)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    before = [attended(a, mask, 0), attended(a, mask, 1)]
    trimmed = kv_rows.trim(a, mask)
    assert trimmed.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]] and a.layers[0].keys.shape[2] == 4
    for row, want in enumerate(before):
        for got, expected in zip(attended(a, trimmed, row), want):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_cache_of_other_layers_is_refused():
    a = cache(1, 2, 3)
    a.layers[0] = object()
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        kv_rows.join(a, torch.ones(1, 2, dtype=torch.long), cache(1, 2, 4), torch.ones(1, 2, dtype=torch.long))
