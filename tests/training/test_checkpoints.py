"""training/checkpoints.py: resuming after kill -9 gives the uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from helpers import cli, tensors
from helpers import train_tiny as run


def test_resume_after_kill_matches_an_uninterrupted_run(tiny, tmp_path):
    args = [
        "train",
        "--model",
        str(tiny["bert"]),
        "--data",
        str(tiny["classify"]),
        "--batch-size",
        "4",
        "--max-steps",
        "64",
        "--save-every",
        "4",
        "--threads",
        "1",
        "--dropout",
        "0.2",
        "--lr",
        "5e-3",
    ]
    whole = cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 240
    # Kill once a second checkpoint has replaced the first, mid-epoch (32 steps an epoch).
    while proc.poll() is None and time.monotonic() < deadline:
        if any(int(p.name[5:]) >= 8 for p in (out / "checkpoints").glob("step-*")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    assert not (out / "adapter_model.safetensors").exists()
    resumed = cli("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    resumed_at = int(resumed.stdout.split("resuming from", 1)[1].split("(step ", 1)[1].split(" ", 1)[0])
    assert 8 <= resumed_at < 64

    a, b = tensors(tmp_path / "whole"), tensors(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise
    losses = lambda d: [
        m["loss"] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in m
    ]
    assert losses(tmp_path / "whole") == losses(out)


def test_resume_without_checkpoint_is_a_clear_error(tiny, tmp_path):
    out = tmp_path / "plain"
    run(tiny, out, max_steps=1)
    result = cli("train", "--resume", str(out))
    assert result.returncode == 2
    assert "no checkpoint to resume from" in result.stderr
