"""Interop with PEFT on Mixture-of-Experts models: adapters on the fused 3-D expert parameters
(PEFT's `target_parameters`), both directions, on every MoE family Transformers 5 fuses."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    MOE_KINDS,
    TINY_MODEL_N,
    assert_rounding_close,
    assert_unchanged,
    logits,
    randomize_adapter,
    snapshot,
    tensors,
    tiny_model,
)

import lorakit
from lorakit.files.adapter_file import AdapterFileError

pytestmark = pytest.mark.numeric  # pins float32 numbers to references (helpers.assert_rounding_close)

peft = pytest.importorskip("peft")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Qwen2-MoE's shared expert is three nn.Linears next to the fused experts.
SHARED = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]


def _peft_modules(kind: str) -> list[str]:
    return ["q_proj", "v_proj"] + (SHARED if kind == "qwen2_moe" else [])


def _randomize_peft(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _peft_file(kind: str, folder, **config):
    """A PEFT adapter on a tiny `kind` with random weights, saved to `folder`: PEFT's logits."""
    reference = peft.get_peft_model(tiny_model(kind), peft.LoraConfig(**config)).eval()
    _randomize_peft(reference)
    reference.save_pretrained(folder)
    return reference


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_peft_expert_adapter_loads_in_lorakit(kind, tmp_path, ids):
    reference = _peft_file(
        kind, tmp_path, r=4, lora_alpha=8, target_modules=_peft_modules(kind), target_parameters=EXPERTS
    )
    expected = logits(reference, ids)
    model = tiny_model(kind)
    base = logits(model, ids)
    lorakit.load_adapter(model, tmp_path)
    assert (expected - base).abs().max() > 1e-3  # the adapter really does something
    assert_rounding_close(logits(model, ids), expected, n=TINY_MODEL_N)
    # The fused experts are adapted as parameters, the shared expert's Linears as modules.
    adapted = lorakit.adapters(model)["default"].modules
    assert sorted(p for p in adapted if ".experts." in p) == sorted(
        f"model.layers.{i}.{p}" for i in (0, 1) for p in EXPERTS
    )
    assert len([p for p in adapted if ".shared_expert." in p]) == (6 if kind == "qwen2_moe" else 0)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_lorakit_expert_adapter_loads_in_peft(kind, tmp_path, ids):
    model = tiny_model(kind)
    base = logits(model, ids)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets="attention+mlp"))
    randomize_adapter(model)
    expected = logits(model, ids)
    assert (expected - base).abs().max() > 1e-3
    lorakit.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_parameters"] == sorted(f"model.layers.{i}.{p}" for i in (0, 1) for p in EXPERTS)
    reference = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path).eval()
    assert_rounding_close(logits(reference, ids), expected, n=TINY_MODEL_N)
    # PEFT adapted exactly the parameters and modules lorakit did.
    theirs = set()
    for name, module in reference.named_modules():
        if type(module).__name__ == "ParamWrapper":
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            theirs.add(f"{owner}.{module.parameter_name}")
        elif hasattr(module, "lora_A"):
            theirs.add(name.removeprefix("base_model.model."))
    assert theirs == set(lorakit.adapters(model)["default"].modules)


def test_one_expert_parameter_is_not_nested(tmp_path, ids):
    """PEFT nests the wrappers of one module's parameters; with only down_proj targeted its pair
    sits at the experts module itself, and rank / alpha patterns reach it by its parameter name."""
    reference = _peft_file(
        "qwen3_moe",
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=[],
        use_rslora=True,
        target_parameters=["mlp.experts.down_proj"],
        rank_pattern={"layers.1.mlp.experts.down_proj": 2},
        alpha_pattern={"down_proj": 3},
    )
    keys = sorted(tensors(tmp_path))
    assert keys[0] == "base_model.model.model.layers.0.mlp.experts.lora_A.weight" and len(keys) == 4
    model = tiny_model("qwen3_moe")
    lorakit.load_adapter(model, tmp_path)
    layer = model.get_submodule("model.layers.1.mlp.experts.down_proj")
    assert layer.rank("default") == 2
    assert_rounding_close(logits(model, ids), logits(reference, ids), n=TINY_MODEL_N)
    # and written back, PEFT reads the same adapter
    lorakit.save_adapter(model, tmp_path / "again")
    assert sorted(tensors(tmp_path / "again")) == keys
    again = peft.PeftModel.from_pretrained(tiny_model("qwen3_moe"), tmp_path / "again").eval()
    assert_rounding_close(logits(again, ids), logits(reference, ids), n=TINY_MODEL_N)


