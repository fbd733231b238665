"""The wrapping layers against the formula base(x) + scaling * B A x, and merge round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rounding_close
from torch import nn

from lorakit.layers.plain import LoraConv, LoraEmbedding, LoraLinear

pytestmark = pytest.mark.numeric  # pins float32 numbers to references (helpers.assert_rounding_close)


def _attach(layer, name="a", rank=4, scaling=0.5, dropout=0.0, seed=0):
    a, b = layer.build_pair(rank, "default")
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(b.shape, generator=gen, dtype=torch.float32).to(b.dtype) * 0.3
    a = torch.randn(a.shape, generator=gen, dtype=torch.float32).to(a.dtype) * 0.3
    layer.attach(name, a, b, scaling, dropout)
    layer.active = [*layer.active, name]
    return layer


def _conv1d_gpt2(nx: int, nf: int):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return Conv1D(nf, nx)


def test_linear_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = _attach(LoraLinear(base), scaling=0.75)
    x = torch.randn(3, 5, 12)
    a, b = layer.pair("a")
    expected = x @ base.weight.T + base.bias + 0.75 * (x @ a.T @ b.T)
    assert_rounding_close(layer(x), expected, n=12 + 4)  # in features, rank


def test_conv1d_transposed_matches_linear():
    conv = _conv1d_gpt2(12, 10)
    layer = _attach(LoraLinear(conv))
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (12, 10)
    lin = nn.Linear(12, 10)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    ref = _attach(LoraLinear(lin))
    x = torch.randn(4, 12)
    assert_rounding_close(layer(x), ref(x), n=12 + 4)
    assert_rounding_close(layer.delta_weight("a"), ref.delta_weight("a").T, n=4)


def test_embedding_matches_formula():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = _attach(LoraEmbedding(base), scaling=2.0)
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    a, b = layer.pair("a")
    expected = base.weight[ids] + 2.0 * (a.T[ids] @ b.T)
    assert_rounding_close(layer(ids), expected, n=4)


def test_embedding_default_init_is_zero_delta():
    layer = LoraEmbedding(nn.Embedding(20, 6))
    a, b = layer.build_pair(4, "default")
    assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) > 0


@pytest.mark.parametrize("conv_cls, shape", [(nn.Conv1d, (2, 3, 11)), (nn.Conv2d, (2, 3, 9, 7))])
def test_conv_delta_equals_merged_forward(conv_cls, shape):
    torch.manual_seed(0)
    base = conv_cls(3, 5, 3, stride=2, padding=1)
    layer = _attach(LoraConv(base))
    x = torch.randn(*shape)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, base(x))
    layer.merge()
    assert_rounding_close(layer(x), unmerged, n=3 * 3 * 3 + 4)  # a 3x3 kernel over 3 channels, rank


def test_grouped_conv_is_refused():
    with pytest.raises(ValueError, match="groups=3"):
        LoraConv(nn.Conv2d(3, 6, 3, groups=3))


LAYERS = {
    "linear": (lambda: nn.Linear(16, 8), lambda: torch.randn(4, 16)),
    "conv1d_gpt2": (lambda: _conv1d_gpt2(16, 8), lambda: torch.randn(4, 16)),
    "embedding": (lambda: nn.Embedding(30, 8), lambda: torch.randint(0, 30, (4, 5))),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 6, 6)),
}
WRAP = {"linear": LoraLinear, "conv1d_gpt2": LoraLinear, "embedding": LoraEmbedding, "conv2d": LoraConv}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merge_unmerge_round_trip(kind):
    torch.manual_seed(0)
    make, inputs = LAYERS[kind]
    layer = _attach(_attach(WRAP[kind](make()), "a", seed=1), "b", seed=2)
    original = layer.base_layer.weight.detach().clone()
    x = inputs()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged == ["a", "b"]
    merged = layer(x)
    scale = unmerged.abs().max().item()
    assert (merged - unmerged).abs().max() <= 1e-5 * scale
    layer.unmerge()
    assert layer.merged == []
    assert (layer.base_layer.weight - original).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_merge(dtype):
    torch.manual_seed(0)
    layer = _attach(LoraLinear(nn.Linear(32, 16).to(dtype)))
    assert layer.pair("a")[0].dtype == dtype
    x = torch.randn(8, 32, dtype=dtype)
    unmerged = layer(x)
    assert unmerged.dtype == dtype
    layer.merge()
    rel = (layer(x).float() - unmerged.float()).abs().max() / unmerged.float().abs().max()
    assert rel < 2e-2


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = _attach(LoraLinear(nn.Linear(16, 8)), dropout=0.5)
    x = torch.randn(64, 16)
    layer.eval()
    assert torch.equal(layer(x), layer.reference_forward(x))
    a, b = layer.pair("a")
    expected = layer.base_layer(x) + 0.5 * F.linear(F.linear(x, a), b)
    assert_rounding_close(layer(x), expected, n=16 + 4)
    layer.train()
    assert not torch.allclose(layer(x), expected, atol=1e-3)


def test_disabled_and_inactive_are_base_bitwise():
    torch.manual_seed(0)
    layer = _attach(LoraLinear(nn.Linear(16, 8)))
    x = torch.randn(4, 16)
    base = layer.base_layer(x)
    assert not torch.equal(layer(x), base)
    layer.enabled = False
    assert torch.equal(layer(x), base)
    layer.enabled = True
    layer.active = []
    assert torch.equal(layer(x), base)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    torch.manual_seed(0)
    layer = _attach(LoraLinear(nn.Linear(64, 32)))
    x = torch.randn(8, 64)
    cpu = layer(x)
    gpu = layer.to("cuda", dtype)(x.to("cuda", dtype))
    torch.testing.assert_close(gpu.float().cpu(), cpu, rtol=2e-2, atol=2e-2)


def test_what_forward_caches_follows_every_change():
    """LoraLinear.forward builds its adapter list once per change; each kind of change shows."""
    torch.manual_seed(0)
    layer = _attach(LoraLinear(nn.Linear(12, 10)), scaling=0.5)
    x = torch.randn(2, 3, 12)

    def want() -> torch.Tensor:
        return layer.reference_forward(x)

    assert_rounding_close(layer(x), want(), n=12 + 2 * 4)
    _attach(layer, "b", seed=1)  # a new adapter, active
    assert_rounding_close(layer(x), want(), n=12 + 2 * 4)
    layer.active = ["b"]
    assert_rounding_close(layer(x), want(), n=12 + 2 * 4)
    layer.enabled = False
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.enabled = True
    layer.detach_adapter("b")
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.active = ["a"]
    state = {k: v * 2 for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)  # new Parameter objects
    assert_rounding_close(layer(x), want(), n=12 + 2 * 4)
    layer.double()
    torch.testing.assert_close(layer(x.double()), layer.reference_forward(x.double()), rtol=0, atol=1e-12)


def test_a_wrapper_added_to_a_model_in_eval_mode_is_in_eval_mode():
    import lorakit

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=["0", "2"], dropout=0.5))
    assert not any(m.training for m in model.modules())
