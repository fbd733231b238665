"""Ctrl-C (SIGINT) at any moment of a `lorakit` command: one line on stderr and exit status 130,
never a traceback, never death by the signal (cli/main.py, with the lazy `lorakit/__init__.py`).

Each case starts a real process and interrupts it at a different moment: while Python imports
the command (the console script's own import included), while torch and Transformers load,
and in the middle of training. A few seconds each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import bert_train_args, ctrl_c_reaches_it, train_tiny

# What the `lorakit` console script runs (pip writes this import and call).
CONSOLE_SCRIPT = ["-c", "import re, sys; from lorakit.cli import main; sys.exit(main())"]


def interrupted(args: list[str], *, after: float = 0.0, line: str | None = None) -> tuple[int, str, str]:
    """Start `python ARGS`, wait `after` seconds (and, if `line`, until stdout shows it), send
    SIGINT; (exit status, stdout, stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=ctrl_c_reaches_it,
    )
    try:
        seen = ""
        if line is not None:
            for text in proc.stdout:  # type: ignore[union-attr]
                seen += text
                if line in text:
                    break
        time.sleep(after)
        assert proc.poll() is None, f"ended before it was interrupted: {seen}{proc.stderr.read()}"  # type: ignore[union-attr]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, seen + out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def train_args(tiny, out) -> list[str]:
    return bert_train_args(tiny, out, steps=100000)


@pytest.mark.parametrize(
    ("start", "after", "line"),
    [
        (CONSOLE_SCRIPT, 0.3, None),  # importing lorakit.cli, then the commands (torch)
        (["-m", "lorakit"], 1.5, None),  # importing torch / Transformers, or loading the model
        (["-m", "lorakit"], 0.5, "before training"),  # training
    ],
    ids=["starting", "loading", "training"],
)
def test_ctrl_c_is_one_line_and_status_130(start, after, line, tiny, tmp_path):
    code, out, err = interrupted([*start, *train_args(tiny, tmp_path / "run")], after=after, line=line)
    assert code == 130, (code, out, err)
    assert err.splitlines() == ["lorakit train: interrupted"], err


def test_ctrl_c_in_another_command(tiny, tmp_path):
    run = tmp_path / "run"
    train_tiny(tiny, run, max_steps=1)
    code, out, err = interrupted(["-m", "lorakit", "merge", str(run), "--out", str(tmp_path / "merged")], after=0.3)
    assert code == 130 and err.splitlines() == ["lorakit merge: interrupted"], (code, out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing half-written left behind
