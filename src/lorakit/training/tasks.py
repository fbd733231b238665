"""What differs between tasks: which head is trained in full, what a forward pass gets, the loss
and evaluation (loading the model for a task is base_model.py).

classify:  `AutoModelForSequenceClassification`; the head (`classifier` or `score`) is a
           module to save; loss is cross-entropy over the label set.
causal-lm: `AutoModelForCausalLM`; loss is next-token cross-entropy on completion tokens only.

Losses are sums here: the training loop divides by the number of labelled examples or tokens
in the whole optimizer step, so gradient accumulation and DistributedDataParallel give the same
update as one big batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import CLASSIFIER_HEADS
from .base_model import ModelError
from .data.examples import IGNORE, Encoded

TASK_TYPES = {"classify": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}  # PEFT's task_type names
TASK_OF_TYPE = {v: k for k, v in TASK_TYPES.items()}


def head_name(model: nn.Module) -> str:
    for name in CLASSIFIER_HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ModelError(f"{type(model).__name__} has no classification head named {' or '.join(CLASSIFIER_HEADS)}")


# What a forward pass gets, in training (data.Encoded.batch) and at every other use: a tokenizer
# may return more (token_type_ids), which some models' forward does not take.
MODEL_INPUTS = ("input_ids", "attention_mask")


def model_inputs(encoding: Any) -> dict[str, torch.Tensor]:
    """The keys of a tokenizer's output that training passes to the model."""
    return {k: encoding[k] for k in MODEL_INPUTS if k in encoding}


# ---- loss and evaluation -------------------------------------------------------------------


def loss_sum(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in float32; causal-lm predicts token t+1 from tokens up to t."""
    logits = logits.float()
    if task == "classify":
        return F.cross_entropy(logits, labels, reduction="sum")
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def label_count(task: str, labels: torch.Tensor) -> int:
    """How many predictions the loss covers: one per example (classify), one per completion token
    after the first position (causal-lm)."""
    return labels.numel() if task == "classify" else int((labels[:, 1:] != IGNORE).sum())


def forward(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool) -> torch.Tensor:
    inputs: dict[str, Any] = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs:  # packed rows: without a cache, or Transformers builds no mask from them
        inputs["use_cache"] = False
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(**inputs).logits


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Encoded, batch_size: int, device: torch.device, bf16: bool = False
) -> dict[str, float]:
    """classify: accuracy and mean loss; causal-lm: mean token loss and perplexity."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    # Similar lengths together: less padding, same result.
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    for start in range(0, len(order), batch_size):
        batch = data.batch(order[start : start + batch_size])
        labels = batch["labels"].to(device)
        logits = forward(model, batch, device, bf16)
        total += float(loss_sum(data.task, logits, labels))
        count += label_count(data.task, labels)
        if data.task == "classify":
            correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    if data.task == "classify":
        return {"accuracy": correct / max(count, 1), "loss": loss}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
