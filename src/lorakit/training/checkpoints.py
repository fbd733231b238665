"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `checkpoints/step-000050/` holding
  adapter_config.json, adapter_model.safetensors  the adapter (PEFT layout, loadable as is)
  optimizer.safetensors                          the optimizer's tensors, keyed by parameter name
  rng.safetensors                                torch's random states (CPU, CUDA, one per rank)
  trainer_state.json                             step, epoch, scalars of the optimizer, Python's
                                                 random state, the learning-rate schedule
  metrics.jsonl                                  the run's log up to this step
Only safetensors and JSON: nothing is pickled. The folder is built under a temporary name and
renamed into place, so a kill at any moment leaves either the previous checkpoint or the new one.
The two newest checkpoints are kept: when the newest is damaged (a truncated file, a key edited
away), `--resume` says what is wrong with which file and continues from the one before it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files.adapter_file import adapter_state_dict, copy_adapter_state, save_adapter
from ..files.atomic import make_temp_dir, write_atomic, write_json_atomic
from ..files.json_file import read_json
from ..files.peft_format import WEIGHTS_FILE

# CheckpointError is defined with the checks; it is imported from here too (cli/main.py).
from .checkpoint_check import CheckpointError, check_rng, check_state, optimizer_state, python_random
from .errors import TrainingError
from .report.metrics_log import METRICS_FILE, read_metrics, write_metrics

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
CPU = torch.device("cpu")
KEEP = 2  # checkpoints kept: the newest, and the one to fall back on if the newest is damaged


@dataclass
class Snapshot:
    """What a checkpoint holds of a run at one step."""

    step: int
    model: nn.Module  # its adapter is saved
    optimizer: torch.optim.Optimizer
    names: list[str]  # the optimizer's parameters by name, in its order
    state: dict[str, Any]  # the schedule, epoch, processes: trainer_state.json
    rng_states: dict[str, torch.Tensor]
    adapter_kwargs: dict[str, Any]  # save_adapter's keywords for the adapter folder
    metrics: list[dict[str, Any]]  # the log up to this step


def save_checkpoint(out: Path, snap: Snapshot) -> Path:
    """Write checkpoint `snap.step` (atomically, as a folder); keep it and the one before it.

    Checkpoints of later steps (left by a run that was resumed from an earlier one) and the
    leftovers of a kill mid-write are removed."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    step = snap.step
    final = root / f"step-{step:06d}"
    tmp = make_temp_dir(root, f"step-{step:06d}")
    try:
        save_adapter(snap.model, tmp, **snap.adapter_kwargs)
        tensors, scalars = _flatten_optimizer(snap.optimizer, snap.names)
        write_atomic(tmp / OPTIMIZER_FILE, lambda p: save_file(tensors, p))
        write_atomic(tmp / RNG_FILE, lambda p: save_file({k: v.contiguous() for k, v in snap.rng_states.items()}, p))
        full = dict(snap.state, step=step, optimizer=scalars, python_random=_python_random_state())
        write_metrics(tmp, snap.metrics)  # the log up to this step travels with the checkpoint
        write_json_atomic(tmp / STATE_FILE, full)
        if final.exists():  # a step saved twice (a resumed run re-saving the same step)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kept = [p for p in all_checkpoints(out) if _step(p) <= step][:KEEP]
    for old in [*root.glob("step-*"), *root.glob(".step-*")]:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _step(folder: Path) -> int:
    return int(folder.name[5:]) if folder.name.startswith("step-") and folder.name[5:].isdigit() else -1


def all_checkpoints(out: Path) -> list[Path]:
    """Every checkpoint folder of a run, the newest first, whole or not."""
    found = [p for p in (out / CHECKPOINTS).glob("step-*") if _step(p) >= 0 and p.is_dir()]
    return sorted(found, key=_step, reverse=True)


def resumable_checkpoints(out: Path) -> list[Path]:
    """`all_checkpoints(out)`; none is a `TrainingError`, as `--resume` has nothing to go on."""
    found = all_checkpoints(out)
    if not found:
        raise TrainingError(f"{out}: no checkpoint to resume from (train with --save-every N to write them)")
    return found


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint folder that holds its trainer_state.json, or None."""
    return next((p for p in all_checkpoints(out) if (p / STATE_FILE).is_file()), None)


