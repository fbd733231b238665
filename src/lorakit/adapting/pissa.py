"""PiSSA and OLoRA adapters: the base weight holds a residual (Meng et al., 2024, arXiv:2404.02948;
Büyükakyüz, 2024, arXiv:2406.01775).

A PiSSA adapter starts from the top-r singular triplets of the base weight W: scaling * B0 A0 is
the best rank-r part of W (init_schemes.pissa_pair), and the base weight is replaced by the
residual W - scaling * B0 A0, so the model starts where it was. An OLoRA adapter is the same with
B0, A0 the first r columns of Q and rows of R of W's QR (init_schemes.olora_pair); everything
below holds for both ("PiSSA" stands for either). What that means later, in one place:

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

from ..config import LoraConfig
from ..files import peft_format as fmt
from ..layers.base import LoraLayer
from ..layers.kinds import wrapper_for
from ..targets import adaptable_kind
from .given import get_adapted, given_pair
from .registry import AdapterRecord, adapters

RESIDUAL_INITS = {"pissa": "PiSSA", "olora": "OLoRA"}  # the inits whose base weight holds a residual


def check_alone(model: nn.Module, layer: LoraLayer, path: str, config: LoraConfig) -> None:
    """Refuse a PiSSA adapter on a module that has adapters, and any adapter on a PiSSA module.

    O(1) per module however many adapters the model holds (a store loads thousands): a PiSSA
    module holds its PiSSA adapter alone, so only a module with one adapter can be one.
    """
    if not isinstance(layer, LoraLayer) or not layer.scaling:
        return
    known = adapters(model)
    if not any(n in known for n in layer.scaling):
        return
    only = next(iter(layer.scaling)) if len(layer.scaling) == 1 else None
    owner = only if only is not None and path in known[only].initial else None
    if owner is not None:
        raise ValueError(
            f"module {path!r} carries {RESIDUAL_INITS.get(known[owner].config.init, 'PiSSA')} adapter "
            f"{owner!r}, whose residual replaced its base weight; "
            f"another adapter there would act on that residual, not on the base it was made for "
            f"(write {owner!r} as plain LoRA with save_adapter(..., as_lora=True) and load that instead)"
        )
    if config.init in RESIDUAL_INITS:
        raise ValueError(
            f"module {path!r} already carries adapters {[n for n in layer.scaling if n in known]}; "
            f"a {RESIDUAL_INITS[config.init]} adapter replaces "
            f"the base weight by its residual, which they would then act on. Put the {RESIDUAL_INITS[config.init]} "
            "adapter on a model of its own"
        )


def start(
    layer: LoraLayer, path: str, rank: int, scaling: float, init: str = "pissa"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A0, B0, residual) of `layer`'s base weight for `init` ("pissa" or "olora"); A0, B0 in
    float32, the residual in the weight's dtype."""
    if layer.merged:
        raise ValueError(f"module {path!r} has merged adapters; unmerge before adding a {RESIDUAL_INITS[init]} adapter")
    try:
        return layer.pissa(rank, scaling) if init == "pissa" else layer.olora(rank, scaling)
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


def plain_pairs(
    model: nn.Module, config: LoraConfig, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A PiSSA (or OLoRA) adapter's trained pairs as plain LoRA over the model's base weights as they are:
    as_plain_lora's [A; A0], [B, -B0], with A0, B0 worked out from each base weight as loading
    would. The base is left unchanged, so other adapters and the base model itself can share it
    (`load_adapter(..., as_lora=True)`, which lorakit serve uses). Each given pair is checked
    against its module first (given.TensorError names the module and A or B)."""

    converted = {}
    for path, pair in pairs.items():
        module = get_adapted(model, path)
        layer = module if isinstance(module, LoraLayer) else wrapper_for(adaptable_kind(module))(module)
        rank, scaling = config.rank_for(path), config.scaling_for(path)
        a, b = given_pair(layer, path, rank, pair)
        if layer.lookup_table:  # an embedding of a PiSSA adapter stays plain LoRA (build_plan)
            a0, b0 = torch.zeros_like(a), torch.zeros_like(b)
        else:
            a0, b0, _ = start(layer, path, rank, scaling, config.init)
            a0, b0 = a0.to(a.dtype), -b0.to(b.dtype)
        converted[path] = (torch.cat([a, a0], dim=0), torch.cat([b, b0], dim=1))
    return plain_config(config), converted


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
