"""Fixtures shared by every test; plain helpers live in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import (
    chat_rows,
    classify_rows,
    completion_rows,
    make_model,
    write_csv,
    write_jsonl,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Folders of tiny random BERT / Llama / GPT-2 models (with a tokenizer) and small data files."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "root": root,
        "bert": make_model(root / "bert", "bert"),
        "llama": make_model(root / "llama", "llama"),
        "gpt2": make_model(root / "gpt2", "gpt2"),
        "classify": write_csv(root / "classify.csv", classify_rows(160)),
        "classify_eval": write_jsonl(root / "classify_eval.jsonl", classify_rows(40, seed=1)),
        "completion": write_jsonl(root / "completion.jsonl", completion_rows(96)),
        "chat": write_jsonl(root / "chat.jsonl", chat_rows(64)),
    }
