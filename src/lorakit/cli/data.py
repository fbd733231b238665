"""`lorakit data FILE`: what training will see of a data file, before any training.

The examples, tokens and trained tokens, the examples --max-length cuts, how much of each step is
padding, and the first examples with their trained tokens marked; or, with --json, each
example's input_ids and labels (-100 where nothing is trained). The options that shape the data
are `lorakit train`'s own, from RunConfig's definitions, so both read a file the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

from ..training import RunConfig, TrainingError
from ..training.base_model import default_model, fit_max_length, load_config, load_tokenizer, quiet_transformers
from ..training.data import examples as data_mod
from ..training.data.summary import DataSummary, marked_text, summarize
from ..training.options import add_run_options
from ..training.prepare import run_labels

# The RunConfig options that decide what training sees of the data. Those RunConfig defines are
# offered (a data option RunConfig gains, such as `packing`, joins when it is defined there).
DATA_OPTIONS = ("model", "task", "labels", "max_length", "train_on_inputs", "packing", "batch_size")


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "data",
        help="what training will see of a data file: tokens, trained tokens, cuts, padding",
        description="Read and tokenize a data file as `lorakit train` would (every record: no "
        "held-out split), and show what training sees of it.",
    )
    d.add_argument("file", metavar="FILE", help="CSV/TSV (header line) or JSONL file, as `train --data` takes")
    add_run_options(d, only=DATA_OPTIONS)
    d.add_argument(
        "--show",
        type=int,
        default=3,
        metavar="N",
        help="print the first N examples with their trained tokens marked (default: 3)",
    )
    d.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object per example, {"input_ids": [...], "labels": [...]}, -100 where '
        "nothing is trained (classify: labels is the class id)",
    )


def run(args: argparse.Namespace) -> int:
    config = RunConfig(data=args.file, **{name: getattr(args, name) for name in DATA_OPTIONS if hasattr(args, name)})
    config.check()
    if args.show < 0:
        raise TrainingError(f"--show must be an integer >= 0, got {args.show}")
    dataset = data_mod.read_dataset(config.data)
    task = config.task or data_mod.infer_task(dataset)
    data_mod.validate(dataset, task)
    labels = run_labels(config, task, dataset)
    model_name = config.model or default_model()
    quiet_transformers()
    tokenizer = load_tokenizer(model_name)
    # The position limit is all that is needed of the model: its configuration, not its weights.
    max_length, notice = fit_max_length(
        config.max_length, SimpleNamespace(config=load_config(model_name)), "--max-length"
    )
    encoded = data_mod.encode(dataset, task, tokenizer, max_length, labels, config.train_on_inputs)
    if notice:  # once the data is known to be good: an error is the only line then
        print(f"lorakit data: notice: {notice}", file=sys.stderr)
    if args.json:
        try:
            for ids, trained in zip(encoded.input_ids, encoded.labels):
                print(json.dumps({"input_ids": ids, "labels": trained}))
            sys.stdout.flush()
        except BrokenPipeError:  # `lorakit data --json | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    summary = summarize(encoded, config)
    print(f"{dataset.source}: {task}, tokenized for {model_name}")
    for line in describe(summary, max_length, config.batch_size):
        print(line)
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    shown = min(args.show, len(encoded))
    if shown:
        how = "in green" if colour else "in [[ ]]"
        first = "the first example" if shown == 1 else f"the first {shown} examples"
        print(f"\n{first}, trained tokens {how}:" if task == "causal-lm" else f"\n{first}:")
    for i in range(shown):
        ids, trained = encoded.input_ids[i], encoded.labels[i]
        if task == "causal-lm":
            text = marked_text(ids, trained, tokenizer, colour)
        else:
            text = f"{tokenizer.decode(ids)}  -> {labels[trained]}"
        print(f"{encoded.lines[i]}: {text}")
    return 0


def describe(summary: DataSummary, max_length: int, batch_size: int) -> list[str]:
    """The summary's lines, as `lorakit data` prints them."""
    lines = [f"examples: {summary.examples:,}", f"tokens: {summary.tokens:,}"]
    if summary.trained is not None:
        share = summary.trained / summary.tokens if summary.tokens else 0.0
        lines.append(f"trained tokens: {summary.trained:,} ({share:.0%} of the tokens)")
    cut = f"cut by --max-length {max_length}: {len(summary.cut):,} examples"
    if summary.cut:
        cut += f" ({', '.join(summary.cut[:5])}{', ...' if len(summary.cut) > 5 else ''})"
    lines.append(cut)
    what, share = summary.efficiency
    lines.append(
        f"{what} efficiency at --batch-size {batch_size}: {share:.0%} of the tokens processed are the examples' own"
    )
    return lines
