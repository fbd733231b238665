"""A trained adapter folder, read for the commands that use one (eval, generate, merge, combine, serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files.adapter_file import AdapterFileError, load_adapter, read_adapter_config
from ..files.peft_format import CONFIG_FILE
from ..training.base_model import load_base
from ..training.labels import LABELS_FILE, read_labels
from ..training.options import RUN_FILE, read_run
from ..training.prepare import quantize_base
from ..training.tasks import TASK_OF_TYPE


def adapter_facts(folder: str | Path) -> dict[str, Any]:
    """Task, base model and label names of an adapter folder, checked."""
    folder = Path(folder)
    config, facts = read_adapter_config(folder)
    task_type = facts.get("task_type")
    if task_type not in TASK_OF_TYPE:
        raise AdapterFileError(
            f"{folder / CONFIG_FILE}: task_type is {task_type!r}; lorakit runs {' or '.join(TASK_OF_TYPE)} adapters"
        )
    labels = None
    if TASK_OF_TYPE[task_type] == "classify":
        labels = read_labels(folder)
        if labels is None:
            raise AdapterFileError(
                f"{folder / LABELS_FILE}: missing; a classifier adapter needs its label names (id2label)"
            )
    return {
        "config": config,
        "task": TASK_OF_TYPE[task_type],
        "base": facts.get("base_model_name_or_path"),
        "labels": labels,
        "facts": facts,
    }


def run_quantization(folder: str | Path) -> tuple[str | None, bool]:
    """(--quantize, --bf16) of the `lorakit train` run in `folder`; (None, False) for other folders."""
    if not (Path(folder) / RUN_FILE).is_file():
        return None, False
    config = read_run(folder)
    return config.quantize, config.bf16


def load_trained(folder: str, model_name: str | None, adapter: bool = True, quantize: str | None = "run"):
    """(model, tokenizer, facts): the base model with the adapter loaded (or not).

    quantize: "run" quantizes the base as the run in `folder` did (--quantize); None keeps it in
    full precision; "nf4" / "fp4" / "int8" quantizes it so (facts["quantize"] says which).
    """
    facts = adapter_facts(folder)
    base = model_name or facts["base"]
    if not base:
        raise AdapterFileError(f"{Path(folder) / CONFIG_FILE}: base_model_name_or_path is empty; pass --model")
    if not model_name and Path(base).is_absolute() and not Path(base).is_dir():
        raise AdapterFileError(
            f"{Path(folder) / CONFIG_FILE}: base_model_name_or_path {base} is not a folder "
            "(moved or deleted?); pass --model FOLDER"
        )
    own = (Path(folder) / "tokenizer_config.json").is_file()  # --add-tokens writes one
    model, tokenizer = load_base(base, facts["task"], facts["labels"], tokenizer_from=str(folder) if own else None)
    if own and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # the adapter brings the new rows' values
    kind, bf16 = run_quantization(folder) if quantize == "run" else (quantize, False)
    quantize_base(model, kind, bf16)
    facts["quantize"] = kind
    if adapter:
        load_adapter(model, folder)
    model.eval()
    facts["base"] = base
    return model, tokenizer, facts
