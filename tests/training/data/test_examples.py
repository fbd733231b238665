"""training/data/examples.py: reading files, errors that name file and line, labels, splits, tokenising."""

from __future__ import annotations

import copy
import json

import pytest
from helpers import (
    chat_rows,
    classify_rows,
    completion_rows,
    make_tokenizer,
    write_csv,
    write_jsonl,
)

from lorakit.training.data import examples as D


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


# ---- reading -------------------------------------------------------------------------------


def test_reads_csv_tsv_jsonl_alike(tmp_path):
    rows = classify_rows(12)
    a = D.read_dataset(write_csv(tmp_path / "a.csv", rows))
    b = D.read_dataset(write_csv(tmp_path / "b.tsv", rows, sep="\t"))
    c = D.read_dataset(write_jsonl(tmp_path / "c.jsonl", rows))
    assert a.records == b.records == c.records == rows
    assert a.columns == ["label", "text"]
    assert a.lines[0] == f"{tmp_path / 'a.csv'}:2"  # line 1 is the header
    assert c.lines[3] == f"{tmp_path / 'c.jsonl'}:4"


def test_csv_quoted_fields_with_commas_and_newlines(tmp_path):
    f = tmp_path / "q.csv"
    f.write_text('text,label\n"good, really",pos\n"two\nlines",neg\nbad,neg\n')
    ds = D.read_dataset(f)
    assert [r["text"] for r in ds.records] == ["good, really", "two\nlines", "bad"]
    assert ds.lines[2].endswith(":5")  # the quoted newline moved the third record down a line


