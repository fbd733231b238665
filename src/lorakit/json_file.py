"""Reading a JSON file we or PEFT wrote, with an error that names the file and the place."""

from __future__ import annotations

import json
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
