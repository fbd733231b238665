"""training/tasks.py: the losses and what they count; training/base_model.py: the position limit."""

from __future__ import annotations

import torch

from lorakit.training.base_model import fit_max_length, position_limit
from lorakit.training.data import examples as D
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


def test_position_limit_of_models_with_offset_positions():
    from transformers import RobertaConfig, RobertaModel

    model = RobertaModel(
        RobertaConfig(
            vocab_size=50,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            max_position_embeddings=66,
            pad_token_id=1,
        )
    )
    assert position_limit(model) == (64, "max_position_embeddings")  # ids start after the padding id
    ids = torch.ones(1, 64, dtype=torch.long) * 5
    model(ids)  # 64 tokens fit
    assert fit_max_length(100, model, "--max-length")[0] == 64 and fit_max_length(32, model, "--max-length") == (
        32,
        None,
    )
    assert position_limit(torch.nn.Linear(2, 2)) is None
