"""What stands around the app: a 500 tells the client an id and nothing of the server's insides
(the log has the id with the exception); an empty API key is refused, never served open."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest
from served import build, client, run

from lorakit.serving.guard import Guard
from lorakit.serving.metrics import Metrics

SECRET = "poisoned: /srv/secret/model.py line 7"


def ids_in(text: str) -> list[str]:
    return re.findall(r"error-[0-9a-f]{16}", text)


def test_a_500_names_an_id_and_the_log_has_the_exception(adapters, caplog):
    cls, cls_engine = build([adapters["a"]], None)
    lm, lm_engine = build([adapters["x"]], None)

    def broken(*args, **kwargs):
        raise RuntimeError(SECRET)

    cls_engine.model.forward = lm_engine.model.forward = broken

    async def go():
        async with client(cls) as c:
            classify = await c.post("/v1/classify", json={"model": "a", "input": "good"})
        async with client(lm) as c:
            body = {"model": "x", "prompt": "count", "max_tokens": 3}
            whole = await c.post("/v1/completions", json=body)
        # An error outside any row (the endpoint itself): the app's last handler.
        cls_engine.encode = broken
        transport = httpx.ASGITransport(app=cls, raise_app_exceptions=False)
        async with cls.router.lifespan_context(cls), httpx.AsyncClient(transport=transport, base_url="http://x") as c:
            crash = await c.post("/v1/classify", json={"model": "a", "input": "good"})
        return classify, whole, crash

    with caplog.at_level(logging.ERROR, logger="lorakit.serve"):
        answers = run(go())
    logged = "\n".join(r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in caplog.records)
    seen = set()
    for r in answers:
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert "poisoned" not in r.text and "secret" not in r.text and "RuntimeError" not in r.text
        (rid,) = ids_in(error["message"])
        assert rid in logged and rid not in seen  # one id per failure, the same in the log
        seen.add(rid)
    for line in logged.splitlines():
        if ids_in(line):
            assert SECRET in line


def test_an_error_in_a_stream_names_an_id_only(adapters):
    app, engine = build([adapters["x"]], None)
    calls = [0]
    real = engine.model.forward

    def breaks_later(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # after the first tokens went out: the error goes in-band
            raise RuntimeError(SECRET)
        return real(*args, **kwargs)

    engine.model.forward = breaks_later

    async def go():
        async with client(app) as c:
            return await c.post(
                "/v1/completions",
                json={"model": "x", "prompt": "count from 3 :", "max_tokens": 8, "temperature": 0, "stream": True},
            )

    r = run(go())
    events = [json.loads(e[len("data: ") :]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert "error" in events[-1] and len(ids_in(events[-1]["error"]["message"])) == 1
    assert "poisoned" not in r.text and "secret" not in r.text


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_is_refused(key):
    with pytest.raises(ValueError, match="API key is empty"):
        Guard(None, api_key=key, max_body=1000, metrics=Metrics())
