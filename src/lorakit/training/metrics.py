"""metrics.jsonl (a JSON object a line: one per optimizer step, one per evaluation) and the
way results are shown to a person."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import write_bytes_atomic
from ..json_file import jsonl_objects
from .errors import TrainingError

METRICS_FILE = "metrics.jsonl"


def write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    write_bytes_atomic(out / METRICS_FILE, text.encode())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl file ([] when there is none); a broken line names file and line."""
    if not path.is_file():
        return []
    metrics = []
    for number, entry in jsonl_objects(path.read_text(encoding="utf-8", errors="replace"), str(path), TrainingError):
        if not isinstance(entry.get("step"), int):
            raise TrainingError(f"{path}:{number}: expected an object with an integer 'step'")
        metrics.append(entry)
    return metrics


def evaluations(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation entries ({"step", "epoch", "eval": {...}}), in order."""
    return [m for m in metrics if isinstance(m.get("eval"), dict)]


def fmt_one(key: str, value: float) -> str:
    return f"{key} {100 * value:.2f}%" if key == "accuracy" else f"{key} {value:.4g}"


def fmt_result(result: dict[str, float]) -> str:
    """`accuracy 94.50%, loss 0.1523`"""
    return ", ".join(fmt_one(k, v) for k, v in result.items())


def fmt_size(n: float) -> str:
    """`585.7 KB`"""
    for unit in ("bytes", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
