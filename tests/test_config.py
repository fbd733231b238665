"""config.py: LoraConfig's per-module rank, alpha and scaling."""

from __future__ import annotations

from helpers import tiny_bert

import lorakit


def test_rank_and_alpha_patterns():
    model = tiny_bert()
    cfg = lorakit.LoraConfig(
        rank=4,
        alpha=8,
        targets=["query", "value"],
        rank_pattern={"value": 2},
        alpha_pattern={r"layer\.1\.attention\.self\.query": 2},
    )
    lorakit.inject(model, cfg)
    enc = model.bert.encoder.layer
    assert enc[0].attention.self.value.rank("default") == 2
    assert enc[0].attention.self.query.rank("default") == 4
    assert enc[0].attention.self.query.scaling["default"] == 2.0
    assert enc[1].attention.self.query.scaling["default"] == 0.5


def test_rslora_scaling():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, rslora=True, targets=["query"]))
    assert model.bert.encoder.layer[0].attention.self.query.scaling["default"] == 4.0


def test_layers_pattern_needs_layers_and_valid_patterns():
    import pytest

    assert lorakit.LoraConfig(layers=[1], layers_pattern="blocks").layers_pattern == "blocks"
    assert lorakit.LoraConfig(layers=[1], layers_pattern=("blocks", "layers")).layers_pattern == ["blocks", "layers"]
    for bad, message in [
        (dict(layers_pattern="blocks"), "needs layers"),
        (dict(layers=[0], layers_pattern=""), "block-list name"),
        (dict(layers=[0], layers_pattern=[]), "block-list name"),
        (dict(layers=[0], layers_pattern=["("]), "not a valid regex"),
    ]:
        with pytest.raises(ValueError, match=message):
            lorakit.LoraConfig(**bad)
