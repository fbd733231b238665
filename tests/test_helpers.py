"""helpers.assert_rounding_close, the one rule for float32 numbers pinned to a reference: it
accepts sums of the same terms taken in other orders and rejects a real (small) error."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rounding_close

pytestmark = pytest.mark.numeric


def _orders(terms: torch.Tensor) -> list[torch.Tensor]:
    """The row sums of `terms` in float32 taken four ways: one by one forwards and backwards,
    pairwise (torch's own), and through a matmul (a BLAS kernel's blocking)."""
    forward, backward = torch.zeros(terms.shape[0]), torch.zeros(terms.shape[0])
    for k in range(terms.shape[1]):
        forward += terms[:, k]
        backward += terms[:, -1 - k]
    return [forward, backward, terms.sum(1), terms @ torch.ones(terms.shape[1])]


@pytest.mark.parametrize("n", [8, 200, 4096])
def test_sums_in_any_order_agree_within_the_rule(n):
    terms = torch.randn(64, n, generator=torch.Generator().manual_seed(n)) * 3.0
    exact = terms.double().sum(1)
    for got in _orders(terms):
        assert_rounding_close(got, exact, n=n)
        assert_rounding_close(got, _orders(terms)[2], n=n)


def test_an_error_above_rounding_is_caught():
    terms = torch.randn(64, 200, generator=torch.Generator().manual_seed(0))
    want = terms.sum(1)
    wrong = want.clone()
    wrong[5] += 1e-4 * want.abs().max()  # a bug that changes one value by 1e-4 of the scale
    with pytest.raises(AssertionError):
        assert_rounding_close(wrong, want, n=200)
    with pytest.raises(AssertionError):
        assert_rounding_close(want * (1 + 1e-4), want, n=200)