def test_round_trip_is_exact(tmp_path, ids):
    model = tiny_model("mixtral")
    lorakit.inject(model, lorakit.LoraConfig(rank=3, alpha=6, targets=[], target_parameters=EXPERTS))
    randomize_adapter(model)
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_model("mixtral")
    lorakit.load_adapter(fresh, tmp_path)
    for path in lorakit.adapters(model)["default"].modules:
        for mine, back in zip(model.get_submodule(path).pair("default"), fresh.get_submodule(path).pair("default")):
            assert torch.equal(mine, back)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == []


# ---- files lorakit refuses, before anything changes ---------------------------------------------


def _edit_config(folder, **changes) -> None:
    file = folder / "adapter_config.json"
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


@pytest.fixture
def expert_file(tmp_path):
    _peft_file("qwen3_moe", tmp_path / "ok", r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    return tmp_path / "ok"


def test_a_missing_expert_pair_is_refused(expert_file, tmp_path):
    from safetensors.torch import save_file

    held = {k: v for k, v in tensors(expert_file).items() if "layers.1.mlp.experts.base_layer" not in k}
    save_file(held, str(expert_file / "adapter_model.safetensors"))
    model = tiny_model("qwen3_moe")
    with pytest.raises(AdapterFileError, match=r"missing key .*layers\.1\.mlp\.experts\.base_layer\.lora_A\.weight"):
        lorakit.load_adapter(model, expert_file)


def test_a_rank_that_does_not_split_into_experts_is_refused(expert_file):
    _edit_config(expert_file, r=3, target_modules=[])  # the pairs hold 2 per expert
    with pytest.raises(AdapterFileError, match=r"key .*experts\.base_layer\.lora_A\.weight.* rank 3 per expert"):
        lorakit.load_adapter(tiny_model("qwen3_moe"), expert_file)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            dict(target_parameters=["mlp.gate.weight"]),
            r"selects 'model\.layers\.0\.mlp\.gate\.weight', which lorakit "
            r"cannot adapt",
        ),
        (dict(target_parameters=["no_such_weight"]), r"selects no parameter of this model"),
        (dict(target_parameters="mlp.experts.down_proj"), r"must be a list of parameter names"),
        (
            dict(target_parameters=None),
            r"is where PEFT writes a pair of target_parameters on 'model\.layers\.0\.mlp\."
            r"experts'",
        ),
        (
            dict(target_parameters=["mlp.experts.down_proj"]),
            r"target_parameters=\['mlp\.experts\.down_proj'\] puts "
            r"none there",
        ),
        (dict(use_dora=True), r"DoRA on a parameter is refused by PEFT"),
    ],
)
def test_a_config_that_does_not_fit_the_file_is_refused(expert_file, change, match):
    good = expert_file.parent / "good"
    _peft_file("qwen3_moe", good, r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    _edit_config(expert_file, **change)
    model = tiny_model("qwen3_moe")
    lorakit.load_adapter(model, good, "first")
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=match):
        lorakit.load_adapter(model, expert_file, "second")
    assert_unchanged(model, before)


def test_parameters_are_matched_by_their_names_without_lorakits_wrappers(tmp_path):
    """PEFT's rule reads the base model's names; adapters already loaded change none of them."""
    from lorakit.files.peft_params import base_parameter_names

    model = tiny_model("qwen2_moe")
    before = base_parameter_names(model)
    assert "model.layers.1.mlp.experts.gate_up_proj" in before
    lorakit.inject(model, lorakit.LoraConfig(targets="attention+mlp", modules_to_save=["lm_head"]))
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(targets=[], target_parameters=["down_proj"]))
    assert base_parameter_names(model) == before
