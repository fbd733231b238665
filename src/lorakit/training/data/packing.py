"""Packing (`--packing`): short causal-LM examples share rows of up to --max-length tokens.

Examples go into rows by best-fit decreasing (longest first, each into the fullest row that
still has room), and a batch is a number of rows instead of a number of examples, so a step
multiplies far less padding on data of mixed lengths. Inside a row each example keeps its own
positions (0, 1, ... from its first token) and sees none of the others:

Transformers 5 (masking_utils.find_packed_sequence_indices, checked on 5.25 for Llama and GPT-2,
sdpa and eager) builds the block-diagonal causal mask itself from position ids that restart at
0, but only when the forward gets no attention mask and no cache. Models build a cache whenever
`use_cache` is on (the config's default, in training mode too), which silently turns the
detection off, so packed batches are run with `use_cache=False` (tasks.forward). A model that
ignores the positions or builds its own mask would let examples attend to each other:
`check_model` compares a packed forward with one forward per example and refuses such a model.

The loss stays the same as unpacked: the first token of each example is never a target (as in
its own row, where nothing precedes it), so the sum and the count of trained tokens are those of
the same examples unpacked, and the loop divides one by the other.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import TrainingError
from .batches import epoch_batches
from .examples import IGNORE, Encoded


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of `lengths` in rows of at most `capacity` tokens.

    Longest first (ties by index, so the rows are a pure function of the lengths); each goes
    into the row with the least room that still fits it, or opens a new row.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        first = too_long[0]
        raise ValueError(f"example {first} has {lengths[first]} tokens, more than a row of {capacity}")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the first that fits is the best fit
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            rows.append([i])
            free, row = capacity - lengths[i], len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, row))
    return rows


@dataclass
class Packed(Encoded):
    """An `Encoded` whose items are packed rows: `input_ids[r]` and `labels[r]` are the row's
    examples one after another, `pieces[r]` their lengths and `members[r]` their indices in the
    unpacked set. `len()` counts rows; `examples` counts examples."""

    pieces: list[list[int]] = field(default_factory=list)
    members: list[list[int]] = field(default_factory=list)
    examples: int = 0

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded rows with position ids restarting at each example, and no attention mask
        (Transformers builds the block-diagonal one from the positions). The padding after a row
        is one more block of positions, so it attends only to itself and is never a target."""
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            used = len(self.input_ids[i])
            ids[row, :used] = torch.tensor(self.input_ids[i])
            labels[row, :used] = torch.tensor(self.labels[i])
            blocks = self.pieces[i] + ([width - used] if width > used else [])
            positions[row] = torch.cat([torch.arange(n) for n in blocks])
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pack(data: Encoded, max_length: int) -> Packed:
    """The causal-LM examples of `data` packed into rows of at most `max_length` tokens."""
    if data.task != "causal-lm":
        raise TrainingError(f"--packing is for causal-lm training (it packs token sequences), not {data.task}")
    rows = pack_lengths([len(ids) for ids in data.input_ids], max_length)
    packed = Packed(data.task, [], [], data.pad_id, [], examples=len(data))
    for members in rows:
        packed.input_ids.append([t for i in members for t in data.input_ids[i]])
        # An example's first token is a target of nothing (unpacked, nothing precedes it).
        packed.labels.append([label for i in members for label in [IGNORE, *data.labels[i][1:]]])
        packed.pieces.append([len(data.input_ids[i]) for i in members])
        packed.members.append(members)
        packed.lines.append(", ".join(data.lines[i] for i in members) if data.lines else "")
    return packed


def efficiency(
    lengths: list[int], batch_size: int, *, grad_accum: int = 1, packing_to: int | None = None, seed: int = 0
) -> float:
    """The share of the tokens one epoch's forward passes take that are not padding.

    `lengths`: the tokenized examples' lengths (after --max-length); `batch_size`: examples
    (packed: rows) per forward pass, `grad_accum` of them to a global batch; `packing_to`: the row
    length with --packing (--max-length), None without. Batches are those of the training loop's
    first epoch (`epoch_batches`, one process), each micro-batch padded to its longest; with fewer
    items than one global batch, all in one.
    """

    if packing_to is not None:
        lengths = [sum(lengths[i] for i in row) for row in pack_lengths(lengths, packing_to)]
    if not lengths:
        return 1.0
    real = processed = 0
    for batch in epoch_batches(lengths, seed, 0, min(batch_size * grad_accum, len(lengths))):
        for start in range(0, len(batch), batch_size):
            micro = [lengths[i] for i in batch[start : start + batch_size]]
            real += sum(micro)
            processed += max(micro) * len(micro)
    return real / processed


@torch.no_grad()
def check_model(model: nn.Module, sample: list[list[int]], device: torch.device) -> None:
    """Refuse a model that lets packed examples attend to each other (or ignores their positions).

    Runs up to 3 of the `sample` sequences (token ids, cut to 12 tokens) once each and once packed
    in one row, in eval mode without autocast, and compares the logits.
    """
    seqs = [s[:12] for s in sample[:3] if s]
    if len(seqs) < 2:
        return  # nothing to pack together
    was_training = model.training
    model.eval()
    name = type(model).__name__
    try:
        apart = torch.cat([model(input_ids=torch.tensor([s], device=device), use_cache=False).logits[0] for s in seqs])
        ids = torch.tensor([[t for s in seqs for t in s]], device=device)
        positions = torch.tensor([[p for s in seqs for p in range(len(s))]], device=device)
        together = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    except (TypeError, ValueError) as err:  # a forward without position_ids or use_cache
        raise TrainingError(f"--packing: {name} does not take packed rows ({err}); train without --packing") from None
    finally:
        model.train(was_training)
    gap = float((together.float() - apart.float()).abs().max())
    scale = float(apart.float().abs().max())
    if not gap <= 1e-3 * scale + 1e-5:  # float32 rounding is ~1e-7 of the scale; a leak is ~1e-2
        raise TrainingError(
            f"--packing: {name} does not keep packed examples apart (its logits change by "
            f"{gap:.3g} when examples share a row); train without --packing"
        )
