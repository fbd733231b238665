"""adapting/pissa.py: PiSSA adapters load to the model that was trained (the residual recomputed, as PEFT
does), convert to plain LoRA for the original base, give the base back, and refuse what cannot
be reproduced. Pinned to PEFT both ways. OLoRA adapters (the same mechanism) at the end."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    TINY_MODEL_N,
    assert_rounding_close,
    assert_unchanged,
    logits,
    randomize_adapter,
    snapshot,
    tiny_gpt2,
    tiny_llama,
)
from safetensors.torch import load_file

import lorakit
from lorakit.files.adapter_file import CONFIG_FILE, WEIGHTS_FILE, AdapterFileError

pytestmark = pytest.mark.numeric  # pins float32 numbers to references (helpers.assert_rounding_close)

peft = pytest.importorskip("peft")

CASES = {
    # name: (model factory, PEFT LoraConfig kwargs, lorakit LoraConfig kwargs)
    "llama": (
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
        dict(rank=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj"]),
    ),
    "llama-rslora-patterns": (
        tiny_llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 3},
        ),
        dict(
            rank=4,
            alpha=8,
            targets=["q_proj", "v_proj"],
            rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 3},
        ),
    ),
    "gpt2-conv1d": (
        tiny_gpt2,
        dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        dict(rank=4, alpha=16, targets=["c_attn", "c_fc"]),
    ),
}


def _train_peft(model, seed: int = 3) -> None:
    """Move every PEFT adapter tensor away from its start, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _train_lorakit(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name in module.adapter_names if isinstance(module, lorakit.LoraLayer) else []:
                for p in module.adapter_parameters(name).values():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)


# PEFT's own OLoRA fails on GPT-2's Conv1D (it factors the stored (in, out) matrix).
RESIDUAL_CASES = [("pissa", case) for case in CASES] + [("olora", "llama"), ("olora", "llama-rslora-patterns")]


@pytest.mark.parametrize("init, case", RESIDUAL_CASES)
def test_peft_residual_adapter_loads_to_the_trained_model(init, case, tmp_path, ids):
    make, peft_kwargs, _ = CASES[case]
    reference = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=init, **peft_kwargs)).eval()
    _train_peft(reference)
    trained = logits(reference, ids)
    reference.save_pretrained(tmp_path)
    model = make()
    base = logits(model, ids)
    lorakit.load_adapter(model, tmp_path)
    assert lorakit.adapters(model)["default"].config.init == init
    assert (trained - base).abs().max() > 1e-2
    assert_rounding_close(logits(model, ids), trained, n=TINY_MODEL_N)
    # The residual is the same computation as PEFT's, to the bit.
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if "base_layer" in n}
    ours = {n: p for n, p in model.named_parameters() if "base_layer" in n}
    assert theirs.keys() == ours.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def _saved_lorakit_pissa(case: str, folder, ids, **save) -> torch.Tensor:
    """Inject a PiSSA adapter for `case`, train it a little, save it; the trained logits."""
    make, _, ours = CASES[case]
    model = make()
    lorakit.inject(model, lorakit.LoraConfig(init="pissa", **ours))
    _train_lorakit(model)
    lorakit.save_adapter(model, folder, **save)
    return logits(model, ids)


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_pissa_adapter_loads_in_peft_and_lorakit(case, tmp_path, ids):
    make = CASES[case][0]
    trained = _saved_lorakit_pissa(case, tmp_path, ids)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["init_lora_weights"] == "pissa"
    reference = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert_rounding_close(logits(reference, ids), trained, n=TINY_MODEL_N)
    fresh = make()
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), trained)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_pissa_reload_is_bitwise(dtype, tmp_path, ids):
    model = tiny_llama().to(dtype)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention", init="pissa"))
    _train_lorakit(model)
    trained = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama().to(dtype)
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), trained)


