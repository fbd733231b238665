"""The sampling fields of /v1/completions and /v1/chat/completions end to end (the app in this
process, a tiny random Llama with adapter x): each field changes the answer as vLLM's does, logprobs
equal the model's log-softmax computed offline, and fields lorakit does not implement are 422."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from served import build, client, run

from lorakit.cli.trained import load_trained
from lorakit.serving.app import Settings, build_app

PROMPT = "count from 3 :"


def complete(engine, *bodies: dict) -> list:
    """The answers to `bodies`, posted at once (so they share batches) to /v1/completions, or to
    the chat endpoint for a body with messages; a fresh app (and batcher) over the engine."""
    app = build_app(engine, Settings(max_wait_ms=30))

    async def go():
        async with client(app) as c:
            return await asyncio.gather(
                *[
                    c.post("/v1/chat/completions" if "messages" in b else "/v1/completions", json={"model": "x", **b})
                    for b in bodies
                ]
            )

    return run(go())


def greedy_offline(folder, prompt_ids: list[int], steps: int) -> list[torch.Tensor]:
    """The adapter's model alone, no server: the log-softmax (float64) at each greedy step."""
    model, _, _ = load_trained(str(folder), None)
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(steps):
            logprobs = model(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
            out.append(logprobs)
            ids.append(int(logprobs.argmax()))
    return out


@pytest.fixture(scope="module")
def served(adapters):
    _, engine = build([adapters["x"]], None)
    return engine, adapters["x"]


def test_top_k_one_at_temperature_one_equals_greedy(served):
    engine, _ = served
    greedy, top1 = complete(
        engine,
        {"prompt": PROMPT, "max_tokens": 6, "temperature": 0},
        {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "top_k": 1, "n": 3, "seed": 4},
    )
    assert greedy.status_code == top1.status_code == 200, top1.text
    want = greedy.json()["choices"][0]["text"]
    assert [c["text"] for c in top1.json()["choices"]] == [want] * 3


def test_logit_bias_forces_a_token_and_leaves_its_batchmates_alone(served):
    engine, _ = served
    token = engine.tokenizer.convert_tokens_to_ids("good")
    (plain_alone,) = complete(engine, {"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    forced, plain = complete(
        engine,
        {"prompt": PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": 1, "logit_bias": {str(token): 100}},
        {"prompt": PROMPT, "max_tokens": 5, "temperature": 0},
    )
    choice = forced.json()["choices"][0]
    assert choice["text"] == engine.tokenizer.decode([token] * 5) and choice["finish_reason"] == "length"
    assert plain.json()["choices"] == plain_alone.json()["choices"]
    first = engine.tokenizer.encode(plain_alone.json()["choices"][0]["text"], add_special_tokens=False)[0]
    (banned,) = complete(
        engine, {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logit_bias": {str(first): -100}}
    )
    assert engine.tokenizer.encode(banned.json()["choices"][0]["text"], add_special_tokens=False)[0] != first


def test_completion_logprobs_equal_the_models_log_softmax(served):
    engine, folder = served
    steps = 5
    two, zero = complete(
        engine,
        {"prompt": PROMPT, "max_tokens": steps, "temperature": 0, "logprobs": 2},
        {"prompt": PROMPT, "max_tokens": steps, "temperature": 0, "logprobs": 0},
    )
    want = greedy_offline(folder, engine.encode(PROMPT), steps)
    for r, n in ((two, 2), (zero, 0)):
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == steps
        for k, logprobs in enumerate(want):
            chosen = int(logprobs.argmax())
            assert lp["tokens"][k] == engine.tokenizer.decode([chosen])
            assert abs(lp["token_logprobs"][k] - logprobs[chosen].item()) <= 1e-4 * max(1.0, abs(logprobs[chosen]))
            top = {engine.tokenizer.decode([t]): logprobs[t].item() for t in logprobs.topk(max(n, 1)).indices.tolist()}
            assert lp["top_logprobs"][k].keys() == top.keys()  # greedy: the chosen token is the first of the top n
            for text, value in top.items():
                assert abs(lp["top_logprobs"][k][text] - value) <= 1e-4 * max(1.0, abs(value))
        assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])


def test_chat_logprobs_and_top_logprobs(served):
    engine, folder = served
    messages = [{"role": "user", "content": "count from 3"}]
    three, none, off = complete(
        engine,
        {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3},
        {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True},
        {"messages": messages, "max_tokens": 4, "temperature": 0},
    )
    want = greedy_offline(folder, engine.chat_ids(messages), 4)
    content = three.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry, logprobs in zip(content, want):
        chosen = int(logprobs.argmax())
        assert entry["token"] == engine.tokenizer.decode([chosen]) and entry["bytes"] == list(entry["token"].encode())
        assert abs(entry["logprob"] - logprobs[chosen].item()) <= 1e-4 * max(1.0, abs(logprobs[chosen]))
        top = logprobs.topk(3)
        assert [t["token"] for t in entry["top_logprobs"]] == [engine.tokenizer.decode([t]) for t in top.indices]
        for t, value in zip(entry["top_logprobs"], top.values.tolist()):
            assert abs(t["logprob"] - value) <= 1e-4 * max(1.0, abs(value))
    assert [e["top_logprobs"] for e in none.json()["choices"][0]["logprobs"]["content"]] == [[]] * 4
    assert off.json()["choices"][0]["logprobs"] is None


def test_streamed_logprobs_equal_the_whole_answers(served):
    engine, _ = served
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 1, "stop": ["zzz"]}
    whole, streamed = complete(engine, body, dict(body, stream=True))
    chunks = [json.loads(e[len("data: ") :]) for e in streamed.text.split("\n\n") if e and e != "data: [DONE]"]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    got = {
        key: [v for p in parts for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    }
    assert got == whole.json()["choices"][0]["logprobs"]


def test_min_tokens_ignore_eos_and_stop_token_ids_set_the_length(served):
    engine, _ = served
    eos = engine.tokenizer.eos_token_id
    force_eos = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logit_bias": {str(eos): 100}}
    at_once, later, ignored, greedy = complete(
        engine,
        force_eos,
        dict(force_eos, min_tokens=3),
        dict(force_eos, ignore_eos=True),
        {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0},
    )
    assert at_once.json()["choices"][0]["finish_reason"] == "stop" and at_once.json()["usage"]["completion_tokens"] == 1
    assert at_once.json()["choices"][0]["text"] == ""
    assert later.json()["choices"][0]["finish_reason"] == "stop" and later.json()["usage"]["completion_tokens"] == 4
    assert (
        ignored.json()["choices"][0]["finish_reason"] == "length" and ignored.json()["usage"]["completion_tokens"] == 6
    )
    tokens = [engine.tokenizer.convert_tokens_to_ids(t) for t in greedy.json()["choices"][0]["logprobs"]["tokens"]]
    stop = tokens[2]
    (cut,) = complete(engine, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stop_token_ids": [stop]})
    choice = cut.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert cut.json()["usage"]["completion_tokens"] == tokens.index(stop) + 1
    assert choice["text"] == engine.tokenizer.decode(tokens[: tokens.index(stop) + 1])  # the stop token stays


@pytest.mark.parametrize(
    "field, value",
    [
        ("echo", True),
        ("best_of", 3),
        ("use_beam_search", True),
        ("suffix", "x"),
        ("prompt_logprobs", 1),
        ("guided_json", {"type": "object"}),
        ("response_format", {"type": "json_object"}),
        ("bad_words", ["a"]),
        ("allowed_token_ids", [4]),
        ("include_stop_str_in_output", True),
        ("skip_special_tokens", False),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("add_special_tokens", False),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_by_name(served, field, value):
    engine, _ = served
    (r,) = complete(engine, {"prompt": PROMPT, "max_tokens": 2, field: value})
    assert r.status_code == 422 and f"'{field}'" in r.json()["error"]["message"], r.text


def test_neutral_values_and_unknown_fields_are_accepted(served):
    engine, _ = served
    neutral = {
        "echo": False,
        "best_of": 1,
        "use_beam_search": False,
        "response_format": {"type": "text"},
        "skip_special_tokens": True,
        "user": "me",
        "some_future_field": 3,
        "top_k": -1,
        "min_p": 0,
    }
    r, base = complete(
        engine,
        {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, **neutral},
        {"prompt": PROMPT, "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200 and r.json()["choices"] == base.json()["choices"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"100000": 1}}, "logit_bias"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [100000]}, "stop_token_ids"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_sampling_values_are_422_naming_the_field(served, body, field):
    engine, _ = served
    (r,) = complete(engine, {"max_tokens": 2, **({} if "messages" in body else {"prompt": PROMPT}), **body})
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"] or r.json()["error"]["param"] == field, r.text


def test_stop_strings_wait_for_min_tokens(served):
    engine, _ = served
    (greedy,) = complete(engine, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 0})
    tokens = greedy.json()["choices"][0]["logprobs"]["tokens"]
    text = greedy.json()["choices"][0]["text"]
    stop = tokens[1]
    early, late = complete(
        engine,
        {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": [stop]},
        {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": [stop], "min_tokens": 3},
    )
    assert early.json()["choices"][0]["text"] == text[: text.find(stop)]
    # vLLM: a stop string is looked for only in text that comes after the first min_tokens tokens.
    kept = late.json()["choices"][0]["text"]
    assert kept.startswith(engine.tokenizer.decode([engine.tokenizer.convert_tokens_to_ids(t) for t in tokens[:3]]))
    assert late.json()["usage"]["completion_tokens"] > 3
