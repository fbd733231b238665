"""training/tasks.py: the losses and what they count."""

from __future__ import annotations

import torch

from lorakit.training import data as D
from lorakit.training.tasks import label_count, loss_sum


def test_causal_loss_counts_completion_tokens_only():
    torch.manual_seed(0)
    labels = torch.tensor([[D.IGNORE, D.IGNORE, D.IGNORE, 5, 6, D.IGNORE]])  # 3 prompt tokens, 2 completion, 1 pad
    logits = torch.randn(1, 6, 10, requires_grad=True)
    loss = loss_sum("causal-lm", logits, labels)
    loss.backward()
    # Position t predicts token t+1: only positions 2 and 3 (predicting 5 and 6) carry gradient.
    touched = logits.grad.abs().sum(-1)[0]
    assert touched[2] > 0 and touched[3] > 0
    assert touched[[0, 1, 4, 5]].eq(0).all()
    expected = torch.nn.functional.cross_entropy(logits[0, 2:4], torch.tensor([5, 6]), reduction="sum")
    torch.testing.assert_close(loss, expected)
    assert label_count("causal-lm", labels) == 2
