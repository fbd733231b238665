"""The app of `lorakit serve` over the adapter folders of tests/conftest.py, in this process."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path


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
