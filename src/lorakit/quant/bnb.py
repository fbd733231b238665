"""What lorakit knows about a quantized frozen base: bitsandbytes' `Linear4bit` and `Linear8bitLt`.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314) trains LoRA adapters on a base whose weights
are stored in 4 bits: NormalFloat (NF4) or FP4 codes in blocks of 64, each block scaled by its
absolute maximum, the scales themselves quantized to 8 bits ("double quantization"). LLM.int8()
(Dettmers et al., 2022, arXiv:2208.07339) stores int8 rows with one scale each. bitsandbytes
implements both as nn.Linear subclasses, which is what Transformers builds for
`BitsAndBytesConfig(load_in_4bit=True)` / `load_in_8bit=True` and what PEFT adapts.

bitsandbytes is optional (`pip install lorakit[quant]`). A model holding its layers has imported
it already, so recognising them only looks in `sys.modules`; the functions that compute with it
import it through `bitsandbytes()`, which names the extra when it is missing. Nothing here
imports the rest of lorakit.

Facts this file relies on (bitsandbytes 0.50, read from its source and checked by
tests/test_quantized.py):

- a 4-bit layer's forward, in training, is `F.linear(x.to(c), W.to(c), bias)` with W
  dequantized straight into the compute dtype c (one rounding from float32), then cast back to
  x's dtype; an 8-bit layer's, in training, is `F.linear(x, CB * (SCB / 127), bias)` in x's dtype.
- On a CPU with AVX512-BF16, a 4-bit layer in eval mode given an input without grad re-lays its
  weight out in place for a bf16 kernel: the block scales are rounded to bf16 for good, and the
  layer can no longer pass a gradient to its input (bitsandbytes 0.50). `keep_layout` turns that
  off, and undoes it where it already happened.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

KINDS = ("linear4bit", "linear8bit")  # what targets.adaptable_kind reports for them
INSTALL = "pip install 'lorakit[quant]'"


def bitsandbytes() -> Any:
    """The bitsandbytes module, or an ImportError that names the extra to install."""
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None:
        return sys.modules["bitsandbytes"]
    log = logging.getLogger("bitsandbytes")
    level = log.level
    # On import it warns that an optional kernel package for bf16 inference is missing; that
    # package is not needed here and the warning would reach every CLI user.
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(
            f"quantized (QLoRA) layers need bitsandbytes, which is not installed ({err}); {INSTALL}"
        ) from None
    finally:
        log.setLevel(level)
    return bnb


def quantized_kind(module: nn.Module) -> str | None:
    """ "linear4bit" or "linear8bit" for a bitsandbytes quantized linear layer, else None."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not hasattr(bnb, "nn"):
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "linear4bit"
    if isinstance(module, bnb.nn.Linear8bitLt) and not module.state.has_fp16_weights:
        return "linear8bit"  # with fp16 weights it is a float layer that quantizes on the fly
    return None


def quant_type(layer: nn.Module) -> str:
    """ "nf4", "fp4" or "int8"."""
    return layer.weight.quant_type if quantized_kind(layer) == "linear4bit" else "int8"


def compute_dtype(layer: nn.Module, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the layer's matmul runs in for an input of `x_dtype`."""
    if quantized_kind(layer) == "linear4bit" and layer.compute_dtype is not None:
        return layer.compute_dtype
    return x_dtype


def check_quantized(layer: nn.Module) -> None:
    """A 4-bit layer must hold its packed weight (bitsandbytes quantizes on .to(device))."""
    if quantized_kind(layer) == "linear4bit" and not getattr(layer.weight, "bnb_quantized", False):
        raise ValueError(
            "this bitsandbytes Linear4bit's weight is not quantized yet (bitsandbytes quantizes "
            "it in .to(device)); move the model to its device first"
        )


def keep_layout(layer: nn.Module) -> None:
    """Keep a 4-bit layer's weight in the layout training reads (see the module docstring)."""
    if quantized_kind(layer) != "linear4bit":
        return
    layer.support_avx512bf16_for_cpu = False
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        # What bitsandbytes itself does before saving such a layer; the bf16 rounding stays.
        undo = getattr(bitsandbytes().functional, "_convert_weight_packed_for_cpu_inverse", None)
        if undo is None:
            raise ValueError(
                "this 4-bit layer was re-laid out for CPU inference and this bitsandbytes "
                "cannot undo it; reload the model"
            )
        weight.data, weight.quant_state = undo(weight.data, weight.quant_state)
        layer.quant_state = weight.quant_state


def keep_layouts(model: nn.Module) -> None:
    """`keep_layout` on every 4-bit layer of `model` (the ones without adapters too)."""
    for module in model.modules():
        keep_layout(module)


def relaid_out(layer: nn.Module) -> bool:
    """Whether a 4-bit layer's weight is in the CPU inference layout (which `dequantize` cannot read)."""
    return getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)


