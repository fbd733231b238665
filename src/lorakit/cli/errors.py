"""`CommandError`: what a command's own checks raise (its options, its input and output folders)."""

from __future__ import annotations

from ..errors import LorakitError


class CommandError(LorakitError, ValueError):
    """A command cannot do what its options ask; the message names the option or folder and why."""
