"""Adapter files: the PEFT layout, round trips, and bad input that changes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_unchanged,
    logits,
    randomize_adapter,
    snapshot,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.files.adapter_file import CONFIG_FILE, WEIGHTS_FILE, AdapterFileError


def _refused_on_tiny_bert(folder, match: str) -> None:
    """Loading `folder` onto a fresh tiny BERT raises AdapterFileError matching `match`; the model is unchanged."""
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=match):
        lorakit.load_adapter(model, folder)
    assert_unchanged(model, before)


def _trained_bert(tmp_path: Path, **cfg) -> tuple[Path, torch.nn.Module]:
    model = tiny_bert()
    config = dict(rank=4, alpha=8, targets="attention", modules_to_save=["classifier"]) | cfg
    lorakit.inject(model, lorakit.LoraConfig(**config))
    randomize_adapter(model)
    with torch.no_grad():
        model.classifier.copies["default"].bias.add_(0.5)
    folder = tmp_path / "adapter"
    lorakit.save_adapter(model, folder)
    return folder, model


def test_layout_and_config_fields(tmp_path):
    folder, model = _trained_bert(tmp_path)
    assert sorted(os.listdir(folder)) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["fan_in_fan_out"] is False and config["modules_to_save"] == ["classifier"]
    assert (
        len(config["target_modules"]) == 8 and "bert.encoder.layer.0.attention.output.dense" in config["target_modules"]
    )
    keys = set(load_file(folder / WEIGHTS_FILE))
    assert "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert len(keys) == 8 * 2 + 2


def test_gpt2_sets_fan_in_fan_out(tmp_path):
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention"))
    lorakit.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["fan_in_fan_out"] is True


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2, tiny_llama])
def test_round_trip_bitwise(make, tmp_path, ids):
    model = make()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="all-linear", rank_pattern={"0.*": 2}))
    randomize_adapter(model)
    adapted = logits(model, ids)
    lorakit.save_adapter(model, tmp_path / "a")
    fresh = make()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, ids), adapted)
    assert lorakit.trainable_parameters(fresh)[0] == 0
    again = make()
    lorakit.load_adapter(again, tmp_path / "a", trainable=True)
    assert lorakit.trainable_parameters(again)[0] > 0


def test_two_adapters_saved_and_loaded_apart(tmp_path, ids):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="attention"), name="a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(rank=2, targets=["gate_proj"]))
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    lorakit.save_adapter(model, tmp_path / "a", name="a")
    lorakit.save_adapter(model, tmp_path / "b", name="b")
    lorakit.set_adapter(model, ["a", "b"])
    both = logits(model, ids)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "b", name="b")
    lorakit.load_adapter(fresh, tmp_path / "a", name="a")
    lorakit.set_adapter(fresh, ["a", "b"])
    assert torch.equal(logits(fresh, ids), both)


def test_bias_and_embedding_round_trip(tmp_path, ids):
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["wte", "c_attn"], bias="lora_only"))
    randomize_adapter(model)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.base_layer.bias.add_(0.3)
    adapted = logits(model, ids)
    lorakit.save_adapter(model, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / WEIGHTS_FILE))
    assert "base_model.model.transformer.wte.lora_embedding_A" in keys
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys
    fresh = tiny_gpt2()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, ids), adapted)


def test_save_extra_files_and_unknown_adapter(tmp_path):
    folder, model = _trained_bert(tmp_path)
    lorakit.save_adapter(model, folder, extra_files={"labels.json": {"id2label": {"0": "neg"}}})
    assert json.loads((folder / "labels.json").read_text()) == {"id2label": {"0": "neg"}}
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        lorakit.save_adapter(model, tmp_path / "x", name="x")
    assert not (tmp_path / "x").exists()


def test_interrupted_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    folder, model = _trained_bert(tmp_path)
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    randomize_adapter(model, seed=5)

    def boom(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("lorakit.files.adapter_file.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        lorakit.save_adapter(model, folder)
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before
    with pytest.raises(KeyboardInterrupt):
        lorakit.save_adapter(model, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


# ---- bad input: one clear error naming the file, and the model unchanged -------------------


def _corrupt(folder: Path, case: str) -> str:
    """Damage `folder` one way; return a regex the error must match."""
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    config = json.loads(cfg_path.read_text())
    tensors = load_file(w_path)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    if case == "missing config":
        cfg_path.unlink()
        return f"{CONFIG_FILE}: missing"
    if case == "missing weights":
        w_path.unlink()
        return f"{WEIGHTS_FILE}: missing"
    if case == "pickle only":
        w_path.rename(folder / "adapter_model.bin")
        return "pickle file, which lorakit never loads"
    if case == "bad json":
        cfg_path.write_text('{"peft_type": "LORA",\n  "r": 4,,}')
        return f"{CONFIG_FILE}: invalid JSON at line 2"
    if case == "dora":  # the config says DoRA, the file holds no magnitudes
        config["use_dora"] = True
        cfg_path.write_text(json.dumps(config))
        return "missing key .*lora_magnitude_vector"
    if case == "not lora":
        config["peft_type"] = "IA3"
        cfg_path.write_text(json.dumps(config))
        return "peft_type is 'IA3'"
    if case == "truncated":
        data = w_path.read_bytes()
        w_path.write_bytes(data[: len(data) // 2])
        return f"{WEIGHTS_FILE}: not a readable safetensors file"
    if case == "garbage":
        w_path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        return f"{WEIGHTS_FILE}: not a readable safetensors file"
    if case == "missing key":
        del tensors[key.replace("lora_A", "lora_B")]
        save_file(tensors, w_path)
        return "missing key .*layer.0.attention.self.query.lora_B.weight"
    if case == "missing module":
        del tensors[key], tensors[key.replace("lora_A", "lora_B")]
        save_file(tensors, w_path)
        return "missing key .*layer.0.attention.self.query.lora_A.weight"
    if case == "unexpected key":
        tensors["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)
        save_file(tensors, w_path)
        return "unexpected key 'base_model.model.bert.pooler.dense.weight'"
    if case == "unknown module":
        tensors["base_model.model.bert.encoder.layer.7.attention.self.query.lora_A.weight"] = tensors[key].clone()
        tensors["base_model.model.bert.encoder.layer.7.attention.self.query.lora_B.weight"] = tensors[
            key
        ].T.contiguous()
        save_file(tensors, w_path)
        return "names module 'bert.encoder.layer.7.attention.self.query', which this model does not have"
    if case == "wrong shape":
        tensors[key] = torch.zeros(4, 48)
        save_file(tensors, w_path)
        return r"has shape \(4, 48\), but this model needs \(4, 32\)"
    if case == "wrong rank":
        config["r"] = 8
        cfg_path.write_text(json.dumps(config))
        return "has rank 4, but the config gives rank 8"
    if case == "head shape":
        tensors["base_model.model.classifier.weight"] = torch.zeros(5, 32)
        save_file(tensors, w_path)
        return r"classifier.weight' has shape \(5, 32\)"
    raise AssertionError(case)


CASES = [
    "missing config",
    "missing weights",
    "pickle only",
    "bad json",
    "dora",
    "not lora",
    "truncated",
    "garbage",
    "missing key",
    "missing module",
    "unexpected key",
    "unknown module",
    "wrong shape",
    "wrong rank",
    "head shape",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_adapter_is_refused_and_model_unchanged(case, tmp_path):
    folder, _ = _trained_bert(tmp_path)
    pattern = _corrupt(folder, case)
    model = tiny_bert(seed=3)
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=pattern) as err:
        lorakit.load_adapter(model, folder)
    assert str(folder) in str(err.value)
    assert_unchanged(model, before)
    assert lorakit.adapters(model) == {}


def test_bad_adapter_on_an_adapted_model_changes_nothing(tmp_path):
    folder, _ = _trained_bert(tmp_path)
    _corrupt(folder, "wrong shape")
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=["query"]), name="mine")
    before = snapshot(model)
    with pytest.raises(AdapterFileError):
        lorakit.load_adapter(model, folder, name="other")
    assert_unchanged(model, before)
    assert list(lorakit.adapters(model)) == ["mine"]


def test_wrong_base_model(tmp_path):
    folder, _ = _trained_bert(tmp_path)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="this model does not have|do not fit this model|matches no module"):
        lorakit.load_adapter(model, folder)
    assert_unchanged(model, before)


def test_no_pickle_in_sources():
    src = Path(lorakit.__file__).parent
    for file in src.rglob("*.py"):
        text = file.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, file


def test_load_onto_merged_model_or_with_a_bad_name_changes_nothing(tmp_path):
    folder, _ = _trained_bert(tmp_path)
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=["key"]), name="mine")
    randomize_adapter(model, "mine")
    lorakit.merge(model)
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="unmerge"):
        lorakit.load_adapter(model, folder, name="other")
    assert_unchanged(model, before)
    lorakit.unmerge(model)
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="without '.'"):
        lorakit.load_adapter(model, folder, name="a.b")
    assert_unchanged(model, before)
    assert list(lorakit.adapters(model)) == ["mine"]


def test_bias_all_round_trip(tmp_path, ids):
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["c_attn"], bias="all"))
    randomize_adapter(model)
    with torch.no_grad():
        model.transformer.ln_f.bias.add_(0.2)
    adapted = logits(model, ids)
    lorakit.save_adapter(model, tmp_path / "a")
    assert "base_model.model.transformer.ln_f.bias" in load_file(tmp_path / "a" / WEIGHTS_FILE)
    fresh = tiny_gpt2()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, ids), adapted)


# ---- values: finite, floating-point --------------------------------------------------------

QUERY_A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
HEAD_W = "base_model.model.classifier.weight"


@pytest.mark.parametrize(
    "key, value, message",
    [
        (QUERY_A, float("nan"), "holds 1 NaN or infinite value"),
        (QUERY_A.replace("lora_A", "lora_B"), float("inf"), "holds 1 NaN or infinite value"),
        (HEAD_W, float("-inf"), "holds 1 NaN or infinite value"),
        (QUERY_A, "int64", "has dtype torch.int64, but this model needs floating-point values"),
        (QUERY_A, "bool", "has dtype torch.bool"),
        (HEAD_W, "int32", "has dtype torch.int32"),
    ],
)
def test_non_finite_or_integer_values_are_refused(key, value, message, tmp_path):
    folder, _ = _trained_bert(tmp_path)
    tensors = load_file(folder / WEIGHTS_FILE)
    if isinstance(value, float):
        tensors[key][0, 0] = value
    else:
        tensors[key] = tensors[key].to(getattr(torch, value))
    save_file(tensors, folder / WEIGHTS_FILE)
    _refused_on_tiny_bert(folder, f"{WEIGHTS_FILE}: key '{key}' {message}")


def test_add_adapter_from_tensors_refuses_non_finite_values():
    model = tiny_bert()
    path = "bert.encoder.layer.0.attention.self.query"
    a, b = torch.zeros(4, 32), torch.zeros(32, 4)
    b[3, 1] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"module '{path}': B holds 1 NaN"):
        lorakit.add_adapter_from_tensors(model, "x", lorakit.LoraConfig(rank=4, targets=[path]), {path: (a, b)})
    with pytest.raises(ValueError, match="'bert.pooler.dense.bias' holds"):
        lorakit.add_adapter_from_tensors(
            model,
            "x",
            lorakit.LoraConfig(rank=4, targets=[path]),
            {path: (a, b.nan_to_num())},
            base={"bert.pooler.dense.bias": torch.full((32,), float("inf"))},
        )
    assert_unchanged(model, before)


# ---- unreadable folders and files ----------------------------------------------------------


def _raise(error: type[OSError]):
    def fail(*args, **kwargs):
        raise error(13, "Permission denied")

    return fail


@pytest.mark.parametrize(
    "case",
    [
        "folder not searchable",
        "config unreadable",
        "weights unreadable",
        "config is a folder",
        "weights is a folder",
        "folder is a file",
    ],
)
def test_unreadable_adapter_is_an_adapter_file_error(case, tmp_path, monkeypatch):
    folder, _ = _trained_bert(tmp_path)
    named = folder / (WEIGHTS_FILE if "weights" in case else CONFIG_FILE)
    if case == "folder not searchable":  # what stat says below a folder without x permission
        monkeypatch.setattr(Path, "is_dir", _raise(PermissionError))
        named = folder / CONFIG_FILE
        message = "cannot be read"
    elif case == "config unreadable":
        monkeypatch.setattr(Path, "read_text", _raise(PermissionError))
        message = "cannot be read"
    elif case == "weights unreadable":
        monkeypatch.setattr("lorakit.files.adapter_file.safe_open", _raise(PermissionError))
        message = "not a readable safetensors file"
    elif case == "folder is a file":
        other = tmp_path / "file"
        other.write_text("x")
        folder = named = other
        message = "not a folder"
    else:
        named.unlink()
        named.mkdir()
        message = "not a file"
    model = tiny_bert()
    before = snapshot(model)
    calls = [lambda: lorakit.load_adapter(model, folder)]
    if "weights" not in case:  # reading the config alone does not touch the weights
        calls.append(lambda: lorakit.read_adapter_config(folder))
    for call in calls:
        with pytest.raises(AdapterFileError, match=message) as err:
            call()
        assert str(named) in str(err.value)
    assert_unchanged(model, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_files_for_real(tmp_path):
    folder, _ = _trained_bert(tmp_path)
    (folder / WEIGHTS_FILE).chmod(0)
    with pytest.raises(AdapterFileError, match=f"{WEIGHTS_FILE}: .*(denied|readable)"):
        lorakit.load_adapter(tiny_bert(), folder)
    folder.chmod(0o600)  # readable listing, no access to the files
    try:
        with pytest.raises(AdapterFileError, match="cannot be read"):
            lorakit.load_adapter(tiny_bert(), folder)
    finally:
        folder.chmod(0o700)


# ---- base tensors a file replaces come back ------------------------------------------------


def _peft_embedding_adapter(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A PEFT adapter on Llama's embed_tokens whose file carries a changed embedding table."""
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    reference.save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_FILE)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 0.5
    for k in tensors:
        if "lora_B" in k or "lora_embedding_A" in k:
            tensors[k] = torch.randn(tensors[k].shape, generator=torch.Generator().manual_seed(0)) * 0.2
    save_file(tensors, tmp_path / "a" / WEIGHTS_FILE)
    return tmp_path / "a", tensors[key]


