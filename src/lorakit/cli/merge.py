"""`lorakit merge`: a full model folder (safetensors, config, tokenizer) with the adapter folded
into the weights, which Transformers loads with no LoRA code."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import write_folder_atomic
from ..model import unload
from ..training import TrainingError
from .trained import load_trained


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="write a full model folder with the adapter folded into the weights")
    m.add_argument("adapter", help="adapter folder")
    m.add_argument("--out", required=True, help="the merged model folder to write")
    m.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> int:
    target = Path(args.out)
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    model, tokenizer, facts = load_trained(args.adapter, args.model)
    try:
        plain = unload(model, merge=True)
    except ValueError as err:  # e.g. an adapter on a weight tied to another module
        raise TrainingError(f"{args.adapter}: {err}") from None

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_folder_atomic(target, fill, args.overwrite)
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    print(f"merged {args.adapter} into {facts['base']}: {target} ({size / 2**20:.1f} MB of safetensors); "
          f"load it with {type(plain).__name__}.from_pretrained({str(target)!r})")
    return 0
