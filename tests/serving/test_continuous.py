"""Continuous batching (scheduler.py) through the app in this process: rows that arrive while
others decode join the running batch and leave when they finish, and every request's text is
still what its adapter gives alone with `generate`; seeded sampling repeats; a client that goes
away frees its row at the next step."""

from __future__ import annotations

import asyncio

from served import build, client, run
from test_app import offline_text

LONG_PROMPT = "count from 3 : 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22"


async def until(condition, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


async def long_running(c, scheduler, model: str, prompt: str, max_tokens: int, after: int) -> asyncio.Future:
    """Post a request that decodes `max_tokens` tokens whatever it picks (ignore_eos); return once
    it runs and has `after` tokens (the request's task)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    task = asyncio.ensure_future(c.post("/v1/completions", json=body))
    await until(lambda: scheduler.rows and len(scheduler.rows[0].out) >= after)
    return task


def test_staggered_requests_join_the_running_batch_and_equal_generate_alone(adapters):
    # A budget of 8 tokens a step: the 30-token prompt of the third request runs in chunks.
    app, engine = build([adapters["x"], adapters["y"]], None, max_wait_ms=0, max_batch_tokens=8)
    jobs = [("x", "9 8 7", 40), ("y", "count from 11 :", 6), (None, LONG_PROMPT, 5), ("x", "count from 3 :", 12)]
    scheduler = app.state.batcher.scheduler
    widest, real_step = [0], scheduler.step

    def step():  # the widest running batch seen after a step
        real_step()
        widest[0] = max(widest[0], len(scheduler.rows))

    scheduler.step = step

    async def go():
        async with client(app) as c:

            def post(model, prompt, n):
                body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
                return asyncio.ensure_future(c.post("/v1/completions", json=dict(body, model=model) if model else body))

            first = post(*jobs[0])
            await until(lambda: scheduler.rows and len(scheduler.rows[0].out) >= 3)
            rest = []
            groups = lambda: app.state.metrics.value("lorakit_batch_rows_count")  # noqa: E731
            for k, job in enumerate(jobs[1:]):  # each arrives while the first one decodes
                rest.append(post(*job))
                await until(lambda k=k: groups() == k + 2 and scheduler.prefill is None)  # it has joined
            answers = await asyncio.gather(first, *rest)
            m = app.state.metrics
            within = m.value("lorakit_step_tokens_bucket", {"le": "8.0"}) == m.value("lorakit_step_tokens_count")
            return answers, m.value("lorakit_batch_rows_count"), within

    answers, groups, within = run(go())
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    for (model, prompt, n), r in zip(jobs, answers):
        want = offline_text(adapters[model], prompt, n) if model else _base_text(adapters["llama"], prompt, n)
        assert r.json()["choices"][0]["text"] == want, (model, prompt)
    assert groups == 4  # each request joined on its own, none waited for a batch to end
    assert widest[0] >= 2  # rows decoded side by side
    assert within  # no step ran more than the 8-token budget: the long prompt went in chunks


def _base_text(folder, prompt: str, n: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=model.config.pad_token_id)
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_a_short_request_finishes_while_a_long_one_decodes(adapters):
    app, engine = build([adapters["x"]], None, max_wait_ms=0)
    scheduler = app.state.batcher.scheduler

    async def go():
        async with client(app) as c:
            long = asyncio.ensure_future(
                c.post(
                    "/v1/completions",
                    json={
                        "model": "x",
                        "prompt": "count from 3 :",
                        "max_tokens": 50,
                        "ignore_eos": True,
                        "temperature": 0,
                    },
                )
            )
            await until(lambda: scheduler.rows and len(scheduler.rows[0].out) >= 2)
            short = await c.post(
                "/v1/completions", json={"model": "x", "prompt": "9 8 7", "max_tokens": 4, "temperature": 0}
            )
            still = [len(r.out) for r in scheduler.rows]
            return short, still, await long

    short, still, long = run(go())
    assert short.status_code == 200 and long.status_code == 200
    assert still and still[0] < 50  # the long row was still decoding when the short one was answered
    assert long.json()["usage"]["completion_tokens"] == 50


def test_seeded_sampling_repeats_whatever_joins_the_batch(adapters):
    app, engine = build([adapters["x"], adapters["y"]], None, max_wait_ms=0)
    seeded = {
        "model": "y",
        "prompt": "count from 11 :",
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 7,
        "ignore_eos": True,
    }
    scheduler = app.state.batcher.scheduler

    async def go():
        async with client(app) as c:
            alone = await c.post("/v1/completions", json=seeded)
            other = asyncio.ensure_future(
                c.post(
                    "/v1/completions",
                    json={"model": "x", "prompt": "count from 3 :", "max_tokens": 30, "temperature": 0.8, "seed": 1},
                )
            )
            await until(lambda: scheduler.rows and len(scheduler.rows[0].out) >= 3)
            joined = await c.post("/v1/completions", json=seeded)
            await other
            return alone, joined

    alone, joined = run(go())
    assert alone.json()["choices"][0]["text"] == joined.json()["choices"][0]["text"]


def test_a_client_that_goes_away_frees_its_row_at_the_next_step(adapters):
    app, engine = build([adapters["x"]], None, max_wait_ms=0)
    scheduler = app.state.batcher.scheduler

    async def go():
        async with client(app) as c:
            task = await long_running(c, scheduler, "x", "count from 3 :", 50, after=2)
            row = scheduler.rows[0]
            task.cancel()
            await until(lambda: not scheduler.rows)
            running = app.state.metrics.value("lorakit_running_rows")
            answer = await c.post("/v1/completions", json={"model": "x", "prompt": "9 8 7", "max_tokens": 3})
            return row, running, answer

    row, running, answer = run(go())
    assert row.cancelled and len(row.out) < 50
    assert running == 0 and answer.status_code == 200


def test_unloading_an_adapter_ends_its_running_rows_with_404(adapters):
    app, engine = build([], adapters["lm_root"], max_wait_ms=0)
    scheduler = app.state.batcher.scheduler

    async def go():
        async with client(app) as c:
            running = await long_running(c, scheduler, "y", "count from 3 :", 50, after=2)
            unloaded = await c.post("/v1/unload_lora_adapter", json={"lora_name": "y"})
            return unloaded, await running

    unloaded, running = run(go())
    assert unloaded.status_code == 200
    assert running.status_code == 404 and "unloaded while this request ran" in running.json()["error"]["message"]


def test_a_weighted_mix_answers_the_same_alone_and_joined(adapters):
    app, engine = build([adapters["x"], adapters["y"]], None, max_wait_ms=0)
    mix = {"adapters": {"x": 0.7, "y": 0.3}, "prompt": "9 8 7", "max_tokens": 10, "temperature": 0}
    scheduler = app.state.batcher.scheduler

    async def go():
        async with client(app) as c:
            alone = await c.post("/v1/completions", json=mix)
            other = await long_running(c, scheduler, "x", "9 8 7", 40, after=3)
            joined = await c.post("/v1/completions", json=mix)
            await other
            return alone, joined

    alone, joined = run(go())
    assert alone.status_code == joined.status_code == 200
    assert alone.json()["choices"][0]["text"] == joined.json()["choices"][0]["text"]


def test_a_disconnect_before_a_whole_answer_frees_the_row(adapters):
    """The server's side of a dropped connection (no task cancelled, as under uvicorn): the ASGI
    `receive` says http.disconnect while a non-streamed answer is being generated."""
    import json

    app, engine = build([adapters["x"]], None, max_wait_ms=0)
    scheduler = app.state.batcher.scheduler
    body = json.dumps({"model": "x", "prompt": "count from 3 :", "max_tokens": 50, "ignore_eos": True}).encode()

    async def go():
        async with client(app):
            gone = asyncio.Event()
            sent: list[dict] = []
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                if messages:
                    return messages.pop()
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/v1/completions",
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                "query_string": b"",
                "http_version": "1.1",
                "scheme": "http",
                "server": ("t", 80),
                "client": ("c", 1),
                "root_path": "",
                "raw_path": b"/v1/completions",
                "app": app,
            }
            call = asyncio.ensure_future(app(scope, receive, send))
            await until(lambda: scheduler.rows and len(scheduler.rows[0].out) >= 2)
            row = scheduler.rows[0]
            gone.set()
            await until(lambda: not scheduler.rows)
            await call
            return row, sent

    row, sent = run(go())
    assert row.cancelled and len(row.out) < 50
    assert sent[0]["status"] == 499
