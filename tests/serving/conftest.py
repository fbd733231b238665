"""Adapter folders on the tiny models, as `lorakit train` would leave them, and an app over them."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import torch
from helpers import randomize_adapter

import lorakit
from lorakit.training.tasks import labels_json, load_model

LABELS = ["neg", "pos"]


def make_adapter(base: Path, out: Path, task: str, seed: int, rank: int = 4, targets="all-linear",
                 labels: list[str] = LABELS) -> Path:
    """An adapter folder on `base` with random nonzero weights (and, for a classifier, its own head)."""
    model = load_model(str(base), task, labels if task == "classify" else None)
    saved = ["classifier"] if task == "classify" else []
    lorakit.inject(model, lorakit.LoraConfig(rank=rank, alpha=2 * rank, targets=targets, modules_to_save=saved))
    randomize_adapter(model, seed=seed)
    if saved:
        with torch.no_grad():
            for p in model.classifier.copies["default"].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    extra = {"labels.json": labels_json(labels)} if task == "classify" else None
    lorakit.save_adapter(model, out, base_model_name_or_path=str(base),
                         task_type="SEQ_CLS" if task == "classify" else "CAUSAL_LM", extra_files=extra)
    return out


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


def build(pinned: list[Path], root: Path | None, budget: int = 1 << 30, **settings):
    """(app, engine) the way `lorakit serve` builds them."""
    from lorakit.cli.serve_setup import build_engine, root_folders
    from lorakit.serving.app import Settings, build_app

    engine, skipped = build_engine(pinned, root_folders(root) if root else [], None, budget)
    assert not skipped, skipped
    return build_app(engine, Settings(adapter_root=root, **settings)), engine


@contextlib.asynccontextmanager
async def client(app):
    """An httpx client on the app in this process, its lifespan (the batcher) running."""
    import httpx

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lorakit") as c:
            yield c


def run(coro):
    return asyncio.run(coro)
