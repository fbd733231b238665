"""`lorakit merge`: a full model folder (safetensors, config, tokenizer) with the adapter folded
into the weights, which Transformers loads with no LoRA code.

`--out` is checked before the model is loaded: it may not be the adapter folder, hold it or lie
inside it, nor be or hold the base model's folder; with `--overwrite` it replaces only a model
folder (one with config.json), never some other folder of the user's."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import write_folder_atomic
from ..model import unload
from ..training import TrainingError
from ..training.out_folder import check_destination
from .trained import adapter_facts, load_trained


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="write a full model folder with the adapter folded into the weights")
    m.add_argument("adapter", help="adapter folder")
    m.add_argument("--out", required=True, help="the merged model folder to write")
    m.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing model folder (one with config.json)")


def check_out(out: Path, adapter: Path, base: str | None, overwrite: bool) -> None:
    """The merged folder may replace neither the adapter nor the base model, nor a user's folder."""
    check_destination(out)
    where, source = out.resolve(), adapter.resolve()
    if where == source or where in source.parents or source in where.parents:
        relation = "is" if where == source else "holds" if where in source.parents else "is inside"
        raise TrainingError(f"--out {out} {relation} the adapter folder {adapter}; write the merged model elsewhere")
    if base and Path(base).is_dir():
        model = Path(base).resolve()
        if where == model or where in model.parents:
            raise TrainingError(f"--out {out} {'is' if where == model else 'holds'} the base model folder {base}; "
                                "write the merged model elsewhere")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise TrainingError(f"--out {out} holds files but no config.json, so it is not a model folder; "
                            "refusing to replace it even with --overwrite; choose another --out")


def run(args: argparse.Namespace) -> int:
    target = Path(args.out)
    check_out(target, Path(args.adapter), args.model or adapter_facts(args.adapter)["base"], args.overwrite)
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
