"""training/data/summary.py: the padding figure and an example's text with its trained tokens marked."""

from __future__ import annotations

import pytest
from helpers import make_tokenizer

from lorakit.training.data.examples import IGNORE
from lorakit.training.data.packing import efficiency as padding_efficiency
from lorakit.training.data.summary import marked_text


@pytest.mark.parametrize(
    ("lengths", "batch_size", "expected"),
    [([5, 5, 5, 5], 2, 1.0), ([1, 3], 2, 4 / 6), ([1, 3], 1, 1.0), ([2, 2, 8, 8], 2, 1.0)],
)
def test_padding_efficiency(lengths, batch_size, expected):
    # Batches are sorted by length within a pool: [2, 2] and [8, 8] pad nothing.
    assert padding_efficiency(lengths, batch_size) == pytest.approx(expected)


def test_padding_efficiency_counts_each_micro_batch():
    lengths = [1, 1, 9, 9, 1, 9, 1, 9]
    # One global batch of 8 in 4 micro-batches of 2; sorted, each pairs equal lengths.
    assert padding_efficiency(lengths, 2, grad_accum=4) == pytest.approx(1.0)
    assert padding_efficiency(lengths, 8) == pytest.approx(sum(lengths) / (9 * 8))


def test_marked_text(tmp_path):
    tok = make_tokenizer(tmp_path)
    ids = tok("count from 3 : 4 5 [EOS] next 6 [EOS]", add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * 4 + ids[4:7] + [IGNORE] + ids[8:]
    assert marked_text(ids, labels, tok) == "count from 3 : [[4 5 [EOS]]] next [[6 [EOS]]]"
    assert (
        marked_text(ids, labels, tok, colour=True)
        == "count from 3 : \033[32m4 5 [EOS]\033[0m next \033[32m6 [EOS]\033[0m"
    )
    assert marked_text(ids, ids, tok) == "[[count from 3 : 4 5 [EOS] next 6 [EOS]]]"