# ---- written as plain LoRA for the original base ----------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_as_lora_reproduces_the_trained_model_on_the_original_base(case, tmp_path, ids):
    make, _, ours = CASES[case]
    trained = _saved_lorakit_pissa(case, tmp_path, ids, as_lora=True)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["init_lora_weights"] is True and config["r"] == 2 * ours["rank"]
    for load in ("lorakit", "peft"):
        base = make()
        if load == "lorakit":
            lorakit.load_adapter(base, tmp_path)
            assert lorakit.adapters(base)["default"].initial == {}  # the base weights stay the original ones
        else:
            base = peft.PeftModel.from_pretrained(base, tmp_path).eval()
        assert_rounding_close(logits(base, ids), trained, n=TINY_MODEL_N)


@pytest.mark.parametrize("case", list(CASES))
def test_load_as_lora_leaves_the_base_weights_as_they_are(case, tmp_path, ids):
    """load_adapter(as_lora=True): the PiSSA adapter as plain LoRA of twice the rank over the
    untouched base (what lorakit serve needs: other adapters and base rows share that base)."""
    make, _, ours = CASES[case]
    trained = _saved_lorakit_pissa(case, tmp_path, ids)
    model = make()
    base = logits(model, ids)
    lorakit.load_adapter(model, tmp_path, "p", as_lora=True)
    record = lorakit.adapters(model)["p"]
    assert record.initial == {} and record.config.init == "default" and record.config.rank == 2 * ours["rank"]
    assert_rounding_close(logits(model, ids), trained, n=TINY_MODEL_N)
    with lorakit.disabled(model):
        assert torch.equal(logits(model, ids), base)
    # A plain adapter may share its modules now (a residual would have refused it).
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(rank=2, targets=ours["targets"][:1]))
    assert set(lorakit.adapters(model)) == {"p", "other"}


def test_load_as_lora_names_the_key_of_a_bad_pair(tmp_path):
    _saved_lorakit_pissa("llama", tmp_path, torch.zeros(1, 1, dtype=torch.long))
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = tensors[key][:3]
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / WEIGHTS_FILE)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=rf"key '{key}'.*A has rank 3, but the config gives rank 4"):
        lorakit.load_adapter(model, tmp_path, as_lora=True)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "peft_kwargs",
    [
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 3},
        ),
        dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True
        ),  # PEFT refuses rslora with patterns
    ],
    ids=["patterns", "rslora"],
)
def test_as_lora_equals_peft_conversion(peft_kwargs, tmp_path):
    # PEFT: save the adapter right after init, train, save with path_initial_model_for_weight_conversion.
    make = tiny_llama
    reference = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights="pissa", **peft_kwargs)).eval()
    reference.save_pretrained(tmp_path / "init")
    _train_peft(reference)
    reference.save_pretrained(tmp_path / "trained")
    reference.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    # lorakit: load the trained adapter (recomputing the start) and write it as plain LoRA.
    model = make()
    lorakit.load_adapter(model, tmp_path / "trained")
    lorakit.save_adapter(model, tmp_path / "ours", as_lora=True)
    theirs, ours = (load_file(tmp_path / d / WEIGHTS_FILE) for d in ("peft", "ours"))
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    theirs, ours = (json.loads((tmp_path / d / CONFIG_FILE).read_text()) for d in ("peft", "ours"))
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert ours[field] == pytest.approx(theirs[field]), field
    assert ours["init_lora_weights"] is True is theirs["init_lora_weights"]


