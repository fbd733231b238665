"""The optional libraries of the HTTP server, checked in one place."""

from __future__ import annotations

import importlib

from ..errors import LorakitError


class ServeError(LorakitError):
    """`lorakit serve` cannot start: a missing library, a bad option, a port in use."""


def require_web() -> None:
    """Raise ServeError naming the extra to install when FastAPI, uvicorn or pydantic is missing."""
    for name in ("fastapi", "uvicorn", "pydantic"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise ServeError(
                f"lorakit serve needs FastAPI and uvicorn ({name} is not installed): pip install 'lorakit[serve]'"
            ) from None
