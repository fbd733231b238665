"""files/peft_targets.py: the modules an adapter_config.json targets, pinned to what PEFT adapts; and
loading refuses a file whose pairs are not exactly those modules (PEFT would skip the extra ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    SwinLike,
    assert_rounding_close,
    assert_unchanged,
    logits,
    randomize_adapter,
    snapshot,
    tiny_bert,
    tiny_llama,
)
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.files.adapter_file import CONFIG_FILE, WEIGHTS_FILE, AdapterFileError
from lorakit.files.peft_targets import peft_saved_modules, targeted_modules

peft = pytest.importorskip("peft")
SWIN_N = 6 * 3 * 8 + 8  # SwinLike: 6 blocks of three width-8 reductions, then the head

# PEFT LoraConfig keyword arguments; each selects a different set on the model it is paired with.
CONFIGS = {
    "swin-pattern-blocks": (SwinLike, dict(target_modules=["qkv"], layers_to_transform=[1], layers_pattern="blocks")),
    "swin-pattern-int": (SwinLike, dict(target_modules=["qkv", "mlp"], layers_to_transform=2, layers_pattern="blocks")),
    "swin-pattern-layers": (SwinLike, dict(target_modules=["qkv"], layers_to_transform=[0], layers_pattern="layers")),
    "swin-patterns-in-order": (
        SwinLike,
        dict(target_modules=["qkv"], layers_to_transform=[1], layers_pattern=["layers", "blocks"]),
    ),
    "swin-no-pattern": (SwinLike, dict(target_modules=["qkv"], layers_to_transform=[0])),
    "swin-whole-name-skips-filter": (
        SwinLike,
        dict(target_modules=["qkv", "layers.1.blocks.2.attn.proj"], layers_to_transform=[0], layers_pattern="layers"),
    ),
    "swin-dotted-suffix": (
        SwinLike,
        dict(target_modules=["attn.qkv"], layers_to_transform=[2], layers_pattern="blocks"),
    ),
    "swin-regex-exclude": (SwinLike, dict(target_modules=r".*\.(qkv|mlp)", exclude_modules=["layers.0.blocks.0.mlp"])),
    "swin-exclude-regex": (SwinLike, dict(target_modules=["qkv", "proj"], exclude_modules=r"layers\.1\..*")),
    "swin-all-linear": (SwinLike, dict(target_modules="all-linear")),
    "llama-layers": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "llama-all-linear": (tiny_llama, dict(target_modules="all-linear")),
    "bert-modules-to-save": (
        tiny_bert,
        dict(target_modules=["query", "dense"], modules_to_save=["classifier", "pooler"]),
    ),
}


def _adapted_by_peft(model) -> list[str]:
    return sorted(
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )


@pytest.mark.parametrize("case", list(CONFIGS))
def test_targeted_modules_are_those_peft_adapts(case):
    make, kwargs = CONFIGS[case]
    expected = _adapted_by_peft(peft.get_peft_model(make(), peft.LoraConfig(r=2, **kwargs)))
    got = targeted_modules(
        make(),
        kwargs["target_modules"],
        layers=kwargs.get("layers_to_transform")
        if not isinstance(kwargs.get("layers_to_transform"), int)
        else [kwargs["layers_to_transform"]],
        layers_pattern=kwargs.get("layers_pattern"),
        exclude=kwargs.get("exclude_modules"),
        modules_to_save=kwargs.get("modules_to_save", []),
    )
    assert sorted(got) == expected


def _saved_by_peft(model) -> list[str]:
    wrapper = peft.utils.other.ModulesToSaveWrapper
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, wrapper))


@pytest.mark.parametrize(
    ("make", "entries"),
    [
        (tiny_llama, ["norm"]),  # every ...layernorm too: a plain suffix, not a dotted one
        (tiny_llama, ["lm_head", "embed_tokens"]),
        (tiny_llama, ["layernorm"]),
        (tiny_llama, ["layers.1"]),  # a whole block, its insides not again
        (tiny_bert, ["classifier", "pooler"]),
        (tiny_bert, ["dense"]),
    ],
)
def test_saved_modules_are_those_peft_trains_in_full(make, entries):
    expected = _saved_by_peft(
        peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules=["k_proj", "key"], modules_to_save=entries))
    )
    assert sorted(peft_saved_modules(make(), entries)) == expected


@pytest.mark.numeric
@pytest.mark.parametrize("case", [c for c in CONFIGS if c.startswith("swin")])
def test_peft_adapter_loads_with_its_targets(case, tmp_path):
    make, kwargs = CONFIGS[case]
    reference = peft.get_peft_model(make(), peft.LoraConfig(r=2, **kwargs))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(4, 8, generator=gen)
    with torch.no_grad():
        expected = reference(x)
    reference.save_pretrained(tmp_path)
    model = make()
    lorakit.load_adapter(model, tmp_path)
    with torch.no_grad():
        assert_rounding_close(model(x), expected, n=SWIN_N)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)) == _adapted_by_peft(
        reference
    )


@pytest.mark.numeric
def test_layers_pattern_in_lorakit_config_round_trips_through_peft(tmp_path):
    config = lorakit.LoraConfig(rank=2, targets=["qkv", "proj"], layers=[1], layers_pattern="blocks")
    model = SwinLike()
    lorakit.inject(model, config)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer))
    assert adapted == [f"layers.{i}.blocks.1.attn.{m}" for i in (0, 1) for m in ("proj", "qkv")]
    randomize_adapter(model)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    lorakit.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert written["layers_to_transform"] == [1] and written["layers_pattern"] == "blocks"
    read, _ = lorakit.read_adapter_config(tmp_path)
    assert read.layers == [1] and read.layers_pattern == "blocks"
    reference = peft.PeftModel.from_pretrained(SwinLike(), tmp_path)
    assert _adapted_by_peft(reference) == adapted
    fresh = SwinLike()
    lorakit.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert_rounding_close(reference(x), expected, n=SWIN_N)
        assert torch.equal(fresh(x), expected)
    # The same selection as PEFT makes from the same settings.
    same = peft.get_peft_model(
        SwinLike(),
        peft.LoraConfig(r=2, target_modules=["qkv", "proj"], layers_to_transform=[1], layers_pattern="blocks"),
    )
    assert _adapted_by_peft(same) == adapted


# ---- a file holding pairs its config does not target ---------------------------------------


def _saved_llama(tmp_path: Path, targets: list[str]) -> Path:
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets=targets))
    randomize_adapter(model)
    lorakit.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(fields)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


K0 = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"

# config edit -> the first key it leaves untargeted (in sorted order)
UNTARGETED = {
    "suffix list without k": (dict(target_modules=["q_proj", "v_proj"]), K0),
    "layers_to_transform [1]": (dict(target_modules=["q_proj", "k_proj", "v_proj"], layers_to_transform=[1]), K0),
    "layers_pattern": (
        dict(target_modules=["q_proj", "k_proj", "v_proj"], layers_to_transform=[0], layers_pattern="layers"),
        V1.replace("v_proj", "k_proj"),
    ),
    "regex": (dict(target_modules=r".*\.(q|v)_proj"), K0),
    "exclude list": (
        dict(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
        Q0,
    ),
    "exclude regex": (dict(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=r".*k_proj"), K0),
    "modules_to_save": (dict(target_modules=["q_proj", "k_proj", "v_proj"], modules_to_save=["k_proj"]), K0),
}


@pytest.mark.parametrize("case", list(UNTARGETED))
def test_pairs_the_config_does_not_target_are_refused(case, tmp_path):
    folder = _saved_llama(tmp_path, ["q_proj", "k_proj", "v_proj"])
    fields, first = UNTARGETED[case]
    _edit_config(folder, **fields)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=f"unexpected key '{first}'") as err:
        lorakit.load_adapter(model, folder)
    assert str(folder / WEIGHTS_FILE) in str(err.value) and "does not target module" in str(err.value)
    assert_unchanged(model, before)


def test_peft_skips_what_lorakit_refuses(tmp_path, ids):
    # The reason for the refusal: PEFT loads such a file without the extra pairs, a different model.
    folder = _saved_llama(tmp_path, ["q_proj", "k_proj", "v_proj"])
    trained = tiny_llama()
    lorakit.load_adapter(trained, folder)
    _edit_config(folder, target_modules=["q_proj", "v_proj"])
    reference = peft.PeftModel.from_pretrained(tiny_llama(), folder)
    assert (logits(reference, ids) - logits(trained, ids)).abs().max() > 1e-3


def test_all_linear_and_null_target_modules(tmp_path, ids):
    folder = _saved_llama(tmp_path, ["q_proj", "k_proj", "v_proj"])
    # "all-linear" is checked like any other target: here it targets far more than the file holds.
    _edit_config(folder, target_modules="all-linear")
    with pytest.raises(AdapterFileError, match="missing key .*layers.0.self_attn.o_proj.lora_A.weight"):
        lorakit.load_adapter(tiny_llama(), folder)
    # null (or []) names nothing to check against: the file's keys are the targets.
    expected = tiny_llama()
    _edit_config(folder, target_modules=["q_proj", "k_proj", "v_proj"])
    lorakit.load_adapter(expected, folder)
    for empty in (None, []):
        _edit_config(folder, target_modules=empty)
        model = tiny_llama()
        lorakit.load_adapter(model, folder)
        assert torch.equal(logits(model, ids), logits(expected, ids))


def test_full_all_linear_file_loads(tmp_path, ids):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets="all-linear"))
    randomize_adapter(model)
    lorakit.save_adapter(model, tmp_path)
    _edit_config(tmp_path, target_modules="all-linear")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_pair_for_a_module_the_model_lacks_names_the_module(tmp_path):
    folder = _saved_llama(tmp_path, ["q_proj", "v_proj"])
    tensors = load_file(folder / WEIGHTS_FILE)
    for role in ("A", "B"):
        key = f"base_model.model.model.layers.5.self_attn.q_proj.lora_{role}.weight"
        tensors[key] = tensors[Q0.replace("lora_A", f"lora_{role}")].clone()
    save_file(tensors, folder / WEIGHTS_FILE)
    with pytest.raises(
        AdapterFileError, match="names module 'model.layers.5.self_attn.q_proj', which this model does not have"
    ):
        lorakit.load_adapter(tiny_llama(), folder)
