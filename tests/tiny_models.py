"""Tiny random models, a tokenizer and small data sets, built in the test (no downloads).

The tokenizer is a word-level one over a fixed vocabulary; the models are 2-layer, 32-wide
BERT, Llama and GPT-2, saved as Hugging Face folders so the CLI loads them like any model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

POSITIVE = "good great nice lovely fine superb excellent happy".split()
NEGATIVE = "bad awful poor terrible sad horrid dull broken".split()
FILLER = "the film food phone was is very quite really and but so".split()
DIGITS = [str(i) for i in range(20)]
EXTRA = "count from to : next list please answer".split()
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
VOCAB = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER + DIGITS + EXTRA))


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                  bos_token="[BOS]", eos_token="[EOS]")
    tok.save_pretrained(folder)
    return tok


def make_model(folder: Path, kind: str, seed: int = 0) -> Path:
    """Save a tiny random `kind` ("bert", "llama", "gpt2") model and the tokenizer in `folder`."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    torch.manual_seed(seed)
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if kind == "bert":
        config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, pad_token_id=0, initializer_range=0.2)
        model = BertModel(config)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **ids)
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    return folder


def classify_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if positive else NEGATIVE))
        rows.append({"text": " ".join(words), "label": "pos" if positive else "neg"})
    return rows


def completion_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randint(0, 15)
        rows.append({"prompt": f"count from {start} :", "completion": " ".join(str(start + k) for k in (1, 2, 3))})
    return rows


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in completion_rows(n, seed)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict], sep: str = ",") -> Path:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=sep)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Folders of tiny random BERT / Llama / GPT-2 models and small data files (import it into a test file)."""
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
