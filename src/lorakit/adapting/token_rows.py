"""Trainable token rows: a few rows of the embedding (and the output head) trained, the rest frozen.

New tokens (`lorakit train --add-tokens`) need embeddings of their own, but saving the whole
table for them would make the adapter as large as the vocabulary. `TokenRows` wraps the input
embedding, or an untied output head, and replaces the chosen rows of its frozen weight with a
small trained tensor in every forward pass. The file layout is PEFT's TrainableTokens
(peft/tuners/trainable_tokens): adapter_config.json's `trainable_token_indices` (a list of token
ids for the input embedding alone, or module name -> ids) and, per wrapped module, the rows
under `<module>.token_adapter.trainable_tokens_delta` (the rows' values, not differences). An
output head tied to the embedding shares the embedding's rows and has no key of its own.

Loading (file_keys.py) needs no wrapper: the rows are written into a copy of the base weight,
which replaces it while the adapter is loaded (the way a saved embedding table does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..module_tree import base_modules, name_matches

ROWS_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key suffix for a wrapped module's rows
CONFIG_KEY = "trainable_token_indices"


class TokenRows(nn.Module):
    """`base_layer` (an nn.Embedding or nn.Linear) with rows `indices` of its weight taken from
    `rows`; `tied`: the rows are another TokenRows' (a head tied to the embedding), not saved."""

    def __init__(self, base_layer: nn.Module, indices: list[int], rows: nn.Parameter | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        ids = torch.tensor(indices, dtype=torch.long, device=base_layer.weight.device)
        self.register_buffer("indices", ids, persistent=False)
        self.tied = rows is not None
        # Starting from the rows the base holds (a resized table's new rows), as PEFT does.
        self.rows = rows if rows is not None else nn.Parameter(base_layer.weight.detach()[ids].clone())

    @property
    def weight(self) -> torch.Tensor:
        """The base weight with the trained rows in place (what the forward pass uses)."""
        base = self.base_layer.weight
        return base.index_copy(0, self.indices, self.rows.to(base.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            return F.embedding(
                x, self.weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )
        return F.linear(x, self.weight, base.bias)

    def __getattr__(self, name: str) -> Any:
        # What models read from their embedding (num_embeddings, embedding_dim, padding_idx).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("base_layer", "rows", "indices"):
                raise
            return getattr(self.base_layer, name)


def add_token_rows(model: nn.Module, indices: list[int]) -> list[str]:
    """Wrap `model`'s input embedding, and its output head, so that rows `indices` train and
    nothing else of them does; returns the wrapped modules' paths. A head tied to the embedding
    shares its rows. Call after the model's vocabulary is resized for new tokens."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"the input embedding is a {type(embedding).__name__}, not an nn.Embedding "
            "(an adapter on it, or an unusual model); its rows cannot be trained alone"
        )
    size = embedding.num_embeddings
    bad = [i for i in indices if not 0 <= i < size]
    if bad or not indices:
        raise ValueError(f"token ids {bad or indices} are not rows of the embedding ({size} rows)")
    paths = {id(m): p for p, m in model.named_modules()}
    embed_rows = TokenRows(embedding, indices)
    model.set_input_embeddings(embed_rows)
    wrapped = [paths[id(embedding)]]
    if isinstance(head, nn.Linear):
        tied = head.weight is embedding.weight
        model.set_output_embeddings(TokenRows(head, indices, embed_rows.rows if tied else None))
        wrapped.append(paths[id(head)])
    elif head is not None:
        raise ValueError(
            f"the output head is a {type(head).__name__}, not an nn.Linear (an adapter on it?); "
            "its rows cannot be trained alone"
        )
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if isinstance(module, TokenRows):
            module.rows.requires_grad_(True)
    return wrapped


def token_rows(model: nn.Module) -> dict[str, TokenRows]:
    """The model's TokenRows that own their rows (not tied to another's), by module path."""
    # The base modules only: saving costs the same however many adapters are loaded (registry.py).
    return {p: m for p, m in base_modules(model) if isinstance(m, TokenRows) and not m.tied}


def config_entry(model: nn.Module) -> list[int] | dict[str, list[int]] | None:
    """adapter_config.json's `trainable_token_indices` for `model`'s token rows: a list when only
    the input embedding has rows of its own (PEFT then finds it, and a tied head follows), else
    module path -> ids; None without token rows."""
    owned = token_rows(model)
    if not owned:
        return None
    if len(owned) == 1 and next(iter(owned.values())) is model.get_input_embeddings():
        return next(iter(owned.values())).indices.tolist()
    return {path: module.indices.tolist() for path, module in owned.items()}


def indices_by_module(model: nn.Module, entry: Any, where: str) -> dict[str, list[int]]:
    """`trainable_token_indices` (as read from a file) -> module path -> token ids on `model`,
    with PEFT's rules: a list means the input embedding; a dict's names match a module whose path
    is the name or ends with "." + name."""
    if isinstance(entry, list):
        embedding = model.get_input_embeddings()
        path = next((p for p, m in base_modules(model) if m is embedding), None)
        if path is None:
            raise ValueError(f"{where}: {CONFIG_KEY} names the input embedding, which this model lacks")
        return {path: entry}
    found: dict[str, list[int]] = {}
    names = [p for p, _ in base_modules(model)]
    for name, ids in entry.items():
        matches = [p for p in names if name_matches(p, name)]
        if len(matches) != 1:
            raise ValueError(
                f"{where}: {CONFIG_KEY} names {name!r}, which matches {len(matches)} modules "
                "of this model (one expected)"
            )
        found[matches[0]] = ids
    return found


def check_entry(entry: Any, where: str) -> None:
    """`trainable_token_indices` must be a list of token ids or an object of such lists."""
    lists = entry.values() if isinstance(entry, dict) else [entry]
    if (
        not all(
            isinstance(ids, list)
            and ids
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
            for ids in lists
        )
        or entry == {}
    ):
        raise ValueError(
            f"{where}: {CONFIG_KEY} must be a list of token ids or an object of module name -> "
            f"list of token ids, got {entry!r}"
        )


def rows_replacing(weight: torch.Tensor, ids: list[int], rows: torch.Tensor, what: str) -> torch.Tensor:
    """A copy of `weight` (on the CPU) with rows `ids` replaced by `rows`; `what` names the key."""
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what}: the token ids {ids} repeat one")
    if max(ids) >= weight.shape[0]:
        raise ValueError(
            f"{what}: token id {max(ids)} is beyond this model's {weight.shape[0]} rows; resize "
            "its embeddings to the adapter's tokenizer first "
            "(model.resize_token_embeddings(len(tokenizer)))"
        )
    if tuple(rows.shape) != (len(ids), weight.shape[1]):
        raise ValueError(
            f"{what}: shape {tuple(rows.shape)}, expected {(len(ids), weight.shape[1])} "
            f"({len(ids)} tokens x the width {weight.shape[1]})"
        )
    index = torch.tensor(ids, dtype=torch.long)
    return weight.detach().to("cpu", copy=True).index_copy(0, index, rows.to(weight.dtype))
