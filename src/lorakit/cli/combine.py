"""`lorakit combine`: one adapter folder from several trained ones, weighted (arithmetic.py).

    lorakit combine RUN_A RUN_B --weights 0.6,0.4 --method svd --rank 8 --out DIR

The adapters must share a base model and task (and, for classifiers, the labels). The new folder
is a normal adapter (adapter_config.json, adapter_model.safetensors, labels.json) plus
combine.json, which records the sources, weights, method, the error per module and the files
written. `--out` follows the rule of every folder a command writes (output_folder.py): no
adapter folder or base model folder may be it, hold it or lie inside it, and `--overwrite`
replaces only a folder `lorakit combine` wrote, removing only the files it wrote.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..files.adapter_file import load_adapter, save_adapter
from ..files.expert_layout import LAYOUTS, check_layout
from ..files.output_folder import Output
from ..files.peft_format import CONFIG_FILE, WEIGHTS_FILE
from ..tools.arithmetic import METHODS, combine
from ..training.labels import LABELS_FILE, labels_json
from ..training.tasks import TASK_TYPES
from .errors import CommandError
from .trained import adapter_facts, load_trained

RECORD_FILE = "combine.json"
COMBINED = Output(
    command="lorakit combine",
    what="a combined adapter folder",
    marker=RECORD_FILE,
    names=(CONFIG_FILE, WEIGHTS_FILE, LABELS_FILE, RECORD_FILE),
    error=CommandError,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "combine",
        help="weight several adapters into one (linear, cat, svd, ties, dare)",
        description="Combine trained adapters of one base model into a new adapter folder.",
    )
    c.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folders (lorakit or PEFT)")
    c.add_argument("--out", required=True, help="the adapter folder to write")
    c.add_argument("--weights", help="one number per adapter, comma-separated (default: equal, summing to 1)")
    c.add_argument(
        "--method",
        default="svd",
        choices=METHODS,
        help="cat: exact, ranks add up; svd: the exact sum cut to --rank; linear: factor-wise, "
        "same ranks; ties / dare: TIES / DARE merging, then --rank (default: svd)",
    )
    c.add_argument("--rank", type=int, help="svd, ties, dare: the new rank (default: the largest source rank)")
    c.add_argument("--density", type=float, help="ties, dare: the fraction of each delta kept, in (0, 1]")
    c.add_argument("--seed", type=int, default=0, help="dare: the random stream (default: 0)")
    c.add_argument(
        "--expert-layout",
        default="fused",
        choices=LAYOUTS,
        help="how a pair on MoE experts is written: fused (PEFT's target_parameters) or per-expert "
        "(vLLM's layout for Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, DeepSeek) (default: fused)",
    )
    c.add_argument("--model", help="base model (default: the one named in the adapters' adapter_config.json)")
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a folder lorakit combine wrote (removes only the files it wrote; your own files there stay)",
    )


def run(args: argparse.Namespace) -> int:
    target = Path(args.out)
    weights = _weights(args.weights, len(args.adapters))
    facts = [adapter_facts(a) for a in args.adapters]
    bases = [args.model] if args.model else sorted({f["base"] for f in facts if f["base"]})
    COMBINED.check_out(
        target,
        args.overwrite,
        [*(("the adapter folder", a) for a in args.adapters), *(("the base model folder", b) for b in bases)],
    )
    _check_alike(args.adapters, facts, args.model)
    model, _, first = load_trained(args.adapters[0], args.model, adapter=False)
    names = [f"source{i}" for i in range(len(args.adapters))]
    for folder, name in zip(args.adapters, names):
        load_adapter(model, folder, name=name)
    try:
        report = combine(
            model,
            dict(zip(names, weights)),
            "combined",
            method=args.method,
            rank=args.rank,
            density=args.density,
            seed=args.seed,
        )
    except ValueError as err:
        message = str(err)
        for name, folder in zip(names, args.adapters):
            message = message.replace(repr(name), folder)
        raise CommandError(message) from None
    try:
        check_layout(model, args.expert_layout, "combined")
    except ValueError as err:
        raise CommandError(f"--expert-layout {args.expert_layout}: {err}") from None
    record = {
        "adapters": [str(Path(a).resolve()) for a in args.adapters],
        "weights": weights,
        "method": args.method,
        "rank": report.rank,
        "density": args.density,
        "seed": args.seed if args.method == "dare" else None,
        "relative_error": report.errors,
    }
    extra = {LABELS_FILE: labels_json(first["labels"])} if first["labels"] else {}

    def fill(tmp: Path) -> None:
        save_adapter(
            model,
            tmp,
            name="combined",
            base_model_name_or_path=first["base"],
            task_type=TASK_TYPES[first["task"]],
            extra_files=extra,
            expert_layout=args.expert_layout,
        )

    COMBINED.write(target, fill, record, args.overwrite)
    parts = " + ".join(f"{w:g} x {a}" for w, a in zip(weights, args.adapters))
    print(f"combined {parts} ({args.method}, rank {report.rank}): {target}")
    print(
        f"relative error of the new deltas against the {'merged' if args.method in ('ties', 'dare') else 'weighted'} "
        f"sum: max {report.max_error:.3g}, mean {report.mean_error:.3g} over {len(report.errors)} modules "
        f"(per module in {target / RECORD_FILE})"
    )
    return 0


def _weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise CommandError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.6,0.4") from None
    if len(weights) != count:
        raise CommandError(f"--weights {text!r}: {len(weights)} number(s) for {count} adapters; give one per adapter")
    return weights


def _check_alike(folders: list[str], facts: list[dict], model: str | None) -> None:
    """Same task, same labels, and (unless --model) the same base model for every adapter."""
    first = facts[0]
    for folder, f in zip(folders[1:], facts[1:]):
        if f["task"] != first["task"]:
            raise CommandError(
                f"{folder} is a {f['task']} adapter, {folders[0]} a {first['task']} one; "
                "only adapters of one task combine"
            )
        if f["labels"] != first["labels"]:
            raise CommandError(
                f"{folder}/{LABELS_FILE} names the labels {f['labels']}, {folders[0]} has "
                f"{first['labels']}; classifier heads combine only over the same labels"
            )
        if model is None and f["base"] != first["base"]:
            raise CommandError(
                f"{folder} was trained on {f['base']!r}, {folders[0]} on {first['base']!r}; "
                "adapters combine on one base model (pass --model to choose it)"
            )
