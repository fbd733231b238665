"""tools/arithmetic.py: combining adapters, pinned to the plain sums and to PEFT's add_weighted_adapter."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    TINY_MODEL_N,
    ConvToy,
    assert_rounding_close,
    assert_unchanged,
    logits,
    randomize_adapter,
    snapshot,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

import lorakit
from lorakit.tools.arithmetic import _keep_largest, _ties

W = {"a1": 0.7, "a2": -0.4}


def _two_adapters(make=tiny_llama, second=("q_proj",), ranks=(4, 4), **extra):
    model = make()
    lorakit.add_adapter(model, "a1", lorakit.LoraConfig(rank=ranks[0], alpha=8, targets=["q_proj", "v_proj"], **extra))
    lorakit.add_adapter(model, "a2", lorakit.LoraConfig(rank=ranks[1], alpha=16, targets=list(second), **extra))
    randomize_adapter(model, "a1", seed=1)
    randomize_adapter(model, "a2", seed=2)
    return model


def _delta(layer, name):
    a, b = layer.pair(name)
    return layer.scaling[name] * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))


@pytest.mark.numeric
def test_cat_is_exactly_the_weighted_sum():
    model = _two_adapters()
    report = lorakit.combine(model, W, "mix", method="cat")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.rank("mix") == 8 and layer.scaling["mix"] == 1.0
    want = 0.7 * _delta(layer, "a1") - 0.4 * _delta(layer, "a2")
    assert_rounding_close(_delta(layer, "mix"), want, n=8)  # rank 8
    v = model.model.layers[0].self_attn.v_proj  # only a1 adapts v_proj: rank 4 there
    assert v.rank("mix") == 4 and v.scaling["mix"] == 1.0
    assert lorakit.adapters(model)["mix"].config.rank_pattern == {
        "model.layers.0.self_attn.v_proj": 4,
        "model.layers.1.self_attn.v_proj": 4,
    }
    assert report.max_error < 1e-6 and lorakit.active_adapters(model) == ["a1"]


@pytest.mark.numeric
def test_svd_error_is_the_dropped_singular_values():
    model = _two_adapters()
    report = lorakit.combine(model, W, "low", method="svd", rank=3)
    lorakit.combine(model, W, "full", method="svd", rank=8)
    path = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(path)
    target = 0.7 * _delta(layer, "a1") - 0.4 * _delta(layer, "a2")
    s = torch.linalg.svdvals(target)
    assert report.errors[path] == pytest.approx((s[3:].norm() / s.norm()).item(), rel=1e-4)
    assert report.rank == 3 and 0.01 < report.max_error < 1
    assert_rounding_close(_delta(layer, "full"), target, n=32)  # an SVD of width 32


def test_linear_is_the_factor_wise_sum():
    model = _two_adapters()
    report = lorakit.combine(model, W, "lin", method="linear")
    layer = model.model.layers[0].self_attn.q_proj
    (a1, b1), (a2, b2) = layer.pair("a1"), layer.pair("a2")
    s1, s2 = layer.scaling["a1"], layer.scaling["a2"]
    want_a = (0.7 * s1) ** 0.5 * a1 - (0.4 * s2) ** 0.5 * a2
    want_b = (0.7 * s1) ** 0.5 * b1 + (0.4 * s2) ** 0.5 * b2
    torch.testing.assert_close(layer.pair("lin")[0], want_a)
    torch.testing.assert_close(layer.pair("lin")[1], want_b)
    assert report.errors["model.layers.0.self_attn.q_proj"] > 0.1  # not the weighted sum


def test_ties_and_dare_primitives():
    t = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
    torch.testing.assert_close(_keep_largest(t, 0.5), torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    deltas = [torch.tensor([2.0, -1.0, 0.0]), torch.tensor([-1.0, -3.0, 5.0])]
    # signs elected by the sums (1, -4, 5): + , -, +; entry 0 keeps only the first delta
    torch.testing.assert_close(_ties(deltas, [1.0, 2.0], 1.0), torch.tensor([2.0, (-1.0 - 6.0) / 2, 10.0]))
    model = _two_adapters()
    first = lorakit.combine(model, W, "d1", method="dare", density=0.5, seed=3, rank=32)
    lorakit.combine(model, W, "d2", method="dare", density=0.5, seed=3, rank=32)
    lorakit.combine(model, W, "d3", method="dare", density=0.5, seed=4, rank=32)
    layer = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(_delta(layer, "d1"), _delta(layer, "d2"), rtol=0, atol=0)
    assert (_delta(layer, "d1") - _delta(layer, "d3")).abs().max() > 1e-3
    assert first.max_error < 1e-5  # the full rank (32) holds the whole DARE-merged delta, masks and all


def test_combined_adapter_with_heads_saves_and_reloads(tmp_path, ids):
    model = tiny_bert()
    for i, name in enumerate(("a1", "a2")):
        config = lorakit.LoraConfig(rank=4, targets=["query", "value"], modules_to_save=["classifier"])
        lorakit.add_adapter(model, name, config)
        randomize_adapter(model, name, seed=i + 1)
        with torch.no_grad():
            model.classifier.copies[name].weight.add_(i + 1.0)
    lorakit.combine(model, W, "mix", method="cat")
    original = model.classifier.original.weight
    torch.testing.assert_close(model.classifier.copies["mix"].weight, original + 0.7 * 1.0 - 0.4 * 2.0)
    lorakit.set_adapter(model, "mix")
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path, name="mix")
    fresh = tiny_bert()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(weights={"zz": 1.0}), "no adapter named 'zz'"),
        (dict(method="magic"), "method must be one of linear, cat, svd, ties, dare"),
        (dict(method="cat", rank=4), "rank .* applies to the methods svd, ties and dare"),
        (dict(method="ties"), "method 'ties' needs density"),
        (dict(method="svd", density=0.5), "density applies to the methods ties and dare"),
        (dict(weights={"a1": float("nan")}), "must be a finite number"),
        (dict(name="a1"), "already has an adapter named 'a1'"),
    ],
)
def test_bad_requests_change_nothing(call, message):
    model = _two_adapters()
    before = snapshot(model)
    kwargs = dict(weights=W, name="mix", method="svd") | call
    with pytest.raises(ValueError, match=message):
        lorakit.combine(model, **kwargs)
    assert_unchanged(model, before)
    assert set(lorakit.adapters(model)) == {"a1", "a2"}


def test_refused_sources():
    model = _two_adapters(ranks=(4, 2))
    with pytest.raises(ValueError, match="'linear' needs adapters of one rank"):
        lorakit.combine(model, W, "x", method="linear")
    lorakit.add_adapter(model, "d", lorakit.LoraConfig(rank=4, targets=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="'d' is a DoRA adapter"):
        lorakit.combine(model, {"a1": 1.0, "d": 1.0}, "x")
    biased = tiny_bert()
    for name in W:
        lorakit.add_adapter(biased, name, lorakit.LoraConfig(rank=4, targets=["query"], bias="lora_only"))
    with pytest.raises(ValueError, match="'a1' trains biases"):
        lorakit.combine(biased, W, "x")


# ---- PEFT's add_weighted_adapter -------------------------------------------------------------

peft = pytest.importorskip("peft")


PEFT_CASES = {
    # name: (model factory, targets of a1, targets of a2, fan_in_fan_out)
    "llama": (tiny_llama, ["q_proj", "v_proj", "embed_tokens"], ["q_proj", "embed_tokens"], False),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_fc"], ["c_attn"], True),
    "conv2d": (ConvToy, ["conv2", "lin"], ["conv2", "lin"], False),
}
# ours -> (PEFT's combination_type, keyword arguments for both)
PEFT_METHODS = {
    "linear": ("linear", {}),
    "cat": ("cat", {}),
    "svd": ("svd", {"rank": 3}),
    "ties": ("ties_svd", {"rank": 5, "density": 0.6}),
    "dare": ("dare_linear_svd", {"rank": 5, "density": 0.6}),
}


def _peft_pair(case, tmp_path):
    make, first, second, fifo = PEFT_CASES[case]
    reference = peft.get_peft_model(
        make().eval(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=first, init_lora_weights=False, fan_in_fan_out=fifo),
        adapter_name="a1",
    )
    reference.add_adapter(
        "a2", peft.LoraConfig(r=4, lora_alpha=16, target_modules=second, init_lora_weights=False, fan_in_fan_out=fifo)
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ours = make().eval()
    for name in ("a1", "a2"):
        reference.save_pretrained(tmp_path, selected_adapters=[name], save_embedding_layers=False)  # to tmp_path / name
        lorakit.load_adapter(ours, tmp_path / name, name=name)
    return reference, ours


@pytest.mark.numeric
@pytest.mark.parametrize("method", list(PEFT_METHODS))
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_same_outputs_as_peft(case, method, tmp_path, monkeypatch):
    kind, kwargs = PEFT_METHODS[method]
    reference, ours = _peft_pair(case, tmp_path)
    # PEFT draws DARE's masks from the global stream after building the new layers: seed it where
    # the combining starts, so both sides use the stream of seed 11.
    from peft.tuners.lora.model import LoraModel

    real, seeded = LoraModel._svd_generalized_task_arithmetic_weighted_adapter, []

    def seeding(self, *args, **kw):
        if not seeded:
            torch.manual_seed(11)
            seeded.append(True)
        return real(self, *args, **kw)

    monkeypatch.setattr(LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter", seeding)
    reference.add_weighted_adapter(
        ["a1", "a2"],
        [0.7, -0.4],
        "mix",
        combination_type=kind,
        svd_rank=kwargs.get("rank"),
        density=kwargs.get("density"),
    )
    lorakit.combine(ours, W, "mix", method=method, seed=11, **kwargs)
    reference.set_adapter("mix")
    lorakit.set_adapter(ours, "mix")
    ids = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(5))
    want, got = _out(reference, ids), _out(ours, ids)
    with lorakit.disabled(ours):
        base = _out(ours, ids)
    assert (want - base).abs().max() > 1e-3  # the combined adapter does something
    assert_rounding_close(got, want, n=TINY_MODEL_N)


def _out(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)
