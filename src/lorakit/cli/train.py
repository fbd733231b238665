"""`lorakit train`: the options come from training/options.py; this adds --overwrite, --resume
and --repeat, which say what to do with the output folder rather than how to train."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..training import RunConfig, TrainingError, train
from ..training.options import add_run_options, read_run, run_option_fields


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="train an adapter (defaults: bundled MiniLM on bundled sentiment data)",
        description="Train a LoRA adapter. With no options: the bundled all-MiniLM-L6-v2 as a "
        "sentence classifier on the bundled sentiment sentences, 20% held out.",
    )
    out = add_run_options(t)["output"]
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in --out (removes only the files a run writes; your own files there stay)",
    )
    again = out.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        metavar="OUT",
        help="continue the run in OUT from its last checkpoint (its saved options are used; giving others is an error)",
    )
    again.add_argument(
        "--repeat", metavar="RUN", help="train again with every option saved in RUN/run_config.json, writing to --out"
    )


def run(args: argparse.Namespace) -> int:
    if args.resume or args.repeat:
        _refuse_run_options(args, "--resume" if args.resume else "--repeat")
    if args.resume:
        config = read_run(args.resume)
        config.out = args.resume
        train(config, resume=True)
        return 0
    if args.repeat:
        config = read_run(args.repeat)
        if Path(args.out).resolve() == Path(args.repeat).resolve():
            raise TrainingError(f"--repeat {args.repeat} needs another --out (it would replace the run it repeats)")
        config.out, config.extra = args.out, {}
        train(config, overwrite=args.overwrite)
        return 0
    train(RunConfig.from_args(args), overwrite=args.overwrite)
    return 0


def _refuse_run_options(args: argparse.Namespace, mode: str) -> None:
    """--resume and --repeat take the run's saved options: one given as well would be ignored in silence
    (`--resume R --epochs 5` would stop at the saved epochs)."""
    defaults = RunConfig()
    given = [
        f"--{f.name.replace('_', '-')}"
        for f in run_option_fields()
        if f.name != "out" and getattr(args, f.name) != getattr(defaults, f.name)
    ]
    if given:
        raise TrainingError(
            f"{mode} uses every option saved in its run_config.json, so {', '.join(given)} would be "
            f"ignored; leave {'it' if len(given) == 1 else 'them'} out, or start a new run without {mode}"
        )
