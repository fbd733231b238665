"""adapting/token_rows.py: new tokens' rows trained alone, saved in PEFT's TrainableTokens layout, loaded
back by PEFT and by lorakit with the same outputs (untied Llama head, tied GPT-2 head)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tensors, tiny_model

import lorakit
from lorakit.adapting.token_rows import ROWS_KEY, TokenRows, add_token_rows
from lorakit.files.adapter_file import AdapterFileError

NEW = [120, 121, 122]  # rows added by resizing the tiny models' 120-token vocabulary
TARGETS = {"llama": "attention", "gpt2": ["c_attn"]}
IDS = torch.tensor([[1, 120, 5, 121, 122, 7]])


def _base(kind: str) -> torch.nn.Module:
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if kind == "gpt2" else {}
    model = tiny_model(kind, **no_dropout)
    torch.manual_seed(3)
    model.resize_token_embeddings(123)
    return model


def _trained(kind: str) -> torch.nn.Module:
    model = _base(kind)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=TARGETS[kind]))
    add_token_rows(model, NEW)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TokenRows) and not module.tied:
                module.rows.add_(torch.randn(module.rows.shape, generator=torch.Generator().manual_seed(4)))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_only_the_new_rows_train(kind):
    model = _base(kind)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=TARGETS[kind]))
    before = model.get_input_embeddings().weight.detach().clone()
    add_token_rows(model, NEW)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, TokenRows) and not embedding.base_layer.weight.requires_grad
    torch.testing.assert_close(embedding.weight, before, rtol=0, atol=0)  # the rows start as the base's
    model(IDS).logits.sum().backward()
    assert embedding.rows.grad is not None and embedding.base_layer.weight.grad is None
    head = model.get_output_embeddings()
    assert isinstance(head, TokenRows) and head.tied == (kind == "gpt2")
    assert head.rows.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_saved_in_peft_layout_and_loaded_by_peft_and_lorakit(kind, tmp_path):
    from peft import PeftModel

    model = _trained(kind)
    with torch.no_grad():
        want = model(IDS).logits
    lorakit.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    keys = sorted(k for k in tensors(tmp_path / "a") if k.endswith(ROWS_KEY))
    if kind == "llama":  # untied head: rows of its own, named per module
        assert config["trainable_token_indices"] == {"lm_head": NEW, "model.embed_tokens": NEW}
        assert keys == [f"base_model.model.{m}.{ROWS_KEY}" for m in ("lm_head", "model.embed_tokens")]
    else:  # tied head: the embedding's rows only, as PEFT writes them
        assert config["trainable_token_indices"] == NEW
        assert keys == [f"base_model.model.transformer.wte.{ROWS_KEY}"]
    assert tensors(tmp_path / "a")[keys[0]].shape == (3, 32)

    peft_model = PeftModel.from_pretrained(_base(kind), tmp_path / "a").eval()
    ours = lorakit.load_adapter(_base(kind), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_lorakit_gives_the_base_back_when_the_adapter_goes(tmp_path):
    lorakit.save_adapter(_trained("llama"), tmp_path / "a")
    model = _base("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.load_adapter(model, tmp_path / "a")
    assert not torch.equal(model.lm_head.weight[NEW], before["lm_head.weight"][NEW])
    lorakit.delete_adapter(model, "default")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_loading_onto_a_model_without_the_new_rows_says_to_resize(tmp_path):
    lorakit.save_adapter(_trained("llama"), tmp_path / "a")
    model = tiny_model("llama")  # 120 rows: the tokens 120-122 do not exist
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"token id 122 is beyond this model's 120 rows; resize"):
        lorakit.load_adapter(model, tmp_path / "a")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_token_entries_are_refused_with_the_file_named(tmp_path):
    folder = lorakit.save_adapter(_trained("llama"), tmp_path / "a")
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for entry, message in (
        (["x"], "must be a list of token ids"),
        ({"nowhere": NEW}, "matches 0 modules"),
        (None, "holds token rows, but adapter_config.json has no trainable_token_indices"),
        ({"model.embed_tokens": NEW}, "unexpected key .*lm_head"),
        ({"lm_head": NEW, "model.embed_tokens": [120, 121]}, r"shape \(3, 32\), expected \(2, 32\)"),
    ):
        config_file.write_text(json.dumps(dict(config, trainable_token_indices=entry)))
        with pytest.raises(AdapterFileError, match=message):
            lorakit.load_adapter(_base("llama"), folder)


def test_add_token_rows_refuses_ids_outside_the_embedding():
    with pytest.raises(ValueError, match=r"token ids \[123\] are not rows of the embedding \(123 rows\)"):
        add_token_rows(_base("llama"), [120, 123])
