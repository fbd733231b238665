"""The official `openai` client against the app in this process (its HTTP client on the app's ASGI
transport): streaming, `n`, stop strings and `max_tokens` answer as the same requests do over
httpx, greedy text as `generate` with the adapter alone."""

from __future__ import annotations

import httpx
import pytest
from served import build, client, run
from test_app import offline_text

openai = pytest.importorskip("openai")
PROMPT = "9 8 7"


async def with_openai(app, work):
    async with client(app):  # the lifespan (the batcher) runs; the client below talks to the same app
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lorakit/v1") as http:
            api = openai.AsyncOpenAI(api_key="none", base_url="http://lorakit/v1", http_client=http, max_retries=0)
            return await work(api)


def test_openai_client_completions_stream_n_stop_max_tokens(adapters):
    app, engine = build([adapters["x"]], None, max_wait_ms=0)

    async def work(api):
        whole = await api.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=0)
        pieces = []
        async for chunk in await api.completions.create(
            model="x", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
        ):
            pieces.append(chunk)
        several = await api.completions.create(model="x", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, n=3)
        return whole, pieces, several

    whole, pieces, several = run(with_openai(app, work))
    want = offline_text(adapters["x"], PROMPT, 12)
    assert whole.choices[0].text == want and whole.usage.completion_tokens <= 12
    assert "".join(c.choices[0].text for c in pieces if c.choices) == want
    assert pieces[-1].choices[0].finish_reason in ("length", "stop")
    assert sorted(c.index for c in several.choices) == [0, 1, 2] and several.usage.completion_tokens <= 18

    stop = want[len(want) // 2 :].strip()[:2]  # a stop string the greedy text contains
    assert stop and stop in want

    async def stopped(api):
        return await api.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])

    cut = run(with_openai(app, stopped)).choices[0]
    assert cut.finish_reason == "stop" and cut.text == want[: want.index(stop)]


def test_openai_client_chat_streaming(adapters):
    app, engine = build([adapters["x"]], None, max_wait_ms=0)
    messages = [{"role": "user", "content": "hi"}]

    async def work(api):
        whole = await api.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0)
        deltas = []
        async for chunk in await api.chat.completions.create(
            model="x", messages=messages, max_tokens=8, temperature=0, stream=True
        ):
            deltas += [c.delta.content or "" for c in chunk.choices]
        return whole, deltas

    whole, deltas = run(with_openai(app, work))
    assert whole.choices[0].message.role == "assistant"
    assert "".join(deltas) == whole.choices[0].message.content
