"""LoRA on fused MoE expert parameters (layers/experts.py): pinned to a float64 per-expert
reference, and every guarantee the library gives other layers, on tiny random MoE models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    MOE_KINDS,
    TINY_MODEL_N,
    assert_rounding_close,
    assert_unchanged,
    randomize_adapter,
    snapshot,
    tiny_model,
)

import lorakit
from lorakit.layers.experts import (
    LoraExpertParam,
    LoraExperts,
    expert_parameters,
    from_peft,
    grouped_forward,
    to_peft,
)

pytestmark = pytest.mark.numeric

IDS = torch.randint(3, 120, (3, 7), generator=torch.Generator().manual_seed(5))


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _experts(model, layer: int = 0):
    return model.model.layers[layer].mlp.experts


def _adapted(kind: str, rank: int = 4, seed: int = 1, **config):
    model = tiny_model(kind)
    lorakit.inject(model, lorakit.LoraConfig(rank=rank, targets="attention+mlp", **config))
    randomize_adapter(model, seed=seed)
    return model


# ---- the computation, against a float64 per-expert reference ----------------------------------


def _reference(experts, hidden, index, weights, pairs, scaling):
    """float64, one expert at a time, its weights plus s B A, in the experts' own layout."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)  # weights: float64 already
    first = "gate_up_proj"
    w = {}
    for name in (first, "down_proj"):
        weight = getattr(experts, name).double()
        a, b = pairs[name]
        delta = torch.einsum("eor,eri->eoi", b.double(), a.double()) * scaling
        w[name] = weight + (delta.transpose(1, 2) if experts.is_transposed else delta)
        w[name] = w[name] if experts.is_transposed else w[name].transpose(1, 2)  # (E, in, out)
    for e in range(experts.num_experts):
        token, slot = torch.where(index == e)
        h = hidden.double()[token] @ w[first][e]
        if experts.has_bias:
            h = h + experts.gate_up_proj_bias.double()[e]
        if experts.is_transposed:  # gpt-oss: interleaved gate / up, clamped
            gate, up = h[..., ::2].clamp(max=experts.limit), h[..., 1::2].clamp(-experts.limit, experts.limit)
            h = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        h = h @ w["down_proj"][e]
        if experts.has_bias:
            h = h + experts.down_proj_bias.double()[e]
        out = out.index_add(0, token, h * weights[token, slot, None])
    return out


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("rank", [3, 8])  # 8: torch's grouped_mm kernel; 3: its alignment fails, one mm per expert
@pytest.mark.parametrize("frozen", [True, False])  # one node for the experts; or one per projection
def test_grouped_forward_and_gradients_match_float64_reference(kind, rank, frozen):
    experts = _experts(tiny_model(kind))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            p.requires_grad_(not frozen)
    tokens = 11
    index = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(tokens)])  # expert 3 gets no token
    weights = torch.rand(tokens, 2, generator=gen, requires_grad=True)
    hidden = torch.randn(tokens, 32, generator=gen, requires_grad=True)
    layers = {n: LoraExpertParam(experts, n) for n in ("gate_up_proj", "down_proj")}
    pairs = {
        n: tuple(torch.randn(s, generator=gen).mul_(0.3).requires_grad_() for s in layer.pair_shapes(rank))
        for n, layer in layers.items()
    }
    got = grouped_forward(experts, hidden, index, weights, {n: [(a, b, 0.7, 0.0)] for n, (a, b) in pairs.items()})
    grad = torch.randn(got.shape, generator=gen)
    got.backward(grad)

    hidden64, weights64 = hidden.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    pairs64 = {n: tuple(t.detach().double().requires_grad_() for t in p) for n, p in pairs.items()}
    want = _reference(experts, hidden64, index, weights64, pairs64, 0.7)
    want.backward(grad.double())
    n = 32 + 2 * 16 + rank  # the longest chain of sums behind an output
    assert_rounding_close(got, want, n=n)
    assert_rounding_close(hidden.grad, hidden64.grad, n=2 * n)
    assert_rounding_close(weights.grad, weights64.grad, n=2 * n * 32)
    for name in pairs:
        for mine, ref in zip(pairs[name], pairs64[name]):
            assert_rounding_close(mine.grad, ref.grad, n=2 * n * tokens)
    assert pairs["gate_up_proj"][0].grad[3].abs().max() == 0  # an expert no token reaches learns nothing


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_host_forward_matches_its_reference_forward(kind):
    """LoraExperts' grouped forward (two adapters live) against its own plain per-expert path."""
    model = _adapted(kind, seed=1)
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(rank=2, targets=[], target_parameters=["down_proj"]))
    randomize_adapter(model, "b", seed=2)
    lorakit.set_adapter(model, ["default", "b"])
    host = _experts(model)
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(9, 32, generator=gen)
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=gen)
    with torch.no_grad():
        got = host(hidden, index, weights)
        want = host.reference_forward(hidden, index, weights)
    assert_rounding_close(got, want, n=32 + 2 * 64)


