"""The HTTP face of `lorakit serve`: a FastAPI app with vLLM's endpoints over an Engine.

    GET  /v1/models                      the base model and every registered adapter
    POST /classify, /v1/classify         sequence classifiers
    POST /v1/completions                 causal LMs (stream: server-sent events)
    POST /v1/chat/completions
    POST /v1/load_lora_adapter           a folder inside --adapter-root, registered and loaded
    POST /v1/unload_lora_adapter
    GET  /health, /metrics

`model` names an adapter or the base model; lorakit's extension `adapters: {name: weight}` asks
for a weighted mix. Errors, the API key and the body limit: guard.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..files.adapter_file import AdapterFileError
from . import protocol as P
from .batcher import Batcher
from .engine import Engine, Row, RowError
from .guard import Guard, Problem, error_handlers, internal_error
from .metrics import Metrics
from .store import AdapterStore


@dataclass
class Settings:
    api_key: str | None = None  # then every request but /health needs "Authorization: Bearer <key>"
    max_batch: int = 32  # rows per batch
    max_wait_ms: float = 5.0  # how long a batch waits for more rows
    max_queue: int = 256  # rows waiting; beyond, 429 (413 for a request of more rows than that)
    adapter_root: Path | None = None  # where /v1/load_lora_adapter may read folders; None: no run-time loading
    max_body_bytes: int = 1 << 20


def build_app(engine: Engine, settings: Settings) -> FastAPI:
    metrics = Metrics()
    batcher = Batcher(engine, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, metrics
    app.add_middleware(Guard, api_key=settings.api_key, max_body=settings.max_body_bytes, metrics=metrics)
    error_handlers(app)
    store = engine.store

    # -- which model a request means ---------------------------------------------------------
    def resolve(model: str | None, mix: dict[str, float] | None) -> tuple[Any, tuple[str, ...], str]:
        """(route, adapter names, the model name to echo)."""
        if mix is not None:
            if model not in (None, engine.base_id):
                raise Problem(
                    422,
                    f"`adapters` mixes adapters over the base model; give model "
                    f"{engine.base_id!r} (or none) with it, not {model!r}",
                    "model",
                )
            unknown = [n for n in mix if n not in store.entries]
            if unknown:
                raise Problem(404, _unknown(unknown[0]), "adapters")
            weighted = {n: w for n, w in mix.items() if w}  # a zero weight adds nothing: nothing to load
            return (weighted or None), tuple(weighted), engine.base_id
        if model is None or model == engine.base_id:
            return None, (), engine.base_id
        if model in store.entries:
            return model, (model,), model
        raise Problem(404, _unknown(model), "model")

    def _unknown(name: str) -> str:
        names = [engine.base_id, *store.entries]
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        return f"The model `{name}` does not exist. Valid models: {shown}."

    def token_ids(value: str | list[int], special: bool = True) -> list[int]:
        if isinstance(value, str):
            return engine.encode(value, special)
        vocab = len(engine.tokenizer)
        if any(not 0 <= t < vocab for t in value):
            raise Problem(422, f"token ids must lie in [0, {vocab})", "prompt")
        return list(value)

    def enqueue(rows: list[Row], with_results: bool):
        if not batcher.alive:  # queued rows would wait for ever
            raise Problem(503, "the server's batch loop has stopped; see the server's log")
        if len(rows) > settings.max_queue:  # it would never fit: retrying (as clients do on 429) cannot help
            raise Problem(
                413,
                f"this request has {len(rows)} rows (inputs x n), more than the "
                f"{settings.max_queue} the server queues (--max-queue); send it in parts",
            )
        if batcher.room() < len(rows):
            raise Problem(
                429,
                f"the queue is full ({settings.max_queue} rows waiting); retry shortly",
                headers={"Retry-After": "1"},
            )
        return batcher.submit(rows, with_results)

    # -- endpoints ---------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if batcher.alive else 503)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        metrics.queue_depth = batcher.depth
        return Response(metrics.text(store), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [P.model_card(engine.base_id, engine.base_id, None, engine.max_length)]
        cards += [P.model_card(e.name, str(e.folder), engine.base_id, None) for e in list(store.entries.values())]
        return {"object": "list", "data": cards}

    async def classify(body: P.ClassifyRequest) -> dict:
        if engine.task != "classify":
            raise Problem(404, "this server runs a causal language model: use /v1/completions or /v1/chat/completions")
        route, names, shown = resolve(body.model, body.adapters)
        rows = [Row(token_ids(text), route, names) for text in P.as_list(body.input)]
        _check_lengths(engine, rows, 0)
        futures = enqueue(rows, with_results=True)
        try:
            results = await asyncio.gather(*futures)
        except Exception as err:
            raise _problem(err) from None
        finally:
            _cancel(rows)  # nothing left to do for them; a dropped client's rows are skipped
        return P.classify_answer(shown, results, sum(len(r.ids) for r in rows))

    app.post("/classify")(classify)
    app.post("/v1/classify")(classify)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest) -> Response:
        prompts = [token_ids(p) for p in P.as_list(body.prompt)]
        return await generate("text", body, prompts, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatRequest) -> Response:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = engine.chat_ids(messages)
        except ValueError as err:
            raise Problem(422, str(err), "messages") from None
        except RowError as err:
            raise Problem(err.status, err.message) from None
        return await generate("chat", body, [prompt], body.limit())

    async def generate(kind: Literal["text", "chat"], body: Any, prompts: list[list[int]], limit: int | None):
        if engine.task != "causal-lm":
            raise Problem(404, "this server runs a sequence classifier: use /v1/classify")
        route, names, shown = resolve(body.model, body.adapters)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sampling, stop = body.settings(), body.stops()  # the same for every row of the request
        wrong = engine.check_sampling(sampling)
        if wrong is not None:
            raise Problem(422, wrong[1], wrong[0])
        rows = []
        for p, ids in enumerate(prompts):
            for c in range(body.n):
                index = p * body.n + c
                rows.append(
                    Row(
                        ids,
                        route,
                        names,
                        max_tokens=limit or max(engine.max_length - len(ids), 1),
                        sampling=sampling,
                        seed=None if body.seed is None else body.seed + c,
                        stop=stop,
                        emit=lambda ev, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, ev)),
                    )
                )
        _check_lengths(engine, rows, limit or 0)
        enqueue(rows, with_results=False)
        rid, created = P.request_id("cmpl" if kind == "text" else "chatcmpl"), int(time.time())
        first = await _next(events, rows)
        if first[1][0] == "error":
            _cancel(rows)
            raise _problem(first[1][1])
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _sse(kind, rid, created, shown, rows, events, first, include_usage, engine)
            return StreamingResponse(stream, media_type="text/event-stream")
        texts, finish = [""] * len(rows), [None] * len(rows)
        event = first
        try:
            while True:
                index, ev = event
                if ev[0] == "text":
                    texts[index] += ev[1]
                elif ev[0] == "done":
                    finish[index] = ev[1:3]
                else:
                    raise _problem(ev[1])
                if all(f is not None for f in finish):
                    break
                event = await _next(events, rows)
        finally:
            _cancel(rows)
        logprobs = [_logprobs(kind, engine, r.logprobs)[0] if sampling.logprobs is not None else None for r in rows]
        choices = [P.completion_choice(kind, i, texts[i], *finish[i], logprobs[i]) for i in range(len(rows))]
        return JSONResponse(
            P.completion_answer(
                kind, rid, created, shown, choices, sum(len(r.ids) for r in rows), sum(len(r.out) for r in rows)
            )
        )

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: P.LoadRequest) -> Response:
        name, root = body.lora_name, settings.adapter_root
        if not name or not body.lora_path:
            raise Problem(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if root is None:
            raise Problem(403, "loading adapters at run time is off: start lorakit serve with --adapter-root DIR")
        if name == engine.base_id:
            raise Problem(400, f"The lora adapter '{name}' conflicts with a served base model.")
        folder = confine(root, body.lora_path)
        if not folder.is_dir():
            raise Problem(404, f"Loading lora {name} failed: No adapter found for {body.lora_path}")
        try:
            added = await batcher.call(_register_and_load, engine, name, folder)
        except (AdapterFileError, ValueError) as err:
            raise Problem(400, f"Loading lora {name} failed: {err}") from None
        if not added:
            raise Problem(400, f"The lora adapter '{name}' has already been loaded.")
        return Response(f"Success: LoRA adapter '{name}' added successfully.", status_code=200)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: P.UnloadRequest) -> Response:
        if not body.lora_name:
            raise Problem(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
        if not await batcher.call(_unregister, store, body.lora_name):
            raise Problem(404, f"The lora adapter '{body.lora_name}' cannot be found.")
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", status_code=200)

    return app


def confine(root: Path, given: str) -> Path:
    """`given` (relative to `root`, or absolute) as a real path inside `root`; 403 otherwise:
    no '..' component, and no symlink that leads out."""
    path = Path(given)
    if ".." in path.parts:
        raise Problem(403, f"lora_path {given!r} may not contain '..'", "lora_path")
    real_root = root.resolve()
    real = (path if path.is_absolute() else root / path).resolve()
    if real != real_root and real_root not in real.parents:
        raise Problem(403, f"lora_path {given!r} lies outside the adapter root {str(root)!r}", "lora_path")
    return real


def _register_and_load(engine: Engine, name: str, folder: Path) -> bool:
    """On the model thread: register, then load at once, so a bad folder is reported now. False
    when the name is taken (checked here, in the same step as registering: loads run concurrently)."""
    store = engine.store
    if name in store.entries:
        return False
    store.register(name, folder)
    failed = store.acquire([name])
    if failed:
        store.unregister(name)
        raise failed[name]
    return True


def _unregister(store: AdapterStore, name: str) -> bool:
    """On the model thread: forget `name`; False when it is not registered (the check and the
    removal are one step, so of concurrent unloads of one name exactly one succeeds)."""
    if name not in store.entries:
        return False
    store.unregister(name)
    return True


def _check_lengths(engine: Engine, rows: list[Row], new_tokens: int) -> None:
    for row in rows:
        if not row.ids:
            raise Problem(422, "an input is empty after tokenizing")
        if len(row.ids) + new_tokens > engine.max_length:
            raise Problem(
                413,
                f"the input is {len(row.ids)} tokens"
                + (f" + {new_tokens} to generate" if new_tokens else "")
                + f", more than this model's maximum context of {engine.max_length} tokens",
            )


async def _next(events: asyncio.Queue, rows: list[Row]) -> tuple[int, tuple]:
    try:
        return await events.get()
    except asyncio.CancelledError:
        _cancel(rows)
        raise


def _cancel(rows: list[Row]) -> None:
    for row in rows:
        row.cancelled = True


def _logprobs(kind: Literal["text", "chat"], engine: Engine, entries: list, offset: int = 0) -> tuple[dict, int]:
    """A choice's `logprobs` for some of its tokens, and (completions) the text offset after them."""

    def decode(token: int) -> str:
        return engine.tokenizer.decode([token])

    if kind == "text":
        return P.completion_logprobs(entries, decode, offset)
    return P.chat_logprobs(entries, decode), offset


