"""What bench/qlora.py runs: the models, the quantized and full-precision variants of each, and
one training-step callable per case.

Every case of a model is built from one copy of the same random weights, inputs and seed; PEFT
and lorakit get the same quantized base (lorakit.quantize gives what Transformers loads with
BitsAndBytesConfig, tests/test_interop_qlora.py) and the same initial adapter values.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

import cases as C

RANK, TARGETS = 8, "all-linear"  # QLoRA adapts every linear layer


@dataclass(frozen=True)
class Model:
    name: str
    batch: int
    seq: int


# Small batches: the setting QLoRA is for, where the weights dominate memory.
MODELS = {
    "llama-277m": Model("llama-277m", 2, 64),
    "minilm": Model("minilm", 8, 64),
}
QUICK = {"llama-277m": Model("llama-277m", 1, 32), "minilm": Model("minilm", 4, 32)}

# case -> (model dtype, quantization kind or None, 4-bit compute dtype, library)
CASES = {
    "lora fp32": (torch.float32, None, None, "lorakit"),
    "lora bf16": (torch.bfloat16, None, None, "lorakit"),
    "qlora nf4 lorakit": (torch.float32, "nf4", torch.float32, "lorakit"),
    "qlora nf4 peft": (torch.float32, "nf4", torch.float32, "peft"),
    "qlora nf4 bf16 lorakit": (torch.bfloat16, "nf4", torch.bfloat16, "lorakit"),
    "qlora nf4 bf16 peft": (torch.bfloat16, "nf4", torch.bfloat16, "peft"),
}


def base_model(name: str) -> nn.Module:
    """float32, random (Llama, from its config) or pre-trained (MiniLM), seeded."""
    torch.manual_seed(0)
    if name == "llama-277m":
        from transformers import LlamaConfig, LlamaForCausalLM

        # 268M of the 277M parameters in the decoder's linear layers; input and output embeddings
        # tied, as in the small Llama-family models (Llama 3.2 1B, Qwen2.5 0.5B).
        config = LlamaConfig(
            vocab_size=8192,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)
    return C.load_model("minilm", "cpu", torch.float32)


def variant(base: nn.Module, case: str) -> nn.Module:
    """A copy of `base` in the case's dtype, quantized as the case says (no adapters yet)."""
    import lorakit

    dtype, kind, compute, _ = CASES[case]
    model = copy.deepcopy(base).to(dtype)  # before quantizing: a 4-bit weight must never be cast
    if kind is not None:
        lorakit.quantize(model, kind, compute_dtype=compute)
    return model


def adapted(base: nn.Module, case: str, like: nn.Module | None = None) -> nn.Module:
    """The case's model with adapters: lorakit's, or PEFT's with the values of lorakit's `like`."""
    model = variant(base, case)
    if CASES[case][3] == "peft":
        return C.peft_model_like(model, like, C.Variant(TARGETS, RANK))
    import lorakit

    lorakit.inject(model, lorakit.LoraConfig(rank=RANK, alpha=2 * RANK, targets=TARGETS))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in C.lora_layers(model):
            _, b = layer.pair("default")
            b.copy_(torch.randn(b.shape, generator=g).mul_(0.02))
    return model


def inputs(model: nn.Module, shape: Model) -> torch.Tensor:
    return C.make_inputs(C.Setting(shape.name, shape.name, shape.batch, shape.seq), model, "cpu")


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantized layers' stored weights, bytes of the same weights in bf16)."""
    from lorakit.quant.bnb import quantized_kind, stored_bytes

    layers = [m for m in model.modules() if quantized_kind(m) is not None]
    return sum(stored_bytes(m) for m in layers), sum(2 * m.in_features * m.out_features for m in layers)


CHECKPOINTED = " + checkpointing"  # a case name ending so: the same with gradient checkpointing


def training_cases(name: str, shape: Model, wanted: list[str]) -> dict[str, callable]:
    """Training-step callables for the `wanted` cases of model `name` (lorakit's built first,
    so that PEFT's copy their adapter values)."""
    base = base_model(name)
    ids = inputs(base, shape)
    models: dict[str, nn.Module] = {}
    for case in sorted(wanted, key=lambda c: CASES[c.removesuffix(CHECKPOINTED)][3] == "peft"):
        plain = case.removesuffix(CHECKPOINTED)
        like = models.get(case.replace(" peft", " lorakit"))
        if CASES[plain][3] == "peft" and like is None:
            like = adapted(base, plain.replace(" peft", " lorakit"))
        models[case] = adapted(base, plain, like)
        if case.endswith(CHECKPOINTED):
            models[case].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    del base
    return {case: C.training_step(models[case], ids) for case in wanted}
