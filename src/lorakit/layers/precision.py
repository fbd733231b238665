"""The precision lorakit computes weight-sized results in: norms, deltas and merges.

In bfloat16 / float16 the rounding of W + s B A would swamp much of a small update, so these
are computed in float32 (float64 stays float64) and rounded once where they are stored.
"""

from __future__ import annotations

import torch


def precise(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32, or float64 if it is float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
