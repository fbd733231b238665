"""POST /v1/completions and /v1/chat/completions: causal LMs, whole answers or server-sent events."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import protocol as P
from ..engine import Engine, Row, RowError
from ..events import Done, Event, Failed, Text
from ..guard import Problem
from ..settings import Settings
from .common import BatcherDep, EngineDep, SettingsDep, cancel, check_lengths, enqueue, problem, resolve, token_ids
from .stream import logprobs_of, sse

router = APIRouter()
Kind = Literal["text", "chat"]


@router.post("/v1/completions")
async def completions(
    body: P.CompletionRequest, request: Request, engine: EngineDep, batcher: BatcherDep, settings: SettingsDep
) -> Response:
    prompts = [token_ids(engine, p) for p in P.as_list(body.prompt)]
    return await generate("text", body, prompts, body.max_tokens, engine, batcher, settings, request)


@router.post("/v1/chat/completions")
async def chat(
    body: P.ChatRequest, request: Request, engine: EngineDep, batcher: BatcherDep, settings: SettingsDep
) -> Response:
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = engine.chat_ids(messages)
    except ValueError as err:
        raise Problem(422, str(err), "messages") from None
    except RowError as err:
        raise Problem(err.status, err.message) from None
    return await generate("chat", body, [prompt], body.limit(), engine, batcher, settings, request)


def rows_of(
    engine: Engine,
    body: Any,
    route: Any,
    names: tuple[str, ...],
    prompts: list[list[int]],
    limit: int | None,
    emit: Any,
) -> list[Row]:
    """The request's rows (through `route`, needing adapters `names`): each prompt `n` times, the
    same sampling fields, seeds seed, seed+1, ..."""
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
                    emit=lambda ev, i=index: emit(i, ev),
                )
            )
    check_lengths(engine, rows, limit or 0)
    return rows


async def generate(
    kind: Kind,
    body: Any,
    prompts: list[list[int]],
    limit: int | None,
    engine: Engine,
    batcher: Any,
    settings: Settings,
    request: Request | None = None,
) -> Response:
    if engine.task != "causal-lm":
        raise Problem(404, "this server runs a sequence classifier: use /v1/classify")
    route, names, shown = resolve(engine, body.model, body.adapters)
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    post = lambda i, ev: events.put_nowait((i, ev))  # on the event loop (the batcher posts there)
    rows = rows_of(engine, body, route, names, prompts, limit, post)
    enqueue(batcher, settings, rows, with_results=False)
    rid, created = P.request_id("cmpl" if kind == "text" else "chatcmpl"), int(time.time())
    # A client that disconnects before the answer (or its first chunk) cancels the rows: Starlette
    # notices a disconnect only while it streams.
    watcher = asyncio.ensure_future(watch_disconnect(request, rows, events)) if request is not None else None
    try:
        return await answer(kind, body, rows, events, rid, created, shown, engine)
    finally:
        if watcher is not None:
            watcher.cancel()


async def watch_disconnect(request: Request, rows: list[Row], events: asyncio.Queue) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel(rows)  # they leave the running batch at the next step
    events.put_nowait((0, Failed(RowError(499, "the client closed the connection"))))


async def answer(
    kind: Kind, body: Any, rows: list[Row], events: asyncio.Queue, rid: str, created: int, shown: str, engine: Engine
) -> Response:
    first = await next_event(events, rows)
    if isinstance(first[1], Failed):
        cancel(rows)
        raise problem(first[1].error)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = sse(kind, rid, created, shown, rows, events, first, include_usage, engine)
        return StreamingResponse(stream, media_type="text/event-stream")
    texts, finish = [""] * len(rows), [None] * len(rows)
    event = first
    try:
        while True:
            index, ev = event
            if isinstance(ev, Text):
                texts[index] += ev.delta
            elif isinstance(ev, Done):
                finish[index] = (ev.finish_reason, ev.stop)
            else:
                raise problem(ev.error)
            if all(f is not None for f in finish):
                break
            event = await next_event(events, rows)
    finally:
        cancel(rows)
    sampling = rows[0].sampling
    logprobs = [logprobs_of(kind, engine, r.logprobs)[0] if sampling.logprobs is not None else None for r in rows]
    choices = [P.completion_choice(kind, i, texts[i], *finish[i], logprobs[i]) for i in range(len(rows))]
    return JSONResponse(
        P.completion_answer(
            kind, rid, created, shown, choices, sum(len(r.ids) for r in rows), sum(len(r.out) for r in rows)
        )
    )


async def next_event(events: asyncio.Queue, rows: list[Row]) -> tuple[int, Event]:
    """The next event of the request; a client that went away (the task cancelled) cancels its
    rows, which leave the running batch at the next step."""
    try:
        return await events.get()
    except asyncio.CancelledError:
        cancel(rows)
        raise
