"""The tree rules (lorakit/module_tree.py): what a wrapper is, the walks that never enter one,
PEFT's two name rules, and get/set by path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, inject
from lorakit.module_tree import (
    base_modules,
    get_module,
    inside,
    is_lora_layer,
    is_saved_module,
    is_wrapper,
    name_matches,
    saved_name_matches,
    set_module,
    unwrapped,
    walk,
    within,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b.norm(b.q(x))
        return self.classifier(x)


def adapted() -> tuple[nn.Module, nn.Linear]:
    model = Net()
    q0 = model.blocks[0].q
    inject(model, LoraConfig(targets=["q"], modules_to_save=["classifier"]))
    return model, q0


def test_wrappers_are_known_by_class_and_unwrapped_gives_the_users_layer():
    model, q0 = adapted()
    wrapper, saved = model.blocks[0].q, model.classifier
    assert is_lora_layer(wrapper) and not is_saved_module(wrapper) and is_wrapper(wrapper)
    assert is_saved_module(saved) and not is_lora_layer(saved) and is_wrapper(saved)
    assert not is_wrapper(q0) and not is_wrapper(model.blocks[0])
    assert unwrapped(wrapper) is q0 and unwrapped(q0) is q0


def test_walk_never_enters_a_wrapper_and_base_modules_skips_the_adapters_own():
    model, _ = adapted()
    walked = [name for name, _, _ in walk(model)]
    assert "blocks.0.q" in walked and "classifier" in walked
    assert not any(n.startswith(("blocks.0.q.", "classifier.")) for n in walked)
    parents = {name: parent for name, _, parent in walk(model)}
    assert parents["blocks.0.q"] is model.blocks[0]

    names = [name for name, _ in base_modules(model)]
    assert names[0] == "" and "blocks.0.q.base_layer" in names and "classifier.original" in names
    assert not any("lora_" in n or ".copies" in n for n in names)  # the adapters' A, B and trained copies
    assert len(names) == len(set(names))


def test_a_shared_module_keeps_its_first_name():
    model = Net()
    model.blocks[1].q = model.blocks[0].q
    assert [n for n, _, _ in walk(model)].count("blocks.1.q") == 0
    assert [n for n, _ in base_modules(model)].count("blocks.1.q") == 0


@pytest.mark.parametrize(
    ("name", "entry", "target_rule", "saved_rule"),
    [
        ("blocks.0.q", "q", True, True),
        ("blocks.0.q", "0.q", True, True),
        ("blocks.0.q", "blocks.0.q", True, True),
        ("pre_classifier", "classifier", False, True),  # modules_to_save: a plain suffix
        ("encoder.layernorm", "norm", False, True),
        ("blocks.0.qq", "q", False, True),  # a plain suffix takes "qq" for "q"
        ("blocks.0.qk", "q", False, False),
    ],
)
def test_peft_name_rules(name, entry, target_rule, saved_rule):
    assert name_matches(name, entry) is target_rule
    assert saved_name_matches(name, entry) is saved_rule


def test_inside_and_within():
    assert inside("blocks.0.q.base_layer", "q") and inside("blocks.0.q", "blocks")
    assert not inside("blocks.0.qq", "q")
    assert within("classifier.original", ["classifier"]) and not within("classifier", ["classifier"])
    assert not within("classifier2.x", ["classifier"])


def test_get_and_set_by_path():
    model = Net()
    new = nn.Linear(4, 4)
    set_module(model, "blocks.1.q", new)
    assert get_module(model, "blocks.1.q") is new and model.blocks[1].q is new
    with pytest.raises(ValueError, match="no module named 'blocks.7'"):
        get_module(model, "blocks.7")
