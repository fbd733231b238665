"""mixed_batch: each row through its own adapters, pinned row by row to that adapter alone."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import randomize_adapter, tiny_model

import lorakit
from lorakit.adapting import mixed

pytestmark = pytest.mark.numeric  # pins float32 numbers to references (helpers.assert_rounding_close)


def _add(model, name: str, seed: int, **config) -> None:
    lorakit.add_adapter(model, name, lorakit.LoraConfig(**config))
    randomize_adapter(model, name, seed=seed)
    for module in model.modules():  # trained heads differ per adapter too
        if isinstance(module, lorakit.adapting.saved_modules.SavedModule) and name in module.copies:
            with torch.no_grad():
                for p in module.copies[name].parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)


def _classifier():
    """A tiny BERT classifier with three adapters of different ranks and targets, each with its head."""
    model = tiny_model("bert", num_labels=3)
    _add(model, "a", 1, rank=4, targets="all-linear", modules_to_save=["classifier"])
    _add(model, "b", 2, rank=8, targets="attention", modules_to_save=["classifier"])
    _add(model, "c", 3, rank=2, alpha=6, targets=["query", "value", "word_embeddings"], rank_pattern={"value": 3})
    return model.eval()


def _alone(model, route, inputs: dict) -> torch.Tensor:
    """The output of the whole batch with only `route` applied (None: the base model)."""
    with torch.no_grad():
        if route is None:
            with lorakit.disabled(model):
                return model(**inputs).logits
        lorakit.set_adapter(model, route)
        return model(**inputs).logits


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale


def _assert_rows_alone(model, routes, got: torch.Tensor, inputs: dict) -> None:
    """Row i of `got` equals routes[i] alone on that row; a base row to the bit."""
    for row, route in enumerate(routes):
        want = _alone(model, route, inputs)[row]
        if route is None:
            assert torch.equal(got[row], want)
        else:
            _close(got[row], want)


def test_each_row_equals_its_adapter_alone_and_base_rows_are_bitwise_base():
    model = _classifier()
    ids = torch.randint(0, 120, (6, 11), generator=torch.Generator().manual_seed(0))
    routes = ["a", None, "b", "c", "a", "b"]
    with torch.no_grad(), lorakit.mixed_batch(model, routes):
        got = model(input_ids=ids).logits
    _assert_rows_alone(model, routes, got, {"input_ids": ids})
    assert all(m.routing is None for m in model.modules() if hasattr(m, "routing"))


def test_the_batched_path_agrees_with_the_plain_per_adapter_path(monkeypatch):
    model = _classifier()
    ids = torch.randint(0, 120, (4, 7), generator=torch.Generator().manual_seed(1))
    routes = ["b", {"a": 0.5, "c": 2.0}, "c", None]
    with torch.no_grad(), lorakit.mixed_batch(model, routes):
        batched = model(input_ids=ids).logits
    monkeypatch.setattr(mixed.MixedBatch, "_fast_ok", staticmethod(lambda layer, x: False))
    with torch.no_grad(), lorakit.mixed_batch(model, routes):
        plain = model(input_ids=ids).logits
    _close(batched, plain)


def test_weighted_mix_is_the_weighted_sum_of_deltas():
    model = tiny_model("llama")
    for i, name in enumerate("abc"):
        _add(model, name, i + 1, rank=4 + 4 * i, targets="all-linear")
    model.eval()
    ids = torch.randint(0, 120, (3, 8), generator=torch.Generator().manual_seed(2))
    routes = [{"a": 0.7, "b": 0.3}, "c", {"c": -0.5}]
    with torch.no_grad(), lorakit.mixed_batch(model, routes):
        got = model(input_ids=ids).logits
    layers = [m for m in model.modules() if isinstance(m, lorakit.LoraLayer)]
    for row, route in enumerate(routes):
        weights = route if isinstance(route, dict) else {route: 1.0}
        saved = [dict(layer.scaling) for layer in layers]
        for layer in layers:  # the reference: every adapter active at once, its scaling times its weight
            for name, w in weights.items():
                if name in layer.scaling:
                    layer.scaling[name] *= w
        try:
            want = _alone(model, list(weights), {"input_ids": ids})[row]
        finally:
            for layer, scaling in zip(layers, saved):
                layer.scaling = scaling
                layer._changed()
        _close(got[row], want)


def test_a_uniform_batch_takes_the_single_adapter_path_bitwise():
    model = _classifier()
    ids = torch.randint(0, 120, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), lorakit.mixed_batch(model, ["a"] * 3):
        got = model(input_ids=ids).logits
    assert torch.equal(got, _alone(model, "a", {"input_ids": ids}))


def _lm(kind: str = "llama", b_rank: int = 8, b_targets: str = "attention"):
    """A tiny causal LM with adapters a (rank 4, every linear layer) and b."""
    model = tiny_model(kind)
    _add(model, "a", 1, rank=4, targets="all-linear")
    _add(model, "b", 2, rank=b_rank, targets=b_targets)
    return model.eval()


def _generated_alone(model, route, ids: torch.Tensor, kw: dict, seed: int | None = None) -> torch.Tensor:
    """`generate` with only `route` applied (None: the base model)."""
    with lorakit.disabled(model) if route is None else contextlib.nullcontext():
        if route is not None:
            lorakit.set_adapter(model, route)
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(ids, **kw)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_routes_every_step(kind):
    model = _lm(kind)
    ids = torch.randint(4, 120, (3, 5), generator=torch.Generator().manual_seed(4))
    routes = ["b", None, "a"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with lorakit.mixed_batch(model, routes):
        got = model.generate(ids, **kw)
    for row, route in enumerate(routes):
        assert torch.equal(got[row], _generated_alone(model, route, ids, kw)[row]), (row, route)


def test_sampling_with_copies_follows_each_rows_route():
    model = _lm(b_rank=2, b_targets="all-linear")
    ids = torch.randint(4, 120, (2, 5), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=5, do_sample=True, top_k=0, num_return_sequences=3, pad_token_id=0)
    torch.manual_seed(11)
    with lorakit.mixed_batch(model, ["a", "b"]):
        got = model.generate(ids, **kw)
    assert got.shape[0] == 6
    for row, route in enumerate(["a", "b"]):
        copies = slice(3 * row, 3 * row + 3)
        assert torch.equal(got[copies], _generated_alone(model, route, ids, kw, seed=11)[copies]), route


def test_beam_search_keeps_each_rows_beams_on_its_route():
    model = _lm()
    ids = torch.randint(4, 120, (3, 5), generator=torch.Generator().manual_seed(7))
    routes = ["a", "b", None]
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
    with lorakit.mixed_batch(model, routes):
        got = model.generate(ids, **kw)
    assert got.shape[0] == 6
    for row, route in enumerate(routes):
        copies = slice(2 * row, 2 * row + 2)
        assert torch.equal(got[copies], _generated_alone(model, route, ids, kw)[copies]), route


def test_reroute_between_forwards():
    model = _classifier()
    ids = torch.randint(0, 120, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), lorakit.mixed_batch(model, ["a", "b"]) as batch:
        model(input_ids=ids)
        batch.reroute(["c", None])
        got = model(input_ids=ids).logits
    _close(got[0], _alone(model, "c", {"input_ids": ids})[0])
    assert torch.equal(got[1], _alone(model, None, {"input_ids": ids})[1])


def test_unknown_names_and_bad_routes_fail_before_any_change():
    model = _classifier()
    with pytest.raises(ValueError, match=r"no adapter named 'zzz'; the model has \['a', 'b', 'c'\]"):
        with lorakit.mixed_batch(model, ["a", "zzz"]):
            pass
    with pytest.raises(ValueError, match="weight of 'a' must be a finite number"):
        with lorakit.mixed_batch(model, [{"a": float("nan")}]):
            pass
    for bad in ("a", [], [3]):
        with pytest.raises(ValueError):
            with lorakit.mixed_batch(model, bad):
                pass
    assert all(m.routing is None for m in model.modules() if hasattr(m, "routing"))


def test_training_mode_and_merged_weights_are_refused():
    model = _classifier()
    model.train()
    with pytest.raises(RuntimeError, match="model.eval"):
        with lorakit.mixed_batch(model, ["a"]):
            pass
    model.eval()
    with lorakit.mixed_batch(model, ["a", "b"]):
        model.train()
        with pytest.raises(RuntimeError, match="model.eval"):
            model(input_ids=torch.zeros(2, 3, dtype=torch.long))
    model.eval()
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        with lorakit.mixed_batch(model, ["a"]):
            pass


def test_a_batch_that_is_no_multiple_of_the_routes_is_an_error():
    model = _classifier()
    with lorakit.mixed_batch(model, ["a", "b"]), pytest.raises(ValueError, match="3 rows, but there are 2 routes"):
        model(input_ids=torch.zeros(3, 4, dtype=torch.long))


def test_nested_blocks_are_refused():
    model = _classifier()
    with lorakit.mixed_batch(model, ["a"]), pytest.raises(RuntimeError, match="already inside"):
        with lorakit.mixed_batch(model, ["b"]):
            pass
    assert all(m.routing is None for m in model.modules() if hasattr(m, "routing"))


def test_inside_disabled_every_row_is_the_base_model():
    """lorakit.disabled wins, nested or not: rows routed to adapters give the base model bitwise."""
    model = _classifier()
    ids = torch.randint(0, 120, (3, 6), generator=torch.Generator().manual_seed(8))
    base = _alone(model, None, {"input_ids": ids})
    with torch.no_grad(), lorakit.disabled(model), lorakit.disabled(model):
        with lorakit.mixed_batch(model, ["a", {"b": 0.5, "c": 0.5}, None]):
            got = model(input_ids=ids).logits
    assert torch.equal(got, base)


def test_dora_adapters_route_beside_lora_ones():
    """A DoRA row rescales its base output (its layers leave the batched path): each row still
    equals its adapter alone, and a mix is the base plus the weighted sum of each one's change."""
    model = tiny_model("llama")
    _add(model, "d", 1, rank=4, targets="all-linear", use_dora=True)
    _add(model, "e", 2, rank=8, targets=["q_proj", "v_proj", "embed_tokens"], use_dora=True)
    _add(model, "l", 3, rank=2, targets="attention")
    model.eval()
    ids = torch.randint(0, 120, (5, 7), generator=torch.Generator().manual_seed(4))
    routes = ["d", None, "l", "e", "d"]
    with torch.no_grad(), lorakit.mixed_batch(model, routes):
        got = model(input_ids=ids).logits
    _assert_rows_alone(model, routes, got, {"input_ids": ids})
    # A mix of a DoRA and a LoRA adapter on a single layer: base + 0.6 change_d + 0.4 change_l.
    layer = next(m for m in model.modules() if isinstance(m, lorakit.LoraLinear) and {"d", "l"} <= set(m.scaling))
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = layer.base_layer(x)
        changes = {}
        for name in ("d", "l"):
            lorakit.set_adapter(model, name)
            changes[name] = layer(x) - base
        with lorakit.mixed_batch(model, [{"d": 0.6, "l": 0.4}, "d"]):
            mixed_out = layer(x)
    _close(mixed_out[0], base[0] + 0.6 * changes["d"][0] + 0.4 * changes["l"][0])
    _close(mixed_out[1], base[1] + changes["d"][1])


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])  # a bias, Conv1D (fan_in_fan_out), no bias
@pytest.mark.parametrize("alphas", [(8, 8), (8, 20)])  # one scaling for every row, or one per row
def test_every_row_adapted_writes_the_delta_before_the_base_matmul(kind, alphas, monkeypatch):
    """When every row has an adapter of one rank on a layer, the delta and the bias are written
    first and the base matmul accumulates onto them; each row still equals its adapter alone."""
    model = tiny_model(kind)
    _add(model, "a", 1, rank=4, alpha=alphas[0], targets="all-linear")
    _add(model, "b", 2, rank=4, alpha=alphas[1], targets="all-linear")
    model.eval()
    calls = []
    original = mixed._delta_then_base
    monkeypatch.setattr(mixed, "_delta_then_base", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(0, 120, (4, 7), generator=torch.Generator().manual_seed(8))
    routes = ["b", "a", "a", "b"]
    with torch.no_grad(), lorakit.mixed_batch(model, routes):
        got = model(input_ids=ids).logits
    assert calls
    for row, route in enumerate(routes):
        _close(got[row], _alone(model, route, {"input_ids": ids})[row])
