"""The HTTP face of `lorakit serve`: a FastAPI app with vLLM's endpoints over an Engine.

    GET  /v1/models                      the base model and every registered adapter
    POST /classify, /v1/classify         sequence classifiers
    POST /v1/completions                 causal LMs (stream: server-sent events)
    POST /v1/chat/completions
    POST /v1/load_lora_adapter           a folder inside --adapter-root, registered and loaded
    POST /v1/unload_lora_adapter
    GET  /health, /metrics

`model` names an adapter or the base model; lorakit's extension `adapters: {name: weight}` asks
for a weighted mix. The endpoints live in routes/ (one APIRouter each); this file wires them to
one engine, its batcher and metrics. Errors, the API key and the body limit: guard.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from . import routes
from .batcher import Batcher
from .engine import Engine
from .guard import Guard, error_handlers
from .metrics import Metrics
from .settings import Settings

__all__ = ["Settings", "build_app"]


def build_app(engine: Engine, settings: Settings) -> FastAPI:
    metrics = Metrics(engine.store)
    batcher = Batcher(engine, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.batcher, app.state.metrics, app.state.settings = engine, batcher, metrics, settings
    app.add_middleware(Guard, api_key=settings.api_key, max_body=settings.max_body_bytes, metrics=metrics)
    error_handlers(app)
    for router in routes.ROUTERS:
        app.include_router(router)
    return app
