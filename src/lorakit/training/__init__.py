"""The training wing: `lorakit train`'s options, data, tasks, loop, checkpoints and reports,
and the hook for Transformers' Trainer. Needs the `[train]` extra (Transformers, tokenizers,
matplotlib, tqdm); the core (`lorakit`) never imports this package."""

from .errors import TrainingError
from .loop import train
from .options import RunConfig

__all__ = ["RunConfig", "TrainingError", "train"]
