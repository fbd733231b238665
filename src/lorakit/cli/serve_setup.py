"""What `lorakit serve` builds before it listens: the base model, its tokenizer, the adapter
store with every folder registered, and the engine (the CLI is the one place that knows both
the training wing, which loads models, and the serving wing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import LoraConfig
from ..files.adapter_file import AdapterFileError
from ..files.peft_format import CONFIG_FILE
from ..serving.engine import Engine
from ..serving.extra_check import ServeError
from ..serving.store import AdapterStore
from ..training.base_model import load_base
from ..training.data.examples import chat_prompt
from ..training.labels import LABELS_FILE
from .trained import adapter_facts


def root_folders(root: Path) -> list[Path]:
    """The adapter folders directly under `root`, by name (a symlink that leads out is not one)."""
    inside = root.resolve()
    return sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file() and p.resolve().parent == inside)


def build_engine(
    pinned: list[Path], found: list[Path], model_name: str | None, budget: int
) -> tuple[Engine, list[tuple[Path, Exception]]]:
    """The engine over the base model; `pinned` adapters are loaded now and kept (any error is
    the user's to fix), `found` ones registered for loading on first use (a bad one is skipped
    and reported)."""
    pinned_real = {p.resolve() for p in pinned}
    found = [f for f in found if f.resolve() not in pinned_real]
    first = _first_facts(pinned, found)
    base = model_name or (first["base"] if first else None)
    if not base:
        raise ServeError(f"{pinned[0] if pinned else found[0]}: base_model_name_or_path is empty; pass --model")
    task = first["task"] if first else "causal-lm"
    labels = first["labels"] if first else None
    # seed: a classifier's base head is fresh, the same one on every start
    model, tokenizer = load_base(base, task, labels, seed=0)
    model.eval()

    def check(folder: Path, _config: LoraConfig, _facts: dict[str, Any]) -> dict[str, Any]:
        facts = adapter_facts(folder)
        if facts["task"] != task:
            raise AdapterFileError(
                f"{folder / CONFIG_FILE}: a {facts['task']} adapter; this server runs {task} adapters"
            )
        if task == "classify" and len(facts["labels"]) != len(labels):
            raise AdapterFileError(
                f"{folder / LABELS_FILE}: {len(facts['labels'])} labels, but the served classifier has {len(labels)}"
            )
        return {"labels": facts["labels"]}

    store = AdapterStore(model, budget, check)
    for folder in pinned:
        name = _name(folder)
        if name in store.entries:
            raise ServeError(f"two adapter folders are named {name!r}: {store.entries[name].folder} and {folder}")
        try:
            store.register(name, folder, pin=True)
        except ValueError as err:
            raise ServeError(f"{folder}: {err}") from None
        store.load(name)
    skipped: list[tuple[Path, Exception]] = []
    for folder in found:
        try:
            store.register(_name(folder), folder)
        except (AdapterFileError, ValueError) as err:
            skipped.append((folder, err))
    return Engine(model, tokenizer, store, task, base, labels, chat_prompt), skipped


def _first_facts(pinned: list[Path], found: list[Path]) -> dict[str, Any] | None:
    """The facts of the first adapter: they choose the base model and the task."""
    if pinned:
        return adapter_facts(pinned[0])
    for folder in found:
        try:
            return adapter_facts(folder)
        except AdapterFileError:
            continue
    return None


def _name(folder: Path) -> str:
    return folder.resolve().name
