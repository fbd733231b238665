"""The HTTP app in this process (httpx.ASGITransport): answers pinned to the adapters run alone
offline, vLLM's shapes, dynamic batching, every error status, path confinement, the API key."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest
import torch
from helpers import LABELS, TINY_MODEL_N, assert_rounding_close, make_adapter
from served import build, client, run

from lorakit.cli.trained import load_trained
from lorakit.serving.app import confine


def offline_probs(folder, texts: list[str]) -> list[list[float]]:
    """Each text alone through the base model with `folder`'s adapter, no server, no mixed batch."""
    model, tokenizer, _ = load_trained(str(folder), None)
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            out.append(model(**enc).logits.float().softmax(-1)[0].tolist())
    return out


def offline_text(folder, prompt: str, max_tokens: int) -> str:
    model, tokenizer, _ = load_trained(str(folder), None)
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def close(got: list[float], want: list[float]) -> None:
    assert_rounding_close(torch.tensor(got), torch.tensor(want), n=TINY_MODEL_N)


# ---- classify ------------------------------------------------------------------------------


def test_classify_answers_like_each_adapter_alone(adapters):
    app, engine = build([adapters["a"], adapters["b"]], adapters["cls_root"])
    texts = ["good film", "the phone was very bad", "quite dull and broken"]

    async def go():
        async with client(app) as c:
            answers = {}
            for name in ("a", "b", "c"):  # c is under --adapter-root: loaded on first use
                r = await c.post("/v1/classify", json={"model": name, "input": texts})
                assert r.status_code == 200, r.text
                answers[name] = r.json()
            alias = await c.post("/classify", json={"model": "a", "input": texts[0]})
            return answers, alias.json()

    answers, alias = run(go())
    for name, body in answers.items():
        assert body["object"] == "list" and body["model"] == name and body["id"].startswith("classify-")
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        for d, want in zip(body["data"], offline_probs(adapters[name], texts)):
            close(d["probs"], want)
            assert d["num_classes"] == 2 and d["label"] == LABELS[max(range(2), key=want.__getitem__)]
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    close(alias["data"][0]["probs"], answers["a"]["data"][0]["probs"])


def test_concurrent_requests_over_many_adapters_run_as_mixed_batches(adapters):
    app, engine = build([adapters["a"], adapters["b"]], adapters["cls_root"], max_wait_ms=50)
    texts = ["good film", "bad phone", "the food was nice", "awful", "so so dull", "really superb"]
    names = ["a", "b", "c", "d", None]
    jobs = [(names[i % 5], texts[i % 6]) for i in range(30)]

    async def go():
        async with client(app) as c:
            rs = await asyncio.gather(*[c.post("/v1/classify", json={"model": m, "input": t}) for m, t in jobs])
            return rs, (await c.get("/metrics")).text

    responses, metrics = run(go())
    assert [r.status_code for r in responses] == [200] * 30
    for name in "abcd":
        want = dict(zip(texts, offline_probs(adapters[name], texts)))
        for (m, t), r in zip(jobs, responses):
            if m == name:
                close(r.json()["data"][0]["probs"], want[t])
    batches = next(line for line in metrics.splitlines() if line.startswith("lorakit_batch_rows_count"))
    assert int(batches.split()[-1]) < 30  # requests shared batches
    assert 'lorakit_requests_total{endpoint="/v1/classify",status="200"} 30' in metrics


def test_a_weighted_mix_of_adapters(adapters):
    app, engine = build([adapters["a"], adapters["b"]], None)

    async def go():
        async with client(app) as c:
            mix = await c.post("/v1/classify", json={"adapters": {"a": 0.5, "b": 0.5}, "input": "good film"})
            base = await c.post("/v1/classify", json={"input": "good film"})
            wrong = await c.post("/v1/classify", json={"model": "a", "adapters": {"b": 1.0}, "input": "x"})
            return mix, base, wrong

    mix, base, wrong = run(go())
    assert mix.status_code == 200 and mix.json()["model"] == engine.base_id
    assert base.status_code == 200
    assert mix.json()["data"][0]["probs"] != base.json()["data"][0]["probs"]
    assert wrong.status_code == 422 and "adapters" in wrong.json()["error"]["message"]


