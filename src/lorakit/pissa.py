"""PiSSA adapters: the base weight holds a residual (Meng et al., 2024, arXiv:2404.02948).

A PiSSA adapter starts from the top-r singular triplets of the base weight W: scaling * B0 A0 is
the best rank-r part of W (init_schemes.pissa_pair), and the base weight is replaced by the
residual W - scaling * B0 A0, so the model starts where it was. What that means later, in one place:

- Loading: an adapter file holds only the trained A and B. The residual is computed again from
  the fresh base weight, as PEFT does; it depends on W alone (the SVD's sign choices cancel in
  B0 A0), so the loaded model is the trained one. PEFT's "pissa_niter_N" (a randomized SVD) has
  no such residual to recompute, and is refused when read (peft_format.py).
- The starting factors are kept (AdapterRecord.initial, float32 on the CPU). With them,
  `delete_adapter` and `unload(merge=False)` put the original weight back (to float rounding),
  and the adapter can be written as a plain LoRA adapter for the original base, of twice the rank:
      W_res + s B A  =  W + s (B A - B0 A0)  =  W + s [B, -B0] [A; A0]
  (what PEFT's `path_initial_model_for_weight_conversion` writes). The scaling s stays: alpha
  doubles with the rank, or grows by sqrt(2) under rsLoRA's alpha / sqrt(r).
- A PiSSA adapter shares no module with another adapter: the other would act on the residual
  instead of the base it was made for.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from . import peft_format as fmt
from .config import LoraConfig
from .layers import LoraLayer
from .registry import AdapterRecord, adapters


def check_alone(model: nn.Module, layer: LoraLayer, path: str, config: LoraConfig) -> None:
    """Refuse a PiSSA adapter on a module that has adapters, and any adapter on a PiSSA module."""
    others = [n for n in layer.adapter_names if n in adapters(model)] if isinstance(layer, LoraLayer) else []
    if not others:
        return
    owner = next((n for n in others if path in adapters(model)[n].initial), None)
    if owner is not None:
        raise ValueError(
            f"module {path!r} carries PiSSA adapter {owner!r}, whose residual replaced its base weight; "
            f"another adapter there would act on that residual, not on the base it was made for "
            f"(write {owner!r} as plain LoRA with save_adapter(..., as_lora=True) and load that instead)"
        )
    if config.init == "pissa":
        raise ValueError(
            f"module {path!r} already carries adapters {others}; a PiSSA adapter replaces the base weight "
            "by its residual, which they would then act on. Put the PiSSA adapter on a model of its own"
        )


def start(layer: LoraLayer, path: str, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A0, B0, residual) of `layer`'s base weight; A0, B0 in float32, the residual in the weight's dtype."""
    if layer.merged:
        raise ValueError(f"module {path!r} has merged adapters; unmerge before adding a PiSSA adapter")
    try:
        return layer.pissa(rank, scaling)
    except ValueError as err:
        raise ValueError(f"module {path!r}: {err}") from None


@torch.no_grad()
def restore_base(model: nn.Module, record: AdapterRecord) -> None:
    """Add scaling * B0 A0 back into each PiSSA module's base weight: the original, to rounding."""
    for path, (a0, b0) in record.initial.items():
        layer = model.get_submodule(path)
        weight = layer.base_layer.weight
        delta = record.config.scaling_for(path) * (b0 @ a0).to(weight.device)  # (out, in)
        delta = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
        weight.copy_((weight.float() + delta).to(weight.dtype))


def as_plain_lora(
    model: nn.Module, record: AdapterRecord, state: dict[str, torch.Tensor]
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a PiSSA adapter rewritten as plain LoRA for the original base.

    Each module's pair becomes [A; A0], [B, -B0]; a module of the adapter that PiSSA did not move
    (an embedding in a PEFT file) gets zeros instead, so every pair has twice its rank. Other
    tensors (trained copies, biases) are kept as they are.
    """
    converted = dict(state)
    for path in record.modules:
        keys = fmt.pair_keys(model.get_submodule(path).lookup_table)
        key_a, key_b = fmt.key(path, keys["A"]), fmt.key(path, keys["B"])
        a, b = state[key_a], state[key_b]
        if path in record.initial:
            a0, b0 = (t.to(a.device, a.dtype) for t in record.initial[path])
            b0 = -b0
        else:
            a0, b0 = torch.zeros_like(a), torch.zeros_like(b)
        converted[key_a] = torch.cat([a, a0], dim=0)  # (2r, ...)
        converted[key_b] = torch.cat([b, b0], dim=1)  # (out, 2r, ...)
    return plain_config(record.config), converted


def plain_config(config: LoraConfig) -> LoraConfig:
    """`config` with twice the rank everywhere and the same scaling per module, default init."""
    grow = math.sqrt(2) if config.rslora else 2.0
    return dataclasses.replace(
        config,
        init="default",
        rank=2 * config.rank,
        alpha=config.alpha * grow,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * grow for k, v in config.alpha_pattern.items()},
        modules_to_save=list(config.modules_to_save),
    )
