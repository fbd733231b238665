"""layers/torch_internals.py: each private behaviour is checked at import, a failed check is noticed,
and with a failed check lorakit still computes what the plain reference computes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import torch_internals
from lorakit.layers.plain import LoraLinear
from lorakit.layers.torch_internals import Checks

IN, OUT = 64, 96


def _layer(dora: bool = False, dropout: float = 0.0) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(IN, OUT))
    a, b = layer.build_pair(4, "default")
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(a.shape, generator=gen) * 0.3, torch.randn(b.shape, generator=gen) * 0.3
    magnitude = layer.initial_magnitude(a, b, 0.5) * 1.1 if dora else None
    layer.attach("a", a, b, 0.5, dropout, magnitude)
    layer.active = ["a"]
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    return layer


def _outputs_and_grads(layer: LoraLinear, fast: bool, tokens: int = 64) -> list[torch.Tensor]:
    """y and the gradients of x and every trained tensor, x the output of GELU (the recipe's case)."""
    x = torch.randn(tokens, IN, generator=torch.Generator().manual_seed(2)).requires_grad_()
    h = F.gelu(x)
    torch.manual_seed(3)  # the same dropout mask on both paths
    y = layer(h) if fast else layer.reference_forward(h)
    params = [p for p in layer.parameters() if p.requires_grad]
    return [y.detach(), *torch.autograd.grad(y.square().sum(), [x, *params])]


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


def _failed(*names: str) -> Checks:
    """Checks where `names` failed and the rest held."""
    return Checks(**{f.name: f.name not in names for f in dataclasses.fields(Checks)})


def test_every_check_holds_on_the_installed_torch():
    # A failure here is not a wrong result, only a slower lorakit: it names what torch changed.
    assert torch_internals.CHECKS.failed() == []
    assert torch_internals.check() == torch_internals.CHECKS


def test_import_does_not_move_the_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    torch_internals.check()
    assert torch.equal(torch.get_rng_state(), before)


def test_a_changed_saved_tensor_hooks_query_is_noticed(monkeypatch):
    monkeypatch.setattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda *args: None)
    assert torch_internals.check().failed() == ["saved_tensor_hooks"]


def test_a_vanished_private_function_fails_closed(monkeypatch):
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    assert torch_internals.check().failed() == ["saved_tensor_hooks"]


def test_hooks_kept_somewhere_else_are_noticed(monkeypatch):
    # As if a torch release stored forward hooks outside the dicts lorakit reads.
    monkeypatch.setattr(
        nn.Module, "register_forward_hook", lambda self, hook, **kwargs: torch.utils.hooks.RemovableHandle({})
    )
    assert torch_internals.check().failed() == ["module_hooks"]


def test_saved_inputs_that_no_longer_give_the_output_back_are_noticed(monkeypatch):
    recipe = torch_internals._recipe
    monkeypatch.setattr(torch_internals, "_recipe", lambda x: None if recipe(x) is None else (recipe(x)[0], torch.add))
    assert torch_internals.check().failed() == ["saved_inputs"]


def test_with_every_check_failed_each_answer_is_the_safe_one(monkeypatch):
    monkeypatch.setattr(torch_internals, "CHECKS", _failed(*(f.name for f in dataclasses.fields(Checks))))
    x = torch.randn(3, requires_grad=True)
    assert torch_internals.has_forward_hooks(nn.Linear(2, 2))
    assert torch_internals.saved_tensor_hooks_active()
    assert torch_internals.recompute_recipe(F.gelu(x)) is None
    assert torch_internals.version(torch.zeros(2)) is None


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_with_the_checks_failed_the_layer_falls_back_to_the_reference(dora, monkeypatch):
    layer = _layer(dora=dora)
    want = _outputs_and_grads(layer, fast=False)
    monkeypatch.setattr(
        nn.Module, "register_forward_hook", lambda self, hook, **kwargs: torch.utils.hooks.RemovableHandle({})
    )
    checks = torch_internals.check()
    monkeypatch.undo()
    assert not checks.module_hooks
    monkeypatch.setattr(torch_internals, "CHECKS", checks)
    reference = layer.reference_forward
    calls = []
    monkeypatch.setattr(layer, "reference_forward", lambda x: calls.append(1) or reference(x))
    _assert_same(_outputs_and_grads(layer, fast=True), want)
    assert calls, "hooks that cannot be seen must send the layer to its reference path"


@pytest.mark.parametrize(
    ("dora", "dropout"), [(False, 0.0), (False, 0.2), (True, 0.0)], ids=["lora", "lora-dropout", "dora"]
)  # DoRA with dropout has no kernel
def test_without_the_recipe_the_kernels_keep_their_input_and_agree(dora, dropout, monkeypatch):
    layer = _layer(dora=dora, dropout=dropout).train()
    want = _outputs_and_grads(layer, fast=False)
    monkeypatch.setattr(torch_internals, "CHECKS", _failed("saved_inputs"))

    def unreachable(x):
        raise AssertionError("grad_fn's saved tensors read although their check failed")

    monkeypatch.setattr(torch_internals, "_recipe", unreachable)
    reference = layer.reference_forward
    monkeypatch.setattr(layer, "reference_forward", lambda x: pytest.fail("the kernel was not used"))
    got = _outputs_and_grads(layer, fast=True)
    monkeypatch.setattr(layer, "reference_forward", reference)
    _assert_same(got, want)


def test_without_trusted_versions_the_dora_norm_is_not_cached(monkeypatch):
    layer = _layer(dora=True).eval()
    x = torch.randn(5, IN)
    with torch.no_grad():
        want = layer.reference_forward(x)
        layer(x)
        assert layer.dora_norms.get("a", (layer.base_layer.weight, *layer.pair("a")), 0.5) is not None
        layer.dora_norms.clear()
        monkeypatch.setattr(torch_internals, "CHECKS", _failed("versions"))
        for _ in range(2):
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
            assert layer.dora_norms.get("a", (layer.base_layer.weight, *layer.pair("a")), 0.5) is None


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_without_the_private_conv_call_the_bias_is_taken_off_the_output(mode, monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)
    nn.init.normal_(conv.bias)
    conv.register_forward_hook(lambda *args: pytest.fail("the base's hooks ran"))
    x = torch.randn(2, 3, 5, 6)
    want = torch_internals.conv_without_bias(conv, x)
    monkeypatch.setattr(torch_internals, "CHECKS", _failed("conv_without_bias"))
    biases = []  # torch's own forward calls it with the bias; only lorakit's private use passes None
    real = nn.Conv2d._conv_forward
    spy = lambda self, x, w, b: biases.append(b) or real(self, x, w, b)  # noqa: E731
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", spy)
    got = torch_internals.conv_without_bias(conv, x)
    assert biases and all(b is conv.bias for b in biases)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
