"""`labels.json`: a classifier adapter's label names, saved next to it (id2label / label2id)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files.adapter_file import AdapterFileError
from ..files.json_file import read_json

LABELS_FILE = "labels.json"  # saved next to a classifier adapter: id2label / label2id


def labels_json(labels: list[str]) -> dict[str, Any]:
    """What labels.json holds for the label set `labels` (in id order)."""
    return {"id2label": {str(i): n for i, n in enumerate(labels)}, "label2id": {n: i for i, n in enumerate(labels)}}


def read_labels(folder: str | Path) -> list[str] | None:
    """The label names (in id order) from `folder`/labels.json, or None when there is no such file."""
    file = Path(folder) / LABELS_FILE
    if not file.exists():
        return None  # one that exists but is no file (a folder) is reported by read_json, named
    raw = read_json(file, AdapterFileError)
    id2label = raw.get("id2label") if isinstance(raw, dict) else None
    try:
        labels = [id2label[str(i)] for i in range(len(id2label))]
    except (KeyError, TypeError):
        labels = None
    if not labels or not all(isinstance(n, str) for n in labels):
        raise AdapterFileError(f'{file}: expected {{"id2label": {{"0": name, "1": name, ...}}}} with ids 0..n-1')
    return labels
