"""The options of a training run, checked, and their file `run_config.json` in the output folder,
from which a run is resumed (`--resume`) or repeated (`--repeat`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import data as data_mod
from .config import LoraConfig
from .json_file import read_json

RUN_FILE = "run_config.json"


class TrainingError(RuntimeError):
    """The run cannot start or had to stop; the message says why and what was kept."""


@dataclass
class RunConfig:
    """Every option of a run; saved as run_config.json so the run can be repeated or resumed."""

    model: str | None = None  # local folder or hub id; None: the bundled all-MiniLM-L6-v2
    data: str = data_mod.BUNDLED  # CSV / TSV / JSONL file, or the bundled sentiment set
    task: str | None = None  # "classify" | "causal-lm"; None: from the data's columns
    eval_data: str | None = None  # held-out file; None: hold out eval_split of data
    eval_split: float = 0.2  # fraction held out (fixed split) when eval_data is None
    labels: list[str] | None = None  # classify: the label set, in id order; None: from the data
    rank: int = 8
    alpha: float = 16.0
    targets: str | list[str] = "attention"
    dropout: float = 0.0  # on the adapters' input
    rslora: bool = False
    epochs: int = 3
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    lr: float = 1e-3  # peak learning rate (linear warmup, then linear decay to 0)
    warmup: float = 0.1  # fraction of the steps spent warming up
    weight_decay: float = 0.0
    batch_size: int = 16  # examples per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 128  # tokens per example, longer ones are cut
    seed: int = 0
    bf16: bool = False  # autocast to bfloat16
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int | None = None  # CPU threads per process; None: the cores shared by the processes
    save_every: int | None = None  # checkpoint every N optimizer steps
    out: str = "runs/sentiment"
    extra: dict[str, Any] = field(default_factory=dict)  # facts found at start (model path, sizes)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainingError(f"{where}: unknown run options {unknown}")
        return cls(**raw)

    def check(self) -> None:
        positive = {"rank": self.rank, "epochs": self.epochs, "batch-size": self.batch_size,
                    "grad-accum": self.grad_accum, "max-length": self.max_length}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise TrainingError(f"--{name} must be an integer >= 1, got {value!r}")
        for name, value in {"max-steps": self.max_steps, "save-every": self.save_every, "threads": self.threads}.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise TrainingError(f"--{name} must be an integer >= 1, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr must be a number > 0, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise TrainingError(f"--warmup must be in [0, 1), got {self.warmup!r}")
        if self.task is not None and self.task not in data_mod.TASKS:
            raise TrainingError(f"--task must be one of {', '.join(data_mod.TASKS)}, got {self.task!r}")

    def lora(self, modules_to_save: list[str]) -> LoraConfig:
        try:
            return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                              rslora=self.rslora, modules_to_save=modules_to_save)
        except ValueError as err:
            raise TrainingError(f"LoRA options: {err}") from None


def read_run(out: str | Path) -> RunConfig:
    """The RunConfig saved in a run folder (for --resume and for eval's defaults)."""
    file = Path(out) / RUN_FILE
    if not file.is_file():
        raise TrainingError(f"{file}: missing; {out} is not a lorakit run folder")
    raw = read_json(file, TrainingError)
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise TrainingError(f"{file}: expected an object with a 'config' object")
    return RunConfig.from_dict(raw["config"], str(file))
