"""training/loop.py: the run's outputs, training that learns, accumulation, the schedule,
output-folder safety and non-finite losses."""

from __future__ import annotations

import io
import json
import math
import os
import stat

import pytest
import torch
from helpers import tensors
from helpers import train_tiny as run

from lorakit.training import RunConfig, TrainingError
from lorakit.training.data import examples as D
from lorakit.training.loop import lr_at, train

# ---- outputs ---------------------------------------------------------------------------------


def test_classify_run_writes_everything(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    stream = io.StringIO()
    summary = train(
        RunConfig(
            model=str(tiny["bert"]),
            data=str(tiny["classify"]),
            out=str(out),
            batch_size=8,
            epochs=2,
            lr=1e-2,
            threads=1,
        ),
        stream=stream,
    )
    text = stream.getvalue()
    bar = capsys.readouterr().err.splitlines()  # the progress bar goes to stderr
    assert bar[-1].startswith("step 32/32 [####") and " loss 0." in bar[-1] and "ETA 0s" in bar[-1]
    for expected in (
        "trainable parameters:",
        "before training: held-out accuracy",
        "after training: held-out",
        "adapter: ",
        "adapter_model.safetensors (",
    ):
        assert expected in text
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
        "metrics.jsonl",
        "loss.png",
        "run_config.json",
    } <= names
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    for p in out.iterdir():  # not the private modes temporary files and folders start with
        assert stat.S_IMODE(p.stat().st_mode) == (0o777 if p.is_dir() else 0o666) & ~umask, p
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert json.loads((out / "labels.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 33))  # 128 training examples / 8 a step, 2 epochs
    assert all(m["lr"] > 0 for m in steps)
    evals = [m for m in metrics if "eval" in m]
    assert [m["step"] for m in evals] == [0, 16, 32]
    assert summary["after"] == evals[-1]["eval"] and summary["before"] == evals[0]["eval"]
    run_config = json.loads((out / "run_config.json").read_text())["config"]
    assert run_config["epochs"] == 2 and run_config["extra"]["train_examples"] == 128
    # The adapter really trained: the classifier copy and B matrices moved away from their start.
    weights = tensors(out)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


def test_explicit_eval_data_and_training_reaches_the_signal(tiny, tmp_path):
    summary = run(tiny, tmp_path / "r", eval_data=str(tiny["classify_eval"]), epochs=8, targets="all-linear")
    # One word decides the label; a random 2-layer model with rank-8 adapters learns it only in part.
    assert summary["before"]["accuracy"] <= 0.6
    assert summary["after"]["accuracy"] >= 0.7
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert summary["learned"] is True and summary["warning"] is None  # a run that learns does not warn
    last = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == {"step": summary["steps"], "learned": True, "warning": None}
    run_file = json.loads((tmp_path / "r" / "run_config.json").read_text())
    assert run_file["learned"] is True and run_file["warning"] is None and run_file["config"]["epochs"] == 8


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_runs_lower_held_out_loss(tiny, tmp_path, kind):
    summary = run(tiny, tmp_path / kind, model=str(tiny[kind]), data=str(tiny["completion"]), epochs=3)
    assert summary["after"]["loss"] < summary["before"]["loss"] - 0.1
    assert json.loads((tmp_path / kind / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert not (tmp_path / kind / "labels.json").exists()


def test_classify_with_a_decoder_model_trains_its_score_head(tiny, tmp_path):
    run(tiny, tmp_path / "score", model=str(tiny["llama"]), max_steps=2)
    config = json.loads((tmp_path / "score" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"
    assert "base_model.model.score.weight" in tensors(tmp_path / "score")


def test_bf16_autocast_runs(tiny, tmp_path):
    summary = run(
        tiny, tmp_path / "bf16", model=str(tiny["gpt2"]), data=str(tiny["completion"]), max_steps=3, bf16=True
    )
    assert summary["steps"] == 3 and math.isfinite(summary["after"]["loss"])
    assert all(t.dtype == torch.float32 for t in tensors(tmp_path / "bf16").values())  # weights stay float32


def test_chat_data_trains(tiny, tmp_path):
    summary = run(tiny, tmp_path / "chat", model=str(tiny["llama"]), data=str(tiny["chat"]), max_steps=4)
    assert summary["steps"] == 4 and "perplexity" in summary["after"]


# ---- the step --------------------------------------------------------------------------------


def test_grad_accum_matches_one_big_batch(tiny, tmp_path):
    """Accumulating 2 x 4 examples gives the update of one batch of 8 (loss normalised per step)."""
    common = dict(model=str(tiny["llama"]), data=str(tiny["completion"]), max_steps=3, dropout=0.0)
    run(tiny, tmp_path / "big", batch_size=8, grad_accum=1, **common)
    run(tiny, tmp_path / "acc", batch_size=4, grad_accum=2, **common)
    a, b = tensors(tmp_path / "big"), tensors(tmp_path / "acc")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)


def test_loraplus_ratio_one_is_the_plain_optimizer_bitwise(tiny, tmp_path):
    """Without --loraplus-ratio the optimizer is one plain AdamW group; ratio 1 splits the groups
    without changing a bit; ratio 16 changes B's updates."""
    runs = {}
    for label, ratio in (("off", None), ("one", 1.0), ("sixteen", 16.0)):
        run(tiny, tmp_path / label, max_steps=4, save_every=4, loraplus_ratio=ratio)
        runs[label] = tensors(tmp_path / label)
    assert all(torch.equal(runs["off"][k], runs["one"][k]) for k in runs["off"])
    assert any(not torch.equal(runs["off"][k], runs["sixteen"][k]) for k in runs["off"] if "lora_B" in k)
    state = lambda label: json.loads((tmp_path / label / "checkpoints/step-000004/trainer_state.json").read_text())
    assert len(state("off")["optimizer"]["param_groups"]) == 1
    groups = state("sixteen")["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 16.0, 1.0]
    assert groups[1]["lr"] == pytest.approx(16 * groups[0]["lr"])  # the schedule keeps the ratio


def test_dora_loraplus_run_resumes_bitwise(tiny, tmp_path, monkeypatch):
    from lorakit.training import loop
    from lorakit.training.options import read_run

    options = dict(max_steps=6, save_every=3, dora=True, loraplus_ratio=4.0, init="olora", targets="all-linear")
    run(tiny, tmp_path / "whole", **options)
    real = loop._Run._save_checkpoint

    def stop_after_saving(self):
        real(self)
        raise KeyboardInterrupt  # as if killed right after the checkpoint at step 3

    monkeypatch.setattr(loop._Run, "_save_checkpoint", stop_after_saving)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path / "cut", **options)
    monkeypatch.undo()
    config = read_run(tmp_path / "cut")
    train(config, resume=True, stream=io.StringIO())
    whole, resumed = tensors(tmp_path / "whole"), tensors(tmp_path / "cut")
    assert whole.keys() == resumed.keys() and any(k.endswith("lora_magnitude_vector") for k in whole)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    saved = json.loads((tmp_path / "whole" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["init_lora_weights"] == "olora"


def test_learning_rate_schedule():
    assert lr_at(0, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 0.1) == pytest.approx(0.5)
    assert lr_at(99, 100, 1.0, 0.1) == pytest.approx(1 / 90)
    assert lr_at(0, 10, 2.0, 0.0) == pytest.approx(2.0)


# ---- safety ----------------------------------------------------------------------------------


def test_existing_out_is_not_overwritten(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny, out, max_steps=2)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(TrainingError, match="already exists and is not empty; pass --overwrite"):
        run(tiny, out, max_steps=3)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    run(tiny, out, max_steps=3, overwrite=True)
    assert json.loads((out / "run_config.json").read_text())["config"]["max_steps"] == 3


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(TrainingError, match="not a lorakit run"):
        run(tiny, out, max_steps=1, overwrite=True)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_bad_data_fails_before_anything_is_written(tiny, tmp_path):
    bad = tmp_path / "bad.csv"
    rows = tiny["classify"].read_text().splitlines()
    rows[7] = "a lonely field without a label"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(D.DataError, match=r"bad\.csv:8: 1 fields, but the header has 2"):
        run(tiny, tmp_path / "never", data=str(bad))
    assert not (tmp_path / "never").exists()
    held = tmp_path / "held.jsonl"
    held.write_text('{"text": "good", "label": "pos"}\n{"text": "meh", "label": "maybe"}\n')
    with pytest.raises(D.DataError, match=r"held\.jsonl:2: label 'maybe' is not in the label set \['neg', 'pos'\]"):
        run(tiny, tmp_path / "never", eval_data=str(held))
    assert not (tmp_path / "never").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny, tmp_path):
    out = tmp_path / "boom"
    with pytest.raises(TrainingError, match=r"not finite\) at step \d+.*last good checkpoint.*step-00000\d"):
        run(
            tiny,
            out,
            model=str(tiny["llama"]),
            data=str(tiny["completion"]),
            lr=1e30,
            warmup=0.0,
            save_every=1,
            max_steps=50,
        )
    checkpoints = list((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    # Only safetensors and JSON: nothing pickled.
    assert sorted(p.suffix for p in checkpoints[0].iterdir()) == [".json"] * 2 + [".jsonl"] + [".safetensors"] * 3
    kept = tensors(checkpoints[0])
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert not (out / "adapter_model.safetensors").exists()
    # Recorded where a program looks: the non-finite step, then the verdict.
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(lines[-2]["loss"]) and lines[-2]["step"] == lines[-1]["step"] == 2
    assert lines[-1]["learned"] is False and "not finite" in lines[-1]["warning"]
    assert "Next: try --lr" in lines[-1]["warning"]
    run_file = json.loads((out / "run_config.json").read_text())
    assert run_file["learned"] is False and run_file["warning"] == lines[-1]["warning"]


def test_a_run_that_does_not_learn_says_so_and_keeps_its_adapter(tiny, tmp_path):
    out = tmp_path / "still"
    stream = io.StringIO()
    summary = train(
        RunConfig(
            model=str(tiny["bert"]),
            data=str(tiny["classify"]),
            out=str(out),
            batch_size=8,
            epochs=1,
            lr=1e-9,
            threads=1,
        ),
        stream=stream,
    )
    lines = stream.getvalue().splitlines()
    assert summary["learned"] is False and summary["after"]["accuracy"] <= summary["before"]["accuracy"]
    assert lines[-3].startswith("done in ")  # the warning is the run's last two lines
    assert lines[-2].startswith("warning: this run did not learn (held-out accuracy ")
    assert "weights barely moved" in lines[-1] and "Next: try --lr 1e-8 or more --epochs." in lines[-1]
    assert summary["warning"] == lines[-2].removeprefix("warning: ") + " " + lines[-1].strip()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]) == {
        "step": 16,
        "learned": False,
        "warning": summary["warning"],
    }
    assert json.loads((out / "run_config.json").read_text())["learned"] is False
    assert (out / "adapter_model.safetensors").is_file()  # it ran to the end: its adapter is written
