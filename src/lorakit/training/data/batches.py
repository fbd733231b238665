"""How a run's examples form global batches, epoch by epoch: the same for every process and
every resume (a pure function of the seed and the epoch)."""

from __future__ import annotations

import torch


def epoch_batches(lengths: list[int], seed: int, epoch: int, size: int) -> list[list[int]]:
    """The global batches of one epoch, a pure function of (seed, epoch).

    A seeded shuffle, cut into pools of 50 batches; each pool is sorted by length before it is
    cut into batches (less padding, so less compute), then the batches are shuffled. The last
    len % size examples of the shuffle sit this epoch out.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    order = order[: len(order) // size * size]
    batches: list[list[int]] = []
    pool = 50 * size
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[k : k + size] for k in range(0, len(chunk), size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
