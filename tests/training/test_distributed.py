"""training/distributed.py: two processes under torchrun train what one process does."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from helpers import cli, tensors
from safetensors.torch import load_file


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tiny, tmp_path):
    common = [
        "--model",
        str(tiny["llama"]),
        "--data",
        str(tiny["completion"]),
        "--max-steps",
        "4",
        "--threads",
        "1",
        "--lr",
        "1e-2",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "lorakit",
            "train",
            *common,
            "--batch-size",
            "4",
            "--save-every",
            "2",
            "--out",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes" in ddp.stdout
    assert ddp.stdout.count("after training:") == 1  # only rank 0 prints
    rng = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-000004" / "rng.safetensors"))
    assert sorted(rng) == ["cpu.rank0", "cpu.rank1"]  # each process's random state, for resuming
    assert not torch.equal(rng["cpu.rank0"], rng["cpu.rank1"])
    single = cli("train", *common, "--batch-size", "8", "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    a, b = tensors(tmp_path / "ddp"), tensors(tmp_path / "one")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