def test_models_lists_the_base_and_every_adapter(adapters):
    app, engine = build([adapters["a"]], adapters["cls_root"])

    async def go():
        async with client(app) as c:
            return (await c.get("/v1/models")).json()

    body = run(go())
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {engine.base_id, "a", "c", "d"}
    assert cards[engine.base_id]["parent"] is None and cards[engine.base_id]["max_model_len"] == engine.max_length
    assert all(cards[n]["parent"] == engine.base_id for n in "acd")


# ---- errors --------------------------------------------------------------------------------


def test_every_error_status(adapters):
    app, engine = build([adapters["a"]], None, max_queue=2, max_body_bytes=2000)

    async def go():
        async with client(app) as c:
            post = lambda body, **kw: c.post("/v1/classify", json=body, **kw)  # noqa: E731
            return {
                "unknown": await post({"model": "nope", "input": "good"}),
                "missing": await post({"model": "a"}),
                "types": await post({"model": "a", "input": 3}),
                "empty": await post({"model": "a", "input": []}),
                "json": await c.post(
                    "/v1/classify", content=b"{not json", headers={"content-type": "application/json"}
                ),
                "body": await post({"model": "a", "input": "good " * 500}),
                "tokens": await post({"model": "a", "input": "good " * 100}),
                "queue": await post({"model": "a", "input": ["good", "bad", "fine"]}),
                "route": await c.get("/v1/nothing"),
                "unsupported": await c.post("/v1/completions", json={"prompt": "x", "echo": True}),
                "after": await post({"model": "a", "input": "good"}),
            }

    r = run(go())
    assert r["unknown"].status_code == 404
    err = r["unknown"].json()["error"]
    assert err["type"] == "NotFoundError" and err["code"] == 404 and err["param"] == "model"
    assert "`nope`" in err["message"] and "a" in err["message"] and engine.base_id in err["message"]
    for key in ("missing", "types", "empty", "json", "unsupported"):
        assert r[key].status_code == 422, (key, r[key].text)
        assert r[key].json()["error"]["type"] == "UnprocessableEntityError"
    assert "input" in r["missing"].json()["error"]["message"]
    assert r["body"].status_code == 413 and "2000 bytes" in r["body"].json()["error"]["message"]
    assert r["tokens"].status_code == 413 and "maximum context of 64 tokens" in r["tokens"].json()["error"]["message"]
    assert r["queue"].status_code == 413 and "retry-after" not in r["queue"].headers  # more rows than fit
    assert (
        "3 rows" in r["queue"].json()["error"]["message"]
        and "2 the server queues (--max-queue)" in (r["queue"].json()["error"]["message"])
    )
    assert r["route"].status_code == 404 and "error" in r["route"].json()
    assert r["after"].status_code == 200  # and the server goes on


def test_a_full_queue_answers_429_while_the_model_is_busy(adapters):
    app, engine = build([adapters["a"]], None, max_queue=4, max_batch=1, max_wait_ms=0)
    slow = engine.classify

    def classify(rows):
        import time

        time.sleep(0.05)
        return slow(rows)

    engine.classify = classify

    async def go():
        async with client(app) as c:
            return await asyncio.gather(
                *[c.post("/v1/classify", json={"model": "a", "input": "good"}) for _ in range(20)]
            )

    codes = [r.status_code for r in run(go())]
    assert 200 in codes and 429 in codes and set(codes) == {200, 429}


