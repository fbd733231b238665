"""The errors training raises for what the user can fix: a run's options, folders, a stopped run
(`TrainingError`), and a data file (`DataError`)."""

from __future__ import annotations

from ..errors import LorakitError


class TrainingError(LorakitError, RuntimeError):
    """The run cannot start or had to stop; the message says why and what was kept."""


class DataError(LorakitError, ValueError):
    """A problem with a data file; the message names the file and, where it can, the line."""
