"""`lorakit eval`: held-out accuracy and loss (classify), loss and perplexity (causal-lm)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..training import TrainingError
from ..training.base_model import fit_max_length
from ..training.data import examples as data_mod
from ..training.labels import LABELS_FILE
from ..training.options import RUN_FILE, read_run
from ..training.prepare import held_out_set
from ..training.report.metrics_log import fmt_result
from ..training.tasks import evaluate
from .trained import adapter_facts, load_trained


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="held-out accuracy and loss (classify) or loss and perplexity (causal-lm)")
    e.add_argument("adapter", help="adapter folder (a `lorakit train` output)")
    e.add_argument("--data", help="file to evaluate on (default: the run's held-out set)")
    e.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-length", type=int, help="default: the run's, else 128")
    e.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--max-length", args.max_length, 2)):
        if value is not None and value < least:
            raise TrainingError(f"{flag} must be an integer >= {least}, got {value}")
    facts = adapter_facts(args.adapter)
    saved_run = read_run(args.adapter) if (Path(args.adapter) / RUN_FILE).is_file() else None
    max_length = args.max_length or (saved_run.max_length if saved_run else 128)
    if args.data:
        dataset = data_mod.read_dataset(args.data)
    elif saved_run is not None:
        dataset = held_out_set(saved_run)
    else:
        raise TrainingError(f"{args.adapter}: no {RUN_FILE} to find the held-out set; pass --data FILE")
    data_mod.validate(dataset, facts["task"])
    if facts["labels"]:
        data_mod.check_labels(dataset, facts["labels"], f"the adapter's {LABELS_FILE}")
    model, tokenizer, facts = load_trained(args.adapter, args.model)
    max_length, notice = fit_max_length(max_length, model, "--max-length")
    if notice and args.max_length:  # a run's own length was already fitted (and said so) in training
        print(f"lorakit eval: notice: {notice}", file=sys.stderr)
    every_token = bool(saved_run and saved_run.train_on_inputs)  # the loss training measured
    encoded = data_mod.encode(dataset, facts["task"], tokenizer, max_length, facts["labels"], every_token)
    result = evaluate(model, encoded, args.batch_size, torch.device("cpu"))
    if args.json:
        print(json.dumps({"examples": len(dataset), **result}, indent=2))
        return 0
    print(f"{args.adapter} on {dataset.source} ({len(dataset)} examples): {fmt_result(result)}")
    return 0
