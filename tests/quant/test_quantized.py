"""Quantized bases (quant/bnb.py, quant/convert.py, quant/loftq.py, layers/quantized.py and
layers/quantized_fused.py): the facts
about bitsandbytes' layers lorakit relies on, quantize / dequantize, the wrapper's forward, fast
path, merge rules and adapter files; and the core without bitsandbytes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TINY_MODEL_N,
    assert_rounding_close,
    assert_unchanged,
    logits,
    randomize_adapter,
    snapshot,
    tiny_bert,
    tiny_llama,
    tiny_model,
)

import lorakit
from lorakit.quant.bnb import dequantize, keep_layouts, quantized_kind, stored_bytes

bnb = pytest.importorskip("bitsandbytes")

KINDS = ["nf4", "fp4", "int8"]


def quantized_llama(kind: str = "nf4", compute_dtype=None, **config):
    return lorakit.quantize(tiny_model("llama", **config), kind, compute_dtype=compute_dtype)


def adapted(kind: str = "nf4", targets="attention+mlp", compute_dtype=None, **lora):
    model = quantized_llama(kind, compute_dtype)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets=targets, **lora))
    randomize_adapter(model)
    return model


def assert_near(got, expected, rel, what=""):
    """|got - expected| <= rel * max |expected|: rounding, not a different computation."""
    torch.testing.assert_close(got, expected, rtol=0, atol=rel * expected.abs().max().item(), msg=what or None)


def reference_outputs(model, ids):
    """Logits with every wrapper on its plain path (the bitsandbytes layer plus each delta)."""
    layers = [m for m in model.modules() if isinstance(m, lorakit.LoraQuantLinear)]
    for layer in layers:
        layer.forward = layer.reference_forward
    try:
        return model(ids).logits
    finally:
        for layer in layers:
            del layer.forward


# ---- what bitsandbytes' layers compute (the facts quant/bnb.py states) ----------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_dequantize_is_what_the_layer_multiplies_by(kind, compute):
    if kind == "int8" and compute is torch.bfloat16:
        pytest.skip("an 8-bit layer computes in its input's dtype")
    layer = quantized_llama(kind, compute).model.layers[0].mlp.up_proj.train()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        y = layer(x)
    expected = F.linear(x.to(compute), dequantize(layer, compute)).to(x.dtype)
    assert torch.equal(y, expected)


def test_quantize_matches_bitsandbytes_own_quantization_bitwise():
    model = tiny_llama()
    weight = model.model.layers[1].self_attn.v_proj.weight.detach().clone()
    lorakit.quantize(model, "nf4")
    layer = model.model.layers[1].self_attn.v_proj
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(layer.weight.data, packed)
    assert torch.equal(dequantize(layer, torch.float32), bnb.functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("kind, bits", [("nf4", 4.0), ("fp4", 4.0), ("int8", 8.0)])
def test_stored_bytes(kind, bits):
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    lorakit.quantize(model, kind)
    layer = model.model.layers[0].mlp.up_proj
    weights = layer.in_features * layer.out_features
    per_weight = 8 * stored_bytes(layer) / weights
    assert bits < per_weight < bits + 0.6  # codes plus block scales (and their scales, code tables)


@pytest.mark.numeric
def test_cpu_inference_relayout_is_kept_off():
    """bitsandbytes re-lays a 4-bit weight out for bf16 inference (eval, no grad) on AVX512-BF16
    CPUs, after which the layer passes no gradient to its input; lorakit keeps it off."""
    model = quantized_llama("nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.support_avx512bf16_for_cpu is False
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 120, (1, 4)))
    x = torch.randn(2, 32, requires_grad=True)
    layer.train()(x).sum().backward()
    assert_rounding_close(x.grad, dequantize(layer, torch.float32).sum(0).expand(2, -1), n=32)


# ---- quantize / dequantize -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_keeps_the_head_and_what_skip_names(kind, ids):
    model = tiny_llama()
    before = logits(model, ids)
    lorakit.quantize(model, kind, skip=["layers.1.mlp"])
    kinds = {n: quantized_kind(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = "linear8bit" if kind == "int8" else "linear4bit"
    assert kinds["lm_head"] is None
    assert kinds["model.layers.1.mlp.up_proj"] is None and kinds["model.layers.1.self_attn.q_proj"] == expected
    assert kinds["model.layers.0.mlp.up_proj"] == expected
    assert getattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit") is True
    error = (logits(model, ids) - before).abs().max() / before.abs().max()
    assert 0 < error < (0.05 if kind == "int8" else 1.0)  # a tiny random model: coarse, not lost


def test_quantize_refuses_bad_requests_before_changing_anything():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="kind must be one of nf4, fp4, int8"):
        lorakit.quantize(model, "nf3")
    with pytest.raises(ValueError, match="'nope' names no module"):
        lorakit.quantize(model, "nf4", skip=["nope"])
    assert_unchanged(model, before)
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets="attention"))
    with pytest.raises(ValueError, match="before adding adapters"):
        lorakit.quantize(model, "nf4")
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize.*Conv1D"):
        lorakit.quantize(tiny_model("gpt2"), "nf4")


def test_quantize_keeps_tied_weights_in_full_precision():
    model = tiny_model("llama", tie_word_embeddings=True)
    lorakit.quantize(model, "nf4")
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.numeric
def test_dequantize_gives_the_same_model_in_full_precision(ids):
    model = adapted("nf4")
    model.eval()
    expected = logits(model, ids)
    lorakit.dequantize(model)
    assert not any(quantized_kind(m) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is lorakit.LoraLinear
    assert model.is_loaded_in_4bit is False
    assert_rounding_close(logits(model, ids), expected, n=TINY_MODEL_N)
    lorakit.merge(model)  # now exact, as for any full-precision layer
    assert_rounding_close(logits(model, ids), expected, n=TINY_MODEL_N)


# ---- the wrapper ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_injected_default_init_gives_the_base_outputs_bitwise(kind, ids):
    model = quantized_llama(kind)
    base = logits(model, ids)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="all-linear"))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, lorakit.LoraQuantLinear) and layer.lora_A["default"].weight.dtype == torch.float32
    assert torch.equal(logits(model, ids), base)


@pytest.mark.numeric
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [9, 400])  # 400: the adapters ride inside the matmul (fp32)
def test_fast_path_matches_the_reference(kind, compute, tokens):
    if kind == "int8" and compute is torch.bfloat16:
        pytest.skip("an 8-bit layer computes in its input's dtype")
    model = adapted(kind, compute_dtype=compute, dropout=0.0)
    model.train()
    ids = torch.randint(0, 120, (2, tokens // 2), generator=torch.Generator().manual_seed(0))
    out = model(ids).logits
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = reference_outputs(model, ids)
    ref.pow(2).mean().backward()

    def near(got, want, what=""):
        if compute is torch.float32:  # rounding of the forward, the backward and the sum over the tokens
            assert_rounding_close(got, want, n=2 * TINY_MODEL_N + tokens, msg=what or None)
        else:  # the same bf16 roundings, but gradients summed in another order flip a few of them
            assert_near(got, want, 2e-2, what)

    near(out, ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            near(grads[n], p.grad, n)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_fast_path_on_a_bf16_model_with_float32_adapters(kind):
    """Transformers' dtype=torch.bfloat16 with a bf16 compute dtype; PEFT keeps the adapters in float32."""
    model = lorakit.quantize(tiny_llama().to(torch.bfloat16), kind, compute_dtype=torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets="attention+mlp"))
    randomize_adapter(model)
    assert model.model.layers[0].mlp.up_proj.lora_B["default"].weight.dtype == torch.float32
    model.train()
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(ids).logits
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = reference_outputs(model, ids)
    ref.float().pow(2).mean().backward()
    assert torch.equal(out, ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_near(grads[n], p.grad, 2e-2, n)


@pytest.mark.numeric
def test_fast_path_with_dropout_draws_the_reference_masks():
    model = adapted("nf4", dropout=0.3)
    model.train()
    ids = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    out = model(ids).logits
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch.manual_seed(5)
    ref = reference_outputs(model, ids)
    ref.sum().backward()
    assert torch.equal(out, ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_rounding_close(grads[n], p.grad, n=2 * TINY_MODEL_N + 14, msg=n)


def test_a_training_step_changes_only_the_adapters():
    model = adapted("nf4")
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 120, (2, 9))
    model(ids, labels=ids).loss.backward()
    opt.step()
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_trainable_parameters_count_packed_weights_as_weights():
    plain = tiny_llama()
    total = lorakit.trainable_parameters(plain)[1]
    assert lorakit.trainable_parameters(lorakit.quantize(tiny_llama(), "nf4"))[1] == total


def test_disabled_and_unload_without_merge_give_the_base_back(ids):
    model = quantized_llama("nf4")
    base = logits(model, ids)
    layer = model.model.layers[0].self_attn.q_proj
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention"))
    randomize_adapter(model)
    assert not torch.equal(logits(model, ids), base)
    with lorakit.disabled(model):
        assert torch.equal(logits(model, ids), base)
    lorakit.unload(model, merge=False)
    assert model.model.layers[0].self_attn.q_proj is layer
    assert torch.equal(logits(model, ids), base)


def test_nested_disabled_and_its_merge_refusal_hold_on_a_quantized_base(ids):
    model = adapted("nf4")
    base = quantized_llama("nf4")
    expected, adapted_out = logits(base, ids), logits(model, ids)
    with lorakit.disabled(model):
        with lorakit.disabled(model):
            assert torch.equal(logits(model, ids), expected)
        assert torch.equal(logits(model, ids), expected)  # the outer block still holds
        with pytest.raises(ValueError, match="adapters are disabled"):
            lorakit.merge(model, requantize=True)
    assert torch.equal(logits(model, ids), adapted_out)


@pytest.mark.parametrize(
    "value, message",
    [(float("nan"), "B holds 1 NaN"), ("int64", "B has dtype torch.int64, but this model needs floating-point")],
)
def test_file_values_are_checked_on_a_quantized_base(value, message):
    model = quantized_llama("nf4")
    path = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(path)
    a, b = torch.zeros(4, layer.in_features), torch.zeros(layer.out_features, 4)
    if isinstance(value, float):
        b[1, 2] = value
    else:
        b = b.to(getattr(torch, value))
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"module '{path}': {message}"):
        lorakit.add_adapter_from_tensors(model, "x", lorakit.LoraConfig(rank=4, targets=[path]), {path: (a, b)})
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_a_quantized_weight_is_refused_unless_asked(kind, ids):
    model = adapted(kind)
    model.eval()
    before = snapshot(model)
    unmerged = logits(model, ids)
    for call in (lambda: lorakit.merge(model), lambda: lorakit.unload(model, merge=True)):
        with pytest.raises(ValueError, match=r"cannot merge into 'model.layers.0.self_attn.q_proj'.*dequantize"):
            call()
        assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="re-quantizing 14 quantized weights; largest weight error"):
        lorakit.merge(model, requantize=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.requantize_error > 0
    merged = logits(model, ids)
    assert (merged - unmerged).abs().max() > 1e-4  # re-quantizing loses part of the update
    lorakit.unmerge(model)  # the original quantized weights come back exactly
    assert_unchanged(model, before)
    assert torch.equal(logits(model, ids), unmerged)


def test_requantized_merge_is_what_quantizing_the_sum_gives():
    model = adapted("nf4")
    layer = model.model.layers[1].mlp.down_proj
    expected = dequantize(layer, torch.float32) + layer.delta_weight("default")
    layer.merge(requantize=True)
    packed, state = bnb.functional.quantize_4bit(expected, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(dequantize(layer, torch.float32), bnb.functional.dequantize_4bit(packed, state))
    assert layer.requantize_error == pytest.approx((dequantize(layer, torch.float32) - expected).abs().max().item())


def test_pissa_is_refused_on_a_quantized_base():
    model = quantized_llama("nf4")
    with pytest.raises(ValueError, match="quantized here"):
        lorakit.inject(model, lorakit.LoraConfig(rank=2, targets="attention", init="pissa"))


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_file_round_trip(kind, tmp_path, ids):
    model = adapted(kind)
    model.eval()
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    fresh = quantized_llama(kind)
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh.eval(), ids), expected)
    plain = tiny_llama()  # the same file on the full-precision base: close, not equal
    lorakit.load_adapter(plain, tmp_path)
    assert (logits(plain, ids) - expected).abs().max() > 0


