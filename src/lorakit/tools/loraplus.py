"""Optimizer parameter groups, with LoRA+ (Hayou et al., 2024, arXiv:2402.12354): B learns faster than A.

LoRA+ shows that with one learning rate for both factors B learns too slowly as the width
grows; giving B a learning rate `ratio` times A's (16 in the paper) trains faster and better.

`param_groups(model, lr, loraplus_ratio=R, weight_decay=W)` returns groups for any
torch.optim optimizer:

    main      lr        weight decay W   A of every adapter, B of embedding adapters, and the
                                         trained copies of modules_to_save (2 axes and more)
    B         R x lr    W                B of every linear and convolution adapter
    no decay  lr        0                DoRA magnitudes and every trained tensor of fewer
                                         than 2 axes (biases, norm scales)

Decisions: an embedding adapter's B keeps lr, since its input is a one-hot row rather than a
dense vector whose width grows (the case LoRA+'s argument is about); PEFT's helper instead gives
embedding adapters a separate, tiny rate. A DoRA magnitude is a per-feature scale like a norm's,
so it gets lr and no decay. Without a ratio there is one group, every trained parameter at lr
with `weight_decay`: plain AdamW, what `lorakit train` has always used.

Each group carries "lr_scale" (its lr / lr), so a loop that sets the rate per step (training/loop.py)
keeps the ratio; torch's LR schedulers keep it by themselves.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..layers.base import LoraLayer


def param_groups(
    model: nn.Module, lr: float, loraplus_ratio: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Parameter groups over `model`'s trained parameters (requires_grad), in model order within a group."""
    _check(lr, "lr", positive=True)
    _check(weight_decay, "weight_decay", positive=False)
    trained = [p for p in model.parameters() if p.requires_grad]
    if not trained:
        raise ValueError("the model has no trained parameters (requires_grad): nothing to optimize")
    if loraplus_ratio is None:
        return [{"params": trained, "lr": lr, "weight_decay": weight_decay, "lr_scale": 1.0}]
    _check(loraplus_ratio, "loraplus_ratio", positive=True)
    fast, no_decay = _roles(model)
    groups = {
        "main": {"params": [], "lr": lr, "weight_decay": weight_decay, "lr_scale": 1.0},
        "B": {"params": [], "lr": lr * loraplus_ratio, "weight_decay": weight_decay, "lr_scale": float(loraplus_ratio)},
        "no decay": {"params": [], "lr": lr, "weight_decay": 0.0, "lr_scale": 1.0},
    }
    for p in trained:
        key = "B" if id(p) in fast else "no decay" if id(p) in no_decay or p.dim() < 2 else "main"
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def _roles(model: nn.Module) -> tuple[set[int], set[int]]:
    """(ids of the B factors LoRA+ speeds up, ids of DoRA magnitudes)."""
    fast: set[int] = set()
    magnitudes: set[int] = set()
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name in layer.adapter_names:
                roles = layer.adapter_parameters(name)
                if not layer.lookup_table:
                    fast.add(id(roles["B"]))
                if "m" in roles:
                    magnitudes.add(id(roles["m"]))
    return fast, magnitudes


def _check(value: Any, what: str, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
