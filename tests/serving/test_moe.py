"""Adapters on a Mixture-of-Experts model (fused 3-D experts) in the adapter store and in
`lorakit serve`: one mixed batch answers each row as its adapter alone, in either file layout."""

from __future__ import annotations

import asyncio

import pytest
import torch
from helpers import TINY_MODEL_N, VOCAB, assert_rounding_close
from served import build, client, run

import lorakit
from lorakit.cli.trained import load_trained
from lorakit.serving import AdapterStore
from lorakit.training.base_model import load_model

pytestmark = pytest.mark.numeric


def _alone(folder, ids: torch.Tensor) -> torch.Tensor:
    model, _, _ = load_trained(str(folder), None)
    with torch.no_grad():
        return model(ids).logits


def test_the_store_serves_moe_adapters_in_one_mixed_batch(moe, ids):
    model = load_model(str(moe["base"]), "causal-lm", None).eval()
    store = AdapterStore(model)
    for name in ("m1", "m2"):
        store.register(name, moe[name])
    assert store.acquire(["m1", "m2"]) == {}
    assert all(p.endswith(("gate_up_proj", "down_proj")) for p in lorakit.adapters(model)["m2"].modules)
    rows = (ids[:1] % len(VOCAB)).repeat(4, 1)
    with torch.no_grad(), lorakit.mixed_batch(model, ["m1", None, "m2", {"m1": 0.5, "m2": 0.5}]):
        mixed = model(rows).logits
    with torch.no_grad():
        base = load_model(str(moe["base"]), "causal-lm", None).eval()(rows[:1]).logits
    assert_rounding_close(mixed[0:1], _alone(moe["m1"], rows[:1]), n=TINY_MODEL_N)
    assert_rounding_close(mixed[1:2], base, n=TINY_MODEL_N)
    assert_rounding_close(mixed[2:3], _alone(moe["m2"], rows[:1]), n=TINY_MODEL_N)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3 and (mixed[3] - mixed[0]).abs().max() > 1e-4


def test_an_moe_adapter_that_does_not_fit_is_refused_at_register(moe, tmp_path):
    import json
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(moe["m1"], foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps(dict(config, target_parameters=["mlp.gate.weight"])))
    store = AdapterStore(load_model(str(moe["base"]), "causal-lm", None))
    with pytest.raises(
        lorakit.AdapterFileError,
        match=r"target_parameters=\['mlp.gate.weight'\] selects "
        r"'model.layers.0.mlp.gate.weight', which lorakit cannot adapt",
    ):
        store.register("foreign", foreign)
    assert store.entries == {}


def test_completions_on_moe_adapters_equal_generate_alone(moe):
    app, engine = build([moe["m1"], moe["m2"]], None, max_wait_ms=50)
    prompts = {"m1": "count from 3 :", "m2": "count from 11 :"}

    async def go():
        async with client(app) as c:
            return await asyncio.gather(
                *[
                    c.post("/v1/completions", json={"model": n, "prompt": p, "max_tokens": 4, "temperature": 0})
                    for n, p in prompts.items()
                ]
            )

    for (name, prompt), r in zip(prompts.items(), run(go())):
        assert r.status_code == 200, r.text
        model, tokenizer, _ = load_trained(str(moe[name]), None)
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=model.config.pad_token_id)
        want = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        assert r.json()["choices"][0]["text"] == want
    assert sorted(engine.store.loaded) == ["m1", "m2"]
