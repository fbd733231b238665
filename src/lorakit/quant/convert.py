"""Quantize a model already in memory for QLoRA, and give full-precision weights back.

`quantize(model, "nf4")` replaces the model's linear layers in place by bitsandbytes' 4-bit
(NF4 or FP4, blocks of 64, double quantization) or 8-bit layers, exactly as Transformers does
when it loads with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)`:
the packed weights are bit for bit the same, so PEFT and Transformers see the same base
(QLoRA: Dettmers et al., 2023, arXiv:2305.14314). The output heads stay in full precision, and
so does every module named in `skip`.

`dequantize(model)` is the way back: every quantized layer becomes an nn.Linear holding the
weight its forward multiplied by, so an adapter trained on the 4-bit base can be merged into
full-precision weights that reproduce the trained model (what `lorakit merge` writes).
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapting.registry import replace_module
from ..layers.plain import LoraLayer, LoraLinear
from ..module_tree import inside, name_matches, unwrapped
from ..targets import output_head_names
from .bnb import bitsandbytes, keep_layout, quantized_kind
from .bnb import dequantize as dequantized_weight

KINDS = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # QLoRA's block size, and what Transformers uses
INT8_THRESHOLD = 6.0  # Transformers' default llm_int8_threshold (used in eval mode only)
_FLAGS = {"nf4": "is_loaded_in_4bit", "fp4": "is_loaded_in_4bit", "int8": "is_loaded_in_8bit"}


def quantize(
    model: nn.Module,
    kind: str = "nf4",
    skip: list[str] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Quantize `model`'s linear layers in place (to `kind`: "nf4", "fp4" or "int8"); returns it.

    skip: module names kept in full precision besides the output heads (PEFT's rule: an entry
    names a module when it is the whole dotted name or ends with "." + entry; everything inside
    a named module is kept). compute_dtype: what a 4-bit layer's matmul runs in (default: the
    dtype its weight had). Add adapters after quantizing. Needs bitsandbytes.
    """
    if kind not in KINDS:
        raise ValueError(f"quantize: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("quantize the model before adding adapters (it already has LoRA layers)")
    if compute_dtype is not None and compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize: compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
    chosen = _quantizable(model, list(skip or []))
    if not chosen:
        raise ValueError(
            "quantize: the model has no nn.Linear layer to quantize outside its heads and skip "
            "(bitsandbytes has no quantized form of other layers, e.g. GPT-2's Conv1D)"
        )
    bitsandbytes()  # missing: an error before anything changes
    for path, linear in chosen:
        replace_module(model, path, quantized_copy(linear, kind, compute_dtype))
    setattr(model, _FLAGS[kind], True)  # what Transformers sets; PEFT reads it to pick its 4-/8-bit layers
    return model


def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized linear layer by an nn.Linear of `dtype` with the weight it used.

    Adapters on those layers are kept (their wrappers become plain `LoraLinear`s) and may then
    be merged. Refused while an adapter is merged into a quantized weight (unmerge first).
    """
    found = [(p, m) for p, m in model.named_modules() if quantized_kind(unwrapped(m)) is not None]
    for path, module in found:
        if isinstance(module, LoraLayer) and module.merged:
            raise ValueError(f"module {path!r} has adapters merged into its quantized weight; unmerge first")
    for path, module in found:
        plain = _plain_linear(unwrapped(module), dtype)
        if isinstance(module, LoraLayer):
            plain = _rewrap(module, plain)
        elif _inside_wrapper(model, path):
            continue  # reached through its wrapper above
        replace_module(model, path, plain)
    for flag in set(_FLAGS.values()):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return model


def _inside_wrapper(model: nn.Module, path: str) -> bool:
    parent = path.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), LoraLayer)


def _quantizable(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Linear]]:
    """(path, layer) of every nn.Linear to quantize; a skip entry that names nothing is an error."""
    names = [p for p, _ in model.named_modules() if p]
    for entry in skip:
        if not any(name_matches(p, entry) for p in names):
            raise ValueError(f"quantize: skip entry {entry!r} names no module of the model")
    keep = sorted(output_head_names(model)) + skip
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    chosen = []
    for path, module in model.named_modules():
        if type(module) is not nn.Linear:  # subclasses have forwards of their own
            continue
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        if isinstance(parent, nn.MultiheadAttention):
            continue  # it reads out_proj.weight directly
        if any(inside(path, entry) for entry in keep):
            continue
        if owners.get(id(module.weight), 0) > 1:
            continue  # tied to another module: quantizing one copy would untie them
        chosen.append((path, module))
    return chosen


def quantized_copy(linear: nn.Linear, kind: str, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight quantized to `kind` (its bias is shared)."""
    bnb = bitsandbytes()
    weight, bias = linear.weight, linear.bias
    has_bias = bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype or weight.dtype,
            compress_statistics=True,
            quant_type=kind,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.data,
            requires_grad=False,
            blocksize=BLOCKSIZE,
            compress_statistics=True,
            quant_type=kind,
            module=layer,
        )
    if has_bias:
        layer.bias = bias  # the same parameter: nothing copied
    layer.weight = layer.weight.to(weight.device)  # bitsandbytes quantizes here
    keep_layout(layer)
    layer.train(linear.training)
    return layer


def _plain_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    weight = dequantized_weight(layer, torch.float32).to(dtype)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=layer.bias.requires_grad)
    plain.train(layer.training)
    return plain


def _rewrap(old: LoraLayer, base: nn.Linear) -> LoraLinear:
    """A LoraLinear on `base` holding `old`'s adapters (the same parameters) and state."""
    new = LoraLinear(base)
    new.lora_A, new.lora_B = old.lora_A, old.lora_B  # the very parameters (optimizer state stays valid)
    new.scaling, new.dropout = dict(old.scaling), dict(old.dropout)
    new.active, new.enabled = list(old.active), old.enabled
    new.train(old.training)
    return new
