"""The root of lorakit's errors: `LorakitError`.

Every error lorakit raises on purpose derives from it, and each is also the built-in kind a
caller would catch (`AdapterFileError` is a `ValueError`, `TrainingError` a `RuntimeError`), so
`except lorakit.LorakitError` catches all of them and `except ValueError` keeps working.
"""

from __future__ import annotations

from typing import ClassVar


class LorakitError(Exception):
    """Every error lorakit raises on purpose derives from this; each is also the built-in kind a
    caller would catch (`ValueError`, `RuntimeError`, ...)."""

    # A mistake the user can fix (bad data, options, folders): the `lorakit` command prints its
    # message as one line and exits with status 2. False for errors that reaching the command
    # line would mean a bug in lorakit (an HTTP answer inside the server, tensors given in Python):
    # those keep their traceback.
    user_fixable: ClassVar[bool] = True
