"""What training will see of a data set, worked out before any training (`lorakit data`): the
examples, their tokens and trained tokens, the ones --max-length cuts, how much of what a step
processes is the examples' own tokens, and an example's text with its trained tokens marked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..options import RunConfig
from . import packing
from .examples import IGNORE, Encoded

# How trained text is marked: colour on a terminal, brackets where colour would be noise.
_MARKS = {True: ("\033[32m", "\033[0m"), False: ("[[", "]]")}


@dataclass
class DataSummary:
    examples: int
    tokens: int
    trained: int | None  # causal-lm: the tokens the loss is taken on; None for classify
    cut: list[str]  # "file:line" of the examples --max-length shortened
    efficiency: tuple[str, float]  # (what is measured, the share of processed tokens that are real)


def summarize(encoded: Encoded, config: RunConfig) -> DataSummary:
    tokens = sum(len(ids) for ids in encoded.input_ids)
    trained = None
    if encoded.task == "causal-lm":  # the first token is never predicted (the loss shifts by one)
        trained = sum(sum(t != IGNORE for t in labels[1:]) for labels in encoded.labels)
    cut = [encoded.lines[i] for i in encoded.cut]
    return DataSummary(len(encoded), tokens, trained, cut, efficiency(encoded, config))


def efficiency(encoded: Encoded, config: RunConfig) -> tuple[str, float]:
    """(what is measured, the share of the tokens the steps of one epoch process that are the
    examples' own, not padding): packed rows with --packing, else batches padded to their longest."""
    lengths = [len(ids) for ids in encoded.input_ids]
    packing_to = config.max_length if config.packing else None
    share = packing.efficiency(
        lengths, config.batch_size, grad_accum=config.grad_accum, packing_to=packing_to, seed=config.seed
    )
    return ("packing" if packing_to else "padding"), share


def marked_text(ids: list[int], labels: list[int], tokenizer: Any, colour: bool = False) -> str:
    """The decoded example, each run of trained tokens marked (green, or [[ ]])."""
    start_mark, end_mark = _MARKS[colour]
    pieces, done, start = [], "", 0
    for end in range(1, len(ids) + 1):
        if end < len(ids) and (labels[end] != IGNORE) == (labels[start] != IGNORE):
            continue
        # Decoding the growing prefix keeps the spaces a tokenizer puts between runs.
        text = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = text[len(done) :] if text.startswith(done) else tokenizer.decode(ids[start:end])
        if labels[start] != IGNORE:
            lead = piece[: len(piece) - len(piece.lstrip())]
            piece = f"{lead}{start_mark}{piece.lstrip()}{end_mark}"
        pieces.append(piece)
        done, start = text, end
    return "".join(pieces)
