"""training/new_tokens.py: `--add-tokens` trains new special tokens' rows, writes the tokenizer
with the adapter, round-trips through PEFT and lorakit, resumes bit for bit, and refuses bad
token lists in one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli_here, tensors, whole_and_resumed, write_jsonl
from helpers import train_tiny as run

from lorakit.training import TrainingError

TOKENS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    rows = [
        {
            "prompt": f"<|im_start|> count from {s} : <|im_end|> <|im_start|>",
            "completion": f"{s + 1} {s + 2} <|im_end|>",
        }
        for s in range(16)
    ] * 4
    return write_jsonl(tmp_path_factory.mktemp("tokens") / "chatml.jsonl", rows)


def test_new_tokens_train_and_round_trip_through_peft(tiny, tmp_path, chatml):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.cli.trained import load_trained

    out = tmp_path / "run"
    run(tiny, out, model=str(tiny["llama"]), data=str(chatml), add_tokens=list(TOKENS), epochs=2)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.convert_tokens_to_ids(TOKENS)
    assert ids == [len(tokenizer) - 2, len(tokenizer) - 1]
    assert tokenizer("<|im_start|> 3", add_special_tokens=False)["input_ids"][0] == ids[0]  # never split
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"lm_head": ids, "model.embed_tokens": ids}

    base = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    start = base.get_input_embeddings().weight.shape[0]
    saved = tensors(out)["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert saved.shape == (2, 32) and start == ids[0]

    sample = tokenizer("<|im_start|> count from 3 : <|im_end|>", return_tensors="pt")["input_ids"]
    ours, _, _ = load_trained(str(out), None)  # as lorakit eval / generate load it: the base resized
    base.resize_token_embeddings(len(tokenizer))
    theirs = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(sample).logits, ours(sample).logits, rtol=1e-5, atol=1e-5)


def test_new_tokens_resume_bitwise(tiny, tmp_path, chatml, monkeypatch):
    whole, cut = whole_and_resumed(
        tiny,
        tmp_path,
        monkeypatch,
        model=str(tiny["gpt2"]),
        data=str(chatml),
        add_tokens=list(TOKENS),
        max_steps=6,
        save_every=3,
    )
    assert any(k.endswith("trainable_tokens_delta") for k in tensors(whole))
    assert tensors(whole).keys() == tensors(cut).keys()
    for key, value in tensors(whole).items():
        assert torch.equal(value, tensors(cut)[key]), key


@pytest.mark.parametrize(
    "given, message",
    [
        ("", "--add-tokens needs at least one token"),
        ("<a>,<a>", "--add-tokens names '<a>' more than once"),
        ("[EOS]", "--add-tokens: '[EOS]' is already a token of"),
    ],
)
def test_bad_token_lists_are_one_line(tiny, tmp_path, chatml, capsys, given, message):
    code, _, err = cli_here(
        capsys,
        "train",
        "--model",
        str(tiny["llama"]),
        "--data",
        str(chatml),
        "--out",
        str(tmp_path / "never"),
        "--add-tokens",
        given,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "never").exists()


def test_add_tokens_refuses_classification(tiny, tmp_path):
    with pytest.raises(TrainingError, match="--add-tokens is for causal-lm training; the task here is classify"):
        run(tiny, tmp_path / "never", add_tokens=["<x>"])