def test_a_bad_adapter_fails_its_own_requests_and_nothing_else(adapters, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(adapters["cls_root"], root)
    (root / "d" / "adapter_model.safetensors").write_bytes(b"\x00garbage")  # registering reads only the config
    app, engine = build([adapters["a"]], root)

    async def go():
        async with client(app) as c:
            both = await asyncio.gather(
                c.post("/v1/classify", json={"model": "d", "input": "good"}),
                c.post("/v1/classify", json={"model": "c", "input": "good"}),
            )
            again = await c.post("/v1/classify", json={"model": "a", "input": "good"})
            return both, again

    (bad, good), again = run(go())
    assert bad.status_code == 422
    message = bad.json()["error"]["message"]
    assert "adapter_model.safetensors" in message and "not a readable safetensors file" in message
    assert good.status_code == 200 and again.status_code == 200
    assert "d" not in engine.store.loaded


# ---- loading at run time, and where from ---------------------------------------------------


def test_load_and_unload_adapters_at_run_time(adapters, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    app, engine = build([adapters["a"]], root)
    # Folders that appear after the server started:
    make_adapter(adapters["bert"], root / "new", "classify", seed=9)
    shutil.copytree(adapters["c"], root / "broken")
    (root / "broken" / "adapter_config.json").write_text("{")
    outside = tmp_path / "outside"
    shutil.copytree(adapters["d"], outside)
    os.symlink(outside, root / "link")

    async def go():
        async with client(app) as c:
            load = lambda name, path: c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})  # noqa
            out = {
                "loaded": await load("fresh", "new"),
                "classify": await c.post("/v1/classify", json={"model": "fresh", "input": "good"}),
                "again": await load("fresh", "new"),
                "base": await load(engine.base_id, "new"),
                "dotdot": await load("up", "new/../new"),
                "absolute": await load("abs", str(outside)),
                "symlink": await load("sym", "link"),
                "missing": await load("gone", "nothing-here"),
                "broken": await load("broken", "broken"),
                "unload_unknown": await c.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}),
                "unload": await c.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}),
                "after": await c.post("/v1/classify", json={"model": "fresh", "input": "good"}),
                "still": await c.post("/v1/classify", json={"model": "a", "input": "good"}),
            }
            return out

    r = run(go())
    assert r["loaded"].status_code == 200 and r["loaded"].text == "Success: LoRA adapter 'fresh' added successfully."
    assert r["classify"].status_code == 200
    assert r["again"].status_code == 400 and "already been loaded" in r["again"].json()["error"]["message"]
    assert r["base"].status_code == 400
    for key in ("dotdot", "absolute", "symlink"):
        assert r[key].status_code == 403, key
    assert "outside the adapter root" in r["symlink"].json()["error"]["message"]
    assert r["missing"].status_code == 404
    assert r["broken"].status_code == 400 and "adapter_config.json" in r["broken"].json()["error"]["message"]
    assert "broken" not in engine.store.entries
    assert r["unload_unknown"].status_code == 404
    assert r["unload"].status_code == 200 and r["unload"].text == "Success: LoRA adapter 'fresh' removed successfully."
    assert r["after"].status_code == 404 and r["still"].status_code == 200


def test_run_time_loading_needs_an_adapter_root(adapters):
    app, _ = build([adapters["a"]], None)

    async def go():
        async with client(app) as c:
            return await c.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adapters["c"])})

    r = run(go())
    assert r.status_code == 403 and "--adapter-root" in r.json()["error"]["message"]


def test_confine_keeps_paths_inside_the_root(tmp_path):
    from lorakit.serving.app import Problem

    (tmp_path / "root" / "ok").mkdir(parents=True)
    assert confine(tmp_path / "root", "ok") == (tmp_path / "root" / "ok").resolve()
    assert confine(tmp_path / "root", str(tmp_path / "root" / "ok")) == (tmp_path / "root" / "ok").resolve()
    for bad in ("../root/ok", "ok/../../x", str(tmp_path), "/etc"):
        with pytest.raises(Problem):
            confine(tmp_path / "root", bad)


# ---- the API key, health, metrics ----------------------------------------------------------


def test_the_api_key_guards_every_endpoint_but_health(adapters):
    app, _ = build([adapters["a"]], None, api_key="s3cret")

    async def go():
        async with client(app) as c:
            body = {"model": "a", "input": "good"}
            return (
                await c.post("/v1/classify", json=body),
                await c.post("/v1/classify", json=body, headers={"Authorization": "Bearer wrong"}),
                await c.post("/v1/classify", json=body, headers={"Authorization": "Bearer s3cret"}),
                await c.get("/v1/models"),
                await c.get("/health"),
            )

    none, wrong, right, models, health = run(go())
    assert none.status_code == wrong.status_code == models.status_code == 401
    assert none.json()["error"]["type"] == "AuthenticationError"
    assert right.status_code == 200 and health.status_code == 200 and health.content == b""


