"""Training data: CSV, TSV and JSONL files, the bundled sentiment set, and tokenising.

Every problem with a file (missing, empty, a line that does not parse, a missing column, a
label outside the label set, a prompt that leaves no room for its completion) is a `DataError`
naming the file and line, raised while reading, before any training starts.

Tasks and the columns that select them:
  classify   `text`, `label`
  causal-lm  `prompt`, `completion` (loss on completion tokens only), or chat `messages`
             (a list of {role, content}; loss on every assistant turn, see chat.py)
With `train_on_inputs` a causal-lm example trains on every token instead.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ...files.json_file import jsonl_objects
from ..errors import DataError
from . import chat
from .chat import IGNORE  # the label the loss skips (prompt and padding tokens)

TASKS = ("classify", "causal-lm")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}

BUNDLED = "bundled:sentiment"  # the name `--data` uses for the bundled set
_BUNDLED_FILES = ("amazon_cells_labelled.txt", "yelp_labelled.txt")
_BUNDLED_LABELS = {"0": "negative", "1": "positive"}


@dataclass
class Dataset:
    records: list[dict[str, Any]]
    lines: list[str]  # where each record came from, "file:line", for error messages
    columns: list[str]
    source: str  # the file (or files) read

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: list[int]) -> Dataset:
        return Dataset([self.records[i] for i in indices], [self.lines[i] for i in indices], self.columns, self.source)


# ---- reading -------------------------------------------------------------------------------


def read_dataset(path: str | Path) -> Dataset:
    """Read a CSV or TSV file (with a header line) or a JSONL file (one JSON object a line)."""
    if str(path) == BUNDLED:
        return bundled_sentiment()
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({err.reason})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    records, lines = (_read_jsonl if fmt == "jsonl" else _read_delimited)(text, str(path), fmt)
    if not records:
        raise DataError(f"{path}: no records (only a header or blank lines)")
    columns = sorted({k for r in records for k in r})
    return Dataset(records, lines, columns, str(path))


def _read_delimited(text: str, where: str, fmt: str) -> tuple[list[dict], list[str]]:
    # csv refuses fields over 128 KB by default; a long document is as valid here as in JSONL.
    # The limit is the module's global, so it is raised for this read and put back after.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, min(len(text), 2**31 - 1)))  # no field is longer than the file; C long
    try:
        return _read_rows(text, where, fmt)
    finally:
        csv.field_size_limit(limit)


def _read_rows(text: str, where: str, fmt: str) -> tuple[list[dict], list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    try:
        header = next(reader)
    except csv.Error as err:
        raise DataError(f"{where}:1: the header line does not parse as {fmt.upper()}: {err}") from None
    header = [h.strip() for h in header]
    if not any(header) or len(set(header)) != len(header) or "" in header:
        raise DataError(f"{where}:1: the header must name each column once, got {header!r}")
    records, lines = [], []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{where}:{reader.line_num}: does not parse as {fmt.upper()}: {err}") from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) != len(header):
            raise DataError(
                f"{where}:{reader.line_num}: {len(row)} fields, but the header has {len(header)} ({', '.join(header)})"
            )
        records.append(dict(zip(header, row)))
        lines.append(f"{where}:{reader.line_num}")
    return records, lines


def _read_jsonl(text: str, where: str, fmt: str) -> tuple[list[dict], list[str]]:
    records, lines = [], []
    for number, record in jsonl_objects(text, where, DataError):
        records.append(record)
        lines.append(f"{where}:{number}")
    return records, lines


def bundled_sentiment() -> Dataset:
    """The bundled Sentiment Labelled Sentences (Amazon and Yelp parts, 2,000 sentences)."""
    folder = resources.files("lorakit").joinpath("data/sentiment")
    records, lines = [], []
    for name in _BUNDLED_FILES:
        where = f"lorakit/data/sentiment/{name}"
        for number, line in enumerate(folder.joinpath(name).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            sentence, _, label = line.rpartition("\t")
            if label.strip() not in _BUNDLED_LABELS or not sentence.strip():
                raise DataError(f"{where}:{number}: expected 'sentence<TAB>0|1', got {line!r}")
            records.append({"text": sentence.strip(), "label": _BUNDLED_LABELS[label.strip()]})
            lines.append(f"{where}:{number}")
    return Dataset(records, lines, ["label", "text"], "lorakit/data/sentiment")


# ---- tasks, validation, labels -------------------------------------------------------------


def infer_task(dataset: Dataset) -> str:
    """The task the columns ask for: `text`+`label` classify; `prompt`+`completion` or `messages` causal-lm."""
    cols = set(dataset.columns)
    if "messages" in cols or {"prompt", "completion"} <= cols:
        return "causal-lm"
    if {"text", "label"} <= cols:
        return "classify"
    raise DataError(
        f"{dataset.source}: cannot tell the task from the columns {sorted(cols)}; expected "
        "'text' and 'label' (classify), 'prompt' and 'completion', or 'messages' (causal-lm)"
    )


def validate(dataset: Dataset, task: str) -> None:
    """Check every record has what `task` needs; the error names the file and line."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    conversations = task == "causal-lm" and "messages" in dataset.columns
    for record, where in zip(dataset.records, dataset.lines):
        if task == "classify":
            _need_text(record, "text", where)
            label = record.get("label")
            if label is None or isinstance(label, (list, dict)) or str(label).strip() == "":
                raise DataError(f"{where}: missing or empty column 'label' (a class name or number)")
        elif conversations:
            chat.check_messages(record, where)
        else:
            if not isinstance(record.get("prompt"), str):
                raise DataError(f"{where}: missing column 'prompt' (a string; may be empty)")
            _need_text(record, "completion", where)


