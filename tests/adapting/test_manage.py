"""Adapters over whole models: the guarantees of inject, training, merge, disable, unload."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    MODELS,
    TINY_MODEL_N,
    assert_rounding_close,
    assert_unchanged,
    logits,
    randomize_adapter,
    snapshot,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

import lorakit


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_default_init_is_base_bitwise(arch, targets, ids):
    model = MODELS[arch]()
    base = logits(model, ids)
    cls = type(model)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=targets))
    assert type(model) is cls
    assert any(isinstance(m, lorakit.LoraLayer) for m in model.modules())
    assert torch.equal(logits(model, ids), base)


@pytest.mark.parametrize("arch", list(MODELS))
def test_training_step_changes_only_adapters(arch, ids):
    model = MODELS[arch]()
    save = ["classifier"] if arch == "bert" else []
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="all-linear", modules_to_save=save, dropout=0.1))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".copies." in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = model(ids)
        out.logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    if save:
        assert any(".copies.default" in n for n in changed)


@pytest.mark.numeric
@pytest.mark.parametrize("arch", list(MODELS))
def test_merge_unmerge_unload_disabled(arch, ids):
    model = MODELS[arch]()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = logits(model, ids)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    randomize_adapter(model)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    with lorakit.disabled(model):
        assert torch.equal(logits(model, ids), base)
    scale = adapted.abs().max().item()
    lorakit.merge(model)
    assert (logits(model, ids) - adapted).abs().max() <= 1e-5 * scale
    with pytest.raises(ValueError, match="unmerge"):
        with lorakit.disabled(model):
            pass
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        if n.replace(".base_layer", "") in original:
            assert (p - original[n.replace(".base_layer", "")]).abs().max() <= 1e-6, n
    plain = lorakit.unload(lorakit.unmerge(model), merge=False)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())
    for _, p in plain.named_parameters():
        assert p.requires_grad
    # unload(merge=False) after an unmerge: within 1e-6; a model never merged: bitwise.
    fresh = MODELS[arch]()
    lorakit.inject(fresh, lorakit.LoraConfig(rank=4, targets="all-linear"))
    randomize_adapter(fresh)
    plain = lorakit.unload(fresh, merge=False)
    assert set(dict(plain.named_parameters())) == set(original)
    for n, p in plain.named_parameters():
        assert torch.equal(p, original[n]), n
    assert torch.equal(logits(plain, ids), base)


@pytest.mark.numeric
def test_unload_merge_keeps_the_adapter(ids):
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention", modules_to_save=["classifier"]))
    randomize_adapter(model)
    with torch.no_grad():
        model.classifier.copies["default"].bias.add_(1.0)
    adapted = logits(model, ids)
    plain = lorakit.unload(model, merge=True)
    assert type(plain.classifier) is torch.nn.Linear
    assert not any(isinstance(m, (lorakit.LoraLayer,)) for m in plain.modules())
    assert (logits(plain, ids) - adapted).abs().max() <= 1e-5 * adapted.abs().max().item()


@pytest.mark.numeric
def test_two_adapters_sum_and_switch(ids):
    model = tiny_llama()
    base = logits(model, ids)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention"), name="a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(rank=2, alpha=4, targets="attention+mlp"))
    assert lorakit.active_adapters(model) == ["a"]
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    only_a = logits(model, ids)
    lorakit.set_adapter(model, "b")
    only_b = logits(model, ids)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable)
    lorakit.set_adapter(model, ["a", "b"])
    both = logits(model, ids)
    assert not torch.allclose(only_a, only_b)
    # The adapters are not additive through the nonlinear network; per layer they are.
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        total = layer(x)
        parts = layer.base_layer(x) + layer._delta(x, "a") + layer._delta(x, "b")
    assert_rounding_close(total, parts, n=32 + 4 + 2)  # width, ranks
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, ids), both, rtol=0, atol=1e-5 * both.abs().max().item())
    with pytest.raises(ValueError, match="unmerge"):
        lorakit.set_adapter(model, "a")
    lorakit.unmerge(model)
    lorakit.delete_adapter(model, "b")
    assert lorakit.active_adapters(model) == ["a"]
    assert not any(".b." in n for n, _ in model.named_parameters())
    # (merge + unmerge moved the base weights by rounding, hence the tolerance)
    assert_rounding_close(logits(model, ids), only_a, n=TINY_MODEL_N)
    lorakit.delete_adapter(model, "a")
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())
    assert_rounding_close(logits(model, ids), base, n=TINY_MODEL_N)


def test_trainable_parameters_counts():
    model = tiny_bert()
    total0 = sum(p.numel() for p in model.parameters())
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["query", "value"]))
    trainable, total = lorakit.trainable_parameters(model)
    # 2 layers x 2 modules x (A: 4x32 + B: 32x4)
    assert trainable == 2 * 2 * (4 * 32 + 32 * 4)
    assert total == total0 + trainable


def test_layers_filter():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention", layers=[1]))
    assert not isinstance(model.model.layers[0].self_attn.q_proj, lorakit.LoraLayer)
    assert isinstance(model.model.layers[1].self_attn.q_proj, lorakit.LoraLayer)


def test_bias_modes():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["query"], bias="lora_only"))
    names = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert names == {f"bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(2)}
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["query"], bias="all"))
    biases = [n for n, p in model.named_parameters() if n.endswith("bias")]
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))
    assert len(biases) > 10


def test_embedding_and_gpt2_generate():
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["wte", "c_attn"]))
    assert isinstance(model.transformer.wte, lorakit.LoraEmbedding)
    assert model.transformer.h[0].attn.c_attn.fan_in_fan_out
    randomize_adapter(model)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_targets_matching_nothing_is_an_error_that_lists_modules():
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        lorakit.inject(model, lorakit.LoraConfig(targets=["q_proj"]))
    assert "query" in str(err.value)
    assert_unchanged(model, before)


def test_bad_requests_change_nothing():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention"))
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter"):
        lorakit.add_adapter(model, "default", lorakit.LoraConfig())
    with pytest.raises(ValueError, match="modules_to_save"):
        lorakit.add_adapter(model, "x", lorakit.LoraConfig(targets="attention", modules_to_save=["nope"]))
    with pytest.raises(ValueError, match="pissa"):
        lorakit.add_adapter(model, "y", lorakit.LoraConfig(targets=["word_embeddings"], init="pissa"))
    with pytest.raises(ValueError, match="no adapter named"):
        lorakit.set_adapter(model, "zzz")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"alpha": 0}, "alpha must be a number > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"init": "loftq"}, "default, gaussian, pissa, olora"),
        ({"bias": "some"}, "none, all, lora_only"),
        ({"targets": "("}, "not a valid regex"),
        ({"rank_pattern": {"q": -1}}, "rank_pattern"),
        # Values of the wrong type: refused rather than read some other way.
        ({"rslora": "no"}, "rslora must be True or False"),  # a non-empty string is true
        ({"rslora": 1}, "rslora must be True or False"),
        ({"dropout": True}, r"dropout must be in \[0, 1\)"),
        ({"modules_to_save": "classifier"}, "modules_to_save must be a list"),  # not ['c', 'l', ...]
        ({"modules_to_save": [1]}, "modules_to_save must be a list"),
        ({"modules_to_save": {"classifier": 1}}, "modules_to_save must be a list"),
        ({"rank_pattern": None}, "rank_pattern must be a dict"),
        ({"rank_pattern": [("q", 2)]}, "rank_pattern must be a dict"),
        ({"rank_pattern": {"q(": 2}}, "rank_pattern key 'q\\(' is not a valid regex"),
        ({"alpha_pattern": {3: 2.0}}, "alpha_pattern key 3 must be a non-empty string"),
        ({"layers": 5}, "layers must be a list of block indices"),
        ({"layers": [True]}, "layers must be a list of block indices"),
        ({"layers": "1"}, "layers must be a list of block indices"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lorakit.LoraConfig(**kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(dtype, ids):
    model = tiny_llama().to(dtype)
    base = logits(model, ids)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="all-linear"))
    assert torch.equal(logits(model, ids), base)
    assert all(p.dtype == dtype for p in model.parameters())


def test_merge_refuses_tied_weights(ids):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["wte", "c_attn"]))
    randomize_adapter(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="tied to .*lm_head.weight"):
        lorakit.merge(model)
    with pytest.raises(ValueError, match="tied"):
        lorakit.unload(model, merge=True)
    assert_unchanged(model, before)


@pytest.mark.parametrize("merge", [True, False])
def test_unload_with_a_trained_copy_of_a_tied_output_layer(merge, ids):
    """GPT-2's lm_head shares wte's weight. A trained copy of lm_head (modules_to_save) is the
    adapter's own: unload(merge=True) keeps it (untied, the embeddings untouched); merge=False
    gives back the tied original and the base model's outputs."""
    model = tiny_gpt2()
    wte = model.transformer.wte.weight
    embeddings = wte.detach().clone()
    base = logits(model, ids)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["c_attn"], modules_to_save=["lm_head"]))
    randomize_adapter(model)
    with torch.no_grad():
        model.lm_head.copies["default"].weight.add_(0.1)
    adapted = logits(model, ids)
    assert torch.equal(wte, embeddings)  # training the copy leaves the tied embeddings alone
    lorakit.unload(model, merge=merge)
    assert type(model.lm_head) is torch.nn.Linear and torch.equal(model.transformer.wte.weight, embeddings)
    if merge:
        assert model.lm_head.weight is not model.transformer.wte.weight
        assert_rounding_close(logits(model, ids), adapted, n=TINY_MODEL_N)
    else:
        assert model.lm_head.weight is model.transformer.wte.weight
        assert torch.equal(logits(model, ids), base)


