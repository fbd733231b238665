"""The fast path (layers/fused.py, LoraLinear.forward) pinned to the plain reference_forward.

Outputs and gradients (x, every A and B, the base weight and bias when they train) must agree
in float32 to rounding (helpers.assert_rounding_close), for: nn.Linear with and without bias and
Conv1D (fan_in_fan_out); 2-D and 3-D inputs; few tokens (delta added in place) and many
(adapters folded into the weight); dropout on (same seed, same mask) and off; one or several
active adapters; partly merged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rounding_close
from torch import nn

from lorakit.layers.fused import Adapter, lora_linear
from lorakit.layers.plain import LoraLinear

pytestmark = pytest.mark.numeric  # pins float32 numbers to references (helpers.assert_rounding_close)

IN, OUT = 64, 96  # folding pays from 1.5 * 64 * 96 / 160 = 57.6 tokens on
FEW, MANY = (3,), (4, 16)  # leading dims of x: 3 tokens (in place), 64 tokens (folded)


def test_both_paths_are_exercised():
    from lorakit.layers.fused import fold_pays as _fold_pays

    w = torch.empty(OUT, IN)
    assert not _fold_pays(_x(FEW), w, (0.0,)) and _fold_pays(_x(MANY), w, (0.0,))
    assert not _fold_pays(_x(MANY), w, (0.1,)), "an adapter with dropout cannot be folded"
    assert not _fold_pays(_x(MANY), w.bfloat16(), (0.0,)), "folding would round the update away in bf16"
    assert not _fold_pays(_x(MANY), torch.empty(16, 8), (0.0,)), "tiny layers keep the in-place path"


def _base(kind: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(OUT, IN)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(IN, OUT, bias=kind == "linear")
    return base.to(dtype)


def _layer(kind="linear", adapters=(("a", 4, 0.5, 0.0),), dtype=torch.float32) -> LoraLinear:
    layer = LoraLinear(_base(kind, dtype))
    gen = torch.Generator().manual_seed(1)
    for name, rank, scaling, dropout in adapters:
        a, b = layer.build_pair(rank, "default")
        a = torch.randn(a.shape, generator=gen).mul_(0.3).to(dtype)
        b = torch.randn(b.shape, generator=gen).mul_(0.3).to(dtype)  # nonzero: a real delta
        layer.attach(name, a, b, scaling, dropout)
        layer.active = [*layer.active, name]
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    return layer


def _run(layer, x, fast: bool, seed: int = 7):
    """Output, gradients of every trainable tensor and x, and the next draw of the global RNG."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    params = [p for p in layer.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    y = layer(x) if fast else layer.reference_forward(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32).to(y.dtype)
    inputs = params + ([x] if x.requires_grad else [])
    grads = torch.autograd.grad(y, inputs, g, allow_unused=True) if inputs and y.requires_grad else ()
    return y, grads, torch.rand(1)


def _n(x: torch.Tensor) -> int:
    """The reductions behind an output or gradient: over the input features, the output features
    (x's gradient) and the tokens (the weights' gradients), one after another at most."""
    return IN + OUT + x.numel() // IN


def _close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, tol: float | None = None) -> None:
    """Equal to float32 rounding; bfloat16 (`tol` given) to that relative and absolute tolerance."""
    if tol is None:
        assert_rounding_close(got, want, n=_n(x))
    else:
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _assert_same(layer, x, tol=None):
    y_ref, g_ref, r_ref = _run(layer, x, fast=False)
    y, grads, r = _run(layer, x, fast=True)
    _close(y, y_ref, x, tol)
    assert len(grads) == len(g_ref)
    for got, want in zip(grads, g_ref):
        assert (got is None) == (want is None)
        if want is not None:
            _close(got, want, x, tol)
    assert torch.equal(r, r_ref), "the fast path must leave the global RNG where the reference does"


