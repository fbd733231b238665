"""metrics.jsonl (a JSON object a line: one per optimizer step, one per evaluation) and the
way results are shown to a person."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic

METRICS_FILE = "metrics.jsonl"


def write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    write_bytes_atomic(out / METRICS_FILE, text.encode())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
