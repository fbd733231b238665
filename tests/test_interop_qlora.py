"""QLoRA interop with PEFT and Transformers, both directions: an adapter trained on a 4-bit (or
8-bit) base by one library loads in the other, on that library's own quantized base (PEFT's:
Transformers' `from_pretrained` with a `BitsAndBytesConfig`; lorakit's: `lorakit.quantize`),
with the same outputs."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    TINY_MODEL_N,
    assert_rounding_close,
    logits,
    make_model,
    randomize_adapter,
)

import lorakit
from lorakit.quant.bnb import keep_layouts, quantized_kind

pytestmark = pytest.mark.numeric  # pins float32 numbers to references (helpers.assert_rounding_close)

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

KINDS = ["nf4", "fp4", "int8"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("qlora") / "llama", "llama")


def transformers_quantized(folder, kind: str):
    """The model as Transformers loads it quantized (what PEFT users start from)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=kind,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    # Compare the layers as they compute in training (see quant/bnb.py: bitsandbytes' CPU
    # inference re-layout changes a 4-bit layer's numbers).
    keep_layouts(model)
    return model.eval()


def lorakit_quantized(folder, kind: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return lorakit.quantize(model, kind).eval()


@pytest.fixture
def ids():
    return torch.randint(4, 40, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kind", KINDS)
def test_lorakit_quantize_is_the_base_transformers_loads(folder, kind, ids):
    ours, theirs = lorakit_quantized(folder, kind), transformers_quantized(folder, kind)
    layers = {n: m for n, m in theirs.named_modules() if quantized_kind(m)}
    assert sorted(layers) == sorted(n for n, m in ours.named_modules() if quantized_kind(m))
    for name, layer in layers.items():
        assert torch.equal(ours.get_submodule(name).weight.data, layer.weight.data), name
    assert torch.equal(logits(ours, ids), logits(theirs, ids))


@pytest.mark.parametrize("kind", KINDS)
def test_peft_qlora_adapter_loads_in_lorakit(folder, kind, ids, tmp_path):
    reference = peft.get_peft_model(
        transformers_quantized(folder, kind),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0),
    ).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    expected = logits(reference, ids)
    reference.save_pretrained(tmp_path)
    for base in (transformers_quantized(folder, kind), lorakit_quantized(folder, kind)):
        plain = logits(base, ids)
        lorakit.load_adapter(base, tmp_path)
        assert isinstance(base.model.layers[0].mlp.down_proj, lorakit.LoraQuantLinear)
        got = logits(base, ids)
        assert (got - plain).abs().max() > 1e-3
        assert_rounding_close(got, expected, n=TINY_MODEL_N)


@pytest.mark.parametrize("kind", KINDS)
def test_lorakit_qlora_adapter_loads_in_peft(folder, kind, ids, tmp_path):
    model = lorakit_quantized(folder, kind)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets="attention+mlp"))
    randomize_adapter(model)
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(transformers_quantized(folder, kind), tmp_path).eval()
    layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"  # PEFT's own 4-/8-bit layer
    assert_rounding_close(logits(reference, ids), expected, n=TINY_MODEL_N)


def test_peft_adapts_a_model_lorakit_quantized_with_its_bitsandbytes_layers(folder):
    """quantize() marks the model as Transformers does (is_loaded_in_4bit), so PEFT picks its
    4-bit LoRA layer for it rather than its plain one (which cannot merge a 4-bit weight)."""
    model = peft.get_peft_model(lorakit_quantized(folder, "nf4"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and type(layer).__module__ == "peft.tuners.lora.bnb"