def test_bundled_sentiment():
    ds = D.read_dataset(D.BUNDLED)
    assert len(ds) == 2000
    assert D.infer_task(ds) == "classify"
    assert D.label_set(ds) == ["negative", "positive"]
    assert ds.lines[0] == "lorakit/data/sentiment/amazon_cells_labelled.txt:1"
    assert sum(r["label"] == "positive" for r in ds.records) == 1000


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "missing.csv: no such file"),
        ("empty.csv", "", "empty.csv: the file is empty"),
        ("blank.jsonl", "\n  \n", "blank.jsonl: the file is empty"),
        ("header.csv", "text,label\n", "header.csv: no records"),
        ("short.csv", "text,label\ngood,pos\nbad\n", "short.csv:3: 1 fields, but the header has 2"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', "bad.jsonl:2: not valid JSON"),
        ("list.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', "list.jsonl:2: expected a JSON object"),
        ("data.parquet", "x", "unknown data format '.parquet'"),
        ("dup.csv", "text,text\na,b\n", "dup.csv:1: the header must name each column once"),
    ],
)
def test_unreadable_files_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(D.DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        D.read_dataset(path)


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\ngood,pos\ncaf\xe9,neg\n")
    with pytest.raises(D.DataError, match=r"latin\.csv:3: not valid UTF-8"):
        D.read_dataset(path)


# ---- tasks and validation ------------------------------------------------------------------


def test_infer_task(tmp_path):
    assert D.infer_task(D.read_dataset(write_jsonl(tmp_path / "a.jsonl", classify_rows(3)))) == "classify"
    assert D.infer_task(D.read_dataset(write_jsonl(tmp_path / "b.jsonl", completion_rows(3)))) == "causal-lm"
    assert D.infer_task(D.read_dataset(write_jsonl(tmp_path / "c.jsonl", chat_rows(3)))) == "causal-lm"
    other = D.read_dataset(write_jsonl(tmp_path / "d.jsonl", [{"sentence": "x", "y": 1}]))
    with pytest.raises(D.DataError, match=r"cannot tell the task from the columns \['sentence', 'y'\]"):
        D.infer_task(other)


@pytest.mark.parametrize(
    ("rows", "task", "message"),
    [
        ([{"text": "a", "label": "x"}, {"text": "", "label": "y"}], "classify", r":2: missing or empty column 'text'"),
        ([{"text": "a", "label": "x"}, {"text": "b"}], "classify", r":2: missing or empty column 'label'"),
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": "a"}],
            "causal-lm",
            r":2: missing or empty column 'completion'",
        ),
        (
            [{"prompt": "a", "completion": "b"}, {"completion": "b", "x": 1}],
            "causal-lm",
            r":2: missing column 'prompt'",
        ),
        ([{"messages": []}], "causal-lm", r":1: 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "robot", "content": "hi"}]}], "causal-lm", r":1: messages\[0\]: role must be one of"),
    ],
)
def test_validate_names_the_line(tmp_path, rows, task, message):
    ds = D.read_dataset(write_jsonl(tmp_path / "v.jsonl", rows))
    with pytest.raises(D.DataError, match=r"v\.jsonl" + message):
        D.validate(ds, task)


def test_labels_numeric_order_and_unknown_label(tmp_path):
    train = D.read_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": n} for n in (10, 2, 1.0, "2")]))
    labels = D.label_set(train)
    assert labels == ["1", "2", "10"]  # numbers sort as numbers; 1.0 and "2" are 1 and 2
    held = D.read_dataset(write_jsonl(tmp_path / "h.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 3}]))
    with pytest.raises(D.DataError, match=r"h\.jsonl:2: label '3' is not in the label set \['1', '2', '10'\]"):
        D.check_labels(held, labels, "the training data")


def test_split_is_fixed_and_disjoint():
    ds = D.bundled_sentiment()
    train, held = D.split(ds, 0.2, 0)
    train2, held2 = D.split(ds, 0.2, 0)
    assert len(held) == 400 and len(train) == 1600
    assert held.lines == held2.lines and train.lines == train2.lines
    assert not set(held.lines) & set(train.lines)
    assert D.split(ds, 0.2, 1)[1].lines != held.lines
    with pytest.raises(D.DataError, match="--eval-split must be in"):
        D.split(ds, 1.5, 0)


# ---- tokenising ----------------------------------------------------------------------------


def test_encode_classify_and_batch(tmp_path, tokenizer):
    ds = D.read_dataset(write_jsonl(tmp_path / "c.jsonl", classify_rows(6)))
    enc = D.encode(ds, "classify", tokenizer, 64, D.label_set(ds))
    assert enc.labels == [["neg", "pos"].index(r["label"]) for r in ds.records]
    batch = enc.batch([0, 1, 2])
    width = max(len(enc.input_ids[i]) for i in range(3))
    assert batch["input_ids"].shape == (3, width)
    for row in range(3):
        n = len(enc.input_ids[row])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()


def test_encode_masks_prompt_tokens(tmp_path, tokenizer):
    ds = D.read_dataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "count from 3 :", "completion": "4 5 6"}]))
    enc = D.encode(ds, "causal-lm", tokenizer, 64)
    prompt = tokenizer("count from 3 :")["input_ids"]
    completion = tokenizer("4 5 6", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert enc.input_ids[0] == prompt + completion
    assert enc.labels[0] == [D.IGNORE] * len(prompt) + completion
    batch = enc.batch([0])
    assert batch["labels"][0].tolist() == enc.labels[0]


def test_encode_chat_without_template_trains_on_last_message(tmp_path, tokenizer):
    ds = D.read_dataset(write_jsonl(tmp_path / "m.jsonl", chat_rows(1)))
    enc = D.encode(ds, "causal-lm", tokenizer, 64)
    record = ds.records[0]["messages"]
    prompt_ids = tokenizer(D.chat_prompt(record[:1]))["input_ids"]
    assert enc.labels[0][: len(prompt_ids)] == [D.IGNORE] * len(prompt_ids)
    trained = [t for t in enc.labels[0] if t != D.IGNORE]
    assert tokenizer.decode(trained[:-1]) == record[-1]["content"]


def test_prompt_longer_than_max_length_is_an_error(tmp_path, tokenizer):
    ds = D.read_dataset(write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the " * 40, "completion": "good"}]))
    with pytest.raises(D.DataError, match=r"long\.jsonl:1: the prompt is 40 tokens, no room"):
        D.encode(ds, "causal-lm", tokenizer, 16)


def test_truncation_keeps_max_length(tmp_path, tokenizer):
    ds = D.read_dataset(
        write_jsonl(tmp_path / "t.jsonl", [{"text": "good " * 50, "label": "a"}, {"text": "bad", "label": "b"}])
    )
    enc = D.encode(ds, "classify", tokenizer, 8, ["a", "b"])
    assert len(enc.input_ids[0]) == 8
    json.dumps(enc.labels)  # plain ints


def test_encode_chat_with_a_template_masks_everything_but_the_answer(tmp_path, tokenizer):
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    ds = D.read_dataset(write_jsonl(tmp_path / "t.jsonl", chat_rows(2)))
    enc = D.encode(ds, "causal-lm", templated, 64)
    for ids, labels, record in zip(enc.input_ids, enc.labels, ds.records):
        trained = [t for t in labels if t != D.IGNORE]
        answer = record["messages"][-1]["content"]
        # The template closes the answer with [EOS]; the encoder does not add a second one.
        assert templated.decode(trained) == f"{answer} [EOS]"
        assert (
            ids[: len(ids) - len(trained)]
            == templated(
                templated.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=False),
                add_special_tokens=False,
            )["input_ids"]
        )


def test_csv_fields_over_128_kb_read_as_jsonl_does(tmp_path):
    import csv

    long_text = "good " * 60_000  # 300 KB in one field; csv's default limit is 128 KB
    rows = [{"text": long_text, "label": "pos"}, {"text": "bad", "label": "neg"}]
    limit = csv.field_size_limit()
    from_csv = D.read_dataset(write_csv(tmp_path / "long.csv", rows))
    from_jsonl = D.read_dataset(write_jsonl(tmp_path / "long.jsonl", rows))
    assert from_csv.records == from_jsonl.records
    assert csv.field_size_limit() == limit  # the module's global limit is put back after the read