@pytest.mark.parametrize("how", ["unload", "delete"])
def test_replaced_embedding_table_comes_back(how, tmp_path, ids):
    folder, table = _peft_embedding_adapter(tmp_path)
    model = tiny_llama()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = logits(model, ids)
    lorakit.load_adapter(model, folder)
    assert torch.equal(model.model.embed_tokens.base_layer.weight, table)
    if how == "unload":
        model = lorakit.unload(model, merge=False)
    else:
        lorakit.delete_adapter(model, "default")
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n
    assert torch.equal(logits(model, ids), base)


def test_biases_a_file_brings_come_back(tmp_path, ids):
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["c_attn"], bias="all"))
    randomize_adapter(model)
    with torch.no_grad():
        for _, p in lorakit.adapting.registry.base_biases(model):
            p.add_(0.2)
    lorakit.save_adapter(model, tmp_path / "a")
    fresh = tiny_gpt2()
    original = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    base = logits(fresh, ids)
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert not torch.equal(fresh.transformer.ln_f.bias, original["transformer.ln_f.bias"])
    plain = lorakit.unload(fresh, merge=False)
    for n, p in plain.named_parameters():
        assert torch.equal(p, original[n]), n
    assert torch.equal(logits(plain, ids), base)


def test_two_adapters_cannot_both_replace_a_base_tensor(tmp_path):
    folder, table = _peft_embedding_adapter(tmp_path)
    model = tiny_llama()
    lorakit.load_adapter(model, folder, name="one")
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="already holds the value adapter 'one' brought"):
        lorakit.load_adapter(model, folder, name="two")
    assert_unchanged(model, before)