def test_two_active_adapters_cannot_share_a_saved_module():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["query"], modules_to_save=["classifier"]), name="a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(rank=4, targets=["value"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="only one of them can be active"):
        lorakit.set_adapter(model, ["a", "b"])
    assert lorakit.active_adapters(model) == ["a"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_merge_unmerge_restores_bitwise(dtype, ids):
    model = tiny_llama().to(dtype)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="all-linear"))
    randomize_adapter(model)
    adapted = logits(model, ids).float()
    lorakit.merge(model)
    rel = (logits(model, ids).float() - adapted).abs().max() / adapted.abs().max()
    assert rel < 0.1  # bf16 keeps 8 bits: merged and unmerged round differently
    plain = lorakit.unload(lorakit.unmerge(model), merge=False)
    for n, p in plain.named_parameters():
        assert torch.equal(p, original[n]), n


# ---- disabled() nests ----------------------------------------------------------------------


def _two_adapter_bert():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention", modules_to_save=["classifier"]))
    randomize_adapter(model)
    with torch.no_grad():
        model.classifier.copies["default"].bias.add_(1.0)
    return model


def test_disabled_blocks_nest(ids):
    model = _two_adapter_bert()
    base = logits(tiny_bert(), ids)
    adapted = logits(model, ids)
    with lorakit.disabled(model):
        with lorakit.disabled(model):
            assert torch.equal(logits(model, ids), base)
        assert torch.equal(logits(model, ids), base)  # leaving the inner block keeps the outer one
        with lorakit.disabled(model), lorakit.disabled(model):
            assert torch.equal(logits(model, ids), base)
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), adapted)


