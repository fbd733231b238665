"""A run's output folder (`--out`): what `lorakit train` writes there, given to the rule every
command that writes a folder follows (files/output_folder.py).

A new run's folder must not exist yet, be empty, or (with `--overwrite`) hold a previous run
(it has run_config.json). `--overwrite` removes only the files a run writes (RUN_OUTPUTS, and
the temporary files of an interrupted write); anything else in the folder is the user's and
stays. No input (data files, the model folder) may be the folder, lie inside it or hold it.
Nothing is removed until every check of the run has passed and the folder is locked
(run_lock.py), so a refused run changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from ..files.output_folder import Inputs, Output
from ..files.peft_format import CONFIG_FILE, WEIGHTS_FILE
from .checkpoints import CHECKPOINTS
from .errors import TrainingError
from .labels import LABELS_FILE
from .new_tokens import TOKENIZER_FILES
from .options import RUN_FILE
from .report.metrics_log import METRICS_FILE
from .report.plot import PLOT_FILE
from .run_lock import LOCK_FILE, check_unlocked

# Everything a run writes in its folder, and nothing else.
RUN_OUTPUTS = (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LABELS_FILE,
    METRICS_FILE,
    PLOT_FILE,
    RUN_FILE,
    CHECKPOINTS,
    LOCK_FILE,
    *TOKENIZER_FILES,
)  # the tokenizer: with --add-tokens

RUN = Output(
    command="lorakit train",
    what="a lorakit run",
    marker=RUN_FILE,
    names=RUN_OUTPUTS,
    error=TrainingError,
    ignore=(LOCK_FILE,),  # a finished run's lock file is no run
    hint=", or `lorakit train --resume {out}` to continue it",
)


def check_out(out: Path, overwrite: bool, inputs: Inputs = ()) -> None:
    """Every check on a new run's `--out`, before anything is written."""
    check_unlocked(out)  # first: a folder another run is writing says so, whatever else holds
    RUN.check_out(out, overwrite, inputs)


def clear_previous_run(out: Path) -> None:
    """`--overwrite`: remove what the previous run wrote (not the lock, which this run holds)."""
    RUN.remove_previous(out, keep=(LOCK_FILE,))
