"""The `lorakit` command: train | eval | generate | merge | inspect | combine | serve.

    lorakit train                      LoRA-fine-tune the bundled MiniLM on the bundled sentiment set
    lorakit train --model M --data F   the general command (see `lorakit train --help`)
    lorakit eval OUT                   accuracy / loss (classify), loss / perplexity (causal-lm)
    lorakit generate OUT --prompt P    run a prompt through base + adapter
    lorakit merge OUT --out MERGED     a full model folder (safetensors) with the adapter folded in
    lorakit inspect OUT                base model, targets, rank, parameters, file size
    lorakit combine A B --out C        one adapter from weighted trained ones (cat, svd, ties, dare, ...)
    lorakit serve OUT...               base model + adapters over HTTP (vLLM's endpoints)

Each subcommand is a module of this package with `add_parser(subparsers)` and `run(args)`.
Errors the user can fix (bad data, bad options, a missing folder) print one line and exit 2;
`--debug` shows the traceback instead. Ctrl-C at any moment prints one line and exits with status
130, never a traceback or death by the signal: this module imports only the standard library
(and `import lorakit` loads nothing heavy, see lorakit/__init__.py), so `main` handles SIGINT
before torch or Transformers start to import (see `main` for how). Outside its reach: the
interpreter's own start (before any lorakit code runs) and the last part of its shutdown after
a command has finished (Python puts the default SIGINT action back before it frees modules).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys

COMMANDS = ("train", "data", "eval", "generate", "merge", "inspect", "combine", "serve")


def _command(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning from a dataset file to an adapter in PEFT's layout.",
        epilog="Run `lorakit train` with no options for the default run (under 2 minutes on 2 CPU cores).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        _command(name).add_parser(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that may mean a mistake the user can fix: one line, exit status 2 (a
    LorakitError only where its class says `user_fixable`, see `is_user_error`)."""
    from ..errors import LorakitError

    # The file-system errors a user's paths cause (a folder they cannot read, a file where a
    # folder should be) name the path; they are shown as one line, not a traceback.
    return (LorakitError, FileExistsError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is shown as one line with exit status 2 rather than a traceback."""
    from ..errors import LorakitError

    if isinstance(err, LorakitError):
        return err.user_fixable
    return isinstance(err, user_errors())


def main(argv: list[str] | None = None) -> int:
    """Run the command in `argv` (default: the process's arguments); returns the exit status."""
    whole_process = argv is None  # the console script or `python -m lorakit`, not a caller in Python
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    name = f"lorakit {command}" if command in COMMANDS else "lorakit"
    # While the commands import torch and Transformers, Ctrl-C ends the process at once: nothing
    # is written yet, and a KeyboardInterrupt there can be swallowed by C code (torch's import of
    # numpy), leaving a half-imported module that fails later with a misleading error.
    own_handler = whole_process and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own_handler:
        signal.signal(signal.SIGINT, lambda *_: _end_interrupted(name))
    try:
        parser = build_parser()  # imports every command
        args = parser.parse_args(argv)
        if own_handler:  # from here a KeyboardInterrupt unwinds the command (temporary files, locks)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        code = _run(parser, args)
        if own_handler:  # the command is done: during the interpreter's shutdown, end at once again
            signal.signal(signal.SIGINT, lambda *_: _end_interrupted(name))
        return code
    except KeyboardInterrupt:
        if whole_process:
            _end_interrupted(name)
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def _end_interrupted(name: str) -> None:
    """One line, then exit 130 at once: the interpreter's shutdown can neither print a traceback
    nor end the process by the signal (it does after a KeyboardInterrupt C code once saw)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # in a signal handler, a write may be under way
            stream.flush()
    os.write(2, f"{name}: interrupted\n".encode())
    os._exit(130)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _command(args.command).run(args)
    except user_errors() as err:
        if args.debug or not is_user_error(err):
            raise
        print(f"lorakit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:  # "path: Permission denied", not "[Errno 13] ..."
        return f"{err.filename}: {err.strerror or err}"
    # Some messages list what exists (a model's adaptable modules) one per line: fold them.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "".join(
        line + ("" if i == len(lines) - 1 else " " if line.endswith((".", ":")) else "; ")
        for i, line in enumerate(lines)
    )


if __name__ == "__main__":
    sys.exit(main())