def test_disabled_blocks_nest_through_errors(ids):
    model = _two_adapter_bert()
    base, adapted = logits(tiny_bert(), ids), logits(model, ids)
    with lorakit.disabled(model):
        with pytest.raises(RuntimeError):
            with lorakit.disabled(model):
                raise RuntimeError("inside")
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), adapted)
    with pytest.raises(KeyError):
        with lorakit.disabled(model):
            with lorakit.disabled(model):
                raise KeyError("both")
    assert torch.equal(logits(model, ids), adapted)


def test_what_happens_inside_a_disabled_block_stays_disabled(ids):
    model = _two_adapter_bert()
    base, adapted = logits(tiny_bert(), ids), logits(model, ids)
    with lorakit.disabled(model):
        lorakit.add_adapter(model, "b", lorakit.LoraConfig(rank=2, targets=["key", "dense"]))
        randomize_adapter(model, "b", seed=4)
        lorakit.set_adapter(model, ["default", "b"])
        assert torch.equal(logits(model, ids), base)
        before = snapshot(model)
        with pytest.raises(ValueError, match="disabled"):
            lorakit.merge(model)
        with pytest.raises(ValueError, match="disabled"):
            lorakit.unload(model, merge=True)
        assert_unchanged(model, before)
    both = logits(model, ids)
    assert not torch.equal(both, adapted) and not torch.equal(both, base)
    lorakit.set_adapter(model, "default")
    torch.testing.assert_close(logits(model, ids), adapted, rtol=0, atol=1e-6)


def test_unload_inside_a_disabled_block(ids):
    model = _two_adapter_bert()
    base = logits(tiny_bert(), ids)
    with lorakit.disabled(model):
        plain = lorakit.unload(model, merge=False)
        assert torch.equal(logits(plain, ids), base)
    assert torch.equal(logits(plain, ids), base)
    lorakit.inject(plain, lorakit.LoraConfig(rank=2, targets=["query"]))
    randomize_adapter(plain)
    assert not torch.equal(logits(plain, ids), base)


# ---- active adapters: each once, never none ------------------------------------------------


