"""training/checkpoint_check.py: resuming from a damaged checkpoint names the file and the
problem and changes nothing, or continues from the previous checkpoint where there is one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import files_of, tensors
from helpers import train_tiny as run
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.training.run_lock import LOCK_FILE

STATE, OPTIMIZER, RNG, ADAPTER, METRICS = (
    "trainer_state.json",
    "optimizer.safetensors",
    "rng.safetensors",
    "adapter_model.safetensors",
    "metrics.jsonl",
)


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (both kept)."""
    out = tmp_path_factory.mktemp("ck") / "run"
    run(tiny, out, max_steps=4, save_every=2, dropout=0.1)
    return out


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def edit_json(name: str, change):
    def damage(folder: Path) -> None:
        state = json.loads((folder / name).read_text())
        change(state)
        (folder / name).write_text(json.dumps(state))

    return damage


def edit_tensors(name: str, change):
    def damage(folder: Path) -> None:
        loaded = load_file(str(folder / name))
        change(loaded)
        save_file(loaded, str(folder / name))

    return damage


def first(keys, ending: str) -> str:
    return next(k for k in sorted(keys) if k.endswith(ending))


DAMAGE = {
    "truncated optimizer": (lambda f: truncate(f / OPTIMIZER), OPTIMIZER, "not a readable safetensors file"),
    "truncated adapter": (lambda f: truncate(f / ADAPTER), ADAPTER, "not a readable safetensors file"),
    "missing rng file": (lambda f: (f / RNG).unlink(), RNG, "missing"),
    "state not JSON": (lambda f: (f / STATE).write_text("{"), STATE, "invalid JSON at line 1"),
    "state a list": (lambda f: (f / STATE).write_text("[]"), STATE, "expected a JSON object"),
    "state without step": (edit_json(STATE, lambda s: s.pop("step")), STATE, "'step' is None, expected 4"),
    "state of another step": (edit_json(STATE, lambda s: s.update(step=7)), STATE, "'step' is 7, expected 4"),
    "state without optimizer": (edit_json(STATE, lambda s: s.pop("optimizer")), STATE, "'optimizer' must be"),
    "state with a broken random state": (
        edit_json(STATE, lambda s: s.update(python_random=[3, [1, 2], None])),
        STATE,
        "'python_random' is not a Python random state",
    ),
    "state with a text learning rate": (
        edit_json(STATE, lambda s: s["optimizer"]["param_groups"][0].update(lr="fast")),
        STATE,
        "param_groups[0].lr is 'fast'",
    ),
    "rng without rank 0": (edit_tensors(RNG, lambda t: t.pop("cpu.rank0")), RNG, "no 'cpu.rank0'"),
    "rng of the wrong shape": (
        edit_tensors(RNG, lambda t: t.update({"cpu.rank0": torch.zeros(10, dtype=torch.uint8)})),
        RNG,
        "'cpu.rank0' is torch.uint8 of shape (10,), not a random state",
    ),
    "optimizer tensor of the wrong shape": (
        edit_tensors(OPTIMIZER, lambda t: t.update({first(t, "/exp_avg"): torch.zeros(3)})),
        OPTIMIZER,
        "has shape (3,), expected",
    ),
    "optimizer tensor of no parameter": (
        edit_tensors(OPTIMIZER, lambda t: t.update({"nowhere.weight/exp_avg": torch.zeros(3)})),
        OPTIMIZER,
        "'nowhere.weight/exp_avg' names no trained parameter",
    ),
    "optimizer without exp_avg_sq": (
        edit_tensors(OPTIMIZER, lambda t: t.pop(first(t, "/exp_avg_sq"))),
        OPTIMIZER,
        "no exp_avg_sq for",
    ),
    "adapter tensor of the wrong shape": (
        edit_tensors(ADAPTER, lambda t: t.update({first(t, "lora_A.weight"): torch.zeros(2, 2)})),
        ADAPTER,
        "has shape (2, 2), expected",
    ),
    "adapter tensor not finite": (
        edit_tensors(ADAPTER, lambda t: t[first(t, "lora_B.weight")].fill_(float("nan"))),
        ADAPTER,
        "holds values that are not finite",
    ),
    "metrics line broken": (
        lambda f: (f / METRICS).write_text('{"step": 0}\n{"step": 1, "loss"\n'),
        METRICS + ":2",
        "not valid JSON",
    ),
    "metrics eval not numbers": (
        lambda f: (f / METRICS).write_text('{"step": 0, "eval": {"accuracy": "high"}}\n'),
        METRICS + ":1",
        "'eval' must be an object of numbers",
    ),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_only_checkpoint_exits_2_naming_file_and_problem(case, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoints" / "step-000002")
    latest = out / "checkpoints" / "step-000004"
    damage, file, problem = DAMAGE[case]
    damage(latest)
    before = files_of(out, skip=(LOCK_FILE,))
    code = main(["train", "--resume", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{latest / file}: " in err and problem in err
    assert files_of(out, skip=(LOCK_FILE,)) == before


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for name in ("adapter_model.safetensors", "metrics.jsonl", "loss.png"):
        (out / name).unlink()  # as if killed after the last checkpoint
    truncate(out / "checkpoints" / "step-000004" / OPTIMIZER)
    code = main(["train", "--resume", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"notice: {out / 'checkpoints' / 'step-000004' / OPTIMIZER}: not a readable safetensors file" in captured.out
    assert f"resuming from {out / 'checkpoints' / 'step-000002'} (step 2 of 4)" in captured.out
    a, b = tensors(finished), tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the run it would have been
    metrics = lambda d: (d / "metrics.jsonl").read_text()
    assert metrics(out) == metrics(finished)
    # The damaged step was written again, whole; both checkpoints are kept.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (
        load_file(str(out / "checkpoints" / "step-000004" / OPTIMIZER)).keys()
        == load_file(str(finished / "checkpoints" / "step-000004" / OPTIMIZER)).keys()
    )


def test_both_checkpoints_damaged_names_the_newest_and_counts_the_rest(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for step in ("step-000002", "step-000004"):
        (out / "checkpoints" / step / STATE).write_text("{")
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'checkpoints' / 'step-000004' / STATE}: invalid JSON" in err
    assert "1 older checkpoint(s) are damaged too" in err


def test_a_checkpoint_of_another_process_count_is_not_damage(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    edit_json(STATE, lambda s: s.update(processes=2))(out / "checkpoints" / "step-000004")
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "step-000004 was written by a run of 2 process(es)" in err
