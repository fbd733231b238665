"""A row's failure stays that row's: when a batch's forward or sampling step raises, the other
rows go on alone from where they stood and answer as if the failing row had never been there.
The failures are injected into the tiny model's forward; the reference is each request alone."""

from __future__ import annotations

import asyncio

import torch
from served import build, client, run

PROMPTS = ("count from 3 :", "count from 11 :")


def fail_forward(engine, when) -> None:
    """Make the model's forward raise (or return nan logits) when `when(call, input_ids)` says so:
    "raise", "nan:<row>" or None."""
    model, real = engine.model, engine.model.forward
    sizes: list[int] = []

    def forward(*args, **kwargs):
        ids = kwargs["input_ids"]
        sizes.append(ids.shape[0])
        what = when(len(sizes), ids)
        if what == "raise":
            raise RuntimeError("poisoned forward: /secret/path/model.py")
        out = real(*args, **kwargs)
        if what and what.startswith("nan:"):
            out.logits[int(what[4:]), -1] = float("nan")
        return out

    model.forward = forward


async def alone_then_together(app, bodies: list[dict]) -> tuple[list, list]:
    """Each body alone, one after the other; then all of them at once (one batch)."""
    async with client(app) as c:
        alone = [await c.post("/v1/completions", json=b) for b in bodies]
        together = []
        for b in bodies:  # in this order into the queue, so the rows' places in the batch are known
            together.append(asyncio.ensure_future(c.post("/v1/completions", json=b)))
            await asyncio.sleep(0.005)
        return alone, list(await asyncio.gather(*together))


def texts(responses) -> list[list[str]]:
    return [[c["text"] for c in r.json()["choices"]] for r in responses]


def test_a_batch_whose_forward_fails_mid_decoding_goes_on_row_by_row(adapters):
    app, engine = build([adapters["x"], adapters["y"]], None, max_wait_ms=200)
    bodies = [
        {"model": "x", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0},
        {"model": "y", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 2},
    ]
    batched = [0]

    def when(call, ids):
        batched[0] += ids.shape[0] == 3  # the three rows together (alone, y's n=2 is a batch of 2)
        return "raise" if ids.shape[0] == 3 and batched[0] == 4 else None  # the batch's 3rd decoding step

    fail_forward(engine, when)
    alone, together = run(alone_then_together(app, bodies))
    assert batched[0] == 4  # the three rows did run as one batch, which failed
    assert [r.status_code for r in together] == [200, 200], [r.text for r in together]
    assert texts(together) == texts(alone)  # greedy and seeded rows: the same text as alone


def test_a_row_that_fails_alone_gets_its_own_error_and_the_others_complete(adapters):
    app, engine = build([adapters["x"]], None, max_wait_ms=200)
    poison = engine.encode("zebra zebra zebra", special=False)[0]
    good = {"model": "x", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 1.0, "seed": 3}
    bad = {"model": "x", "prompt": "zebra zebra zebra", "max_tokens": 6}
    fail_forward(engine, lambda call, ids: "raise" if bool((ids == poison).any()) else None)

    async def go():
        async with client(app) as c:
            alone = await c.post("/v1/completions", json=good)
            together = await asyncio.gather(
                c.post("/v1/completions", json=good),
                c.post("/v1/completions", json=bad),
                c.post("/v1/completions", json=dict(good, stream=True)),
            )
            return alone, together, app.state.metrics.batch_rows.total

    alone, (ok, failed, streamed), batches = run(go())
    assert batches == 2  # the alone request, then the three together
    assert failed.status_code == 500
    assert ok.status_code == 200 and texts([ok]) == texts([alone])
    pieces = [line for line in streamed.text.split("\n\n") if line.startswith("data: {")]
    assert "error" not in streamed.text and streamed.text.endswith("data: [DONE]\n\n") and len(pieces) > 1


def test_a_sampling_failure_rewinds_the_other_rows_random_streams(adapters):
    app, engine = build([adapters["x"]], None, max_wait_ms=200)
    bodies = [{"model": "x", "prompt": p, "max_tokens": 8, "temperature": 1.0, "seed": 11} for p in PROMPTS]
    batched = [0]

    def when(call, ids):
        batched[0] += ids.shape[0] > 1
        # Row 1 samples from nan in the batch's 2nd decoding step, after row 0 drew from its stream.
        return "nan:1" if ids.shape[0] > 1 and batched[0] == 3 else None

    fail_forward(engine, when)
    alone, together = run(alone_then_together(app, bodies))
    assert batched[0] == 3
    assert [r.status_code for r in together] == [200, 200], [r.text for r in together]
    assert texts(together) == texts(alone)


def test_a_classify_batch_that_fails_is_retried_row_by_row(adapters):
    app, engine = build([adapters["a"], adapters["b"]], None, max_wait_ms=200)
    poison = engine.encode("zebra", special=False)[0]
    fail_forward(engine, lambda call, ids: "raise" if bool((ids == poison).any()) else None)
    jobs = [("a", "good film"), ("b", "zebra"), ("b", "bad phone"), (None, "so dull")]

    async def go():
        async with client(app) as c:
            post = lambda m, t: c.post("/v1/classify", json={"model": m, "input": t})  # noqa: E731
            alone = [await post(m, t) for m, t in jobs if t != "zebra"]
            together = await asyncio.gather(*[post(m, t) for m, t in jobs])
            return alone, together

    alone, together = run(go())
    assert [r.status_code for r in together] == [200, 500, 200, 200]
    kept = [r for r, (_, t) in zip(together, jobs) if t != "zebra"]
    for got, want in zip(kept, alone):
        torch.testing.assert_close(got.json()["data"][0]["probs"], want.json()["data"][0]["probs"], rtol=0, atol=1e-5)


def test_an_adapter_load_that_fails_unexpectedly_fails_only_its_rows(adapters, monkeypatch):
    import lorakit.serving.store as store_module

    app, engine = build([adapters["a"]], adapters["cls_root"], max_wait_ms=200)
    real = store_module.load_adapter

    def load_adapter(model, folder, name, **kwargs):
        if name == "c":
            raise MemoryError("out of memory while loading c")  # not the folder's fault
        return real(model, folder, name, **kwargs)

    monkeypatch.setattr(store_module, "load_adapter", load_adapter)

    async def go():
        async with client(app) as c:
            post = lambda m: c.post("/v1/classify", json={"model": m, "input": "good film"})  # noqa: E731
            return await asyncio.gather(post("a"), post("c"), post("d"))

    a, c, d = run(go())
    assert (a.status_code, c.status_code, d.status_code) == (200, 500, 200), c.text
    assert "memory" not in c.text and sorted(engine.store.loaded) == ["a", "d"]
    assert engine.store.failures == 1 and engine.store.entries["c"].error == "out of memory while loading c"
