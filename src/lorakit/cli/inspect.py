"""`lorakit inspect`: what an adapter folder holds, read from its files alone (no model is
loaded), so it also works on adapter folders PEFT wrote."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from ..files.adapter_file import read_adapter_config, read_tensor_shapes
from ..files.peft_format import PREFIX, WEIGHTS_FILE, split_pair_key
from ..training.labels import read_labels
from ..training.report.metrics_log import METRICS_FILE, evaluations, fmt_result, read_metrics
from ..training.tasks import TASK_OF_TYPE


def add_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="what an adapter folder holds")
    i.add_argument("adapter", help="adapter folder")
    i.add_argument("--json", action="store_true", help="print the facts as JSON")


def inspect_adapter(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    config, facts = read_adapter_config(folder)
    shapes = read_tensor_shapes(folder)
    count = sum(_numel(s) for s in shapes.values())
    lora = sum(_numel(s) for k, s in shapes.items() if k.startswith(PREFIX) and split_pair_key(k[len(PREFIX) :]))
    modules = facts.get("target_modules") or []
    experts = _experts(config.target_parameters, modules)
    if isinstance(modules, list):
        modules = [m for m in modules if not _PER_EXPERT.search(m)]
    info: dict[str, Any] = {
        "folder": str(folder),
        "base_model": facts.get("base_model_name_or_path"),
        "task_type": facts.get("task_type"),
        "rank": config.rank,
        "alpha": config.alpha,
        "rslora": config.rslora,
        "dora": config.use_dora,
        "init": config.init,
        "dropout": config.dropout,
        "targets": sorted({m.rsplit(".", 1)[-1] for m in modules}) if isinstance(modules, list) else modules,
        "target_modules": len(modules) if isinstance(modules, list) else modules,
        "experts": experts,
        "modules_to_save": config.modules_to_save,
        "parameters": count,
        "lora_parameters": lora,
        "file_bytes": (folder / WEIGHTS_FILE).stat().st_size,
    }
    labels = read_labels(folder)
    if labels is not None:
        info["labels"] = labels
    evals = evaluations(read_metrics(folder / METRICS_FILE))
    if evals:
        info["held_out"] = {"before": evals[0]["eval"], "after": evals[-1]["eval"], "steps": evals[-1]["step"]}
    return info


_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _experts(parameters: list[str], modules: Any) -> dict[str, Any] | None:
    """The adapter's part on MoE experts, from its config alone: fused parameters (PEFT's
    target_parameters) or per-expert modules (vLLM's layout), or None."""
    if parameters:
        return {
            "layout": "fused",
            "parameters": len(parameters),
            "names": sorted({p.rsplit(".", 1)[-1] for p in parameters}),
        }
    per = [m for m in modules if _PER_EXPERT.search(m)] if isinstance(modules, list) else []
    if not per:
        return None
    return {
        "layout": "per-expert",
        "modules": len(per),
        "experts": len({_PER_EXPERT.search(m).group(1) for m in per}),
        "names": sorted({m.rsplit(".", 1)[-1] for m in per}),
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _experts_text(experts: dict[str, Any]) -> str:
    names = ", ".join(experts["names"])
    if experts["layout"] == "fused":
        return f"{experts['parameters']} fused expert parameters: {names} (PEFT's target_parameters layout)"
    return (
        f"{experts['modules']} per-expert modules of {experts['experts']} experts: {names} (vLLM's per-expert layout)"
    )


def run(args: argparse.Namespace) -> int:
    info = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    targets = ", ".join(info["targets"]) if isinstance(info["targets"], list) else info["targets"]
    rows = [
        ("base model", info["base_model"]),
        ("task", f"{info['task_type']} ({TASK_OF_TYPE.get(info['task_type'], '?')})"),
        (
            "LoRA",
            f"rank {info['rank']}, alpha {info['alpha']:g}{', rsLoRA' if info['rslora'] else ''}"
            f"{', DoRA' if info['dora'] else ''}{', ' + info['init'] + ' init' if info['init'] != 'default' else ''}, "
            f"dropout {info['dropout']:g}",
        ),
        ("targets", f"{info['target_modules']} modules: {targets}"),
        *([("experts", _experts_text(info["experts"]))] if info["experts"] else []),
        ("trained in full", ", ".join(info["modules_to_save"]) or "-"),
        ("parameters", f"{info['parameters']:,} ({info['lora_parameters']:,} in LoRA pairs)"),
        ("file size", f"{info['file_bytes'] / 1024:.1f} KB ({WEIGHTS_FILE})"),
    ]
    if "labels" in info:
        rows.append(("labels", ", ".join(info["labels"])))
    if "held_out" in info:
        h = info["held_out"]
        rows.append(
            ("held out", f"before {fmt_result(h['before'])}; after {h['steps']} steps {fmt_result(h['after'])}")
        )
    width = max(len(k) for k, _ in rows)
    print(info["folder"])
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0
