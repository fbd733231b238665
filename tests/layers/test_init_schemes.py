"""layers/init_schemes.py: how A and B start (PiSSA, OLoRA, gaussian)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    TINY_MODEL_N,
    assert_rounding_close,
    assert_unchanged,
    logits,
    snapshot,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

import lorakit

pytestmark = pytest.mark.numeric  # pins float32 numbers to references (helpers.assert_rounding_close)


def test_pissa_keeps_outputs_and_replaces_base(ids):
    model = tiny_llama()
    base = logits(model, ids)
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention", init="pissa"))
    layer = model.model.layers[0].self_attn.q_proj
    assert not torch.allclose(layer.base_layer.weight, w0)
    assert_rounding_close(layer.base_layer.weight + layer.delta_weight("default"), w0, n=32)  # SVD, width 32
    assert_rounding_close(logits(model, ids), base, n=TINY_MODEL_N)
    # The residual holds none of the top-r singular directions.
    s0 = torch.linalg.svdvals(w0)
    s1 = torch.linalg.svdvals(layer.base_layer.weight)
    assert s1[0] < s0[0] and torch.allclose(s1[0], s0[4], atol=1e-4)


def test_gaussian_init():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=8, targets="all-linear", init="gaussian"))
    a = torch.cat([m.pair("default")[0].flatten() for m in model.modules() if isinstance(m, lorakit.LoraLayer)])
    assert abs(a.std().item() - 1 / 8) < 0.01
    assert all(
        torch.count_nonzero(m.pair("default")[1]) == 0 for m in model.modules() if isinstance(m, lorakit.LoraLayer)
    )


def test_olora_keeps_outputs_and_uses_the_qr_factors(ids):
    model = tiny_llama()
    base = logits(model, ids)
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets="attention", init="olora"))
    layer = model.model.layers[0].self_attn.q_proj
    a, b = layer.pair("default")
    assert_rounding_close(b.T @ b, torch.eye(4), n=32)  # orthonormal columns
    q, r = torch.linalg.qr(w0)
    assert_rounding_close(b @ a, q[:, :4] @ r[:4], n=32)  # the first r columns of Q R
    assert_rounding_close(layer.base_layer.weight + 2.0 * b @ a, w0, n=32)
    assert_rounding_close(logits(model, ids), base, n=TINY_MODEL_N)


def test_olora_matches_peft_and_works_on_conv1d(ids):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="olora")
    )
    ours = tiny_llama()
    lorakit.inject(ours, lorakit.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"], init="olora"))
    mine, other = ours.model.layers[1].self_attn.v_proj, theirs.base_model.model.model.layers[1].self_attn.v_proj
    assert_rounding_close(mine.pair("default")[0], other.lora_A["default"].weight, n=32)
    assert_rounding_close(mine.pair("default")[1], other.lora_B["default"].weight, n=32)
    assert_rounding_close(mine.base_layer.weight, other.base_layer.weight, n=32)
    # GPT-2's Conv1D stores (in, out): the QR is of the (out, in) weight, and outputs are kept.
    gpt2 = tiny_gpt2()
    base = logits(gpt2, ids)
    lorakit.inject(gpt2, lorakit.LoraConfig(rank=4, targets=["c_attn"], init="olora", use_dora=True))
    assert_rounding_close(logits(gpt2, ids), base, n=TINY_MODEL_N)


def test_residual_inits_with_dora_keep_outputs(ids):
    for init in ("pissa", "olora"):
        model = tiny_llama()
        base = logits(model, ids)
        lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention+mlp", init=init, use_dora=True))
        layer = model.model.layers[0].mlp.down_proj
        w = layer.base_layer.weight + layer.delta_weight("default")  # the original weight
        assert_rounding_close(layer.lora_magnitude["default"], w.norm(dim=1), n=64)
        assert_rounding_close(logits(model, ids), base, n=TINY_MODEL_N)


def test_olora_rank_above_the_layer_is_refused():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"module 'model.layers.0.self_attn.k_proj': OLoRA rank 20 is above the layer's size.*rank <= 16",
    ):
        lorakit.inject(model, lorakit.LoraConfig(rank=20, targets=["k_proj"], init="olora"))
    assert_unchanged(model, before)