def _need_text(record: dict, key: str, where: str) -> None:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: missing or empty column {key!r} (a non-empty string)")


def label_name(value: Any) -> str:
    """Labels are names; 1, 1.0 and "1" are the same label."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def label_set(dataset: Dataset) -> list[str]:
    """The sorted label names in `dataset` (numerically when all are integers)."""
    names = {label_name(r["label"]) for r in dataset.records}
    if len(names) < 2:
        raise DataError(f"{dataset.source}: classification needs at least 2 labels, found {sorted(names)}")
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def check_labels(dataset: Dataset, labels: list[str], origin: str) -> None:
    """Every label in `dataset` must be one of `labels` (which came from `origin`)."""
    known = set(labels)
    for record, where in zip(dataset.records, dataset.lines):
        name = label_name(record["label"])
        if name not in known:
            raise DataError(f"{where}: label {name!r} is not in the label set {labels} ({origin})")


def split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A fixed (seeded) held-out split: (train, held_out), held_out has round(fraction * n) records."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--eval-split must be in (0, 1), got {fraction}")
    n_eval = round(fraction * len(dataset))
    if n_eval < 1 or n_eval >= len(dataset):
        raise DataError(f"{dataset.source}: {len(dataset)} records are too few to hold out {fraction:.0%}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return dataset.subset(sorted(order[n_eval:])), dataset.subset(sorted(order[:n_eval]))


# ---- tokenising ----------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids for one task; `labels` is a class id per example or per-token ids (IGNORE masked)."""

    task: str
    input_ids: list[list[int]]
    labels: list[Any]
    pad_id: int = 0
    lines: list[str] = field(default_factory=list)
    cut: list[int] = field(default_factory=list)  # the examples --max-length shortened

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded tensors for the examples at `indices`."""
        seqs = [self.input_ids[i] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        if self.task == "classify":
            labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        else:
            labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
            for row, i in enumerate(indices):
                labels[row, : len(self.labels[i])] = torch.tensor(self.labels[i])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


CUT_SHARE = 0.01  # `train` warns when more than this share of the examples is cut by --max-length


def cut_notice(encoded: Encoded, max_length: int) -> str | None:
    """A warning when more than a few examples (CUT_SHARE) are longer than --max-length."""
    count = len(encoded.cut)
    if count <= CUT_SHARE * len(encoded):
        return None
    lost = "their ends are not trained" if encoded.task == "causal-lm" else "their ends are not seen"
    return (
        f"{count} of {len(encoded)} training examples ({count / len(encoded):.0%}) are longer than "
        f"--max-length {max_length} and are cut ({lost}); `lorakit data` shows them"
    )


def pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return token_id
    return 0


def encode(
    dataset: Dataset,
    task: str,
    tokenizer: Any,
    max_length: int,
    labels: list[str] | None = None,
    train_on_inputs: bool = False,
) -> Encoded:
    """Tokenise a validated dataset, each example cut to `max_length` tokens (`Encoded.cut` says which
    were). classify needs `labels` (the label set, in id order); `train_on_inputs` (causal-lm)
    labels every token, not only the completion or the assistant's turns."""
    if max_length < 2:
        raise DataError(f"--max-length must be at least 2, got {max_length}")
    if train_on_inputs and task != "causal-lm":
        raise DataError(f"--train-on-inputs is for causal-lm data; {dataset.source} is {task} data")
    out = Encoded(task, [], [], pad_id(tokenizer), list(dataset.lines))
    if task == "classify":
        ids = {name: i for i, name in enumerate(labels or [])}
        texts = [r["text"] for r in dataset.records]
        full = tokenizer(texts)["input_ids"]  # only to tell which examples the cut shortens
        out.input_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        out.labels = [ids[label_name(r["label"])] for r in dataset.records]
        out.cut = [i for i, x in enumerate(full) if len(x) > max_length]
        return out
    for index, (record, where) in enumerate(zip(dataset.records, dataset.lines)):
        if "messages" in record:
            ids, trained = chat.encode_conversation(record["messages"], tokenizer, where)
        else:
            ids, trained = _prompt_completion(record, tokenizer, max_length, where, train_on_inputs)
        if train_on_inputs:
            trained = list(ids)
        if len(ids) > max_length:
            out.cut.append(index)
        if all(t == IGNORE for t in trained[:max_length]):
            first = next((k for k, t in enumerate(trained) if t != IGNORE), None)
            raise DataError(
                f"{where}: nothing to train on"
                + (
                    " (no assistant turn)"
                    if first is None
                    else f" within --max-length {max_length} (the first trained token is token {first + 1})"
                )
            )
        out.input_ids.append(ids[:max_length])
        out.labels.append(trained[:max_length])
    return out


def _prompt_completion(
    record: dict[str, Any], tokenizer: Any, max_length: int, where: str, train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a prompt/completion pair: the completion, closed by end-of-text, is trained."""
    prompt, completion = record["prompt"], record["completion"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    if prompt and prompt_ids and prompt_ids[-1] == eos and eos != getattr(tokenizer, "bos_token_id", None):
        prompt_ids = prompt_ids[:-1]  # tokenisers that close every text (BERT's [SEP]) must not close the prompt
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if eos is not None and completion_ids[-1:] != [eos]:
        completion_ids = completion_ids + [eos]
    if len(prompt_ids) >= max_length and not train_on_inputs:
        raise DataError(
            f"{where}: the prompt is {len(prompt_ids)} tokens, no room for the completion within "
            f"--max-length {max_length}; raise --max-length or shorten the prompt"
        )
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def chat_prompt(messages: list[dict[str, str]]) -> str:
    """The plain chat rendering used when the tokenizer has no chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