def test_health_and_requests_say_503_once_batches_no_longer_run(adapters):
    app, _ = build([adapters["a"]], None)

    async def go():
        async with client(app) as c:
            before = await c.get("/health")
            app.state.batcher._task.cancel()  # as if the loop had died
            await asyncio.sleep(0.01)
            return before, await c.get("/health"), await c.post("/v1/classify", json={"model": "a", "input": "good"})

    before, after, request = run(go())
    assert before.status_code == 200 and after.status_code == 503
    assert request.status_code == 503 and "batch loop has stopped" in request.json()["error"]["message"]


def test_metrics_in_prometheus_text(adapters):
    app, _ = build([adapters["a"]], None)

    async def go():
        async with client(app) as c:
            await c.post("/v1/classify", json={"model": "a", "input": "good"})
            await c.post("/v1/classify", json={"model": "zz", "input": "good"})
            return await c.get("/metrics")

    r = run(go())
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for needle in (
        'lorakit_requests_total{endpoint="/v1/classify",status="200"} 1',
        'lorakit_requests_total{endpoint="/v1/classify",status="404"} 1',
        "lorakit_request_errors_total 1",
        "lorakit_queue_depth 0",
        "lorakit_batch_rows_count 1",
        'lorakit_request_duration_seconds_count{endpoint="/v1/classify"} 2',
        "lorakit_adapters_loaded 1",
    ):
        assert needle in text, needle


# ---- generation ----------------------------------------------------------------------------


def test_completions_equal_generate_with_the_adapter_alone(adapters):
    app, engine = build([adapters["x"]], adapters["lm_root"], max_wait_ms=50)
    prompts = {"x": "count from 3 :", "y": "count from 11 :"}
    lengths = {"x": 2, "y": 7}  # a short row leaves the batch while the other goes on

    async def go():
        async with client(app) as c:
            return await asyncio.gather(
                *[
                    c.post(
                        "/v1/completions", json={"model": n, "prompt": p, "max_tokens": lengths[n], "temperature": 0}
                    )
                    for n, p in prompts.items()
                ]
            )

    responses = run(go())
    for (name, prompt), r in zip(prompts.items(), responses):
        body = r.json()
        assert r.status_code == 200 and body["object"] == "text_completion" and body["model"] == name
        choice = body["choices"][0]
        assert choice["text"] == offline_text(adapters[name], prompt, lengths[name])
        assert choice["finish_reason"] in ("length", "stop") and choice["index"] == 0
        assert body["usage"]["completion_tokens"] <= lengths[name]
    assert sorted(engine.store.loaded) == ["x", "y"]
    assert app.state.metrics.batch_rows.total == 1  # one mixed batch; the short row left it early


