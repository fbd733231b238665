"""Each router of the app on a bare FastAPI app, its dependencies overridden with stand-ins: a
route answers from what its dependencies give, with no model, batcher or lifespan behind it."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
from served import run

from lorakit.serving.metrics import Metrics
from lorakit.serving.routes import admin, generate
from lorakit.serving.routes.common import get_batcher, get_engine, get_metrics, get_settings
from lorakit.serving.settings import Settings


def bare(router, overrides: dict):
    from fastapi import FastAPI

    from lorakit.serving.guard import error_handlers

    app = FastAPI()
    app.include_router(router)
    error_handlers(app)
    app.dependency_overrides.update(overrides)
    return app


def given(value):
    """A dependency that returns `value` (a closure: FastAPI reads a default argument as a query parameter)."""
    return lambda: value


async def ask(app, method: str, path: str, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.request(method, path, **kwargs)


def test_the_admin_router_alone():
    entry = SimpleNamespace(name="sft", folder="/runs/sft")
    engine = SimpleNamespace(base_id="tiny", max_length=64, store=SimpleNamespace(entries={"sft": entry}))
    batcher = SimpleNamespace(alive=False, depth=3)
    metrics = Metrics()
    stand_ins = {get_engine: engine, get_batcher: batcher, get_metrics: metrics, get_settings: Settings()}
    app = bare(admin.router, {dep: given(v) for dep, v in stand_ins.items()})
    models = run(ask(app, "GET", "/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["tiny", "sft"] and models["data"][1]["parent"] == "tiny"
    assert run(ask(app, "GET", "/health")).status_code == 503  # the batch loop stands still
    assert "lorakit_queue_depth 3.0" in run(ask(app, "GET", "/metrics")).text
    refused = run(ask(app, "POST", "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "b"}))
    assert refused.status_code == 403 and "--adapter-root" in refused.json()["error"]["message"]


def test_the_generate_router_alone_turns_away_a_classifier_and_a_full_queue():
    engine = SimpleNamespace(
        task="classify", base_id="tiny", store=SimpleNamespace(entries={}), encode=lambda text, special=True: [1, 2, 3]
    )
    batcher = SimpleNamespace(alive=True, room=lambda: 0)
    stand_ins = {get_engine: engine, get_batcher: batcher, get_settings: Settings(max_queue=4)}
    app = bare(generate.router, {dep: given(v) for dep, v in stand_ins.items()})
    r = run(ask(app, "POST", "/v1/completions", json={"prompt": "hi"}))
    assert r.status_code == 404 and "/v1/classify" in r.json()["error"]["message"]
    engine.task, engine.max_length = "causal-lm", 64
    engine.check_sampling = lambda sampling: None
    r = run(ask(app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 4}))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
