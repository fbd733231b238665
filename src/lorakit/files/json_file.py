"""Reading JSON and JSON-lines text we or PEFT wrote, with an error that names the file and the place."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_json(file: Path, error: type[Exception] = ValueError) -> Any:
    """The parsed contents of `file`; a missing, unreadable or broken file raises `error` naming
    the file (and the line and column of a syntax error)."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{file}: missing") from None
    except OSError as err:
        raise error(f"{file}: cannot be read ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise error(f"{file}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise error(f"{file}: not UTF-8 text ({err.reason})") from None


def jsonl_objects(text: str, where: str, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSON-lines `text`; a line that is not a
    JSON object raises `error` naming `where` and the line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(value, dict):
            raise error(f"{where}:{number}: expected a JSON object, got {type(value).__name__}")
        yield number, value
