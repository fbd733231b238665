"""lorakit/errors.py: one root under every error lorakit raises, and what the CLI does with it."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil

import pytest

import lorakit
from lorakit.errors import LorakitError

cli_main = importlib.import_module("lorakit.cli.main")  # the module; lorakit.cli.main is its function

# The wings whose libraries may be missing here (a module that cannot import is skipped).
_OPTIONAL = ("fastapi", "uvicorn", "pydantic", "transformers", "bitsandbytes", "prometheus_client", "tqdm")


def _error_classes() -> list[type[BaseException]]:
    """Every exception class defined in a lorakit module, found by importing them all."""
    found = []
    for info in pkgutil.walk_packages(lorakit.__path__, "lorakit."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError as err:
            if err.name and err.name.split(".")[0] in _OPTIONAL:
                continue
            raise
        found += [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, BaseException) and c.__module__ == info.name
        ]
    return found


def test_every_lorakit_error_derives_from_the_root_and_keeps_its_builtin_kind():
    classes = _error_classes()
    names = {c.__name__ for c in classes}
    assert {"AdapterFileError", "TrainingError", "DataError", "CommandError"} <= names  # the walk found them
    for cls in classes:
        assert issubclass(cls, LorakitError), cls
    assert issubclass(lorakit.AdapterFileError, ValueError) and lorakit.LorakitError is LorakitError
    from lorakit.training.errors import DataError, TrainingError

    assert issubclass(TrainingError, RuntimeError) and issubclass(DataError, ValueError)


def _run_raising(monkeypatch: pytest.MonkeyPatch, err: BaseException, debug: bool = False) -> int:
    class Command:
        @staticmethod
        def run(_args: argparse.Namespace) -> int:
            raise err

    monkeypatch.setattr(cli_main, "_command", lambda _name: Command)
    return cli_main._run(argparse.ArgumentParser(), argparse.Namespace(command="inspect", debug=debug))


def test_the_cli_shows_a_lorakit_error_as_one_line_and_exit_2(monkeypatch, capsys):
    class Custom(LorakitError, ValueError):
        pass

    assert _run_raising(monkeypatch, Custom("data.csv line 3: no label\nvalid: pos, neg")) == 2
    assert capsys.readouterr().err == "lorakit inspect: error: data.csv line 3: no label; valid: pos, neg\n"
    with pytest.raises(Custom):  # --debug shows the traceback
        _run_raising(monkeypatch, Custom("x"), debug=True)


def test_the_cli_keeps_the_traceback_of_errors_that_are_not_the_users(monkeypatch):
    from lorakit.adapting.given import TensorError
    from lorakit.serving.engine import RowError

    for err in (TensorError("bad A", "q", "A"), RowError(404, "gone"), RuntimeError("a bug")):
        with pytest.raises(type(err)):
            _run_raising(monkeypatch, err)