def test_streaming_gives_the_same_text_as_sse(adapters):
    app, _ = build([adapters["x"]], None)
    body = {"model": "x", "prompt": "count from 3 :", "max_tokens": 6, "temperature": 0}

    async def go():
        async with client(app) as c:
            whole = await c.post("/v1/completions", json=body)
            streamed = await c.post(
                "/v1/completions", json=dict(body, stream=True, stream_options={"include_usage": True})
            )
            chat = await c.post(
                "/v1/chat/completions",
                json={
                    "model": "x",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "temperature": 0,
                    "stream": True,
                },
            )
            return whole, streamed, chat

    whole, streamed, chat = run(go())
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [e[len("data: ") :] for e in streamed.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole.json()["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.json()["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole.json()["choices"][0]["finish_reason"]
    chat_chunks = [json.loads(e[len("data: ") :]) for e in chat.text.split("\n\n") if e and e != "data: [DONE]"]
    assert chat_chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat_chunks[0]["object"] == "chat.completion.chunk"


def test_sampling_with_a_seed_repeats_and_n_gives_several_choices(adapters):
    app, _ = build([adapters["x"]], None)
    body = {
        "model": "x",
        "prompt": ["count from 3 :", "count from 5 :"],
        "max_tokens": 5,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 7,
        "n": 2,
    }

    async def go():
        async with client(app) as c:
            first = await c.post("/v1/completions", json=body)
            # The same request in a batch with another one: a row's seed is its own.
            second, _ = await asyncio.gather(
                c.post("/v1/completions", json=body), c.post("/v1/completions", json=dict(body, seed=99))
            )
            return first, second

    first, second = run(go())
    assert [c["index"] for c in first.json()["choices"]] == [0, 1, 2, 3]
    assert first.json()["choices"] == second.json()["choices"]


def test_stop_strings_end_the_text(adapters):
    app, _ = build([adapters["x"]], None)

    async def go():
        async with client(app) as c:
            base = await c.post(
                "/v1/completions", json={"model": "x", "prompt": "count from 3 :", "max_tokens": 6, "temperature": 0}
            )
            text = base.json()["choices"][0]["text"]
            stop = text.split()[1]
            cut = await c.post(
                "/v1/completions",
                json={"model": "x", "prompt": "count from 3 :", "max_tokens": 6, "temperature": 0, "stop": [stop]},
            )
            return text, stop, cut.json()["choices"][0]

    text, stop, choice = run(go())
    assert choice["text"] == text[: text.find(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop


def test_each_server_serves_its_task(adapters):
    lm, _ = build([adapters["x"]], None)
    cls, _ = build([adapters["a"]], None)

    async def go():
        async with client(lm) as c:
            a = await c.post("/v1/classify", json={"input": "good"})
        async with client(cls) as c:
            b = await c.post("/v1/completions", json={"prompt": "good"})
        return a, b

    a, b = run(go())
    assert a.status_code == 404 and "/v1/completions" in a.json()["error"]["message"]
    assert b.status_code == 404 and "/v1/classify" in b.json()["error"]["message"]


# ---- one request never fails another -------------------------------------------------------


def test_a_zero_weight_adds_nothing_even_for_an_adapter_not_loaded(adapters):
    app, engine = build([adapters["a"]], adapters["cls_root"])  # c and d registered, not loaded

    async def go():
        async with client(app) as c:
            post = lambda body: c.post("/v1/classify", json=dict(body, input="good film"))  # noqa: E731
            return (
                await post({"adapters": {"a": 1.0, "c": 0.0}}),
                await post({"model": "a"}),
                await post({"adapters": {"d": 0}}),
                await post({}),
            )

    mixed, alone, zero, base = run(go())
    assert mixed.status_code == 200 and zero.status_code == 200, (mixed.text, zero.text)
    close(mixed.json()["data"][0]["probs"], alone.json()["data"][0]["probs"])
    close(zero.json()["data"][0]["probs"], base.json()["data"][0]["probs"])
    assert engine.store.loaded == ["a"]  # nothing was loaded for a weight of 0


def test_concurrent_unloads_of_one_name_succeed_once(adapters):
    app, engine = build([adapters["a"]], adapters["cls_root"])

    async def go():
        async with client(app) as c:
            await c.post("/v1/classify", json={"model": "c", "input": "good"})  # loaded: unloading has work
            unload = lambda: c.post("/v1/unload_lora_adapter", json={"lora_name": "c"})  # noqa: E731
            load = {"lora_name": "e", "lora_path": "d"}
            loads = await asyncio.gather(*[c.post("/v1/load_lora_adapter", json=load) for _ in range(20)])
            return await asyncio.gather(*[unload() for _ in range(40)]), loads

    unloads, loads = run(go())
    codes = sorted(r.status_code for r in unloads)
    assert codes == [200] + [404] * 39, [r.text for r in unloads if r.status_code not in (200, 404)]
    assert "c" not in engine.store.entries and "c" not in engine.store.loaded
    assert sorted(r.status_code for r in loads) == [200] + [400] * 19
    assert all("already been loaded" in r.json()["error"]["message"] for r in loads if r.status_code == 400)


def test_a_request_larger_than_the_queue_is_413_naming_the_limit(adapters):
    lm, _ = build([adapters["x"]], None, max_queue=8)
    cls, _ = build([adapters["a"]], None, max_queue=8)

    async def go():
        async with client(lm) as c:  # an empty server: 429 would be a lie, and clients retry it for ever
            many = await c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1})
            fits = await c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 4, "max_tokens": 1})
        async with client(cls) as c:
            inputs = await c.post("/v1/classify", json={"input": ["good"] * 9})
        return many, fits, inputs

    many, fits, inputs = run(go())
    assert fits.status_code == 200
    for r, rows in ((many, 9), (inputs, 9)):
        assert r.status_code == 413 and "retry-after" not in r.headers
        message = r.json()["error"]["message"]
        assert f"{rows} rows" in message and "8 the server queues (--max-queue)" in message
