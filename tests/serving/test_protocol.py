"""Request bodies: values that could only fail are a 422 naming the field, before any row runs."""

from __future__ import annotations

import asyncio

import pytest
from served import build, client, run

from lorakit.serving.protocol import MIN_TEMPERATURE

# Python's JSON parser takes these; the server must not.
NOT_FINITE = ("NaN", "Infinity", "-Infinity", "1e400")


def post_raw(c, path: str, text: str):
    return c.post(path, content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("number", NOT_FINITE)
def test_numbers_that_are_not_finite_are_422_naming_the_field(adapters, number):
    lm, _ = build([adapters["x"], adapters["y"]], None, max_wait_ms=100)
    cls, _ = build([adapters["a"], adapters["b"]], None, max_wait_ms=100)
    good = '{"model": "x", "prompt": "count from 3 :", "max_tokens": 3, "temperature": 0}'
    bad = {
        "temperature": f'{{"prompt": "count", "temperature": {number}}}',
        "top_p": f'{{"prompt": "count", "top_p": {number}}}',
        "adapters.y": f'{{"prompt": "count", "adapters": {{"x": 0.5, "y": {number}}}}}',
    }
    chat = f'{{"messages": [{{"role": "user", "content": "hi"}}], "adapters": {{"x": {number}}}}}'

    async def go():
        async with client(lm) as c:
            # Sent together with a good request: it would have shared the bad one's batch.
            lm_answers = await asyncio.gather(
                post_raw(c, "/v1/completions", good),
                *[post_raw(c, "/v1/completions", b) for b in bad.values()],
                post_raw(c, "/v1/chat/completions", chat),
            )
        async with client(cls) as c:
            cls_answers = await asyncio.gather(
                post_raw(c, "/v1/classify", '{"model": "a", "input": "good"}'),
                post_raw(c, "/v1/classify", f'{{"adapters": {{"a": 1, "b": {number}}}, "input": "good"}}'),
            )
        return lm_answers, cls_answers

    (ok, *refused, chat_refused), (cls_ok, cls_refused) = run(go())
    assert ok.status_code == 200 and cls_ok.status_code == 200
    for field, r in [*zip(bad, refused), ("adapters.x", chat_refused), ("adapters.b", cls_refused)]:
        assert r.status_code == 422, (field, r.text)
        error = r.json()["error"]
        assert error["param"] == f"body.{field}" and "finite number" in error["message"], error


def test_a_temperature_that_could_only_fail_is_422_and_the_smallest_valid_one_is_greedy(adapters):
    app, _ = build([adapters["x"]], None)
    body = {"model": "x", "prompt": "count from 3 :", "max_tokens": 6}

    async def go():
        async with client(app) as c:
            refused = [
                await c.post("/v1/completions", json=dict(body, temperature=t))
                for t in (1e-40, 5e-324, MIN_TEMPERATURE / 2, -1.0)
            ]
            greedy = await c.post("/v1/completions", json=dict(body, temperature=0))
            tiny = await c.post("/v1/completions", json=dict(body, temperature=MIN_TEMPERATURE, seed=1))
            return refused, greedy, tiny

    refused, greedy, tiny = run(go())
    for r in refused:
        assert r.status_code == 422 and r.json()["error"]["param"] == "body.temperature", r.text
    assert "temperature must be 0 (greedy) or at least" in refused[0].json()["error"]["message"]
    assert tiny.status_code == 200, tiny.text  # a valid temperature never fails: it samples the top token
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