def test_peft_layout_round_trip_and_its_meaning():
    a, b = torch.randn(4, 3, 5), torch.randn(4, 6, 3)
    a2, b2 = to_peft(a, b)
    assert a2.shape == (12, 5) and b2.shape == (6, 12)
    # PEFT's ParamWrapper.get_delta_weight: A as (E, r, in), B as (out, r, E)
    peft_delta = torch.einsum("ore,eri->eoi", b2.reshape(6, 3, 4), a2.reshape(4, 3, 5))
    torch.testing.assert_close(peft_delta, torch.bmm(b, a))
    back = from_peft(a2, b2, 4)
    assert torch.equal(back[0], a) and torch.equal(back[1], b)
    with pytest.raises(ValueError, match="does not split into 5 experts"):
        from_peft(a2, b2, 5)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_outputs_match_peft_target_parameters(kind):
    """PEFT's own ParamWrapper, on the same expert weights with the same adapter values."""
    peft = pytest.importorskip("peft")
    ours = tiny_model(kind)
    theirs = copy.deepcopy(ours)
    lorakit.inject(
        ours, lorakit.LoraConfig(rank=4, alpha=8, targets=[], target_parameters=["gate_up_proj", "down_proj"])
    )
    randomize_adapter(ours)
    theirs = peft.get_peft_model(
        theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    )
    with torch.no_grad():
        for path in lorakit.adapters(ours)["default"].modules:
            wrapper = theirs.base_model.model.get_submodule(path.rpartition(".")[0])
            while wrapper.parameter_name != path.rpartition(".")[2]:
                wrapper = wrapper.base_layer
            a, b = to_peft(*ours.get_submodule(path).pair("default"))
            wrapper.lora_A["default"].weight.copy_(a)
            wrapper.lora_B["default"].weight.copy_(b)
    assert_rounding_close(_logits(ours), _logits(theirs), n=TINY_MODEL_N)


# ---- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_presets_reach_the_experts_and_start_at_the_base(kind):
    model = tiny_model(kind)
    base = _logits(model)
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets="attention+mlp"))
    modules = lorakit.adapters(model)["default"].modules
    experts = [p for p in modules if p in set(expert_parameters(model))]
    assert len(experts) == 4  # gate_up_proj and down_proj of both layers
    assert {p.rsplit(".", 1)[1] for p in experts} == {"gate_up_proj", "down_proj"}
    assert any(p.endswith("self_attn.q_proj") for p in modules)
    assert not any(p.endswith("_bias") for p in modules)
    if kind == "qwen2_moe":  # its shared expert is a plain MLP of nn.Linears: adapted as modules
        assert any(p.endswith("shared_expert.down_proj") for p in modules)
    assert torch.equal(_logits(model), base)  # B starts at zero
    with pytest.raises(ValueError, match="already has an adapter"):
        lorakit.inject(model, lorakit.LoraConfig(rank=2, targets="attention+mlp"))


def test_attention_preset_leaves_experts_alone():
    model = tiny_model("mixtral")
    lorakit.inject(model, lorakit.LoraConfig(targets="attention"))
    assert not isinstance(_experts(model), LoraExperts)


def test_target_parameters_follow_peft_matching_rule():
    model = tiny_model("qwen3_moe")
    lorakit.inject(model, lorakit.LoraConfig(targets=[], target_parameters=["1.mlp.experts.down_proj"]))
    assert lorakit.adapters(model)["default"].modules == ["model.layers.1.mlp.experts.down_proj"]
    assert not isinstance(_experts(model, 0), LoraExperts)
    assert [p.parameter_name for p in _experts(model, 1).params()] == ["down_proj"]


def test_bad_targets_are_refused_with_what_exists():
    model = tiny_model("qwen3_moe")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"target_parameters=\['gate_up_proj'\]"):
        lorakit.inject(model, lorakit.LoraConfig(targets=["gate_up_proj"]))
    with pytest.raises(ValueError, match="selects no expert parameter: it names no parameter.*gate_up_proj"):
        lorakit.inject(model, lorakit.LoraConfig(target_parameters=["experts.w1"]))
    with pytest.raises(ValueError, match="not a fused 3-D expert weight"):
        lorakit.inject(model, lorakit.LoraConfig(target_parameters=["q_proj.weight"]))
    with pytest.raises(ValueError, match="target_parameters must be a list"):
        lorakit.LoraConfig(target_parameters="gate_up_proj")
    assert_unchanged(model, before)


