"""layers/dispatch.py: which path each adapted layer takes, chosen in one place and kept per change.

The numbers of each kernel are pinned to the reference in test_fused.py, test_dora.py and
test_quantized.py; here, which computation runs, and that what the chooser keeps follows the
layer's changes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import dispatch
from lorakit.layers.plain import LoraConv, LoraEmbedding, LoraLinear

IN, OUT = 16, 24


class _Subclass(nn.Linear):
    """An nn.Linear subclass: its forward may differ, so no kernel may stand in for it."""


def _adapt(layer, names=("a",), dora=False, dropout=0.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    for name in names:
        a, b = layer.build_pair(4, "default")
        a = (torch.randn(a.shape, generator=gen) * 0.3).to(dtype)
        b = (torch.randn(b.shape, generator=gen) * 0.3).to(dtype)
        magnitude = layer.initial_magnitude(a, b, 0.5) if dora and name == "a" else None
        layer.attach(name, a, b, 0.5, dropout, magnitude)
    layer.active = list(names)
    return layer


def _linear(base=None, **kwargs) -> LoraLinear:
    torch.manual_seed(0)
    return _adapt(LoraLinear(base if base is not None else nn.Linear(IN, OUT)), **kwargs)


def _path(layer, x, monkeypatch) -> str:
    """Run `layer(x)` and say which computation gave its output."""
    taken = []
    for label, kernel in (("lora", dispatch.LINEAR_LORA), ("dora", dispatch.LINEAR_DORA)):
        run = type(kernel).run
        spy = lambda *a, run=run, label=label, k=kernel: taken.append(label) or run(k, *a)  # noqa: E731
        monkeypatch.setattr(kernel, "run", spy)
    reference = layer.reference_forward
    monkeypatch.setattr(layer, "reference_forward", lambda x: taken.append("reference") or reference(x))
    layer(x)
    monkeypatch.undo()
    return taken[0] if taken else "base"


def _x(dtype=torch.float32):
    return torch.randn(5, IN, generator=torch.Generator().manual_seed(2)).to(dtype)


def test_the_linear_kernels_take_what_they_can_compute(monkeypatch):
    from transformers.pytorch_utils import Conv1D

    assert _path(_linear(), _x(), monkeypatch) == "lora"
    assert _path(_linear(Conv1D(OUT, IN)), _x(), monkeypatch) == "lora"
    assert _path(_linear(names=("a", "b")), _x(), monkeypatch) == "lora"
    assert _path(_linear(dora=True), _x(), monkeypatch) == "dora"
    assert _path(_linear(dora=True, dropout=0.1).eval(), _x(), monkeypatch) == "dora"


@pytest.mark.parametrize(
    "case",
    [
        "nn.Linear subclass",
        "adapter dtype",
        "forward hook",
        "pre-hook",
        "autocast",
        "two adapters with DoRA",
        "DoRA with dropout in training",
    ],
)
def test_the_reference_runs_where_no_kernel_is_exact(case, monkeypatch):
    layer = {
        "nn.Linear subclass": lambda: _linear(_Subclass(IN, OUT)),
        "adapter dtype": lambda: _linear(dtype=torch.float64),
        "two adapters with DoRA": lambda: _linear(names=("a", "b"), dora=True),
        "DoRA with dropout in training": lambda: _linear(dora=True, dropout=0.1).train(),
    }.get(case, _linear)()
    x = _x()
    if case == "forward hook":
        layer.base_layer.register_forward_hook(lambda *args: None)
    if case == "pre-hook":
        layer.base_layer.register_forward_pre_hook(lambda *args: None)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _path(layer, x, monkeypatch) == "reference"
        return
    assert _path(layer, x, monkeypatch) == "reference"


def test_an_input_in_another_dtype_than_the_weight_is_left_to_the_base_layer():
    # What nn.Linear does with it (an error, or a result of its own dtype) is the reference's answer.
    layer = _linear()
    state = dispatch.LINEAR_LORA.prepare(layer, ["a"])
    assert dispatch.LINEAR_LORA.accepts(layer, _x(), state)
    assert not dispatch.LINEAR_LORA.accepts(layer, _x(torch.float64), state)
    layer = _linear(dora=True)
    state = dispatch.LINEAR_DORA.prepare(layer, ["a"])
    assert dispatch.LINEAR_DORA.accepts(layer, _x(), state)
    assert not dispatch.LINEAR_DORA.accepts(layer, _x(torch.bfloat16), state)


def test_embeddings_and_convolutions_have_no_kernel(monkeypatch):
    torch.manual_seed(0)
    embedding = _adapt(LoraEmbedding(nn.Embedding(10, IN)))
    conv = _adapt(LoraConv(nn.Conv1d(IN, OUT, 3)))
    assert _path(embedding, torch.tensor([[1, 2, 3]]), monkeypatch) == "reference"
    assert _path(conv, torch.randn(2, IN, 7), monkeypatch) == "reference"


def test_without_a_live_adapter_the_base_layer_runs_alone(monkeypatch):
    layer = _linear()
    x = _x()
    layer.enabled = False
    assert _path(layer, x, monkeypatch) == "base"
    layer.enabled = True
    layer.merge()
    assert _path(layer, x, monkeypatch) == "base"
    layer.unmerge()
    layer.active = []
    assert _path(layer, x, monkeypatch) == "base"
    layer.active = ["a"]
    assert _path(layer, x, monkeypatch) == "lora"


def test_the_choice_follows_the_layers_changes():
    layer = _linear()
    x = _x()
    with torch.no_grad():
        layer(x)
        _adapt(layer, names=("b",))  # a second adapter
        layer.active = ["a", "b"]
        torch.testing.assert_close(layer(x), layer.reference_forward(x))
        layer.double()  # new tensors of another dtype: the kernel takes float64 inputs now
        torch.testing.assert_close(layer(x.double()), layer.reference_forward(x.double()))
        layer.active = ["b"]
        torch.testing.assert_close(layer(x.double()), layer.reference_forward(x.double()))


def test_the_batched_gate_uses_the_same_facts():
    x = _x()
    assert dispatch.batched_linear_ok(_linear(), x)
    assert not dispatch.batched_linear_ok(_linear(), x.double())
    assert not dispatch.batched_linear_ok(_linear(dora=True), x)
    assert not dispatch.batched_linear_ok(_linear(dtype=torch.float64), x)
    assert not dispatch.batched_linear_ok(_linear(_Subclass(IN, OUT)), x)
    hooked = _linear()
    hooked.base_layer.register_forward_hook(lambda *args: None)
    assert not dispatch.batched_linear_ok(hooked, x)
    torch.manual_seed(0)
    assert not dispatch.batched_linear_ok(_adapt(LoraEmbedding(nn.Embedding(10, IN))), torch.tensor([[1]]))


def test_a_mixed_batch_over_adapters_of_another_dtype_takes_the_plain_path():
    # The batched path stacks the adapters and multiplies them with x: with float64 adapters on a
    # float32 layer it raised a dtype error; the shared gate now sends such a layer to the plain path.
    model = nn.Sequential(nn.Linear(IN, OUT))
    lorakit.add_adapter(model, "a", lorakit.LoraConfig(rank=2, targets=["0"]))
    layer = model[0]
    layer.double()
    layer.base_layer.float()
    nn.init.normal_(layer.lora_B["a"].weight)
    model.eval()
    x = _x()[:2]
    with torch.no_grad():
        want = layer.reference_forward(x)
        with lorakit.mixed_batch(model, ["a", None]):
            got = model(x)
        with lorakit.mixed_batch(model, ["a", "a"]):
            uniform = model(x)
    torch.testing.assert_close(got[0], want[0].to(got.dtype))
    torch.testing.assert_close(got[1], layer.base_layer(x[1]).to(got.dtype))
    torch.testing.assert_close(uniform, want)
