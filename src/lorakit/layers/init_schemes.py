"""How a new adapter's A and B start.

- "default": A as nn.Linear initialises its weight (kaiming-uniform), B zero, so B A = 0 and
  the adapted model starts exactly at the base model (Hu et al., 2021). Embeddings flip the
  roles (A zero, B normal) since their A is a lookup table.
- "gaussian": A ~ N(0, 1/r), B zero.
- "pissa": A and B from the top-r singular triplets of the base weight, and the base weight
  replaced by the residual, so the sum is unchanged (Meng et al., 2024, arXiv:2404.02948).
- "olora": A and B from the QR decomposition of the base weight, B the first r orthonormal
  columns of Q and A the first r rows of R, and the base weight replaced by the residual
  W - s B A, as with PiSSA (Büyükakyüz, 2024, arXiv:2406.01775).
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def init_pair(mode: str, a: torch.Tensor, b: torch.Tensor, *, embedding: bool = False) -> None:
    """Initialise A (r, ...) and B (out, r, ...) in place for the "default" and "gaussian" modes."""
    rank = a.shape[0]
    if embedding:
        nn.init.zeros_(a)
        nn.init.normal_(b)
    elif mode == "gaussian":
        nn.init.normal_(a, std=1.0 / rank)
        nn.init.zeros_(b)
    else:
        # a=sqrt(5) makes this nn.Linear's own default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)


@torch.no_grad()
def pissa_pair(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual) for a (out, in) weight: scaling * B A + residual == weight (up to rounding).

    Each factor carries sqrt(S) / sqrt(scaling), so B A is the rank-r part divided by scaling.
    A and B are float32 (the SVD's precision; the caller casts them), the residual has the
    weight's dtype. A rank above min(out, in) has no singular triplets to take: refused.
    """
    if rank > min(weight.shape):
        raise ValueError(
            f"PiSSA rank {rank} is above the layer's size: its {tuple(weight.shape)} weight has "
            f"{min(weight.shape)} singular values (give it rank <= {min(weight.shape)}, e.g. with rank_pattern)"
        )
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    # contiguous: the SVD hands out column-major factors, and a parameter's layout picks the matmul
    # kernel, so a reloaded (row-major) adapter would round differently from the trained one.
    a = (root[:, None] * vh[:rank]).contiguous()  # (r, in)
    b = (u[:, :rank] * root[None, :]).contiguous()  # (out, r)
    residual = weight.float() - (scaling * b) @ a  # PEFT's order of operations, so both agree bitwise
    return a, b, residual.to(weight.dtype)


@torch.no_grad()
def olora_pair(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual) for a (out, in) weight: scaling * B A + residual == weight (up to rounding).

    W = Q R; B = Q[:, :r] (orthonormal columns), A = R[:r]. Unlike PiSSA the factors are not
    divided by the scaling (PEFT's choice, kept so that its OLoRA adapters mean the same here):
    the residual is W - s Q_r R_r. A and B are float32, the residual has the weight's dtype, as
    with `pissa_pair`; a rank above min(out, in) has no columns of Q to take: refused.
    """
    if rank > min(weight.shape):
        raise ValueError(
            f"OLoRA rank {rank} is above the layer's size: the QR of its {tuple(weight.shape)} weight has "
            f"{min(weight.shape)} columns (give it rank <= {min(weight.shape)}, e.g. with rank_pattern)"
        )
    q, r = torch.linalg.qr(weight.float())  # reduced: Q (out, k), R (k, in)
    a, b = r[:rank].contiguous(), q[:, :rank].contiguous()
    residual = weight.float() - (scaling * b) @ a  # PEFT's order of operations
    return a, b, residual.to(weight.dtype)
