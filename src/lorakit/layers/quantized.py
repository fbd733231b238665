"""LoRA on a quantized base (QLoRA): the wrapper of bitsandbytes' Linear4bit and Linear8bitLt.

output = base(x) + sum over active adapters of scaling * B(A(dropout(x)))
         (Dettmers et al., 2023, arXiv:2305.14314; Hu et al., 2021, arXiv:2106.09685)

The frozen base stays quantized and runs as the bitsandbytes layer itself computes; the adapters
are float32 parameters, as in QLoRA, and the delta is computed in their dtype. The fast kernel
(quantized_fused.py, chosen by dispatch.py) gives the same numbers in one autograd node.

Merging is where a quantized base differs: W + s B A can only be stored by re-quantizing it, and
the rounding to 4 bits swamps most of a small update, so the merged model is not the trained
one. `merge()` therefore refuses unless asked (`requantize=True`, which records the error it
made in `requantize_error`), and `unmerge()` puts the original quantized weight back exactly.
To merge faithfully, `quantize.dequantize(model)` first turns the base into full-precision
weights (what `lorakit merge` writes).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.bnb import check_quantized, dequantize, keep_layout, quant_type, restore, snapshot
from ..quant.bnb import requantize as store_requantized
from . import dispatch
from .base import LoraLayer
from .plain import LoraLinear

ADAPTER_DTYPE = torch.float32  # QLoRA trains the adapters in full precision over the 4-bit base


class LoraQuantLinear(LoraLinear):
    """A bitsandbytes Linear4bit (NF4 / FP4) or Linear8bitLt, and its float32 adapters."""

    kernels = (dispatch.QUANT_LORA,)

    def __init__(self, base_layer: nn.Module) -> None:
        LoraLayer.__init__(self, base_layer)
        check_quantized(base_layer)
        keep_layout(base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.requantize_error: float | None = None  # max |weight error| of the last re-quantizing merge

    supports_dora = False  # DoRA's norm needs the full-precision weight; dequantize the model first

    def adapter_placement(self) -> tuple[torch.device, torch.dtype]:
        return self.base_layer.weight.device, ADAPTER_DTYPE

    def pissa(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise ValueError(
            f"init='pissa' replaces the base weight, which is quantized here ({quant_type(self.base_layer)}); "
            "use the default init on a quantized base"
        )

    def olora(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise ValueError(
            f"init='olora' replaces the base weight, which is quantized here ({quant_type(self.base_layer)}); "
            "use the default init on a quantized base"
        )

    # -- forward -----------------------------------------------------------------------------
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The bitsandbytes layer, plus each delta computed in the adapter's dtype and cast to the output's."""
        result = self.base_layer(x)
        for name in self.live_adapters():
            result = result + self.adapter_delta(x, name).to(result.dtype)
        return result

    # -- merge -------------------------------------------------------------------------------
    def check_merge(self, requantize: bool = False) -> None:
        if requantize or all(n in self.merged for n in self.active):
            return
        kind = quant_type(self.base_layer)
        raise ValueError(
            f"its base weight is {kind}: merging would re-quantize W + BA to {kind}, and that rounding loses "
            "much of the adapter's update (the merged model is then not the trained one). For full-precision "
            "weights to merge into, call lorakit.dequantize(model) first (`lorakit merge` does); to re-quantize "
            "in place anyway, lorakit.merge(model, requantize=True) (it reports the error it makes)"
        )

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        """Fold the active adapters into the quantized weight: dequantize, add, re-quantize.
        Refused unless `requantize` (see the module docstring)."""
        self.check_merge(requantize)
        pending = [n for n in self.active if n not in self.merged]
        if not pending:
            return
        base = self.base_layer
        if not self.merged:
            self._unmerged = snapshot(base)
        target = dequantize(base, torch.float32)
        for name in pending:
            target += self.delta_weight(name)
        store_requantized(base, target)
        self.requantize_error = float((dequantize(base, torch.float32) - target).abs().max())
        self.merged += pending
        self._changed()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            restore(self.base_layer, self.__dict__.pop("_unmerged"))
            self.merged = []
            self._changed()
