"""`lorakit combine`: two trained runs into one normal adapter folder; user mistakes as one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import TINY_MODEL_N, assert_rounding_close, files_of
from helpers import cli_here as lorakit_cli

import lorakit
from lorakit.cli import main
from lorakit.cli.trained import load_trained


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Two tiny BERT classifier runs (different seeds and targets)."""
    root = tmp_path_factory.mktemp("combine")
    common = [
        "train",
        "--model",
        str(tiny["bert"]),
        "--data",
        str(tiny["classify"]),
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--threads",
        "1",
        "--rank",
        "4",
    ]
    assert main([*common, "--out", str(root / "a"), "--targets", "query,value"]) == 0
    assert main([*common, "--out", str(root / "b"), "--targets", "query,key", "--seed", "1"]) == 0
    return root / "a", root / "b"


def test_combine_writes_a_normal_adapter(runs, tiny, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "ab"
    code, text, err = lorakit_cli(
        capsys, "combine", str(a), str(b), "--weights", "0.6,0.4", "--method", "svd", "--rank", "4", "--out", str(out)
    )
    assert code == 0, err
    assert "(svd, rank 4)" in text and "relative error" in text
    record = json.loads((out / "combine.json").read_text())
    assert record["weights"] == [0.6, 0.4] and record["method"] == "svd"
    assert set(record["relative_error"]) == {
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "key", "value")
    }
    assert json.loads((out / "labels.json").read_text()) == json.loads((a / "labels.json").read_text())

    # The folder holds what lorakit.combine builds in Python from the same two adapters.
    model, tokenizer, _ = load_trained(str(a), None, adapter=False)
    lorakit.load_adapter(model, a, name="a")
    lorakit.load_adapter(model, b, name="b")
    lorakit.combine(model, {"a": 0.6, "b": 0.4}, "ab", method="svd", rank=4)
    lorakit.set_adapter(model, "ab")
    loaded, _, _ = load_trained(str(out), None)
    batch = tokenizer(["good film", "awful food and dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert_rounding_close(loaded(**batch).logits, model(**batch).logits, n=TINY_MODEL_N)

    code, text, err = lorakit_cli(capsys, "eval", str(out), "--data", str(tiny["classify_eval"]))
    assert code == 0 and "(40 examples): accuracy" in text, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "0.5"], r"1 number\(s\) for 2 adapters"),
        (["--weights", "a,b"], "expected numbers separated by commas"),
        (["--method", "ties"], "method 'ties' needs density"),
        (["--method", "cat", "--rank", "2"], "rank .* applies to the methods svd, ties and dare"),
    ],
)
def test_mistakes_are_one_line(runs, tmp_path, capsys, extra, message):
    a, b = runs
    code, _, err = lorakit_cli(capsys, "combine", str(a), str(b), "--out", str(tmp_path / "x"), *extra)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "x").exists()


# ---- --out: the rule of every folder a command writes (output_folder.py) ----------------------


@pytest.fixture
def copies(runs, tiny, tmp_path):
    """Copies of the two runs in tmp_path/runs, trained on a copy of the base in tmp_path/base
    (their adapter_config.json names it), so a command that deletes them harms no other test."""
    base = shutil.copytree(tiny["bert"], tmp_path / "base")
    folders = [shutil.copytree(run, tmp_path / "runs" / run.name) for run in runs]
    for folder in folders:
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folders[0], folders[1], base


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_a_folder_combine_did_not_write_is_refused_even_with_overwrite(overwrite, copies, tmp_path, capsys):
    a, b, _ = copies
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("my thesis\n")
    code, _, err = lorakit_cli(capsys, "combine", str(a), str(b), "--out", str(mine), *overwrite)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"--out {mine} holds files that are not a combined adapter folder (no combine.json)" in err
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"] and (mine / "thesis.txt").read_text() == "my thesis\n"


@pytest.mark.parametrize(
    ("where", "says"),
    [
        (lambda a, base: a, "is the adapter folder"),
        (lambda a, base: a.parent, "holds the adapter folder"),  # `--out runs` with runs/a and runs/b in it
        (lambda a, base: a / "combined", "is inside the adapter folder"),
        (lambda a, base: base, "is the base model folder"),
        (lambda a, base: base / "combined", "is inside the base model folder"),
        (lambda a, base: base.parent, "holds the adapter folder"),
    ],
)
def test_combine_never_writes_where_it_reads(where, says, copies, tmp_path, capsys):
    a, b, base = copies
    out = where(a, base)
    before = files_of(tmp_path)
    code, _, err = lorakit_cli(capsys, "combine", str(a), str(b), "--out", str(out), "--overwrite")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"--out {out} {says}" in err, err
    assert files_of(tmp_path) == before and not (a / "combined").exists() and not (base / "combined").exists()


def test_overwrite_replaces_only_what_combine_wrote(copies, tmp_path, capsys):
    a, b, _ = copies
    out = tmp_path / "ab"
    assert lorakit_cli(capsys, "combine", str(a), str(b), "--out", str(out))[0] == 0
    written = json.loads((out / "combine.json").read_text())["files"]
    assert written == sorted(p.name for p in out.iterdir())
    code, _, err = lorakit_cli(capsys, "combine", str(a), str(b), "--out", str(out), "--weights", "0.9,0.1")
    assert code == 2 and "already exists and is not empty; pass --overwrite" in err
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    code, _, err = lorakit_cli(
        capsys, "combine", str(a), str(b), "--out", str(out), "--weights", "0.9,0.1", "--overwrite"
    )
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots" / "a.png").read_bytes() == b"png"
    assert json.loads((out / "combine.json").read_text())["weights"] == [0.9, 0.1]
    assert sorted(p.name for p in out.iterdir()) == sorted([*written, "notes.txt", "plots"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left aside
