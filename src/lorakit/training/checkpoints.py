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
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter_file import adapter_state_dict, save_adapter
from ..atomic import make_temp_dir, write_atomic, write_json_atomic
from ..json_file import read_json
from ..peft_format import WEIGHTS_FILE
from .metrics import write_metrics

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message names the file."""


def save_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    state: dict[str, Any],
    rng_states: dict[str, torch.Tensor],
    adapter_kwargs: dict[str, Any],
    metrics: list[dict[str, Any]],
) -> Path:
    """Write checkpoint `step` (atomically, as a folder) and drop the older ones."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = make_temp_dir(root, f"step-{step:06d}")
    try:
        save_adapter(model, tmp, **adapter_kwargs)
        tensors, scalars = _flatten_optimizer(optimizer, names)
        write_atomic(tmp / OPTIMIZER_FILE, lambda p: save_file(tensors, p))
        write_atomic(tmp / RNG_FILE, lambda p: save_file({k: v.contiguous() for k, v in rng_states.items()}, p))
        full = dict(state, step=step, optimizer=scalars, python_random=_python_random_state())
        write_metrics(tmp, metrics)  # the log up to this step travels with the checkpoint
        write_json_atomic(tmp / STATE_FILE, full)
        if final.exists():  # a step saved twice (a resumed run re-saving the same step)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in [*root.glob("step-*"), *root.glob(".step-*")]:  # older ones, and leftovers of a kill
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(
        (p for p in (out / CHECKPOINTS).glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()),
        key=lambda p: int(p.name[5:]),
    )
    return found[-1] if found else None


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Put the checkpoint's adapter and optimizer state into `model` / `optimizer` (freshly built
    with the run's settings); returns (trainer state, random states). Validates before changing."""
    state = read_state(folder)
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
        opt_tensors = load_file(str(folder / OPTIMIZER_FILE))
        rng = load_file(str(folder / RNG_FILE))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: cannot read the checkpoint ({err})") from None
    live = adapter_state_dict(model)
    if set(live) != set(weights):
        extra = sorted(set(weights) ^ set(live))[:3]
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: keys do not match the run's adapter: {extra}")
    for key, tensor in live.items():
        if tensor.shape != weights[key].shape:
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: {key!r} has shape {tuple(weights[key].shape)}, expected {tuple(tensor.shape)}")
    opt_state = _unflatten_optimizer(opt_tensors, state["optimizer"], names, folder)
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(weights[key])  # adapter_state_dict hands out the live parameters
    optimizer.load_state_dict(opt_state)
    random.setstate(_to_tuple(state["python_random"]))
    return state, rng


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json."""
    state = read_json(folder / STATE_FILE, CheckpointError)
    if not isinstance(state, dict):
        raise CheckpointError(f"{folder / STATE_FILE}: expected a JSON object")
    return state


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


def _unflatten_optimizer(tensors: dict, scalars: dict, names: list[str], folder: Path) -> dict:
    if scalars.get("names") != names:
        raise CheckpointError(f"{folder}/{STATE_FILE}: the optimizer's parameters differ from this run's")
    state: dict[int, dict[str, Any]] = {}
    index = {n: i for i, n in enumerate(names)}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(index[name], {})[field] = value
    for name, fields in scalars.get("state", {}).items():
        state.setdefault(index[name], {}).update(fields)
    groups = []
    for group in scalars["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _python_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _to_tuple(saved: list) -> tuple:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


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
