"""A run's output folder (`--out`): what a run writes there, the checks made on it before
anything is written, and what `--overwrite` removes.

A new run's folder must not exist yet, be empty, or (with `--overwrite`) hold a previous run
(it has run_config.json). `--overwrite` removes only the files a run writes (RUN_OUTPUTS, and
the temporary files of an interrupted write); anything else in the folder is the user's and
stays. Nothing is removed until every check of the run has passed and the folder is locked
(run_lock.py), so a refused run changes nothing, and `--out .` from inside a run folder keeps
the user's other files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..peft_format import CONFIG_FILE, WEIGHTS_FILE
from .checkpoints import CHECKPOINTS
from .errors import TrainingError
from .metrics import METRICS_FILE
from .new_tokens import TOKENIZER_FILES
from .options import RUN_FILE
from .plot import PLOT_FILE
from .run_lock import LOCK_FILE, check_unlocked
from .tasks import LABELS_FILE

# Everything a run writes in its folder, and nothing else.
RUN_OUTPUTS = (CONFIG_FILE, WEIGHTS_FILE, LABELS_FILE, METRICS_FILE, PLOT_FILE, RUN_FILE, CHECKPOINTS,
               LOCK_FILE, *TOKENIZER_FILES)  # the tokenizer: with --add-tokens


def check_destination(out: Path, option: str = "--out") -> None:
    """`out` is a folder or can be made one: the nearest part of the path that exists is a
    writable folder (checked without writing anything)."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise TrainingError(f"{option} {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{option} {out} is a file, not a folder")
    nearest = next((p for p in [out, *out.parents] if p.exists() or p.is_symlink()), Path("."))
    if not nearest.is_dir():
        raise TrainingError(f"{option} {out}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise TrainingError(f"{option} {out}: {nearest} is not writable")


def run_entries(out: Path) -> list[Path]:
    """What a lorakit run wrote in `out`: its outputs, and the temporary files an interrupted
    atomic write leaves (`.NAME.XXXX.tmp`, see atomic.py)."""
    if not out.is_dir():
        return []
    found = []
    for entry in out.iterdir():
        name = entry.name
        if name in RUN_OUTPUTS or any(name.startswith(f".{o}.") and name.endswith(".tmp") for o in RUN_OUTPUTS):
            found.append(entry)
    return sorted(found)


def check_contents(out: Path, overwrite: bool) -> None:
    """A new run's folder is new or empty, or (with `--overwrite`) holds a previous run."""
    if not out.is_dir():
        return
    try:
        present = [p for p in out.iterdir() if p.name != LOCK_FILE]  # a finished run's lock file is no run
    except OSError as err:
        raise TrainingError(f"--out {out}: cannot be read ({err.strerror or err})") from None
    if not present:
        return
    if not overwrite:
        raise TrainingError(
            f"--out {out} already exists and is not empty; pass --overwrite to replace it, "
            f"or `lorakit train --resume {out}` to continue it"
        )
    if not (out / RUN_FILE).is_file():
        raise TrainingError(
            f"--out {out} holds files that are not a lorakit run (no {RUN_FILE}); "
            "refusing to delete them even with --overwrite; choose another --out"
        )


def check_inputs(out: Path, inputs: Iterable[tuple[str, str | None]]) -> None:
    """No input of the run (`(option, path)` pairs: data files, the model folder) is one of the
    files the run replaces in `out`."""
    replaced = [(out / name).resolve() for name in RUN_OUTPUTS]
    for option, path in inputs:
        if not path or not Path(path).exists():
            continue  # not a local file: the bundled set, a hub id
        where = Path(path).resolve()
        for target in replaced:
            if where == target or target in where.parents:
                raise TrainingError(
                    f"{option} {path} is {target.name} in --out {out} (or inside it), which this run writes; "
                    "move it or choose another --out"
                )


def check_out(out: Path, overwrite: bool, inputs: Iterable[tuple[str, str | None]] = ()) -> None:
    """Every check on a new run's `--out`, before anything is written."""
    check_destination(out)
    check_unlocked(out)
    check_contents(out, overwrite)
    check_inputs(out, inputs)


def clear_previous_run(out: Path) -> None:
    """`--overwrite`: remove what the previous run wrote (not the lock, which this run holds)."""
    for entry in run_entries(out):
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
