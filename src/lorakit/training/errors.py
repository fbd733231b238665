"""The error a training run raises for what the user can fix (options, folders, a stopped run)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run cannot start or had to stop; the message says why and what was kept."""