def test_as_lora_keeps_trained_heads_and_is_a_no_op_for_plain_adapters(tmp_path, ids):
    from helpers import tiny_bert

    model = tiny_bert()
    lorakit.inject(
        model, lorakit.LoraConfig(rank=4, targets=["query", "value"], init="pissa", modules_to_save=["classifier"])
    )
    _train_lorakit(model)
    with torch.no_grad():
        model.classifier.copies["default"].bias.add_(0.5)
    trained = logits(model, ids)
    lorakit.save_adapter(model, tmp_path / "a", as_lora=True)
    assert "base_model.model.classifier.bias" in load_file(tmp_path / "a" / WEIGHTS_FILE)
    for loaded in (
        peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "a").eval(),
        lorakit.load_adapter(tiny_bert(), tmp_path / "a"),
    ):
        assert_rounding_close(logits(loaded, ids), trained, n=TINY_MODEL_N)
    plain = tiny_bert()
    lorakit.inject(plain, lorakit.LoraConfig(rank=4, targets=["query"]))
    randomize_adapter(plain)
    lorakit.save_adapter(plain, tmp_path / "p1")
    lorakit.save_adapter(plain, tmp_path / "p2", as_lora=True)
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        assert (tmp_path / "p1" / file).read_bytes() == (tmp_path / "p2" / file).read_bytes()


# ---- the original base back ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["unload", "delete", "delete-one-of-two"])
def test_removing_a_pissa_adapter_gives_the_original_weights_back(how, ids):
    model = tiny_gpt2()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = logits(model, ids)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["c_attn"], init="pissa"))
    if how == "delete-one-of-two":
        lorakit.add_adapter(model, "other", lorakit.LoraConfig(rank=2, targets=["c_fc"]))
    _train_lorakit(model)
    weight = model.transformer.h[0].attn.c_attn.base_layer.weight
    assert (weight - original["transformer.h.0.attn.c_attn.weight"]).abs().max() > 1e-2  # the residual
    if how == "unload":
        lorakit.merge(model)  # unload(merge=False) unmerges first
        model = lorakit.unload(model, merge=False)
    else:
        lorakit.delete_adapter(model, "default")
    for n, p in model.named_parameters():
        n = n.replace(".base_layer", "")
        if n in original:
            torch.testing.assert_close(p, original[n], rtol=0, atol=1e-6)
    if how != "delete-one-of-two":
        assert_rounding_close(logits(model, ids), base, n=TINY_MODEL_N)


# ---- what cannot be reproduced is refused ----------------------------------------------------


def test_rank_above_the_layer_size_is_refused_in_inject_and_load(tmp_path):
    model = tiny_llama()  # k_proj / v_proj: 32 -> 16
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"k_proj'.*PiSSA rank 24 is above the layer's size.*16 singular values"):
        lorakit.inject(model, lorakit.LoraConfig(rank=24, targets=["q_proj", "k_proj"], init="pissa"))
    assert_unchanged(model, before)
    # A rank_pattern that fits makes it valid; its file loads.
    ok = lorakit.LoraConfig(rank=24, targets=["q_proj", "k_proj"], init="pissa", rank_pattern={"k_proj": 16})
    lorakit.inject(model, ok)
    lorakit.save_adapter(model, tmp_path / "ok")
    lorakit.load_adapter(tiny_llama(), tmp_path / "ok")
    # A file that asks for more (PEFT writes smaller factors at the asked rank): refused, same words.
    config = json.loads((tmp_path / "ok" / CONFIG_FILE).read_text())
    config["rank_pattern"] = {}
    (tmp_path / "ok" / CONFIG_FILE).write_text(json.dumps(config))
    fresh = tiny_llama()
    before = snapshot(fresh)
    with pytest.raises(AdapterFileError, match="PiSSA rank 24 is above the layer's size"):
        lorakit.load_adapter(fresh, tmp_path / "ok")
    assert_unchanged(fresh, before)


def test_pissa_niter_is_refused_and_its_peft_conversion_loads(tmp_path, ids):
    make, peft_kwargs, _ = CASES["llama"]
    reference = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights="pissa_niter_2", **peft_kwargs)).eval()
    reference.save_pretrained(tmp_path / "init")
    _train_peft(reference)
    trained = logits(reference, ids)
    reference.save_pretrained(tmp_path / "trained")
    model = make()
    before = snapshot(model)
    with pytest.raises(
        AdapterFileError, match="pissa_niter_2.*cannot be loaded.*path_initial_model_for_weight_conversion"
    ):
        lorakit.load_adapter(model, tmp_path / "trained")
    assert_unchanged(model, before)
    reference.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    lorakit.load_adapter(model, tmp_path / "plain")
    assert_rounding_close(logits(model, ids), trained, n=TINY_MODEL_N)


