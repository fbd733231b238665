"""init_schemes.py: how A and B start (PiSSA, gaussian)."""

from __future__ import annotations

import torch
from helpers import logits, tiny_bert, tiny_llama

import lorakit


def test_pissa_keeps_outputs_and_replaces_base(ids):
    model = tiny_llama()
    base = logits(model, ids)
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention", init="pissa"))
    layer = model.model.layers[0].self_attn.q_proj
    assert not torch.allclose(layer.base_layer.weight, w0)
    torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight("default"), w0, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=1e-4)
    # The residual holds none of the top-r singular directions.
    s0 = torch.linalg.svdvals(w0)
    s1 = torch.linalg.svdvals(layer.base_layer.weight)
    assert s1[0] < s0[0] and torch.allclose(s1[0], s0[4], atol=1e-4)


def test_gaussian_init():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=8, targets="all-linear", init="gaussian"))
    a = torch.cat([m.pair("default")[0].flatten() for m in model.modules() if isinstance(m, lorakit.LoraLayer)])
    assert abs(a.std().item() - 1 / 8) < 0.01
    assert all(torch.count_nonzero(m.pair("default")[1]) == 0 for m in model.modules() if isinstance(m, lorakit.LoraLayer))
