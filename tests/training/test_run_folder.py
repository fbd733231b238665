"""training/run_folder.py: --out is checked before anything is written, and --overwrite
removes only what a run wrote (the rule of lorakit/output_folder.py, for `lorakit train`)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import bert_train_args, classify_rows, files_of, write_csv
from helpers import train_tiny as run

from lorakit.cli import main
from lorakit.training import TrainingError
from lorakit.training.run_folder import RUN
from lorakit.training.run_lock import LOCK_FILE


def train_args(tiny, out, *more: str) -> list[str]:
    return bert_train_args(tiny, out, *more, steps=2)


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
    for out, message in ((blocker / "run", f"{blocker} is a file, not a folder"), (blocker, "is a file, not a folder")):
        code, _, err = lorakit(capsys, *train_args(tiny, out))
        assert code == 2 and message in err and err.count("\n") == 1
    assert blocker.read_text() == "a file"


def test_unwritable_destination_is_refused_before_anything_is_written(tiny, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "readonly"
    locked.mkdir()
    real_access = os.access
    # Tests may run as root, where chmod does not stop writes: say the folder is not writable.
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(locked) else real_access(p, mode, **kw)
    )
    code, _, err = lorakit(capsys, *train_args(tiny, locked / "new" / "run"))
    assert code == 2 and f"{locked} is not writable" in err
    assert list(locked.iterdir()) == []
    with pytest.raises(TrainingError, match="is not writable"):
        RUN.check_destination(locked)


def test_overwrite_removes_only_what_a_run_wrote(tiny, previous_run, capsys):
    out = previous_run
    assert {p.name for p in RUN.entries(out)} >= {
        "checkpoints",
        "run_config.json",
        ".metrics.jsonl.x1y2.tmp",
        LOCK_FILE,
    }
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


@pytest.mark.parametrize(
    "where", ["data inside", "data named like an output", "model is out", "model inside", "out inside model"]
)
def test_an_input_inside_equal_to_or_holding_out_is_refused_before_anything_is_written(
    where, tiny, previous_run, tmp_path, capsys
):
    data, model, out = tiny["classify"], tiny["bert"], previous_run
    if where == "data inside":
        data = write_csv(previous_run / "train.csv", classify_rows(40, seed=3))
    if where == "data named like an output":
        data = previous_run / "metrics.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in classify_rows(40, seed=3)) + "\n")
    if where.startswith("model"):
        model = shutil.copytree(tiny["bert"], (previous_run if where == "model inside" else tmp_path) / "model")
        out = model if where == "model is out" else previous_run
    if where == "out inside model":
        model = shutil.copytree(tiny["bert"], tmp_path / "model")
        out = model / "run"
    before = files_of(tmp_path)
    code, _, err = lorakit(
        capsys,
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--overwrite",
        "--batch-size",
        "8",
        "--max-steps",
        "1",
        "--threads",
        "1",
    )
    relation = {"model is out": "is", "out inside model": "is inside"}.get(where, "holds")
    option, path = ("--model", model) if where.startswith("model") or where.endswith("model") else ("--data", data)
    assert code == 2 and err.count("\n") == 1 and f"--out {out} {relation} {option} {path}" in err, err
    assert files_of(tmp_path) == before


def test_a_folder_holding_only_a_lock_file_is_empty(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("12345\n")  # a run killed before it wrote anything
    code, _, err = lorakit(capsys, *train_args(tiny, out))
    assert code == 0, err


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_a_folder_that_is_not_a_run_is_refused_even_with_overwrite(overwrite, tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("my thesis\n")
    (out / "metrics.jsonl").write_text("my own log\n")  # a run's file name, but no run_config.json
    before = files_of(out)
    code, _, err = lorakit(capsys, *train_args(tiny, out, *overwrite))
    assert code == 2 and err.count("\n") == 1
    assert f"--out {out} holds files that are not a lorakit run (no run_config.json)" in err
    assert files_of(out) == before


def test_overwrite_without_the_flag_names_both_ways_on(tiny, previous_run, capsys):
    before = files_of(previous_run)
    code, _, err = lorakit(capsys, *train_args(tiny, previous_run))
    assert code == 2 and "pass --overwrite to replace a lorakit run there, or `lorakit train --resume" in err
    assert files_of(previous_run) == before
