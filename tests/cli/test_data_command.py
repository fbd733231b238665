"""`lorakit data` (cli/data.py; named apart from tests/training/data/, as pytest needs): what training
will see, as a summary with the trained tokens marked and as JSON."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import cli_here as lorakit
from helpers import write_jsonl

from lorakit.training.data import examples as D

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }} [EOS]{% endgeneration %}{% else %}{{ m['content'] }} [EOS]{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVERSATION = [
    turn("system", "answer please"),
    turn("user", "count from 3 :"),
    turn("assistant", "4 5 6"),
    turn("user", "next"),
    turn("assistant", "7 8 9"),
    turn("user", "next please"),
    turn("assistant", "10 11 12"),
    turn("user", "list"),
]


@pytest.fixture(scope="module")
def chat_model(tiny, tmp_path_factory):
    """The tiny Llama folder with a chat template that marks the assistant's turns."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "llama"
    shutil.copytree(tiny["llama"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_json_shows_every_assistant_turn_trained(chat_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}])
    code, out, err = lorakit(capsys, "data", str(data), "--model", str(chat_model), "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(set(r) == {"input_ids", "labels"} for r in rows)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    for row, messages in zip(rows, (CONVERSATION, CONVERSATION[:3])):
        trained = [t for t in row["labels"] if t != D.IGNORE]
        expected = [
            t
            for m in messages
            if m["role"] == "assistant"
            for t in tok(m["content"] + " [EOS]", add_special_tokens=False)["input_ids"]
        ]
        assert trained == expected  # all three answers and their [EOS], nothing of the other turns
        assert all(t in (D.IGNORE, i) for t, i in zip(row["labels"], row["input_ids"], strict=True))
    code, out, _ = lorakit(capsys, "data", str(data), "--model", str(chat_model), "--json", "--train-on-inputs")
    assert all(r["labels"] == r["input_ids"] for r in map(json.loads, out.splitlines()))


def test_summary_counts_what_json_shows(chat_model, tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[: k + 3]} for k in range(6)])
    code, out, _ = lorakit(capsys, "data", str(data), "--model", str(chat_model), "--json", "--max-length", "20")
    rows = [json.loads(line) for line in out.splitlines()]
    code, out, _ = lorakit(
        capsys, "data", str(data), "--model", str(chat_model), "--max-length", "20", "--batch-size", "2", "--show", "2"
    )
    assert code == 0
    full = [
        json.loads(line)
        for line in lorakit(capsys, "data", str(data), "--model", str(chat_model), "--json")[1].splitlines()
    ]
    cut = [f"{data}:{k + 1}" for k, r in enumerate(full) if len(r["input_ids"]) > 20]
    tokens = sum(len(r["input_ids"]) for r in rows)
    trained = sum(t != D.IGNORE for r in rows for t in r["labels"][1:])
    assert f"examples: 6\ntokens: {tokens}\ntrained tokens: {trained} (" in out
    assert f"cut by --max-length 20: {len(cut)} examples ({', '.join(cut[:5])}" in out and cut
    assert "padding efficiency at --batch-size 2: " in out
    # Not a terminal: the trained tokens are in brackets, each run of them once.
    shown = out.split("the first 2 examples, trained tokens in [[ ]]:\n")[1].splitlines()
    assert shown[0] == f"{data}:1: [UNK] : answer please [EOS] [UNK] : count from 3 : [EOS] [UNK] : [[4 5 6 [EOS]]]"
    assert shown[1].startswith(f"{data}:2: ") and shown[1].count("[[") == 1  # the cut left one answer


def test_classify_data_and_errors(tiny, tmp_path, capsys):
    code, out, err = lorakit(capsys, "data", str(tiny["classify"]), "--model", str(tiny["bert"]), "--show", "1")
    assert code == 0, err
    assert "examples: 160" in out and "trained tokens" not in out and "padding efficiency at --batch-size 16" in out
    assert out.rstrip().endswith(("-> neg", "-> pos"))
    code, _, err = lorakit(capsys, "data", str(tiny["classify"]), "--model", str(tiny["bert"]), "--train-on-inputs")
    assert code == 2 and err.count("\n") == 1 and "--train-on-inputs is for causal-lm data" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [turn("user", "hi"), turn("tool", "42")]}])
    code, _, err = lorakit(capsys, "data", str(bad), "--model", str(tiny["llama"]))
    assert (
        code == 2
        and err
        == f"lorakit data: error: {bad}:1: messages[1]: tool calls and tool results are not "
        "supported; use roles system, user, assistant with text content\n"
    )
    code, _, err = lorakit(capsys, "data", str(tiny["chat"]), "--model", str(tiny["llama"]), "--max-length", "1")
    assert code == 2 and "--max-length must be" in err
