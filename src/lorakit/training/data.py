"""Training data: CSV, TSV and JSONL files, the bundled sentiment set, and tokenising.

Every problem with a file (missing, empty, a line that does not parse, a missing column, a
label outside the label set, a prompt that leaves no room for its completion) is a `DataError`
naming the file and line, raised while reading, before any training starts.

Tasks and the columns that select them:
  classify   `text`, `label`
  causal-lm  `prompt`, `completion` (loss on completion tokens only), or chat `messages`
             (a list of {role, content}; loss on the last message, which must be the assistant's)
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..json_file import jsonl_objects

TASKS = ("classify", "causal-lm")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
IGNORE = -100  # label id the loss skips (prompt and padding tokens)
ROLES = ("system", "user", "assistant")

BUNDLED = "bundled:sentiment"  # the name `--data` uses for the bundled set
_BUNDLED_FILES = ("amazon_cells_labelled.txt", "yelp_labelled.txt")
_BUNDLED_LABELS = {"0": "negative", "1": "positive"}


class DataError(ValueError):
    """A problem with a data file; the message names the file and, where it can, the line."""


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
                f"{where}:{reader.line_num}: {len(row)} fields, but the header has {len(header)} "
                f"({', '.join(header)})"
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
    chat = task == "causal-lm" and "messages" in dataset.columns
    for record, where in zip(dataset.records, dataset.lines):
        if task == "classify":
            _need_text(record, "text", where)
            label = record.get("label")
            if label is None or isinstance(label, (list, dict)) or str(label).strip() == "":
                raise DataError(f"{where}: missing or empty column 'label' (a class name or number)")
        elif chat:
            _check_messages(record.get("messages"), where)
        else:
            if not isinstance(record.get("prompt"), str):
                raise DataError(f"{where}: missing column 'prompt' (a string; may be empty)")
            _need_text(record, "completion", where)


def _need_text(record: dict, key: str, where: str) -> None:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: missing or empty column {key!r} (a non-empty string)")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: messages[{i}] must be an object with 'role' ({', '.join(ROLES)}) and string 'content'"
            )
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (it is the one trained on)")


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


def pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return token_id
    return 0


def encode(dataset: Dataset, task: str, tokenizer: Any, max_length: int, labels: list[str] | None = None) -> Encoded:
    """Tokenise a validated dataset. classify needs `labels` (the label set, in id order)."""
    if max_length < 2:
        raise DataError(f"--max-length must be at least 2, got {max_length}")
    out = Encoded(task, [], [], pad_id(tokenizer), list(dataset.lines))
    if task == "classify":
        ids = {name: i for i, name in enumerate(labels or [])}
        texts = [r["text"] for r in dataset.records]
        out.input_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        out.labels = [ids[label_name(r["label"])] for r in dataset.records]
        return out
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    for record, where in zip(dataset.records, dataset.lines):
        prompt, completion = render(record, tokenizer)
        templated = "messages" in record and bool(getattr(tokenizer, "chat_template", None))
        prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"] if prompt else []
        if prompt and prompt_ids and prompt_ids[-1] == eos and eos != getattr(tokenizer, "bos_token_id", None):
            prompt_ids = prompt_ids[:-1]  # tokenisers that close every text (BERT's [SEP]) must not close the prompt
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if eos is not None and completion_ids[-1:] != [eos]:  # chat templates may close the turn already
            completion_ids = completion_ids + [eos]
        if len(prompt_ids) >= max_length:
            raise DataError(
                f"{where}: the prompt is {len(prompt_ids)} tokens, no room for the completion within "
                f"--max-length {max_length}; raise --max-length or shorten the prompt"
            )
        full = (prompt_ids + completion_ids)[:max_length]
        out.input_ids.append(full)
        out.labels.append(([IGNORE] * len(prompt_ids) + completion_ids)[:max_length])
    return out


def render(record: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """(prompt text, completion text) for a prompt/completion or chat record."""
    if "messages" not in record:
        return record["prompt"], record["completion"]
    messages = record["messages"]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
    return chat_prompt(messages[:-1]), messages[-1]["content"]


def chat_prompt(messages: list[dict[str, str]]) -> str:
    """The plain chat rendering used when the tokenizer has no chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
