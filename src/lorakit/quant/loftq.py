"""LoftQ initialisation: adapters that start from the quantization error (Li et al., 2023,
arXiv:2310.08659).

QLoRA starts with B = 0, so training starts from the 4-bit model, off from the original by the
quantization error W - deq(Q). LoftQ starts the adapters at the best rank-r approximation of
that error instead: s B A = SVD_r(W - deq(Q)), so deq(Q) + s B A is closer to W than deq(Q) is.
With one iteration (what this file does, and PEFT's default) the quantized base is the ordinary
one, bit for bit what `quantize` and Transformers produce, so the adapter file needs nothing
else: any library that loads the 4-bit base and the adapter gets the same model. (More
iterations would re-quantize W - s B A and change the base itself.)

    pairs = lorakit.loftq_pairs(model, config, "nf4")      # on the full-precision model
    lorakit.quantize(model, "nf4")
    lorakit.add_adapter_from_tensors(model, "default", config, pairs)
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LoraConfig
from ..targets import resolve_targets
from .bnb import dequantize
from .convert import quantized_copy


@torch.no_grad()
def loftq_pairs(
    model: nn.Module, config: LoraConfig, kind: str = "nf4", compute_dtype: torch.dtype | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each module `config` targets in the full-precision `model`: (A, B) in float32 with
    s B A the rank-r SVD of the error that quantizing its weight to `kind` makes. The model is
    not changed; quantize it with the same `kind` and `compute_dtype` before adding the pairs."""
    pairs = {}
    for path in resolve_targets(model, config.targets, config.layers, exclude=list(config.modules_to_save)):
        linear = model.get_submodule(path)
        if type(linear) is not nn.Linear:
            raise ValueError(f"LoftQ: module {path!r} is a {type(linear).__name__}; it needs nn.Linear targets")
        weight = linear.weight.detach().float()
        error = weight - dequantize(quantized_copy(linear, kind, compute_dtype), torch.float32)
        pairs[path] = _low_rank(error / config.scaling_for(path), config.rank_for(path))
    return pairs


def _low_rank(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A the best rank-`rank` approximation of `error` (out, in), the singular
    values split evenly between them."""
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root).contiguous()
