"""training/prepare.py: the data as training takes it: --train-on-inputs, and a warning when --max-length cuts
more than a few examples. (The rest of prepare is exercised through every training test.)"""

from __future__ import annotations

import io
import json

import pytest
from helpers import cli_here, write_jsonl

from lorakit.training import RunConfig, train
from lorakit.training import distributed as dist_mod
from lorakit.training.prepare import prepare


def _setup(tiny, tmp_path, **options):
    config = RunConfig(
        model=str(tiny["llama"]), data=str(tiny["chat"]), out=str(tmp_path / "run"), batch_size=8, threads=1, **options
    )
    world = dist_mod.setup("cpu")
    try:
        return prepare(config, world)
    finally:
        dist_mod.teardown(world)


def test_train_on_inputs_reaches_both_sets(tiny, tmp_path):
    plain = _setup(tiny, tmp_path)
    every = _setup(tiny, tmp_path, train_on_inputs=True)
    for name in ("train", "held_out"):
        assert getattr(every, name).labels == getattr(every, name).input_ids
        assert getattr(plain, name).labels != getattr(plain, name).input_ids


def test_train_warns_when_max_length_cuts_many_examples(tiny, tmp_path):
    lengths = {len(ids) for ids in _setup(tiny, tmp_path).train.input_ids}
    assert len(lengths) == 1  # every example of chat.jsonl is as long: one length cuts all, the next none
    longest = lengths.pop()
    assert not [n for n in _setup(tiny, tmp_path, max_length=longest).describe["notices"] if "cut" in n]
    stream = io.StringIO()
    train(
        RunConfig(
            model=str(tiny["llama"]),
            data=str(tiny["chat"]),
            out=str(tmp_path / "run"),
            batch_size=8,
            threads=1,
            max_steps=1,
            max_length=longest - 1,
        ),
        stream=stream,
    )
    assert (
        f"51 of 51 training examples (100%) are longer than --max-length {longest - 1} and are cut (their "
        "ends are not trained); `lorakit data` shows them"
    ) in stream.getvalue()


def test_eval_measures_the_loss_training_measured(tiny, tmp_path, capsys):
    """A run with --train-on-inputs: `lorakit eval` takes the loss over every token, as training did."""
    out = tmp_path / "every"
    train(
        RunConfig(
            model=str(tiny["llama"]),
            data=str(tiny["chat"]),
            out=str(out),
            batch_size=8,
            threads=1,
            max_steps=2,
            train_on_inputs=True,
        ),
        stream=io.StringIO(),
    )
    final = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]
    code, text, err = cli_here(capsys, "eval", str(out), "--json")
    assert code == 0, err
    assert json.loads(text)["loss"] == pytest.approx(final["eval"]["loss"], rel=1e-5)
    other = write_jsonl(tmp_path / "c.jsonl", [json.loads(x) for x in tiny["chat"].read_text().splitlines()])
    code, text, _ = cli_here(capsys, "eval", str(out), "--json", "--data", str(other))
    assert code == 0 and json.loads(text)["examples"] == 64
