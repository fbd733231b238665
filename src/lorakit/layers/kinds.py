"""Which wrapper class each kind of adaptable module takes (the kinds of targets.adaptable_kind)."""

from __future__ import annotations

from .base import LoraLayer
from .plain import LoraConv, LoraEmbedding, LoraLinear
from .quantized import LoraQuantLinear

_WRAPPERS: dict[str, type[LoraLayer]] = {
    "linear": LoraLinear,
    "conv1d_transposed": LoraLinear,  # Transformers' Conv1D: LoraLinear with fan_in_fan_out
    "embedding": LoraEmbedding,
    "conv": LoraConv,
    "linear4bit": LoraQuantLinear,
    "linear8bit": LoraQuantLinear,
}


def wrapper_for(kind: str) -> type[LoraLayer]:
    """The wrapper class for a kind reported by `targets.adaptable_kind`."""
    return _WRAPPERS[kind]