def _three_adapters():
    model = tiny_llama()
    for i, name in enumerate(["a", "b", "c"]):
        lorakit.add_adapter(
            model, name, lorakit.LoraConfig(rank=2, alpha=4, targets="attention" if i != 1 else ["q_proj", "up_proj"])
        )
        randomize_adapter(model, name, seed=i + 1)
    return model


@pytest.mark.parametrize("names", [["a", "a"], ["a", "b", "a"], ("b", "b"), [], ["a", 3], None, {"a"}])
def test_set_adapter_refuses_repeats_and_nothing(names):
    model = _three_adapters()
    before = snapshot(model)
    with pytest.raises(ValueError, match="more than once|at least one|no adapter named|a list of them"):
        lorakit.set_adapter(model, names)
    assert_unchanged(model, before)
    assert lorakit.active_adapters(model) == ["a"]


@pytest.mark.numeric
@pytest.mark.parametrize("names", [["a"], ["b"], ["a", "b"], ["c", "a"], ["a", "b", "c"]])
def test_merged_and_unmerged_agree_for_every_active_set(names, ids):
    model = _three_adapters()
    lorakit.set_adapter(model, names)
    unmerged = logits(model, ids)
    lorakit.merge(model)
    merged = logits(model, ids)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5 * unmerged.abs().max().item())
    # and each adapter counts once: the sum of the per-layer deltas
    lorakit.unmerge(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + sum(layer._delta(x, n) for n in names)
        assert_rounding_close(layer(x), expected, n=32 + 3 * 2)  # width, ranks


def test_deleting_the_active_adapter_activates_the_oldest_left(ids):
    model = _three_adapters()
    lorakit.set_adapter(model, "b")
    lorakit.delete_adapter(model, "b")
    assert lorakit.active_adapters(model) == ["a"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)
    only_a = logits(model, ids)
    lorakit.set_adapter(model, ["c", "a"])
    lorakit.delete_adapter(model, "c")  # another active one is left: it stays the only one
    assert lorakit.active_adapters(model) == ["a"]
    assert torch.equal(logits(model, ids), only_a)


# ---- misuse of the API: a clear error before anything changes --------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: lorakit.inject(m, {"rank": 4}), TypeError, "config must be a lorakit.LoraConfig, got dict"),
        (lambda m: lorakit.inject(m, None), TypeError, "config must be a lorakit.LoraConfig, got NoneType"),
        (lambda m: lorakit.add_adapter(m, lorakit.LoraConfig(), "b"), ValueError, "adapter name must be"),
        (lambda m: lorakit.add_adapter_from_tensors(m, "b", "attention", {}), TypeError, "config must be"),
        (
            lambda m: lorakit.inject("model", lorakit.LoraConfig()),
            TypeError,
            "model must be a torch.nn.Module, got str",
        ),
        # Names nn.ModuleDict / nn.ParameterDict cannot hold: these failed halfway through, wrappers in place.
        *[
            (
                lambda m, n=n: lorakit.inject(m, lorakit.LoraConfig(targets=["query", "word_embeddings"]), name=n),
                ValueError,
                f"adapter name {n!r} is the name of an attribute",
            )
            for n in ("training", "forward", "keys", "update", "to", "__class__")
        ],
    ],
)
def test_misuse_is_a_clear_error_and_changes_nothing(call, error, message):
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["value"]), name="a")
    before = snapshot(model)
    with pytest.raises(error) as caught:
        call(model)
    assert message in str(caught.value)
    assert_unchanged(model, before)
    assert list(lorakit.adapters(model)) == ["a"]


def _eval_model_with(how):
    model = tiny_llama()  # eval mode
    cfg = lorakit.LoraConfig(rank=4, targets=["q_proj", "v_proj", "embed_tokens"], dropout=0.5)
    if how == "inject":
        lorakit.inject(model, cfg)
    elif how == "add second":
        lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["q_proj"]), name="first")
        lorakit.add_adapter(model, "default", cfg)
        lorakit.set_adapter(model, "default")
    else:
        source = tiny_llama()
        lorakit.inject(source, cfg)
        lorakit.save_adapter(source, how)
        lorakit.load_adapter(model, how)
    return model


@pytest.mark.parametrize("how", ["inject", "add second", "load"])
def test_new_wrappers_take_the_mode_of_the_module_they_wrap(how, ids, tmp_path):
    # A new nn.Module trains: in an eval-mode model, the adapters' dropout was on at inference.
    model = _eval_model_with(tmp_path / "adapter" if how == "load" else how)
    randomize_adapter(model)
    assert not any(m.training for m in model.modules())
    assert torch.equal(logits(model, ids), logits(model, ids))
    model.train()
    assert all(m.training for m in model.modules())
