"""layers/kinds.py: each kind of module `targets.adaptable_kind` reports has its wrapper class."""

from __future__ import annotations

import pytest
from torch import nn

from lorakit.layers.kinds import wrapper_for
from lorakit.layers.plain import LoraConv, LoraEmbedding, LoraLinear
from lorakit.layers.quantized import LoraQuantLinear
from lorakit.quant.bnb import KINDS as QUANTIZED_KINDS
from lorakit.targets import adaptable_kind


@pytest.mark.parametrize(
    ("module", "wrapper"),
    [
        (nn.Linear(4, 3), LoraLinear),
        (nn.Embedding(10, 4), LoraEmbedding),
        (nn.Conv1d(4, 3, 2), LoraConv),
        (nn.Conv2d(4, 3, 2), LoraConv),
    ],
)
def test_each_plain_kind_takes_its_wrapper(module, wrapper):
    assert wrapper_for(adaptable_kind(module)) is wrapper


def test_transformers_conv1d_is_a_linear_stored_transposed():
    from transformers.pytorch_utils import Conv1D

    layer = wrapper_for(adaptable_kind(Conv1D(3, 4)))(Conv1D(3, 4))
    assert type(layer) is LoraLinear and layer.fan_in_fan_out


def test_quantized_kinds_take_the_quantized_wrapper():
    assert QUANTIZED_KINDS and all(wrapper_for(kind) is LoraQuantLinear for kind in QUANTIZED_KINDS)
