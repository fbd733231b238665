"""Fixtures shared by every test; plain helpers live in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import (
    chat_rows,
    classify_rows,
    completion_rows,
    make_adapter,
    make_model,
    write_csv,
    write_jsonl,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# LORAKIT_TEST_THREADS=N runs the suite on N threads (torch splits its reductions, and picks
# kernels, by the thread count: the numeric tests must hold for any N); by default at most 2.
torch.set_num_threads(int(os.environ.get("LORAKIT_TEST_THREADS") or min(2, torch.get_num_threads())))


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


@pytest.fixture(scope="session")
def adapters(tiny, tmp_path_factory):
    """Classifier adapters a, b (pinned: given by path) and c, d under a root; LM adapters x, y."""
    root = tmp_path_factory.mktemp("adapters")
    cls_root, lm_root = root / "cls", root / "lm"
    found = {
        "a": make_adapter(tiny["bert"], root / "pinned" / "a", "classify", seed=1, rank=4),
        "b": make_adapter(tiny["bert"], root / "pinned" / "b", "classify", seed=2, rank=8, targets="attention"),
        "c": make_adapter(tiny["bert"], cls_root / "c", "classify", seed=3, rank=2),
        "d": make_adapter(tiny["bert"], cls_root / "d", "classify", seed=4, rank=6),
        "x": make_adapter(tiny["llama"], lm_root / "x", "causal-lm", seed=5, rank=4),
        "y": make_adapter(tiny["llama"], lm_root / "y", "causal-lm", seed=6, rank=8, targets="attention"),
    }
    found.update(root=root, cls_root=cls_root, lm_root=lm_root, bert=tiny["bert"], llama=tiny["llama"])
    return found


@pytest.fixture(scope="session")
def moe(tiny, tmp_path_factory):
    """A tiny Qwen3-MoE folder (fused 3-D experts) and adapters on it: "m1" on attention and the
    experts (PEFT's fused layout), "m2" on the experts alone (vLLM's per-expert layout)."""
    root = tmp_path_factory.mktemp("moe")
    base = make_model(root / "qwen3_moe", "qwen3_moe")
    return {
        "base": base,
        "root": root / "adapters",
        "m1": make_adapter(base, root / "adapters" / "m1", "causal-lm", seed=7, rank=4, targets="attention+mlp"),
        "m2": make_adapter(
            base,
            root / "adapters" / "m2",
            "causal-lm",
            seed=8,
            rank=2,
            targets=[],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            expert_layout="per-expert",
        ),
    }
