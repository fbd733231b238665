"""vLLM's per-expert layout of an expert adapter (expert_layout.py): written under the names and
split of the model's own checkpoint, read back exactly, refused where the model has none."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    TINY_MODEL_N,
    assert_rounding_close,
    assert_unchanged,
    logits,
    randomize_adapter,
    snapshot,
    tensors,
    tiny_model,
)
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.files.adapter_file import AdapterFileError
from lorakit.files.expert_layout import ExpertLayoutError

pytestmark = pytest.mark.numeric

PER_EXPERT_KINDS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
A, B = "lora_A.weight", "lora_B.weight"


def _adapted(kind: str, **config):
    model = tiny_model(kind)
    lorakit.inject(model, lorakit.LoraConfig(**({"rank": 2, "alpha": 4, "targets": "attention+mlp"} | config)))
    randomize_adapter(model, std=0.3)
    return model


@pytest.mark.parametrize("kind", PER_EXPERT_KINDS)
def test_each_pair_is_its_experts_weight_change_in_the_checkpoint(kind, tmp_path):
    """Transformers saves a fused MoE in its checkpoint's per-expert layout (what vLLM loads): the
    merged model's checkpoint minus the base's is, key by key, scaling * B @ A of the file's pair."""
    model = _adapted(kind, rank_pattern={"layers.1.mlp.experts.down_proj": 3})
    lorakit.save_adapter(model, tmp_path / "adapter", expert_layout="per-expert")
    tiny_model(kind).save_pretrained(tmp_path / "base")
    lorakit.unload(model, merge=True).save_pretrained(tmp_path / "merged")
    base, merged = (load_file(str(tmp_path / f / "model.safetensors")) for f in ("base", "merged"))
    pairs = tensors(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] is None
    experts = [k for k in pairs if ".experts.0." in k and k.endswith(A)]
    assert len(experts) == 2 * 3  # gate, up, down of expert 0 in each block
    if kind == "mixtral":
        assert "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight" in pairs
    for key in pairs:
        if not key.endswith(A):
            continue
        module = key.removeprefix("base_model.model.").removesuffix("." + A)
        a, b = pairs[key], pairs[key.replace(A, B)]
        delta = 4 / a.shape[0] * (b @ a)
        change = merged[module + ".weight"] - base[module + ".weight"]
        assert_rounding_close(change, delta, n=64, scale=base[module + ".weight"].abs().max().item())


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_per_expert_file_reads_back_exactly(kind, tmp_path, ids):
    model = _adapted(kind, rslora=True, rank_pattern={"layers.1.mlp.experts.down_proj": 3})
    lorakit.save_adapter(model, tmp_path, expert_layout="per-expert")
    fresh = tiny_model(kind)
    lorakit.load_adapter(fresh, tmp_path)
    for path in lorakit.adapters(model)["default"].modules:
        for mine, back in zip(model.get_submodule(path).pair("default"), fresh.get_submodule(path).pair("default")):
            assert torch.equal(mine, back)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_gate_and_up_with_their_own_a_load_as_the_same_update(tmp_path, ids):
    """A per-expert file from elsewhere: gate and up of an expert need not share A. lorakit gathers
    them into a pair of twice the rank; the model equals the base with each expert's weights
    changed by its pairs (computed here by hand on the fused weights)."""
    model = tiny_model("qwen3_moe")
    hidden, width = 32, model.model.layers[0].mlp.experts.down_proj.shape[-1]
    gen = torch.Generator().manual_seed(5)
    state = {}
    expected = tiny_model("qwen3_moe")
    with torch.no_grad():
        for layer in (0, 1):
            experts = expected.model.layers[layer].mlp.experts
            for e in range(4):
                for name, fan_in, fan_out in (
                    ("gate_proj", hidden, width),
                    ("up_proj", hidden, width),
                    ("down_proj", width, hidden),
                ):
                    a, b = torch.randn(2, fan_in, generator=gen) * 0.3, torch.randn(fan_out, 2, generator=gen) * 0.3
                    prefix = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{name}"
                    state[f"{prefix}.{A}"], state[f"{prefix}.{B}"] = a, b
                    delta = 2.0 * (b @ a)  # alpha 4 / rank 2
                    if name == "down_proj":
                        experts.down_proj[e] += delta
                    else:
                        rows = slice(0, width) if name == "gate_proj" else slice(width, 2 * width)
                        experts.gate_up_proj[e, rows] += delta
    tmp_path.mkdir(exist_ok=True)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["gate_proj", "up_proj", "down_proj"]}
        )
    )
    lorakit.load_adapter(model, tmp_path)
    assert model.get_submodule("model.layers.0.mlp.experts.gate_up_proj").rank("default") == 4
    assert model.get_submodule("model.layers.0.mlp.experts.down_proj").rank("default") == 2
    assert_rounding_close(logits(model, ids), logits(expected, ids), n=TINY_MODEL_N)


def test_a_missing_expert_is_refused_before_anything_changes(tmp_path):
    lorakit.save_adapter(_adapted("olmoe"), tmp_path, expert_layout="per-expert")
    held = {k: v for k, v in tensors(tmp_path).items() if ".layers.1.mlp.experts.3.up_proj." not in k}
    save_file(held, str(tmp_path / "adapter_model.safetensors"))
    model = _adapted("olmoe")
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=r"missing key .*layers\.1\.mlp\.experts\.3\.up_proj\.lora_A\.weight"):
        lorakit.load_adapter(model, tmp_path, "second")
    assert_unchanged(model, before)


def test_gpt_oss_has_no_per_expert_layout(tmp_path):
    model = _adapted("gpt_oss")
    with pytest.raises(ExpertLayoutError, match="gpt_oss.*vLLM reads its adapters in the fused layout"):
        lorakit.save_adapter(model, tmp_path / "out", expert_layout="per-expert")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="expert_layout must be one of fused, per-expert"):
        lorakit.save_adapter(model, tmp_path / "out", expert_layout="vllm")


def test_an_adapter_without_experts_is_the_same_in_either_layout(tmp_path):
    model = _adapted("qwen3_moe", targets="attention")
    lorakit.save_adapter(model, tmp_path / "fused")
    lorakit.save_adapter(model, tmp_path / "per", expert_layout="per-expert")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "fused" / name).read_bytes() == (tmp_path / "per" / name).read_bytes()