@dataclass
class Restored:
    """A checkpoint read and checked against the run, ready to apply."""

    folder: Path
    state: dict[str, Any]  # trainer_state.json
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # the optimizer's state_dict
    python_random: tuple
    rng: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]]

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Put the adapter, optimizer and Python random state in place (torch's random states
        are the caller's: they are per process)."""
        optimizer.load_state_dict(self.optimizer)
        copy_adapter_state(model, self.weights)
        random.setstate(self.python_random)


def read_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    processes: int = 1,
    device: torch.device = CPU,
) -> Restored:
    """Read checkpoint `folder` and check every file against the run (its model, its freshly
    built optimizer, its number of processes); changes nothing. A `CheckpointError` names the
    file and the problem; a checkpoint of another number of processes is a `TrainingError`."""
    state = read_json(folder / STATE_FILE, CheckpointError)
    check_state(state, folder / STATE_FILE, _step(folder))  # a JSON object, among other things
    if state.get("processes", 1) != processes:
        raise TrainingError(
            f"{folder} was written by a run of {state.get('processes', 1)} process(es); resume it with the same "
            f"number (now {processes}), so the global batches and random states line up"
        )
    weights = _read_tensors(folder / WEIGHTS_FILE)
    live = adapter_state_dict(model)
    if set(live) != set(weights):
        extra = sorted(set(weights) ^ set(live))[:3]
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: keys do not match the run's adapter: {extra}")
    for key, tensor in live.items():
        if tensor.shape != weights[key].shape:
            raise CheckpointError(
                f"{folder / WEIGHTS_FILE}: {key!r} has shape {tuple(weights[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
        if not torch.isfinite(weights[key]).all():
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: {key!r} holds values that are not finite")
    opt_state = optimizer_state(
        _read_tensors(folder / OPTIMIZER_FILE),
        state["optimizer"],
        names,
        optimizer,
        (folder / OPTIMIZER_FILE, folder / STATE_FILE),
    )
    rng = _read_tensors(folder / RNG_FILE)
    check_rng(rng, processes, device, folder / RNG_FILE)
    pyrandom = python_random(state["python_random"], folder / STATE_FILE)
    if not (folder / METRICS_FILE).is_file():
        raise CheckpointError(f"{folder / METRICS_FILE}: missing")
    try:
        metrics = read_metrics(folder / METRICS_FILE)
    except TrainingError as err:
        raise CheckpointError(str(err)) from None
    return Restored(folder, state, weights, opt_state, pyrandom, rng, metrics)


def choose_checkpoint(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    processes: int = 1,
    device: torch.device = CPU,
) -> tuple[Restored, list[str]]:
    """The newest checkpoint of `out` that reads and checks whole, and a notice for each newer
    one that did not (what is wrong, in which file). None whole: the newest one's error."""
    found = resumable_checkpoints(out)
    problems: list[str] = []
    for folder in found:
        try:
            restored = read_checkpoint(folder, model, optimizer, names, processes, device)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        return restored, [f"{problem}; resuming from an earlier checkpoint, {folder}" for problem in problems]
    more = f" (and {len(problems) - 1} older checkpoint(s) are damaged too)" if len(problems) > 1 else ""
    raise CheckpointError(f"cannot resume: {problems[0]}{more}")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own types for every kind of damage
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


def _flatten_optimizer(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """Tensors keyed `<parameter name>/<field>`; everything else (hyperparameters) as JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "names": names, "state": {}}
    for index, fields in sd["state"].items():
        for field, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{names[index]}/{field}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars["state"].setdefault(names[index], {})[field] = value
    return tensors, json.loads(json.dumps(scalars))  # tuples (betas) become lists


def _python_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
