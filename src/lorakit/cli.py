"""The `lorakit` command: train | eval | generate | merge | inspect.

    lorakit train                      LoRA-fine-tune the bundled MiniLM on the bundled sentiment set
    lorakit train --model M --data F   the general command (see `lorakit train --help`)
    lorakit eval OUT                   accuracy / loss (classify), loss / perplexity (causal-lm)
    lorakit generate OUT --prompt P    run a prompt through base + adapter
    lorakit merge OUT --out MERGED     a full model folder (safetensors) with the adapter folded in
    lorakit inspect OUT                base model, targets, rank, parameters, file size

Errors the user can fix (bad data, bad options, a missing folder) print one line and exit 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from . import data as data_mod

DEFAULT_OUT = "runs/sentiment"


def _targets(value: str) -> str | list[str]:
    """`q_proj,v_proj` is a list of names; anything else (a preset, a regex) stays one string."""
    if "," in value and not any(c in value for c in "()[]|*+?\\^$"):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning from a dataset file to an adapter in PEFT's layout.",
        epilog="Run `lorakit train` with no options for the default run (under 2 minutes on 2 CPU cores).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train an adapter (defaults: bundled MiniLM on bundled sentiment data)",
                       description="Train a LoRA adapter. With no options: the bundled all-MiniLM-L6-v2 as a "
                                   "sentence classifier on the bundled sentiment sentences, 20% held out.")
    g = t.add_argument_group("what to train")
    g.add_argument("--model", metavar="FOLDER|HUB_ID", help="local Hugging Face model folder, or a hub id where the network allows "
                                   "(default: the bundled all-MiniLM-L6-v2)")
    g.add_argument("--data", metavar="FILE", default=data_mod.BUNDLED,
                   help="CSV/TSV (header line) or JSONL file; columns text,label | prompt,completion | messages "
                        f"(default: {data_mod.BUNDLED})")
    g.add_argument("--task", choices=data_mod.TASKS, help="default: inferred from the data's columns")
    g.add_argument("--labels", metavar="A,B,...", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                   help="classify: the label set in id order, comma-separated (default: the data's labels, sorted)")
    held = g.add_mutually_exclusive_group()
    held.add_argument("--eval-data", metavar="FILE", help="held-out file (same format and columns as --data)")
    held.add_argument("--eval-split", metavar="FRACTION", type=float, default=0.2,
                      help="fraction of --data held out, a fixed split (default: 0.2)")
    lo = t.add_argument_group("LoRA")
    lo.add_argument("--rank", metavar="R", type=int, default=8, help="rank r of each adapter (default: 8)")
    lo.add_argument("--alpha", metavar="A", type=float, default=16.0, help="scale: alpha / rank (default: 16)")
    lo.add_argument("--targets", metavar="WHICH", type=_targets, default="attention",
                    help="attention | attention+mlp | all-linear | comma-separated module names | a regex "
                         "(default: attention)")
    lo.add_argument("--dropout", metavar="P", type=float, default=0.0, help="dropout on the adapters' input (default: 0)")
    lo.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank) (rank-stabilised LoRA)")
    tr = t.add_argument_group("training")
    tr.add_argument("--epochs", metavar="N", type=int, default=3, help="passes over the data (default: 3)")
    tr.add_argument("--max-steps", metavar="N", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    tr.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    tr.add_argument("--warmup", metavar="FRACTION", type=float, default=0.1, help="fraction of steps to warm up over (default: 0.1)")
    tr.add_argument("--weight-decay", metavar="W", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    tr.add_argument("--batch-size", metavar="N", type=int, default=16, help="examples per process per micro-batch (default: 16)")
    tr.add_argument("--grad-accum", metavar="N", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    tr.add_argument("--max-length", metavar="TOKENS", type=int, default=128, help="tokens per example (default: 128)")
    tr.add_argument("--seed", metavar="N", type=int, default=0, help="seed for the initial weights, order and dropout (default: 0)")
    tr.add_argument("--bf16", action="store_true", help="compute in bfloat16 (autocast)")
    tr.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    tr.add_argument("--threads", metavar="N", type=int, help="CPU threads per process (default: the cores / processes)")
    ou = t.add_argument_group("output")
    ou.add_argument("--out", metavar="FOLDER", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    ou.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ou.add_argument("--save-every", metavar="N", type=int, help="write a checkpoint every N optimizer steps")
    again = ou.add_mutually_exclusive_group()
    again.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its last checkpoint "
                                                       "(its saved options are used; others are ignored)")
    again.add_argument("--repeat", metavar="RUN", help="train again with every option saved in RUN/run_config.json, "
                                                       "writing to --out")

    e = sub.add_parser("eval", help="held-out accuracy and loss (classify) or loss and perplexity (causal-lm)")
    e.add_argument("adapter", help="adapter folder (a `lorakit train` output)")
    e.add_argument("--data", help="file to evaluate on (default: the run's held-out set)")
    e.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-length", type=int, help="default: the run's, else 128")
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    gen = sub.add_parser("generate", help="run a prompt through base + adapter")
    gen.add_argument("adapter", help="adapter folder")
    gen.add_argument("--prompt", required=True, help="text (classify: the sentence to label)")
    gen.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--no-adapter", action="store_true", help="run the base model alone, to compare")

    m = sub.add_parser("merge", help="write a full model folder with the adapter folded into the weights")
    m.add_argument("adapter", help="adapter folder")
    m.add_argument("--out", required=True, help="the merged model folder to write")
    m.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    i = sub.add_parser("inspect", help="what an adapter folder holds")
    i.add_argument("adapter", help="adapter folder")
    i.add_argument("--json", action="store_true", help="print the facts as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .commands import USER_ERRORS, run_command

    try:
        return run_command(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