def test_dora_pissa_and_quantized_experts_are_refused_before_anything_changes():
    model = tiny_model("olmoe")
    before = snapshot(model)
    with pytest.raises(ValueError, match="DoRA on fused expert weights is not supported"):
        lorakit.inject(model, lorakit.LoraConfig(targets="attention+mlp", use_dora=True))
    assert_unchanged(model, before)
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match=f"init='{init}' is not supported on fused expert weights"):
            lorakit.inject(model, lorakit.LoraConfig(targets="attention+mlp", init=init))
        assert_unchanged(model, before)
    with torch.no_grad():
        _experts(model).down_proj = torch.nn.Parameter(torch.zeros(4, 32, 64, dtype=torch.uint8), requires_grad=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="full-precision expert weights"):
        lorakit.inject(model, lorakit.LoraConfig(targets=[], target_parameters=["gate_up_proj", "down_proj"]))
    assert_unchanged(model, before)


# ---- guarantees -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_merge_unmerge_disabled_unload(kind):
    model = tiny_model(kind)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = _logits(model)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention+mlp"))
    randomize_adapter(model)
    unmerged = _logits(model)
    assert (unmerged - base).abs().max() > 1e-2
    with lorakit.disabled(model):
        assert torch.equal(_logits(model), base)
    weight = _experts(model).base_layer.gate_up_proj.detach().clone()
    lorakit.merge(model)
    assert_rounding_close(_logits(model), unmerged, n=TINY_MODEL_N)
    lorakit.unmerge(model)
    assert (_experts(model).base_layer.gate_up_proj - weight).abs().max() <= 1e-6
    assert_rounding_close(_logits(model), unmerged, n=TINY_MODEL_N)

    merged = lorakit.unload(copy.deepcopy(model), merge=True)
    assert type(_experts(merged)).__name__.endswith("Experts") and not isinstance(_experts(merged), LoraExperts)
    assert_rounding_close(_logits(merged), unmerged, n=TINY_MODEL_N)

    fresh = tiny_model(kind)
    lorakit.inject(fresh, lorakit.LoraConfig(rank=4, targets="attention+mlp"))
    randomize_adapter(fresh)
    lorakit.unload(fresh, merge=False)
    assert set(fresh.state_dict()) == set(base_state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in base_state.items())
    assert torch.equal(_logits(fresh), base)


def test_several_adapters_add_up_and_delete_gives_the_module_back():
    model = _adapted("qwen3_moe", rank=4, seed=1)
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(rank=2, alpha=3, targets=[], target_parameters=["down_proj"]))
    randomize_adapter(model, "b", seed=2)
    lorakit.set_adapter(model, ["default", "b"])
    both = _logits(model)
    reference = copy.deepcopy(model).double()
    reference.set_experts_implementation("eager")  # Transformers' grouped_mm experts take no float64
    lorakit.merge(reference)  # float64 merged weights: the sum of both deltas per expert
    assert_rounding_close(both, _logits(reference).float(), n=TINY_MODEL_N)
    lorakit.delete_adapter(model, "b")
    assert [p.adapter_names for p in _experts(model).params()] == [["default"], ["default"]]
    lorakit.delete_adapter(model, "default")
    assert not isinstance(_experts(model), LoraExperts)
    assert not lorakit.adapters(model)


def test_training_step_changes_only_adapters_and_dropout_acts_in_training_only():
    model = _adapted("gpt_oss", dropout=0.3).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    expert_a = _experts(model).down_proj.pair("default")[0]
    assert expert_a.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(IDS, labels=IDS).loss.backward()
    assert expert_a.grad is not None and expert_a.grad.abs().max() > 0
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    assert torch.equal(_logits(model), _logits(model))  # no dropout in eval


