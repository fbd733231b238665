"""Checking what a checkpoint's files hold against the run that resumes from it.

Every check runs before any of it is applied, and each failure is a `CheckpointError` naming
the file and the problem: a truncated or foreign tensor file, a missing or mistyped key in
trainer_state.json, a tensor of the wrong shape, a random state torch or Python would refuse.
The file layout itself is in checkpoints.py.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import LorakitError

# AdamW's state per parameter (the loop's optimizer); "step" is a scalar, the others the
# parameter's shape.
ADAMW_FIELDS = ("step", "exp_avg", "exp_avg_sq")


class CheckpointError(LorakitError, ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the problem."""


def check_state(state: Any, file: Path, step: int) -> None:
    """trainer_state.json: an object with the step of its folder, the processes and the
    optimizer's scalars."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    if state.get("step") != step or isinstance(state.get("step"), bool):
        raise CheckpointError(f"{file}: 'step' is {state.get('step')!r}, expected {step} (the folder's step)")
    processes = state.get("processes", 1)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise CheckpointError(f"{file}: 'processes' must be an integer >= 1, got {processes!r}")
    optimizer = state.get("optimizer")
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("names"), list)
        and isinstance(optimizer.get("param_groups"), list)
        and isinstance(optimizer.get("state", {}), dict)
    ):
        raise CheckpointError(f"{file}: 'optimizer' must be an object with 'names', 'param_groups' and 'state'")
    if "python_random" not in state:
        raise CheckpointError(f"{file}: 'python_random' is missing")


def python_random(saved: Any, file: Path) -> tuple:
    """Python's random state as random.setstate takes it, checked on a generator of its own."""
    try:
        version, internal, gauss = saved
        state = (version, tuple(internal), gauss)
        random.Random().setstate(state)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: 'python_random' is not a Python random state ({err})") from None
    return state


def optimizer_state(
    tensors: dict[str, torch.Tensor],
    scalars: dict[str, Any],
    names: list[str],
    optimizer: torch.optim.Optimizer,
    files: tuple[Path, Path],
) -> dict[str, Any]:
    """The optimizer's state_dict from the checkpoint's tensors and scalars, every tensor checked
    against the parameter it belongs to. `files`: (the tensor file, trainer_state.json)."""
    tensor_file, state_file = files
    if scalars["names"] != names:
        raise CheckpointError(f"{state_file}: the optimizer's parameters differ from this run's")
    index = {n: i for i, n in enumerate(names)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        if name not in index:
            raise CheckpointError(f"{tensor_file}: {key!r} names no trained parameter of this run")
        expected = () if field == "step" else tuple(params[index[name]].shape)
        if tuple(value.shape) != expected:
            raise CheckpointError(f"{tensor_file}: {key!r} has shape {tuple(value.shape)}, expected {expected}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{tensor_file}: {key!r} holds values that are not finite")
        state.setdefault(index[name], {})[field] = value
    extra = scalars.get("state", {})
    for name, fields in extra.items():
        if name not in index or not isinstance(fields, dict):
            raise CheckpointError(f"{state_file}: optimizer state for {name!r}, which is no trained parameter")
        state.setdefault(index[name], {}).update(fields)
    wanted = set(ADAMW_FIELDS) | ({"max_exp_avg_sq"} if optimizer.defaults.get("amsgrad") else set())
    for i, fields in state.items():
        if not wanted <= set(fields):
            missing = sorted(wanted - set(fields))
            raise CheckpointError(f"{tensor_file}: no {', '.join(missing)} for {names[i]!r}")
    return {"state": state, "param_groups": _param_groups(scalars["param_groups"], optimizer, state_file)}


def _param_groups(saved: list, optimizer: torch.optim.Optimizer, file: Path) -> list[dict[str, Any]]:
    """The saved groups, each value of the kind the live optimizer has (numbers finite)."""
    live = optimizer.param_groups
    if len(saved) != len(live):
        raise CheckpointError(f"{file}: {len(saved)} optimizer parameter groups, this run has {len(live)}")
    groups = []
    for number, (group, mine) in enumerate(zip(saved, live)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise CheckpointError(f"{file}: optimizer param_groups[{number}] must be an object with 'params'")
        if len(group["params"]) != len(mine["params"]):
            raise CheckpointError(
                f"{file}: optimizer param_groups[{number}] has {len(group['params'])} "
                f"parameters, this run has {len(mine['params'])}"
            )
        group = dict(group)
        for key, value in group.items():
            if key != "params" and key in mine and not _same_kind(value, mine[key]):
                raise CheckpointError(f"{file}: optimizer param_groups[{number}].{key} is {value!r}")
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return groups


def _same_kind(value: Any, like: Any) -> bool:
    if isinstance(like, bool) or like is None:
        return value is None or isinstance(value, bool)
    if isinstance(like, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(like, (tuple, list)):
        return (
            isinstance(value, (tuple, list))
            and len(value) == len(like)
            and all(_same_kind(v, w) for v, w in zip(value, like))
        )
    return True


def check_rng(rng: dict[str, torch.Tensor], processes: int, device: torch.device, file: Path) -> None:
    """A CPU random state for every process (and a CUDA one where present, when on CUDA), each
    of the size torch's generator takes."""
    sizes = {"cpu": torch.get_rng_state().numel()}
    if device.type == "cuda":
        sizes["cuda"] = torch.cuda.get_rng_state(device).numel()
    for rank in range(processes):
        if f"cpu.rank{rank}" not in rng:
            raise CheckpointError(f"{file}: no 'cpu.rank{rank}' (the random state of process {rank})")
    for key, value in rng.items():
        kind = key.split(".", 1)[0]
        if kind in sizes and (value.dtype != torch.uint8 or tuple(value.shape) != (sizes[kind],)):
            raise CheckpointError(
                f"{file}: {key!r} is {value.dtype} of shape {tuple(value.shape)}, "
                f"not a random state (uint8 of shape ({sizes[kind]},))"
            )
