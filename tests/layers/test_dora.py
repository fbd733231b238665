"""layers/dora.py: DoRA pinned to a plain formula, its fast path to the reference, and both to PEFT.

The plain formula, written here from the paper: y = m / ||W + s B A||_c * (x (W + s B A)^T) + bias,
the norm per output feature and a constant for the gradient; training with dropout follows
PEFT's convention, y = base(x) + (g - 1) base_nobias(xd) + g s lora(xd).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TINY_MODEL_N,
    ConvToy,
    assert_rounding_close,
    logits,
    randomize_adapter,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn

import lorakit
from lorakit.layers import dora
from lorakit.layers.fused import fold_pays
from lorakit.layers.plain import LoraConv, LoraEmbedding, LoraLinear

pytestmark = pytest.mark.numeric  # pins float32 numbers to references (helpers.assert_rounding_close)

S = 0.75  # the adapters' scaling


# ---- single layers ---------------------------------------------------------------------------


def _base(kind: str, dtype=torch.float64, wide: bool = False) -> nn.Module:
    """A small base layer; `wide` linears (64 -> 96) are big enough to fold (fused._fold_pays)."""
    torch.manual_seed(0)
    n_in, n_out = (64, 96) if wide else (16, 24)
    if kind == "conv1d_transposed":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(n_out, n_in)
        nn.init.normal_(base.bias)
    else:
        base = {
            "linear": lambda: nn.Linear(n_in, n_out),
            "linear_nobias": lambda: nn.Linear(n_in, n_out, bias=False),
            "conv2d": lambda: nn.Conv2d(3, 5, 3, padding=1, stride=2),
            "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1),
            "embedding": lambda: nn.Embedding(30, 12),
        }[kind]()
    for p in base.parameters():
        p.requires_grad_(False)
    return base.to(dtype)


def _wrapper(base: nn.Module):
    if isinstance(base, nn.Embedding):
        return LoraEmbedding(base)
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return LoraConv(base)
    return LoraLinear(base)


def _layer(kind: str, dtype=torch.float64, dropout: float = 0.0, names=("a",), seed: int = 1, wide: bool = False):
    """A wrapper with random DoRA adapters `names`, active in that order."""
    layer = _wrapper(_base(kind, dtype, wide))
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        a, b = layer.build_pair(4, "default")
        a = torch.randn(a.shape, generator=gen, dtype=dtype) * 0.3
        b = torch.randn(b.shape, generator=gen, dtype=dtype) * 0.3
        m = layer.initial_magnitude(a, b, S) * (
            1 + 0.2 * torch.rand(layer.magnitude_shape(), generator=gen, dtype=dtype)
        )
        layer.attach(name, a, b, S, dropout, m)
        layer.active.append(name)
    return layer


def _input(kind: str, dtype=torch.float64, tokens: int = 10, wide: bool = False):
    """A batch of two for `kind`; linears see (2, tokens / 2, in)."""
    gen = torch.Generator().manual_seed(4)
    if kind == "embedding":
        return torch.randint(0, 30, (2, tokens), generator=gen)
    shape = {"conv2d": (2, 3, 7, 7), "conv1d": (2, 4, 9)}.get(kind, (2, tokens // 2, 64 if wide else 16))
    return torch.randn(shape, generator=gen, dtype=dtype)


def _plain(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """The formula, one adapter, no dropout, computed from the tensors alone."""
    a, b = layer.pair(name)
    base = layer.base_layer
    w = base.weight
    m = layer.lora_magnitude[name].reshape(-1)
    if isinstance(layer, LoraEmbedding):  # table (num, dim): features are columns
        v = w + S * (b @ a).T
        g = m / v.norm(dim=0).detach()
        return g * F.embedding(x, v)
    if isinstance(layer, LoraConv):
        v = w + S * torch.einsum("or,r...->o...", b.flatten(1), a)
        g = m / v.flatten(1).norm(dim=1).detach()
        y = base._conv_forward(x, v, None)
        return g.view(-1, *[1] * (w.dim() - 2)) * y + base.bias.view(-1, *[1] * (w.dim() - 2))
    w_oi = w.T if layer.fan_in_fan_out else w
    v = w_oi + S * b @ a
    g = m / v.norm(dim=1).detach()
    y = g * (x @ v.T)
    return y if base.bias is None else y + base.bias


def _grads(y: torch.Tensor, tensors: list[torch.Tensor]) -> tuple:
    gen = torch.Generator().manual_seed(9)
    return torch.autograd.grad(y, tensors, torch.randn(y.shape, generator=gen, dtype=y.dtype))


KINDS = ["linear", "linear_nobias", "conv1d_transposed", "conv2d", "conv1d", "embedding"]


@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_the_formula(kind):
    """Outputs and gradients (A, B, m, x) of the layer, every path, equal the plain formula."""
    layer = _layer(kind)
    x = _input(kind)
    if kind != "embedding":
        x.requires_grad_()
    params = list(layer.adapter_parameters("a").values())
    inputs = params + ([x] if x.requires_grad else [])
    want = _plain(layer, "a", x)
    for y in (layer(x), layer.reference_forward(x)):
        torch.testing.assert_close(y, want)
        for got, expected in zip(_grads(y, inputs), _grads(_plain(layer, "a", x), inputs)):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kind", ["linear", "conv1d_transposed", "conv2d"])
def test_dropout_follows_peft_convention(kind):
    layer = _layer(kind, dropout=0.4).train()
    x = _input(kind)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.4, True)
    g = (layer.lora_magnitude["a"].reshape(-1) / dora.norm_of(layer, "a").double()).view(dora._output_view(layer, y))
    expected = layer.base_layer(x) + (g - 1) * layer.base_without_bias(xd) + g * layer.lora_delta(xd, "a")
    torch.testing.assert_close(y, expected)
    assert (y - layer.eval()(x)).abs().max() > 1e-2  # the mask mattered


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_several_adapters_apply_in_turn(kind):
    """Two DoRA adapters and a plain one: each rescales what came before it; merge agrees."""
    layer = _layer(kind, names=("a", "b"))
    a, b = layer.build_pair(2, "default")
    layer.attach("plain", torch.randn(a.shape, dtype=a.dtype) * 0.3, torch.randn(b.shape, dtype=b.dtype) * 0.3, S, 0.0)
    layer.active = ["a", "plain", "b"]
    x = _input(kind)
    bias = getattr(layer.base_layer, "bias", None)
    view = dora._output_view(layer, layer.base_layer(x))
    bias = 0 if bias is None else bias.view(view)
    ga, gb = ((layer.lora_magnitude[n].reshape(-1) / dora.norm_of(layer, n).double()).view(view) for n in "ab")
    expected = bias + ga * (layer.base_layer(x) - bias + layer.lora_delta(x, "a")) + layer.lora_delta(x, "plain")
    expected = bias + gb * (expected - bias + layer.lora_delta(x, "b"))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        layer.merge()
        torch.testing.assert_close(layer.base_layer(x), expected)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, _base(kind).weight)


# ---- the fast path ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1d_transposed"])
@pytest.mark.parametrize("fold", [False, True])
def test_gradcheck(kind, fold):
    """float64 gradcheck of the autograd function (x, weight, bias, A, B, m), the norm held fixed."""
    layer = _layer(kind)
    base = layer.base_layer
    a, b = (t.detach().clone().requires_grad_() for t in layer.pair("a"))
    m = layer.lora_magnitude["a"].detach().reshape(-1).clone().requires_grad_()
    w = base.weight.detach().clone().requires_grad_()
    bias = None if base.bias is None else base.bias.detach().clone().requires_grad_()
    x = _input(kind, tokens=6).requires_grad_()
    norm = dora.norm_of(layer, "a").double()

    def f(x, w, bias, a, b, m):
        return dora.dora_linear(
            x, w, bias, a, b, magnitude=m, scaling=S, fan_in_fan_out=layer.fan_in_fan_out, norm=norm, fold=fold
        )

    assert torch.autograd.gradcheck(f, (x, w, bias, a, b, m), fast_mode=True)


def _fast_vs_reference(layer, x):
    """Outputs and gradients agree to float32 rounding of sums over the input features (64), the
    output features (96, x's gradient) and the tokens (the weights' gradients), one after another."""
    n = 64 + 96 + x[..., 0].numel()
    params = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for fast in (True, False):
        xi = x.detach().clone().requires_grad_()
        h = F.gelu(xi)  # x as GELU's output: the fast path keeps GELU's input instead
        y = layer(h) if fast else layer.reference_forward(h)
        results.append((y, _grads(y, params + [xi])))
    (y, grads), (y_ref, grads_ref) = results
    assert_rounding_close(y, y_ref, n=n)
    for got, want in zip(grads, grads_ref):
        assert_rounding_close(got, want, n=n)


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1d_transposed"])
@pytest.mark.parametrize("tokens", [6, 200])  # in place / folded into the weight
def test_fast_path_matches_reference_float32(kind, tokens):
    layer = _layer(kind, dtype=torch.float32, wide=True)
    x = _input(kind, torch.float32, tokens, wide=True)
    assert fold_pays(x, layer.base_layer.weight, (0.0,)) == (tokens == 200)
    _fast_vs_reference(layer, x)
    with torch.no_grad():
        assert_rounding_close(layer(x), layer.reference_forward(x), n=64 + 4)


def test_fast_path_used_and_norm_cached(monkeypatch):
    """At inference the norm is computed once, then again only after A, B or W change."""
    layer = _layer("linear", dtype=torch.float32).eval()
    calls = []  # each norm computed for a forward is stored in the cache once
    real = layer.dora_norms.put
    monkeypatch.setattr(layer.dora_norms, "put", lambda *a: calls.append(1) or real(*a))
    reference = []
    monkeypatch.setattr(layer, "reference_forward", lambda x: reference.append(1))
    x = _input("linear", torch.float32)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert len(calls) == 1 and not reference
    a, b = layer.pair("a")
    changes = [
        lambda: a.add_(0.01),  # an optimizer step
        lambda: layer.load_state_dict(layer.state_dict()),  # loading writes in place
        lambda: layer.base_layer.weight.mul_(1.0),
        lambda: (layer.merge(), layer.unmerge()),
        lambda: setattr(layer.lora_B["a"], "weight", nn.Parameter(b.detach().clone())),  # a new tensor
        lambda: layer.scaling.__setitem__("a", 0.5),
    ]
    for n, change in enumerate(changes, start=2):
        with torch.no_grad():
            change()
            layer(x)
            layer(x)
        assert len(calls) == n, n
    # magnitudes are not part of the norm: changing m reuses it
    with torch.no_grad():
        layer.lora_magnitude["a"].mul_(2)
        layer(x)
    assert len(calls) == len(changes) + 1


def test_training_steps_recompute_the_norm():
    layer = _layer("linear", dtype=torch.float32).train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = _input("linear", torch.float32)
    for _ in range(3):
        y = layer(x)
        assert_rounding_close(y, _plain(layer, "a", x), n=16 + 4)  # in features, rank
        y.pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


def test_copies_and_pickles_start_with_an_empty_cache():
    import pickle

    layer = _layer("linear", dtype=torch.float32).eval()
    x = _input("linear", torch.float32)
    with torch.no_grad():
        y = layer(x)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.pair("a")[1].zero_()  # the copy's own tensors
        assert_rounding_close(clone(x), _plain(clone, "a", x), n=16 + 4)
    again = pickle.loads(pickle.dumps(layer))
    with torch.no_grad():
        torch.testing.assert_close(again(x), y)


# ---- whole models ----------------------------------------------------------------------------


def _dora_model(make=tiny_llama, targets="attention+mlp", seed: int = 1):
    model = make()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets=targets, use_dora=True))
    randomize_adapter(model, std=0.1, seed=seed)
    with torch.no_grad():  # magnitudes near their starting norms, as after training
        for layer in model.modules():
            if isinstance(layer, lorakit.LoraLayer):
                layer.lora_magnitude["default"].copy_(dora.norm_of(layer, "default").reshape(layer.magnitude_shape()))
                layer.lora_magnitude["default"].mul_(1.05)
    return model


def test_new_dora_adapter_changes_nothing(ids):
    model = tiny_llama()
    base = logits(model, ids)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention", use_dora=True))
    layer = model.model.layers[0].self_attn.q_proj
    assert_rounding_close(layer.lora_magnitude["default"], layer.base_layer.weight.norm(dim=1), n=32)
    assert_rounding_close(logits(model, ids), base, n=TINY_MODEL_N)
    assert layer.lora_magnitude["default"].requires_grad
    assert lorakit.trainable_parameters(model)[0] == sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, lorakit.LoraLayer)
        for p in m.adapter_parameters("default").values()
    )


@pytest.mark.parametrize("make, targets", [(tiny_llama, "attention+mlp"), (tiny_gpt2, ["c_attn", "c_fc", "c_proj"])])
def test_merge_unload_disabled(make, targets, ids):
    model = _dora_model(make, targets)
    plain = make()
    expected = logits(model, ids)
    assert (expected - logits(plain, ids)).abs().max() > 1e-3
    with lorakit.disabled(model):
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=0)
    lorakit.merge(model)
    assert_rounding_close(logits(model, ids), expected, n=TINY_MODEL_N)
    lorakit.unmerge(model)
    original = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if "base_layer" in name:
            torch.testing.assert_close(p, original[name.replace(".base_layer", "")], rtol=0, atol=1e-6)
    merged = lorakit.unload(copy.deepcopy(model), merge=True)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in merged.modules())
    assert_rounding_close(logits(merged, ids), expected, n=TINY_MODEL_N)
    restored = lorakit.unload(model, merge=False)
    torch.testing.assert_close(logits(restored, ids), logits(plain, ids), rtol=0, atol=1e-6)


def test_save_load_round_trip(tmp_path, ids):
    model = _dora_model()
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    from helpers import tensors

    saved = tensors(tmp_path)
    assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == len(
        [m for m in model.modules() if isinstance(m, lorakit.LoraLayer)]
    )
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    assert lorakit.adapters(fresh)["default"].config.use_dora
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=0, atol=0)


def test_file_errors(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model = _dora_model()
    lorakit.save_adapter(model, tmp_path)
    weights, config_file = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("lora_magnitude_vector"))
    save_file({k: v for k, v in state.items() if k != key}, str(weights))
    with pytest.raises(lorakit.AdapterFileError, match=f"missing key {key}"):
        lorakit.load_adapter(tiny_llama(), tmp_path)
    save_file(dict(state, **{key: state[key][:-1]}), str(weights))
    with pytest.raises(lorakit.AdapterFileError, match=f"key '{key}': .*DoRA magnitude has shape"):
        lorakit.load_adapter(tiny_llama(), tmp_path)
    save_file(state, str(weights))
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, use_dora=False)))
    with pytest.raises(lorakit.AdapterFileError, match=f"unexpected key {key}.*use_dora false"):
        lorakit.load_adapter(tiny_llama(), tmp_path)
    config_file.write_text(json.dumps(dict(config, use_dora="yes")))
    with pytest.raises(lorakit.AdapterFileError, match="use_dora='yes'"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


# ---- PEFT, both directions ----------------------------------------------------------------------

peft = pytest.importorskip("peft")


DORA_CASES = {
    # name: (model factory, PEFT LoraConfig kwargs, lorakit LoraConfig kwargs)
    "llama": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
        dict(targets=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    ),
    "gpt2-conv1d": (
        tiny_gpt2,
        dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        dict(targets=["c_attn", "c_fc"]),
    ),
    "conv-embedding": (
        ConvToy,
        dict(target_modules=["emb", "lin", "conv2", "conv1"]),
        dict(targets=["emb", "lin", "conv2", "conv1"]),
    ),
}


def _out(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _peft_dora(case):
    make, peft_kwargs, _ = DORA_CASES[case]
    model = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **peft_kwargs)).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(1.05) if "magnitude" in name else p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("case", list(DORA_CASES))
def test_peft_dora_adapter_loads_in_lorakit(case, tmp_path):
    ids = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(7))
    reference = _peft_dora(case)
    expected = _out(reference, ids)
    reference.save_pretrained(tmp_path)
    model = DORA_CASES[case][0]().eval()
    base = _out(model, ids)
    lorakit.load_adapter(model, tmp_path)
    assert (expected - base).abs().max() > 1e-3
    assert_rounding_close(_out(model, ids), expected, n=TINY_MODEL_N)
    lorakit.merge(model)
    reference.merge_adapter()
    assert_rounding_close(_out(model, ids), _out(reference, ids), n=TINY_MODEL_N)


@pytest.mark.parametrize("case", list(DORA_CASES))
def test_lorakit_dora_adapter_loads_in_peft(case, tmp_path):
    ids = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(7))
    make, _, ours = DORA_CASES[case]
    model = make().eval()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, use_dora=True, **ours))
    randomize_adapter(model, std=0.1)
    expected = _out(model, ids)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make().eval(), tmp_path).eval()
    assert theirs.peft_config["default"].use_dora
    assert_rounding_close(_out(theirs, ids), expected, n=TINY_MODEL_N)


@pytest.mark.parametrize("case", list(DORA_CASES))
def test_training_gradients_match_peft(case):
    """Same adapter, same batch, training mode: the loss and every adapter gradient agree."""
    ids = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(7))
    reference = _peft_dora(case).train()
    make, _, ours = DORA_CASES[case]
    model = make()
    lorakit.load_adapter(model, _saved(reference), trainable=True)
    model.train()
    losses = []
    for m in (model, reference):
        torch.manual_seed(0)  # the models' own dropout draws alike
        out = m(ids)
        loss = (out.logits if hasattr(out, "logits") else out).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
    assert_rounding_close(torch.tensor(losses[0]), torch.tensor(losses[1]), n=TINY_MODEL_N + 2 * 9 * 120)
    theirs = dict(reference.base_model.model.named_modules())
    checked = 0
    for path, layer in model.named_modules():
        if isinstance(layer, lorakit.LoraLayer):
            for role, p in layer.adapter_parameters("default").items():
                other = _peft_tensor(theirs[path], role, isinstance(layer, LoraEmbedding))
                # a gradient runs the model forward and back, and sums over the batch's 18 tokens
                assert_rounding_close(p.grad, other.grad, n=2 * TINY_MODEL_N + 18)
                checked += 1
    assert checked >= 12


def _peft_tensor(layer, role: str, embedding: bool) -> torch.Tensor:
    if role == "m":
        return layer.lora_magnitude_vector["default"].weight
    if embedding:
        return getattr(layer, f"lora_embedding_{role}")["default"]
    return getattr(layer, f"lora_{role}")["default"].weight


def _saved(peft_model):
    import tempfile

    folder = tempfile.mkdtemp()
    peft_model.save_pretrained(folder)
    return folder