def test_lora_only_bias_trains_gpt_oss_expert_biases():
    model = tiny_model("gpt_oss")
    lorakit.inject(model, lorakit.LoraConfig(targets=[], target_parameters=["gate_up_proj"], bias="lora_only"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == {f"model.layers.{i}.mlp.experts.base_layer.gate_up_proj_bias" for i in (0, 1)}


def test_add_adapter_from_tensors_is_transactional():
    model = _adapted("qwen3_moe")
    source = {
        p: tuple(t.detach().clone() for t in model.get_submodule(p).pair("default"))
        for p in lorakit.adapters(model)["default"].modules
    }
    config = lorakit.adapters(model)["default"].config
    path = "model.layers.1.mlp.experts.down_proj"
    before = snapshot(model)
    bad = dict(source, **{path: (source[path][0], source[path][1].clone().fill_(float("nan")))})
    with pytest.raises(ValueError, match=f"{path}.*NaN"):
        lorakit.add_adapter_from_tensors(model, "twin", config, bad)
    wrong = dict(source, **{path: (source[path][0][:, :2], source[path][1])})
    with pytest.raises(ValueError, match=f"{path}.*rank 2"):
        lorakit.add_adapter_from_tensors(model, "twin", config, wrong)
    assert_unchanged(model, before)
    lorakit.add_adapter_from_tensors(model, "twin", config, source)
    lorakit.set_adapter(model, "twin")
    copied = _logits(model)
    lorakit.set_adapter(model, "default")
    assert torch.equal(copied, _logits(model))


def test_tensors_onto_a_fresh_model_wrap_the_experts():
    model = _adapted("mixtral")
    pairs = {p: model.get_submodule(p).pair("default") for p in lorakit.adapters(model)["default"].modules}
    fresh = tiny_model("mixtral")
    lorakit.add_adapter_from_tensors(fresh, "default", lorakit.adapters(model)["default"].config, pairs)
    assert torch.equal(_logits(fresh), _logits(model))


def test_combine_cat_is_exact_on_experts():
    model = _adapted("qwen3_moe", seed=1)
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(rank=2, targets="attention+mlp"))
    randomize_adapter(model, "b", seed=2)
    report = lorakit.combine(model, {"default": 0.6, "b": -0.4}, "mix", "cat")
    assert report.max_error < 1e-5
    config = lorakit.adapters(model)["mix"].config
    assert len(config.target_parameters) == 4 and all("experts" not in t for t in config.targets)
    lorakit.set_adapter(model, "mix")
    combined = _logits(model)
    with lorakit.mixed_batch(model, [{"default": 0.6, "b": -0.4}] * 3):
        mixed = _logits(model)
    assert_rounding_close(combined, mixed, n=TINY_MODEL_N)
    svd = lorakit.combine(model, {"default": 1.0}, "svd", "svd", rank=4)
    assert svd.max_error < 1e-5  # rank 4 holds a rank-4 adapter exactly, expert by expert


def test_mixed_batch_rows_each_through_their_own_expert_adapters():
    model = _adapted("qwen3_moe", seed=1).eval()
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(rank=2, targets="attention+mlp"))
    randomize_adapter(model, "b", seed=2)
    routes = ["default", None, "b", {"default": 0.5, "b": 0.5}]
    ids = torch.randint(3, 120, (4, 6), generator=torch.Generator().manual_seed(9))
    with lorakit.mixed_batch(model, routes):
        got = _logits(model, ids)
    with lorakit.disabled(model):
        assert torch.equal(got[1], _logits(model, ids)[1])
    for row, route in ((0, "default"), (2, "b")):
        lorakit.set_adapter(model, route)
        assert_rounding_close(got[row], _logits(model, ids)[row], n=TINY_MODEL_N)
    half = lorakit.combine(model, {"default": 0.5, "b": 0.5}, "halves", "cat")
    assert half.max_error < 1e-5
    lorakit.set_adapter(model, "halves")
    assert_rounding_close(got[3], _logits(model, ids)[3], n=TINY_MODEL_N)


def test_quantized_model_keeps_experts_in_full_precision_for_lora():
    pytest.importorskip("bitsandbytes")
    model = tiny_model("qwen3_moe")
    lorakit.quantize(model, "nf4")  # nn.Linear layers only: the fused experts stay float32
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention+mlp"))
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, lorakit.LoraLayer)}
    assert kinds == {"LoraQuantLinear", "LoraExpertParam"}
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert _experts(model).gate_up_proj.pair("default")[0].grad is not None


def test_generate_inside_mixed_batch_follows_each_rows_route():
    model = _adapted("qwen3_moe", seed=1, rank=4)
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(rank=4, targets="attention+mlp"))
    randomize_adapter(model, "b", seed=3)
    ids, routes = IDS[:, :5], ["default", None, "b"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with lorakit.mixed_batch(model, routes):
        together = model.generate(ids, **kw)
    for row, route in enumerate(routes):
        if route is None:
            with lorakit.disabled(model):
                alone = model.generate(ids[row : row + 1], **kw)
        else:
            lorakit.set_adapter(model, route)
            alone = model.generate(ids[row : row + 1], **kw)
        assert torch.equal(alone[0], together[row])


def test_layers_restrict_the_experts_too():
    model = tiny_model("olmoe")
    lorakit.inject(model, lorakit.LoraConfig(targets="attention+mlp", layers=[1]))
    modules = lorakit.adapters(model)["default"].modules
    assert all(".layers.1." in p for p in modules)
    assert {p for p in modules if "experts" in p} == {
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    }
