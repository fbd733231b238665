"""training/out_folder.py: --out is checked before anything is written, and --overwrite
removes only what a run wrote."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import classify_rows, files_of, write_csv
from helpers import train_tiny as run

from lorakit.cli import main
from lorakit.training import TrainingError
from lorakit.training.out_folder import check_destination, run_entries
from lorakit.training.run_lock import LOCK_FILE


def train_args(tiny, out, *more: str) -> list[str]:
    return ["train", "--model", str(tiny["bert"]), "--data", str(tiny["classify"]), "--out", str(out),
            "--batch-size", "8", "--threads", "1", "--max-steps", "2", *more]


def lorakit(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def previous_run(tiny, tmp_path):
    """A finished run with a checkpoint, plus the user's own files beside it."""
    out = tmp_path / "run"
    run(tiny, out, max_steps=2, save_every=1)
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "keep.csv").write_text("text,label\n")
    (out / ".metrics.jsonl.x1y2.tmp").write_text("left by a kill")  # an interrupted atomic write
    return out


def test_out_below_a_file_is_refused_before_anything_is_written(tiny, tmp_path, capsys):
    blocker = tmp_path / "plain.txt"
    blocker.write_text("a file")
    for out, message in ((blocker / "run", f"{blocker} is a file, not a folder"),
                         (blocker, "is a file, not a folder")):
        code, _, err = lorakit(capsys, *train_args(tiny, out))
        assert code == 2 and message in err and err.count("\n") == 1
    assert blocker.read_text() == "a file"


def test_unwritable_destination_is_refused_before_anything_is_written(tiny, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "readonly"
    locked.mkdir()
    real_access = os.access
    # Tests may run as root, where chmod does not stop writes: say the folder is not writable.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(locked)
                        else real_access(p, mode, **kw))
    code, _, err = lorakit(capsys, *train_args(tiny, locked / "new" / "run"))
    assert code == 2 and f"{locked} is not writable" in err
    assert list(locked.iterdir()) == []
    with pytest.raises(TrainingError, match="is not writable"):
        check_destination(locked)


def test_overwrite_removes_only_what_a_run_wrote(tiny, previous_run, capsys):
    out = previous_run
    assert {p.name for p in run_entries(out)} >= {"checkpoints", "run_config.json", ".metrics.jsonl.x1y2.tmp",
                                                  LOCK_FILE}
    code, _, err = lorakit(capsys, *train_args(tiny, out, "--overwrite", "--max-steps", "3"))
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine" / "keep.csv").is_file()
    assert not (out / "checkpoints").exists()  # this run saved none; the old ones went with the old run
    assert not (out / ".metrics.jsonl.x1y2.tmp").exists()
    assert json.loads((out / "run_config.json").read_text())["config"]["max_steps"] == 3


def test_out_dot_from_inside_a_run_folder(tiny, previous_run, capsys, monkeypatch):
    monkeypatch.chdir(previous_run)
    code, out, err = lorakit(capsys, *train_args(tiny, ".", "--overwrite"))
    assert code == 0, err
    assert (previous_run / "notes.txt").read_text() == "mine"
    assert (previous_run / "adapter_model.safetensors").is_file()


def test_data_and_model_inside_the_out_folder_are_kept_or_refused(tiny, previous_run, capsys):
    data = write_csv(previous_run / "train.csv", classify_rows(40, seed=3))
    model = shutil.copytree(tiny["bert"], previous_run / "model")
    code, _, err = lorakit(capsys, "train", "--model", str(model), "--data", str(data), "--out",
                           str(previous_run), "--overwrite", "--batch-size", "8", "--max-steps", "1", "--threads", "1")
    assert code == 0, err
    assert data.is_file() and files_of(model) == files_of(tiny["bert"])
    # A data file that has the name of a file the run writes would be replaced: refused first.
    clash = previous_run / "metrics.jsonl"
    clash.write_text("\n".join(json.dumps(r) for r in classify_rows(40, seed=3)) + "\n")
    before = files_of(previous_run)
    code, _, err = lorakit(capsys, "train", "--model", str(tiny["bert"]), "--data", str(clash), "--out",
                           str(previous_run), "--overwrite", "--batch-size", "8", "--max-steps", "1")
    assert code == 2 and f"--data {clash} is metrics.jsonl in --out" in err
    assert files_of(previous_run) == before


def test_a_folder_holding_only_a_lock_file_is_empty(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("12345\n")  # a run killed before it wrote anything
    code, _, err = lorakit(capsys, *train_args(tiny, out))
    assert code == 0, err


def test_refused_overwrite_of_user_files_changes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own log\n")  # a run's file name, but no run_config.json
    before = files_of(out)
    code, _, err = lorakit(capsys, *train_args(tiny, out, "--overwrite"))
    assert code == 2 and "not a lorakit run" in err
    assert files_of(out) == before