def _assert_same_from(layer, leaves, make_y):
    """Like _assert_same, for an input built from `leaves` by autograd ops: make_y(forward, *leaves)
    runs the layer (fast, or its reference) on that input; the output and the gradients of the
    leaves and the trainable parameters must agree."""

    def run(forward):
        copies = [t.detach().clone().requires_grad_() for t in leaves]
        torch.manual_seed(7)
        y = make_y(forward, *copies)
        params = [p for p in layer.parameters() if p.requires_grad]
        return y, torch.autograd.grad(y.square().sum(), [*copies, *params])

    (y_ref, g_ref), (y, grads) = run(layer.reference_forward), run(layer)
    _close(y, y_ref, leaves[0])
    for got, want in zip(grads, g_ref, strict=True):
        _close(got, want, leaves[0])


def _x(lead, dtype=torch.float32, requires_grad=True):
    return torch.randn(*lead, IN, generator=torch.Generator().manual_seed(5)).to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("kind", ["linear", "linear-nobias", "conv1d"])
@pytest.mark.parametrize("lead", [FEW, MANY, (2, 4, 8)], ids=["few", "many", "4d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_one_adapter_matches_reference(kind, lead, dropout):
    layer = _layer(kind, (("a", 4, 0.5, dropout),)).train()
    _assert_same(layer, _x(lead))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("lead", [FEW, MANY], ids=["few", "many"])
@pytest.mark.parametrize("dropouts", [(0.0, 0.0), (0.2, 0.0), (0.1, 0.4)])
def test_several_active_adapters_match_reference(kind, lead, dropouts):
    layer = _layer(kind, (("a", 4, 0.5, dropouts[0]), ("b", 2, 2.0, dropouts[1]), ("c", 3, 1.0, 0.0))).train()
    layer.active = ["a", "b"]  # c is inactive: must not count
    _assert_same(layer, _x(lead))


@pytest.mark.parametrize("lead", [FEW, MANY], ids=["few", "many"])
def test_eval_mode_ignores_dropout(lead):
    layer = _layer("linear", (("a", 4, 0.5, 0.5),)).eval()
    _assert_same(layer, _x(lead))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("lead", [FEW, MANY], ids=["few", "many"])
def test_trained_base_weight_and_bias_match_reference(kind, lead):
    layer = _layer(kind, (("a", 4, 0.5, 0.0), ("b", 2, 1.5, 0.3))).train()
    for p in layer.base_layer.parameters():
        p.requires_grad_(True)
    _assert_same(layer, _x(lead))


@pytest.mark.parametrize("lead", [FEW, MANY], ids=["few", "many"])
def test_input_without_grad_and_frozen_adapter(lead):
    layer = _layer("linear", (("a", 4, 0.5, 0.0), ("b", 2, 1.5, 0.0))).train()
    layer.lora_A["b"].weight.requires_grad_(False)
    layer.lora_B["a"].weight.requires_grad_(False)
    _assert_same(layer, _x(lead, requires_grad=False))


@pytest.mark.parametrize("lead", [FEW, MANY], ids=["few", "many"])
def test_partly_merged_matches_reference(lead):
    layer = _layer("linear", (("a", 4, 0.5, 0.0), ("b", 2, 2.0, 0.0)))
    layer.active = ["a"]
    layer.merge()
    layer.active = ["a", "b"]  # a is in the weight, b is live
    _assert_same(layer, _x(lead))
    layer.active = ["a"]  # everything active is merged: the base alone
    _assert_same(layer, _x(lead))


@pytest.mark.parametrize("lead", [FEW, MANY], ids=["few", "many"])
def test_no_grad_and_inference_mode_match_reference(lead):
    layer = _layer("conv1d", (("a", 4, 0.5, 0.0), ("b", 2, 2.0, 0.0)))
    x = _x(lead, requires_grad=False)
    want = layer.reference_forward(x)
    with torch.no_grad():
        _close(layer(x), want, x)
    with torch.inference_mode():
        _close(layer(x), want, x)


def test_disabled_and_inactive_are_the_base_bitwise():
    layer = _layer("linear")
    x = _x(MANY)
    base = layer.base_layer(x)
    layer.enabled = False
    assert torch.equal(layer(x), base)
    layer.enabled, layer.active = True, []
    assert torch.equal(layer(x), base)


@pytest.mark.parametrize("lead", [FEW, MANY], ids=["few", "many"])
def test_gelu_input_is_recomputed_not_kept(lead):
    """x = GELU(h): the fast path keeps h (GELU keeps it anyway) and gets x back exactly."""
    layer = _layer("linear", (("a", 4, 0.5, 0.2),)).train()
    h = _x(lead)
    _assert_same_from(layer, [h], lambda forward, hh: forward(F.gelu(hh, approximate="tanh")))

    hh = h.detach().clone().requires_grad_()
    x = F.gelu(hh)
    kept = layer(x).grad_fn.saved_tensors
    assert not any(t.data_ptr() == x.data_ptr() for t in kept), "GELU's output was kept"
    assert any(t.data_ptr() == hh.data_ptr() for t in kept)


def test_product_input_is_recomputed_not_kept():
    """x = silu(gate) * up (Llama's MLP): both factors are kept by the product anyway."""
    layer = _layer("linear", (("a", 4, 0.5, 0.0),)).train()
    gate, up = _x(MANY), _x(MANY) * 0.5
    _assert_same_from(layer, [gate, up], lambda forward, g, u: forward(F.silu(g) * u))
    g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    x = F.silu(g) * u
    assert not any(t.data_ptr() == x.data_ptr() for t in layer(x).grad_fn.saved_tensors)


def test_in_place_change_of_a_kept_input_fails_loudly():
    layer = _layer("linear").train()
    h = _x(MANY) * 1.0
    y = layer(F.gelu(h))
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("lead", [FEW, MANY], ids=["few", "many"])
def test_training_never_writes_the_base_weight(lead):
    layer = _layer("linear", (("a", 4, 0.5, 0.0),)).train()
    before = copy.deepcopy(layer.base_layer.state_dict())
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    outs = []
    for _ in range(3):
        y = layer(_x(lead))
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outs.append(y.detach())
        # nothing cached: after the step the next call sees the new A and B
        _close(layer(_x(lead)), layer.reference_forward(_x(lead)), _x(lead))
    for key, value in layer.base_layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(outs[0], outs[-1])


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("lead", [FEW, MANY], ids=["few", "many"])
def test_bfloat16_is_close(kind, lead):
    layer = _layer(kind, (("a", 4, 0.5, 0.0), ("b", 2, 2.0, 0.3)), dtype=torch.bfloat16).train()
    _assert_same(layer, _x(lead, dtype=torch.bfloat16), tol=3e-2)


def test_mixed_dtypes_and_autocast_take_the_reference():
    layer = _layer("linear")
    layer.lora_A["a"].double(), layer.lora_B["a"].double()
    x = _x(MANY, requires_grad=False)
    torch.testing.assert_close(layer(x), layer.reference_forward(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(_x(MANY)), layer.reference_forward(_x(MANY)))


@pytest.mark.parametrize("tokens", [2, 40], ids=["in-place", "folded"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_gradcheck_float64(tokens, fan_in_fan_out, monkeypatch):
    import lorakit.layers.fused

    monkeypatch.setattr(lorakit.layers.fused, "_FOLD_MIN_WEIGHTS", 0)  # small enough for gradcheck
    d_in, d_out = 6, 5  # folding from 1.5 * 30 / 11 = 4.1 tokens on
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x = t(tokens, d_in)
    weight = t(d_in, d_out) if fan_in_fan_out else t(d_out, d_in)
    bias = t(d_out)
    a1, b1, a2, b2 = t(3, d_in), t(d_out, 3), t(2, d_in), t(d_out, 2)
    assert lorakit.layers.fused.fold_pays(x, weight, (0.0,)) == (tokens == 40)

    def f(x, weight, bias, a1, b1, a2, b2):
        adapters = [Adapter(a1, b1, 0.5, 0.0), Adapter(a2, b2, 2.0, 0.0)]
        return lora_linear(x, weight, bias, adapters, fan_in_fan_out, training=True)

    assert torch.autograd.gradcheck(f, (x, weight, bias, a1, b1, a2, b2))


def test_activation_checkpointing_matches_reference():
    from torch.utils.checkpoint import checkpoint

    layer = _layer("linear", (("a", 4, 0.5, 0.0), ("b", 2, 1.0, 0.0))).train()
    h = _x(MANY)

    def through_checkpoint(forward, hh):
        return checkpoint(lambda t: forward(F.gelu(t)), hh, use_reentrant=False)

    _assert_same_from(layer, [h], through_checkpoint)
