"""`--add-tokens`: special tokens added to the tokenizer, their embedding rows trained.

The tokens are added to the tokenizer as special tokens (never split, e.g. ChatML's
`<|im_start|>`), the model's vocabulary is resized for them, and only their rows of the
embedding (and of an untied output head) train, next to the LoRA adapter (lorakit/token_rows.py,
PEFT's `trainable_token_indices` layout). The tokenizer is written into the adapter folder:
loading the adapter needs the base resized to it (`model.resize_token_embeddings(len(tokenizer))`,
which `lorakit eval` / `generate` do when the folder has a tokenizer).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..files.atomic import make_temp_dir
from .errors import TrainingError

# What a tokenizer's save_pretrained writes (Transformers 5): the files a run may put in its folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "vocab.txt",
)
EXAMPLE = '"<|im_start|>,<|im_end|>"'


def check_tokens(tokens: Any) -> None:
    """--add-tokens: a non-empty list of distinct tokens, none blank or with spaces inside."""
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise TrainingError(f"--add-tokens needs at least one token, comma-separated (e.g. {EXAMPLE}), got {tokens!r}")
    for token in tokens:
        if not token.strip() or any(c.isspace() for c in token):
            raise TrainingError(
                f"--add-tokens: {token!r} is blank or holds a space; a token is one word (e.g. {EXAMPLE})"
            )
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise TrainingError(f"--add-tokens names {repeated[0]!r} more than once")


def add_tokens(tokenizer: Any, model: nn.Module, tokens: list[str], model_name: str) -> list[int]:
    """Add `tokens` to `tokenizer` as special tokens and resize `model`'s vocabulary to match;
    returns their ids. A token the tokenizer already has is refused (it needs no new row)."""
    check_tokens(tokens)
    vocab = tokenizer.get_vocab()
    known = [t for t in tokens if t in vocab]
    if known:
        raise TrainingError(
            f"--add-tokens: {known[0]!r} is already a token of {model_name}'s tokenizer "
            f"(id {vocab[known[0]]}); leave it out"
        )
    if model.get_input_embeddings() is None or not hasattr(model, "resize_token_embeddings"):
        raise TrainingError(f"--add-tokens: {type(model).__name__} has no input embedding to add rows to")
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
    for token, token_id in zip(tokens, ids):
        if tokenizer(token, add_special_tokens=False)["input_ids"] != [token_id]:
            raise TrainingError(
                f"--add-tokens: {token!r} does not encode to its own id {token_id} in {model_name}'s tokenizer"
            )
    return ids


def write_tokenizer(tokenizer: Any, out: Path) -> list[str]:
    """Write `tokenizer` into the adapter folder `out`, each file replaced whole (written aside,
    then renamed); returns the names written."""
    aside = make_temp_dir(out, "tokenizer")
    try:
        tokenizer.save_pretrained(aside)
        names = sorted(p.name for p in Path(aside).iterdir())
        strange = [n for n in names if n not in TOKENIZER_FILES]
        if strange:  # a run's folder holds only files a run is known to write (--overwrite removes those)
            raise TrainingError(
                f"the tokenizer writes {strange[0]}, which lorakit does not know; train without --add-tokens"
            )
        for name in names:
            os.replace(Path(aside) / name, out / name)
        return names
    finally:
        shutil.rmtree(aside, ignore_errors=True)
