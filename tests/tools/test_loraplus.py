"""tools/loraplus.py: optimizer parameter groups, LoRA+ (B at ratio x lr) and what is not decayed."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert, tiny_llama

import lorakit


def _names(model, group) -> set[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)] for p in group["params"]}


def test_without_a_ratio_one_plain_group():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention", modules_to_save=["classifier"]))
    groups = lorakit.param_groups(model, 1e-3, weight_decay=0.1)
    assert len(groups) == 1
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters() if p.requires_grad]
    assert (groups[0]["lr"], groups[0]["weight_decay"], groups[0]["lr_scale"]) == (1e-3, 0.1, 1.0)


def test_loraplus_groups():
    model = tiny_llama()
    lorakit.inject(
        model,
        lorakit.LoraConfig(
            rank=4,
            targets=["q_proj", "v_proj", "embed_tokens"],
            use_dora=True,
            bias="lora_only",
            modules_to_save=["lm_head", "norm"],
        ),
    )
    main, fast, no_decay = lorakit.param_groups(model, 1e-4, loraplus_ratio=16, weight_decay=0.1)
    assert (fast["lr"], fast["weight_decay"], fast["lr_scale"]) == (1.6e-3, 0.1, 16.0)
    assert (main["lr"], main["weight_decay"]) == (1e-4, 0.1)
    assert (no_decay["lr"], no_decay["weight_decay"]) == (1e-4, 0.0)
    fast_names, main_names, quiet = _names(model, fast), _names(model, main), _names(model, no_decay)
    assert fast_names and all(n.split(".")[-3] == "lora_B" for n in fast_names)  # q/v B, not the embedding's
    assert {n for n in main_names if "embed_tokens" in n} == {
        "model.embed_tokens.lora_embedding_A.default",
        "model.embed_tokens.lora_embedding_B.default",
    }
    assert any("lm_head.copies.default.weight" in n for n in main_names)
    assert any("lora_magnitude" in n for n in quiet) and any(n.endswith("norm.copies.default.weight") for n in quiet)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert fast_names | main_names | quiet == trained and len(fast_names) + len(main_names) + len(quiet) == len(trained)


def test_one_sgd_step_moves_b_ratio_times_faster():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["q_proj"], init="gaussian"))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.pair("default")[1].normal_()
    opt = torch.optim.SGD(lorakit.param_groups(model, 1e-2, loraplus_ratio=8))
    a0, b0 = (t.detach().clone() for t in layer.pair("default"))
    model(torch.randint(0, 120, (2, 5))).logits.pow(2).mean().backward()
    a, b = layer.pair("default")
    ga, gb = a.grad.clone(), b.grad.clone()
    opt.step()
    torch.testing.assert_close(a - a0, -1e-2 * ga)
    torch.testing.assert_close(b - b0, -8e-2 * gb)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "lr must be a finite number > 0"),
        (dict(lr=1e-3, loraplus_ratio=-2), "loraplus_ratio must be a finite number > 0"),
        (dict(lr=1e-3, loraplus_ratio=float("nan")), "loraplus_ratio"),
        (dict(lr=1e-3, weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
    ],
)
def test_bad_values(kwargs, message):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=4))
    with pytest.raises(ValueError, match=message):
        lorakit.param_groups(model, **kwargs)


def test_nothing_trained_is_an_error():
    with pytest.raises(ValueError, match="no trained parameters"):
        lorakit.param_groups(tiny_llama().requires_grad_(False), 1e-3)
