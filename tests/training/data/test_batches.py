"""Global batches per epoch (lorakit/training/data/batches.py): a pure function of seed and epoch."""

from __future__ import annotations

import random

from lorakit.training.data.batches import epoch_batches


def lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 300) for _ in range(n)]


def test_the_same_seed_and_epoch_give_the_same_batches_and_another_epoch_others():
    sizes = lengths(403)
    first = epoch_batches(sizes, seed=7, epoch=0, size=8)
    assert first == epoch_batches(sizes, seed=7, epoch=0, size=8)  # every process, every resume
    assert first != epoch_batches(sizes, seed=7, epoch=1, size=8)
    assert first != epoch_batches(sizes, seed=8, epoch=0, size=8)


def test_every_batch_is_full_and_no_example_repeats_in_an_epoch():
    sizes = lengths(403)
    batches = epoch_batches(sizes, seed=1, epoch=2, size=8)
    flat = [i for b in batches for i in b]
    assert all(len(b) == 8 for b in batches) and len(batches) == 403 // 8
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(403))


def test_batches_are_cut_from_length_sorted_pools_so_they_pad_less():
    sizes = lengths(800, seed=3)
    batches = epoch_batches(sizes, seed=0, epoch=0, size=8)
    padded = sum(8 * max(sizes[i] for i in b) for b in batches)
    rng = random.Random(0)
    order = list(range(800))
    rng.shuffle(order)
    unsorted = sum(8 * max(sizes[i] for i in order[k : k + 8]) for k in range(0, 800, 8))
    assert padded < 0.8 * unsorted
