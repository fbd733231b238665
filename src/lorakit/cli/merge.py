"""`lorakit merge`: a full model folder (safetensors, config, tokenizer) with the adapter folded
into the weights, which Transformers loads with no LoRA code.

An adapter trained on a quantized base (`lorakit train --quantize`) learned to correct the
dequantized weights, not the original ones: folding it into the original full-precision weights
gives another model (PEFT issue 2105 and others). So for such a run the folder holds the
dequantized base plus the adapter, in --dtype, and the command reports how far its outputs are
from the trained model's (4-bit base + adapter) and how far merging into the original weights
would have been. `--requantize` instead merges into the quantized weights in place (dequantize,
add, quantize again) and writes a quantized folder, reporting the error that makes.

`--out` follows the rule of every folder a command writes (output_folder.py), checked before the
model is loaded: it may not be the adapter folder or the base model's folder, hold one or lie
inside one; `--overwrite` replaces only a folder `lorakit merge` wrote (one with merge.json, which
lists the files written), and only those files: the user's own files there stay."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from ..adapting.manage import merge, unload
from ..adapting.registry import lora_layers
from ..files.output_folder import Output
from ..quant.bnb import quantized_kind
from ..quant.convert import INT8_THRESHOLD, dequantize
from ..quant.convert import KINDS as QUANTIZE_KINDS
from .errors import CommandError
from .merge_check import Probe, probe_for
from .trained import adapter_facts, load_trained

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RECORD_FILE = "merge.json"
# The model's and tokenizer's files vary with the model: merge.json lists them.
MERGED = Output(
    command="lorakit merge", what="a merged model folder", marker=RECORD_FILE, names=(RECORD_FILE,), error=CommandError
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="write a full model folder with the adapter folded into the weights")
    m.add_argument("adapter", help="adapter folder")
    m.add_argument("--out", required=True, help="the merged model folder to write")
    m.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    m.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights of the folder (default: fp32)")
    m.add_argument(
        "--quantize",
        choices=QUANTIZE_KINDS,
        help="the adapter was trained on this quantized base (default: what the run's run_config.json says)",
    )
    m.add_argument(
        "--requantize",
        action="store_true",
        help="quantized base: merge into the quantized weights (re-quantize them) and write a quantized folder",
    )
    m.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a folder lorakit merge wrote (removes only the files it wrote; your own files there stay)",
    )


def run(args: argparse.Namespace) -> int:
    target = Path(args.out)
    base = args.model or adapter_facts(args.adapter)["base"]
    MERGED.check_out(target, args.overwrite, [("the adapter folder", args.adapter), ("the base model folder", base)])
    model, tokenizer, facts = load_trained(args.adapter, args.model, quantize=args.quantize or "run")
    kind, dtype = facts["quantize"], DTYPES[args.dtype]
    if args.requantize and kind is None:
        raise CommandError(
            f"--requantize: {args.adapter} was not trained on a quantized base (pass --quantize KIND if it was)"
        )
    probe = probe_for(args.adapter, model, tokenizer, facts) if kind else None
    trained = probe.outputs(model) if probe else None
    report = ""
    if args.requantize:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the figures are reported below
            merge(model, requantize=True)
        errors = [
            e for e in (getattr(layer, "requantize_error", None) for layer in lora_layers(model)) if e is not None
        ]
        plain = _unload(model, args.adapter)
        plain.config.quantization_config = _quantization_config(plain, kind)  # so from_pretrained reads it back
        report = _requantize_report(errors, plain, probe, trained, kind)
    else:
        if kind:
            dequantize(model)  # the weights the run trained against, in full precision
        plain = _unload(model, args.adapter).to(dtype)

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    record = {
        "adapter": str(Path(args.adapter).resolve()),
        "base": facts["base"],
        "dtype": args.dtype,
        "requantize": args.requantize,
    }
    MERGED.write(target, fill, record, args.overwrite)
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    weights = f"{kind}, re-quantized" if args.requantize else args.dtype
    print(
        f"merged {args.adapter} into {facts['base']}: {target} ({size / 2**20:.1f} MB of safetensors, {weights}); "
        f"load it with {type(plain).__name__}.from_pretrained({str(target)!r})"
    )
    if kind and not args.requantize:
        del model
        report = _dequantized_report(args, plain, probe, trained, kind, dtype)
    if report:
        print(report)
    return 0


def _unload(model: torch.nn.Module, folder: str) -> torch.nn.Module:
    try:
        return unload(model, merge=True)
    except ValueError as err:  # e.g. an adapter on a weight tied to another module
        raise CommandError(f"{folder}: {err}") from None


def _dequantized_report(args, plain, probe: Probe, trained, kind: str, dtype: torch.dtype) -> str:
    written = probe.worst(plain, trained)
    original, _, _ = load_trained(args.adapter, args.model, quantize=None)
    naive = probe.worst(_unload(original, args.adapter).to(dtype), trained)
    return (
        f"the folder holds the {kind}-dequantized base plus the adapter; on {probe.what}, its largest output "
        f"difference from the trained model ({kind} base + adapter) is {written:.3g} (outputs up to "
        f"{probe.scale(trained):.3g}); merging into the original unquantized weights instead would give {naive:.3g}"
    )


def _quantization_config(model: torch.nn.Module, kind: str):
    """The BitsAndBytesConfig Transformers would have loaded `model` with: its quantized layers'
    kind and compute dtype, and every other linear layer kept (llm_int8_skip_modules)."""
    from transformers import BitsAndBytesConfig

    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and quantized_kind(m) is None]
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=kept)
    layer = next(m for m in model.modules() if quantized_kind(m) is not None)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=layer.compute_dtype,
        llm_int8_skip_modules=kept,
    )


def _requantize_report(errors: list[float], plain, probe: Probe, trained, kind: str) -> str:
    merged = probe.worst(plain, trained)
    return (
        f"re-quantized {len(errors)} {kind} weights with the adapter added: largest weight error "
        f"{max(errors):.3g}; on {probe.what}, the largest output difference from the trained model "
        f"({kind} base + adapter) is {merged:.3g} (outputs up to {probe.scale(trained):.3g})"
    )
