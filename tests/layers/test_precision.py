"""layers/precision.py: weight-sized results in float32 at least, float64 kept."""

from __future__ import annotations

import pytest
import torch

from lorakit.layers.precision import precise


@pytest.mark.parametrize(
    ("dtype", "want"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_precise_dtype(dtype, want):
    t = torch.tensor([1.0, 2.5], dtype=dtype)
    assert precise(t).dtype == want
    assert torch.equal(precise(t).to(dtype), t)  # exact: no value is changed on the way up
