"""`lorakit train --quantize`: QLoRA runs, their checkpoints and resume, and a clear error
without bitsandbytes."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from helpers import tensors
from helpers import train_tiny as run

import lorakit
from lorakit.cli.trained import load_trained
from lorakit.training import TrainingError, train
from lorakit.training import loop as loop_mod
from lorakit.training.options import read_run

pytest.importorskip("bitsandbytes")


def test_quantized_run_trains_adapters_on_a_4bit_base(tiny, tmp_path):
    out = tmp_path / "run"
    summary = run(tiny, out, quantize="nf4", epochs=2, targets="all-linear")
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert json.loads((out / "run_config.json").read_text())["config"]["quantize"] == "nf4"
    # The adapter file is an ordinary PEFT-layout adapter; the run's base is quantized again to load it.
    model, _, facts = load_trained(str(out), None)
    assert facts["quantize"] == "nf4"
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, lorakit.LoraQuantLinear)


@pytest.mark.parametrize("kind, bf16", [("nf4", False), ("int8", False), ("fp4", True)])
def test_resumed_quantized_run_is_bitwise_the_uninterrupted_one(tiny, tmp_path, monkeypatch, kind, bf16):
    options = dict(
        quantize=kind, bf16=bf16, max_steps=12, save_every=4, dropout=0.1, batch_size=4, targets="all-linear"
    )
    run(tiny, tmp_path / "whole", **options)

    real_lr_at = loop_mod.lr_at

    def stop_at_step_10(step, *args):
        if step == 10:
            raise KeyboardInterrupt  # as a Ctrl-C between steps 10 and 11
        return real_lr_at(step, *args)

    monkeypatch.setattr(loop_mod, "lr_at", stop_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path / "cut", **options)
    monkeypatch.setattr(loop_mod, "lr_at", real_lr_at)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    config = read_run(tmp_path / "cut")
    assert config.quantize == kind
    train(config, resume=True, stream=io.StringIO())
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_quantize_without_bitsandbytes_names_the_extra(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(TrainingError, match=r"--quantize nf4: .*pip install 'lorakit\[quant\]'"):
        run(tiny, tmp_path / "run", quantize="nf4", max_steps=1)
    assert not (tmp_path / "run").exists()


def test_bad_quantize_value_in_a_saved_run(tiny, tmp_path):
    with pytest.raises(TrainingError, match="--quantize must be one of nf4, fp4, int8"):
        run(tiny, tmp_path / "run", quantize="nf2", max_steps=1)


def test_loftq_run(tiny, tmp_path):
    summary = run(tiny, tmp_path / "run", quantize="nf4", loftq=True, max_steps=4)
    assert summary["steps"] == 4
    with pytest.raises(TrainingError, match="--loftq .* needs --quantize"):
        run(tiny, tmp_path / "other", loftq=True, max_steps=1)
