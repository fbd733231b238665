"""Server-sent events of a generation request (`stream: true`), and the `logprobs` of a choice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Literal

from .. import protocol as P
from ..engine import Engine, Row
from ..events import Done, Text
from .common import cancel, problem


def logprobs_of(kind: Literal["text", "chat"], engine: Engine, entries: list, offset: int = 0) -> tuple[dict, int]:
    """A choice's `logprobs` for some of its tokens, and (completions) the text offset after them."""

    def decode(token: int) -> str:
        return engine.tokenizer.decode([token])

    if kind == "text":
        return P.completion_logprobs(entries, decode, offset)
    return P.chat_logprobs(entries, decode), offset


async def sse(
    kind: Literal["text", "chat"],
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
            out, offsets[index] = logprobs_of(kind, engine, entries, offsets[index])
            return out

        while True:
            index, ev = event
            if isinstance(ev, Text):
                yield data(P.chunk(kind, rid, created, model, index, ev.delta, logprobs=logprobs(index, ev.logprobs)))
            elif isinstance(ev, Done):
                yield data(
                    P.chunk(
                        kind,
                        rid,
                        created,
                        model,
                        index,
                        "",
                        finish=ev.finish_reason,
                        stop=ev.stop,
                        logprobs=logprobs(index, ev.logprobs) if ev.logprobs else None,
                    )
                )
                finished += 1
            else:  # the status line is gone already: the error goes in-band
                failure = problem(ev.error)
                yield data(P.error_body(failure.status, failure.message))
                break
            if finished == len(rows):
                if include_usage:
                    prompt, completion = sum(len(r.ids) for r in rows), sum(len(r.out) for r in rows)
                    yield data(P.usage_chunk(kind, rid, created, model, prompt, completion))
                break
            event = await events.get()
        yield "data: [DONE]\n\n"
    finally:
        cancel(rows)