def test_pissa_shares_no_module_with_another_adapter(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["q_proj"]), name="plain")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already carries adapters \\['plain'\\]; a PiSSA adapter replaces"):
        lorakit.add_adapter(model, "p", lorakit.LoraConfig(rank=4, targets=["q_proj", "v_proj"], init="pissa"))
    assert_unchanged(model, before)
    lorakit.add_adapter(model, "p", lorakit.LoraConfig(rank=4, targets=["v_proj"], init="pissa"))
    lorakit.save_adapter(model, tmp_path / "p", name="p")
    before = snapshot(model)
    with pytest.raises(ValueError, match="carries PiSSA adapter 'p', whose residual"):
        lorakit.add_adapter(model, "more", lorakit.LoraConfig(rank=2, targets=["v_proj"]))
    with pytest.raises(AdapterFileError, match="carries PiSSA adapter 'p'"):
        lorakit.load_adapter(model, tmp_path / "p", name="again")
    assert_unchanged(model, before)


def test_peft_pissa_file_with_an_embedding_keeps_it_plain(tmp_path, ids):
    # PEFT gives an embedding in a PiSSA adapter the default start and leaves its table alone.
    kwargs = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights="pissa")
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs)).eval()
    _train_peft(reference)
    trained = logits(reference, ids)
    reference.save_pretrained(tmp_path / "a")
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path / "a")
    assert torch.equal(logits(model, ids), trained)
    assert list(lorakit.adapters(model)["default"].initial) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    lorakit.save_adapter(model, tmp_path / "plain", as_lora=True)
    converted = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain").eval()
    assert_rounding_close(logits(converted, ids), trained, n=TINY_MODEL_N)
    with pytest.raises(ValueError, match="needs a linear layer"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(**{"rank": 4, "targets": ["embed_tokens"], "init": "pissa"}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_comes_back_to_the_rounding_of_the_residual(dtype):
    model = tiny_llama().to(dtype)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention", init="pissa"))
    model = lorakit.unload(model, merge=False)
    changed = 0
    for n, p in model.named_parameters():
        w = original[n].float()
        error = (p.float() - w).abs().max()
        assert error <= torch.finfo(dtype).eps * w.abs().max(), n  # the residual was stored rounded to dtype
        changed += bool(error > 0)
    assert changed  # (so the bound is what is tested, not bitwise equality)


# ---- OLoRA: the same residual mechanism, its factors from a QR ----------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dora", [False, True])
def test_olora_reloads_converts_and_gives_the_base_back(case, dora, tmp_path, ids):
    make, _, ours = CASES[case]
    model = make()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.inject(model, lorakit.LoraConfig(init="olora", use_dora=dora, **ours))
    _train_lorakit(model)
    trained = logits(model, ids)
    lorakit.save_adapter(model, tmp_path / "olora")
    lorakit.save_adapter(model, tmp_path / "plain", as_lora=True)
    assert json.loads((tmp_path / "olora" / CONFIG_FILE).read_text())["init_lora_weights"] == "olora"
    fresh = make()
    lorakit.load_adapter(fresh, tmp_path / "olora")
    assert_rounding_close(logits(fresh, ids), trained, n=TINY_MODEL_N)
    plain = make()
    lorakit.load_adapter(plain, tmp_path / "plain")
    assert lorakit.adapters(plain)["default"].initial == {}  # the original base weights, untouched
    assert_rounding_close(logits(plain, ids), trained, n=TINY_MODEL_N)
    if case == "llama" and not dora:
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "olora").eval()
        assert_rounding_close(logits(theirs, ids), trained, n=TINY_MODEL_N)
    lorakit.delete_adapter(model, "default")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, original[n], rtol=0, atol=1e-6)