def _problem(err: Exception) -> Problem:
    if isinstance(err, RowError):
        return Problem(err.status, err.message)
    return internal_error(err, "a row failed")


async def _sse(
    kind,
    rid: str,
    created: int,
    model: str,
    rows: list[Row],
    events: asyncio.Queue,
    first: tuple,
    include_usage: bool,
    engine: Engine,
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of new text, a last chunk per choice, [DONE]."""

    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        if kind == "chat":
            for i in range(len(rows)):
                yield data(P.chunk(kind, rid, created, model, i, None, first=True))
        finished = 0
        event = first
        offsets = [0] * len(rows)  # each choice's text offset, for the completions API's logprobs

        def logprobs(index: int, entries: list) -> dict | None:
            if rows[index].sampling.logprobs is None:
                return None
            out, offsets[index] = _logprobs(kind, engine, entries, offsets[index])
            return out

        while True:
            index, ev = event
            if ev[0] == "text":
                yield data(P.chunk(kind, rid, created, model, index, ev[1], logprobs=logprobs(index, ev[2])))
            elif ev[0] == "done":
                yield data(
                    P.chunk(
                        kind,
                        rid,
                        created,
                        model,
                        index,
                        "",
                        finish=ev[1],
                        stop=ev[2],
                        logprobs=logprobs(index, ev[3]) if ev[3] else None,
                    )
                )
                finished += 1
            else:  # the status line is gone already: the error goes in-band
                problem = _problem(ev[1])
                yield data(P.error_body(problem.status, problem.message))
                break
            if finished == len(rows):
                if include_usage:
                    prompt, completion = sum(len(r.ids) for r in rows), sum(len(r.out) for r in rows)
                    yield data(
                        {
                            "id": rid,
                            "object": "text_completion" if kind == "text" else "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": P.usage(prompt, completion),
                        }
                    )
                break
            event = await events.get()
        yield "data: [DONE]\n\n"
    finally:
        _cancel(rows)