# ---- the file's keys: named in every error; what a file must hold --------------------------------

KEY_VALUE = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
KEY_EMBEDDING = "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A"


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        (QUERY_A, (4, 33)),
        (QUERY_A, (5, 32)),  # the rank the config does not give
        (KEY_VALUE, (32, 3)),
        (KEY_VALUE, (128,)),
        (KEY_EMBEDDING, (4, 7)),
    ],
)
def test_a_tensor_of_the_wrong_shape_is_named_by_its_key(key, shape, tmp_path):
    folder, _ = _trained_bert(tmp_path, targets=["query", "value", "word_embeddings"])
    tensors = load_file(folder / WEIGHTS_FILE)
    tensors[key] = torch.zeros(shape)
    save_file(tensors, folder / WEIGHTS_FILE)
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(AdapterFileError) as caught:
        lorakit.load_adapter(model, folder)
    assert str(caught.value).startswith(f"{folder / WEIGHTS_FILE}: key {key!r}")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("bias", "drop"),
    [
        ("lora_only", "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias"),
        ("all", "base_model.model.bert.encoder.layer.1.output.LayerNorm.bias"),
        ("all", "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias"),
    ],
)
def test_a_trained_bias_missing_from_the_file_is_refused(bias, drop, tmp_path):
    folder, _ = _trained_bert(tmp_path, targets=["query"], bias=bias)
    tensors = load_file(folder / WEIGHTS_FILE)
    del tensors[drop]
    save_file(tensors, folder / WEIGHTS_FILE)
    _refused_on_tiny_bert(folder, f"missing key '{drop}' \\(bias='{bias}' trains it\\)")


