"""metrics.jsonl (a JSON object a line: one per optimizer step, one per evaluation) and the
way results are shown to a person."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...files.atomic import write_bytes_atomic
from ...files.json_file import jsonl_objects
from ..errors import TrainingError

METRICS_FILE = "metrics.jsonl"


def write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    write_bytes_atomic(out / METRICS_FILE, text.encode())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl file ([] when there is none); a broken line names file and line."""
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise TrainingError(f"{path}: cannot be read ({err.strerror or err})") from None
    metrics = []
    for number, entry in jsonl_objects(text, str(path), TrainingError):
        if not _is_int(entry.get("step")):
            raise TrainingError(f"{path}:{number}: expected an object with an integer 'step'")
        for key in ("epoch", "loss", "lr"):
            if key in entry and not _is_number(entry[key]):
                raise TrainingError(f"{path}:{number}: '{key}' must be a number, got {entry[key]!r}")
        result = entry.get("eval", {})
        if not (isinstance(result, dict) and all(isinstance(k, str) and _is_number(v) for k, v in result.items())):
            raise TrainingError(f"{path}:{number}: 'eval' must be an object of numbers, got {result!r}")
        metrics.append(entry)
    return metrics


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # A NaN loss is a fact worth keeping in the log (json writes it as NaN), so not "finite".
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
