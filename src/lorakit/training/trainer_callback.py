"""lorakit adapters in a Transformers `Trainer` (or TRL's `SFTTrainer`) training loop.

A model with lorakit adapters trains in `Trainer` as it is: only the adapters require grad.
But `Trainer` saves checkpoints with the model's own `save_pretrained`, which writes the whole
model, wrappers included (`...query.base_layer.weight`, `...query.lora_A.default.weight`).
`SaveAdapterCallback` adds the adapter folder in PEFT's layout (adapter_config.json +
adapter_model.safetensors) to every checkpoint folder and to `output_dir` when training ends,
so each checkpoint can be loaded with `lorakit.load_adapter` or PEFT's `PeftModel`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapting.registry import adapters
from ..files.adapter_file import save_adapter
from .tasks import TASK_TYPES

# Transformers class-name endings -> PEFT's task_type.
_TASK_OF_CLASS = {
    "ForSequenceClassification": TASK_TYPES["classify"],
    "ForCausalLM": TASK_TYPES["causal-lm"],
    "LMHeadModel": TASK_TYPES["causal-lm"],
}


class SaveAdapterCallback(TrainerCallback):
    """Write adapter `name` (PEFT layout) into each checkpoint and into `output_dir` at the end.

    `task_type` (PEFT's, e.g. "SEQ_CLS", "CAUSAL_LM") defaults to what the model's class says;
    `base_model_name_or_path` to the model config's `_name_or_path`. Only the main process
    writes.
    """

    def __init__(
        self, name: str = "default", *, task_type: str | None = None, base_model_name_or_path: str | None = None
    ) -> None:
        self.name = name
        self.task_type = task_type
        self.base_model_name_or_path = base_model_name_or_path

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        # Fail at the start, not at the first checkpoint, if there is nothing to save.
        if model is not None and self.name not in adapters(model):
            raise ValueError(
                f"SaveAdapterCallback: the model has no lorakit adapter named {self.name!r}; "
                f"it has {sorted(adapters(model)) or 'none'}"
            )

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._write(model, folder, state)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._write(model, args.output_dir, state)

    def _write(self, model: nn.Module | None, folder: str, state: TrainerState) -> None:
        if model is None or not state.is_world_process_zero:
            return
        save_adapter(
            model,
            folder,
            self.name,
            task_type=self.task_type or _task_type(model),
            base_model_name_or_path=self.base_model_name_or_path,
        )


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for end, task in _TASK_OF_CLASS.items() if name.endswith(end)), None)