@pytest.mark.parametrize("inside", ["modules_to_save", "original_module"])
def test_peft_second_copies_of_a_saved_modules_tensor_must_agree(inside, tmp_path, ids):
    # PEFT's bias="all" writes a trained head's bias also as classifier.modules_to_save.bias (the
    # copy again) and classifier.original_module.bias (the untouched original).
    folder, model = _trained_bert(tmp_path, bias="all")
    expected = logits(model, ids)
    tensors = load_file(folder / WEIGHTS_FILE)
    same = tensors["base_model.model.classifier.bias"] if inside == "modules_to_save" else tiny_bert().classifier.bias
    key = f"base_model.model.classifier.{inside}.bias"
    tensors[key] = same.detach().clone()
    save_file(tensors, folder / WEIGHTS_FILE)
    fresh = tiny_bert()
    lorakit.load_adapter(fresh, folder)
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=0, atol=0)
    tensors[key] = tensors[key] + 1
    save_file(tensors, folder / WEIGHTS_FILE)
    _refused_on_tiny_bert(folder, f"key '{key}' differs from")


# ---- saving: checked before anything is written ---------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(extra_files={"labels.json": {"x": object()}}), ValueError, "extra file 'labels.json': not JSON"),
        (dict(extra_files={"labels.json": {"x": {1, 2}}}), ValueError, "extra file 'labels.json': not JSON"),
        (dict(extra_files={"../labels.json": {}}), ValueError, "must be a plain '*.json' name"),
        (dict(path=123), TypeError, "an adapter folder is a path (str or os.PathLike), got int 123"),
    ],
)
def test_a_refused_save_leaves_the_folder_as_it_was(kwargs, error, message, tmp_path):
    folder, model = _trained_bert(tmp_path)
    randomize_adapter(model, seed=7)  # new weights that must not reach the folder
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    with pytest.raises(error) as caught:
        lorakit.save_adapter(model, **({"path": folder} | kwargs))
    assert message in str(caught.value)
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before


def test_load_path_of_the_wrong_type():
    model = tiny_bert()
    with pytest.raises(TypeError, match="an adapter folder is a path"):
        lorakit.load_adapter(model, None)
