"""files/peft_format.py: adapter_config.json written so that it means what the config meant, and read
with every field checked for its JSON type (a string "false" is not false)."""

from __future__ import annotations

import json

import pytest
from helpers import assert_unchanged, randomize_adapter, snapshot, tiny_llama

import lorakit
from lorakit.files.peft_format import from_peft_dict, to_peft_dict

MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


@pytest.mark.parametrize(
    ("ranks", "alphas", "kept"),
    [
        ({"q_proj": 2}, {"v_proj": 3}, True),
        ({r"layers\.1\..*": 2}, {"q_proj": 1.5}, True),
        # Sorted, "layers.0..." comes before "q_proj" and would win for layer 0: written per module.
        ({}, {"q_proj": 4, "layers.0.self_attn.q_proj": 32}, False),
        ({"q_proj": 2, "layers.0.self_attn.q_proj": 6}, {}, False),
        ({"v_proj": 2, r"model\.layers\.1\..*": 3}, {"proj": 5, "v_proj": 7}, False),
    ],
)
def test_written_patterns_mean_the_same_when_read_back(ranks, alphas, kept):
    config = lorakit.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern=ranks, alpha_pattern=alphas)
    written = to_peft_dict(config, MODULES, fan_in_fan_out=False, base_model_name_or_path=None, task_type=None)
    back, _ = from_peft_dict(json.loads(json.dumps(written, sort_keys=True)), "adapter_config.json")  # as on disk
    for module in MODULES:
        assert (back.rank_for(module), back.alpha_for(module)) == (config.rank_for(module), config.alpha_for(module))
    if kept:  # patterns that sorting does not change are written as given
        assert (written["rank_pattern"], written["alpha_pattern"]) == (ranks, alphas)


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize_adapter(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("use_rslora", "false", "use_rslora='false' must be true or false"),  # read as true, it changed the scaling
        ("use_rslora", 1, "use_rslora=1 must be true or false"),
        ("fan_in_fan_out", "no", "fan_in_fan_out='no' must be true or false"),
        ("task_type", ["CAUSAL_LM"], "task_type=['CAUSAL_LM'] must be a string"),
        ("base_model_name_or_path", 5, "base_model_name_or_path=5 must be a string"),
        ("layers_pattern", 5, "layers_pattern=5 must be a block-list name"),
        ("modules_to_save", "lm_head", "modules_to_save must be a list of module names, got 'lm_head'"),
        ("modules_to_save", [1], "modules_to_save must be a list of module names"),
        ("rank_pattern", {"q(": 2}, "rank_pattern key 'q(' is not a valid regex"),
        ("alpha_pattern", [1], "alpha_pattern must be a dict"),
        ("layers_to_transform", [True], "layers_to_transform: layers must be a list of block indices"),
        ("lora_alpha", float("nan"), "lora_alpha: alpha must be a number > 0, got nan"),  # Python's json reads NaN
        ("r", "4", "r: rank must be an integer >= 1, got '4'"),
        ("lora_dropout", "0.1", "lora_dropout: dropout must be in [0, 1)"),
        ("target_modules", 5, "target_modules: targets must be"),
        ("init_lora_weights", "lora_ga", "init_lora_weights='lora_ga' is not supported"),  # it moves the base weights
    ],
)
def test_a_field_of_the_wrong_type_is_refused_naming_it(field, value, message, saved):
    config_file = saved / "adapter_config.json"
    raw = json.loads(config_file.read_text())
    raw[field] = value
    config_file.write_text(json.dumps(raw))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(lorakit.AdapterFileError) as caught:
        lorakit.load_adapter(model, saved)
    assert str(caught.value).startswith(f"{config_file}: ") and message in str(caught.value)
    assert_unchanged(model, before)