def test_all_linear_preset_finds_quantized_layers():
    model = quantized_llama("nf4")
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets="all-linear"))
    adapted_paths = [n for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)]
    assert len(adapted_paths) == 14 and "lm_head" not in adapted_paths


def test_bert_classifier(ids):
    model = tiny_bert()
    lorakit.quantize(model, "nf4")
    assert quantized_kind(model.classifier) is None  # the head stays in full precision
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets="attention", modules_to_save=["classifier"]))
    model.train()
    out = model(ids).logits
    out.sum().backward()
    assert model.bert.encoder.layer[0].attention.self.query.lora_A["default"].weight.grad is not None


def test_a_layer_already_relaid_out_is_put_back_when_wrapped():
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes re-lays 4-bit weights out only on CPUs with AVX512-BF16")
    model = quantized_llama("nf4", hidden_size=128, intermediate_size=256)  # its kernel needs 64+ inputs
    for m in model.modules():
        if quantized_kind(m) == "linear4bit":
            m.support_avx512bf16_for_cpu = True  # bitsandbytes' default, as Transformers loads it
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 120, (1, 4)))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.quant_state.packing_format_for_cpu
    keep_layouts(model)
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets="attention"))
    randomize_adapter(model)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    ids = torch.randint(0, 120, (2, 5))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


