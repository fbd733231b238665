"""`lorakit combine`: two trained runs into one normal adapter folder; user mistakes as one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_MODEL_N, assert_rounding_close
from helpers import cli_here as lorakit_cli

import lorakit
from lorakit.cli import main
from lorakit.cli.trained import load_trained


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Two tiny BERT classifier runs (different seeds and targets)."""
    root = tmp_path_factory.mktemp("combine")
    common = ["train", "--model", str(tiny["bert"]), "--data", str(tiny["classify"]), "--batch-size", "8",
              "--epochs", "1", "--lr", "1e-2", "--threads", "1", "--rank", "4"]
    assert main([*common, "--out", str(root / "a"), "--targets", "query,value"]) == 0
    assert main([*common, "--out", str(root / "b"), "--targets", "query,key", "--seed", "1"]) == 0
    return root / "a", root / "b"


def test_combine_writes_a_normal_adapter(runs, tiny, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "ab"
    code, text, err = lorakit_cli(capsys, "combine", str(a), str(b), "--weights", "0.6,0.4", "--method", "svd",
                                  "--rank", "4", "--out", str(out))
    assert code == 0, err
    assert "(svd, rank 4)" in text and "relative error" in text
    record = json.loads((out / "combine.json").read_text())
    assert record["weights"] == [0.6, 0.4] and record["method"] == "svd"
    assert set(record["relative_error"]) == {f"bert.encoder.layer.{i}.attention.self.{m}"
                                             for i in (0, 1) for m in ("query", "key", "value")}
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


@pytest.mark.parametrize("extra, message", [
    (["--weights", "0.5"], r"1 number\(s\) for 2 adapters"),
    (["--weights", "a,b"], "expected numbers separated by commas"),
    (["--method", "ties"], "method 'ties' needs density"),
    (["--method", "cat", "--rank", "2"], "rank .* applies to the methods svd, ties and dare"),
])
def test_mistakes_are_one_line(runs, tmp_path, capsys, extra, message):
    a, b = runs
    code, _, err = lorakit_cli(capsys, "combine", str(a), str(b), "--out", str(tmp_path / "x"), *extra)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "x").exists()


def test_existing_out_and_out_equal_to_an_input(runs, tmp_path, capsys):
    a, b = runs
    (tmp_path / "taken").mkdir()
    code, _, err = lorakit_cli(capsys, "combine", str(a), str(b), "--out", str(tmp_path / "taken"))
    assert code == 2 and "pass --overwrite" in err
    code, _, err = lorakit_cli(capsys, "combine", str(a), str(b), "--out", str(a), "--overwrite")
    assert code == 2 and "is one of the adapters being combined" in err
    assert (a / "run_config.json").exists()