def dequantize(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight, (out, in), as a new tensor of `dtype`: the values its forward multiplies by."""
    weight = layer.weight
    if quantized_kind(layer) == "linear8bit":
        return weight.data.to(dtype).mul_(_scb(layer).unsqueeze(1).mul(1.0 / 127.0))
    if relaid_out(layer):
        keep_layout(layer)
    state = weight.quant_state
    absmax = state.absmax
    ops = torch.ops.bitsandbytes
    if state.nested:  # the block scales are themselves 8-bit codes in blocks of 256
        inner = state.state2
        absmax = ops.dequantize_blockwise.default(absmax, inner.absmax, inner.code, inner.blocksize, torch.float32)
        absmax = absmax + state.offset
    return ops.dequantize_4bit.default(weight.data, absmax, state.blocksize, state.quant_type, state.shape, dtype)


def snapshot(layer: nn.Module) -> dict[str, Any]:
    """What `restore` needs to put the layer's quantized weight back exactly."""
    weight = layer.weight
    if quantized_kind(layer) == "linear4bit":
        return {"weight": weight}
    return {"data": weight.data.clone(), "scb": _scb(layer).clone()}


def restore(layer: nn.Module, saved: dict[str, Any]) -> None:
    if quantized_kind(layer) == "linear4bit":
        layer.weight = saved["weight"]
        layer.quant_state = saved["weight"].quant_state
        return
    layer.weight.data = saved["data"]
    _set_scb(layer, saved["scb"])


def requantize(layer: nn.Module, value: torch.Tensor) -> None:
    """Store `value` (out, in) as the layer's weight, quantized as the layer's own weight is."""
    bnb = bitsandbytes()
    weight = layer.weight
    if quantized_kind(layer) == "linear8bit":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(value.to(weight.device, torch.float16))
        weight.data = cb
        _set_scb(layer, scb)
        return
    state = weight.quant_state
    packed, new_state = bnb.functional.quantize_4bit(
        value.to(weight.device, state.dtype).contiguous(),
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=weight.dtype,
    )
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=new_state,
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=weight.dtype,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = new_state


def _scb(layer: nn.Module) -> torch.Tensor:
    # bitsandbytes moves the row scales from the weight to the layer's state on the first forward.
    scb = getattr(layer.weight, "SCB", None)
    return scb if scb is not None else layer.state.SCB


def _set_scb(layer: nn.Module, scb: torch.Tensor) -> None:
    if getattr(layer.weight, "SCB", None) is not None:
        layer.weight.SCB = scb
        layer.weight.CB = layer.weight.data
    else:
        layer.state.SCB = scb
        layer.state.CB = layer.weight.data


def stored_bytes(layer: nn.Module) -> int:
    """Bytes the quantized weight takes: codes, block scales (and their own scales), code tables."""
    weight = layer.weight
    tensors = [weight.data]
    if quantized_kind(layer) == "linear8bit":
        tensors.append(_scb(layer))
    else:
        state = weight.quant_state
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def logical_numel(param: torch.Tensor) -> int:
    """How many weights a parameter stands for (a packed 4-bit one holds two per byte)."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(param, "bnb_quantized", False):
        return int(torch.Size(state.shape).numel())
    return param.numel()
