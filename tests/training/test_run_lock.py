"""training/run_lock.py: two runs on one folder are kept apart, and a dead run's lock is free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import bert_train_args, files_of
from helpers import train_tiny as run

from lorakit.cli import main
from lorakit.training import TrainingError
from lorakit.training import loop as loop_mod
from lorakit.training.run_lock import LOCK_FILE, RunLock

HOLD = textwrap.dedent("""
    import sys, time
    from lorakit.training.run_lock import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock on a run folder; yields (folder, process)."""
    started: list[subprocess.Popen] = []

    def start(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_run_exits_2_naming_the_first_and_writes_nothing(tiny, tmp_path, holder, capsys):
    out = tmp_path / "run"
    run(tiny, out, max_steps=2, save_every=2)
    other = holder(out)
    before = files_of(out)
    for attempt in (bert_train_args(tiny, out, "--overwrite", steps=2), ["train", "--resume", str(out)]):
        code = main(attempt)
        err = capsys.readouterr().err
        assert code == 2 and f"is in use by another lorakit run (process {other.pid}" in err
        assert files_of(out) == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    holder(fresh)  # a folder that holds nothing but the other run's lock
    assert main(bert_train_args(tiny, fresh, steps=2)) == 2
    assert [p.name for p in fresh.iterdir()] == [LOCK_FILE]

    other.send_signal(signal.SIGKILL)  # the operating system drops a dead process's lock
    other.wait()
    assert main(bert_train_args(tiny, out, "--overwrite", steps=2)) == 0


def test_a_run_holds_the_lock_while_it_trains(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []
    real_loop = loop_mod._Run.loop

    def loop(self):
        try:
            RunLock(out).acquire()
        except TrainingError as err:
            seen.append(str(err))
        real_loop(self)

    monkeypatch.setattr(loop_mod._Run, "loop", loop)
    run(tiny, out, max_steps=1)
    assert len(seen) == 1 and f"process {os.getpid()}" in seen[0]
    lock = RunLock(out)  # released at the end of the run
    lock.acquire()
    lock.release()


def test_acquire_makes_the_folder_and_abandon_removes_it(tmp_path):
    lock = RunLock(tmp_path / "a" / "b" / "run")
    lock.acquire()
    assert (tmp_path / "a" / "b" / "run" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    lock.release(abandon=True)
    assert list(tmp_path.iterdir()) == []
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    lock = RunLock(mine)
    lock.acquire()
    lock.release(abandon=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