# ---- without bitsandbytes ------------------------------------------------------------------


def test_core_imports_without_bitsandbytes_and_quantize_names_the_extra():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import lorakit, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "lorakit.inject(m, lorakit.LoraConfig(rank=2, targets=['0']))\n"
        "try:\n"
        "    lorakit.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), 'nf4')\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "need bitsandbytes" in out and "pip install 'lorakit[quant]'" in out


def test_import_lorakit_does_not_import_bitsandbytes():
    code = "import sys, lorakit; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- LoftQ ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_loftq_pairs_start_the_adapters_at_the_quantization_error(kind, ids):
    original = tiny_llama()
    config = lorakit.LoraConfig(rank=8, alpha=16, targets="attention+mlp")
    pairs = lorakit.loftq_pairs(original, config, kind)
    model = lorakit.quantize(tiny_llama(), kind)
    plain = logits(model, ids)
    lorakit.add_adapter_from_tensors(model, "default", config, pairs)
    for path in pairs:
        weight = original.get_submodule(path).weight
        layer = model.get_submodule(path)
        before = (weight - dequantize(layer.base_layer, torch.float32)).norm()
        after = (weight - dequantize(layer.base_layer, torch.float32) - layer.delta_weight("default")).norm()
        assert after < 0.9 * before, path  # rank 8 of a 32-wide weight: a real part of the error
    reference = logits(original, ids)
    assert (logits(model, ids) - reference).abs().max() < (plain - reference).abs().max()


def test_loftq_adapter_loads_on_any_quantized_base(tmp_path, ids):
    """One iteration leaves the base the ordinary quantized one, so the file is all it takes."""
    config = lorakit.LoraConfig(rank=4, alpha=8, targets="attention")
    pairs = lorakit.loftq_pairs(tiny_llama(), config, "nf4")
    model = lorakit.quantize(tiny_llama(), "nf4")
    lorakit.add_adapter_from_tensors(model, "default", config, pairs)
    lorakit.save_adapter(model, tmp_path)
    fresh = lorakit.quantize(tiny_llama(), "nf4")
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"init": "olora"}, {"init": "pissa"}])
def test_variants_that_need_the_full_precision_weight_are_refused_before_any_change(lora):
    model = quantized_llama("nf4")
    before = snapshot(model)
    with pytest.raises(ValueError, match="q_proj.*(full-precision base weight|quantized here)"):
        lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention", **lora))
    assert_unchanged(model, before)
    assert lorakit.adapters(model) == {}
