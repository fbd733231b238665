"""Interop with PEFT (the independent reference), both directions, with non-zero B."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    TINY_MODEL_N,
    assert_rounding_close,
    logits,
    randomize_adapter,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_model,
)

import lorakit

pytestmark = pytest.mark.numeric  # pins float32 numbers to references (helpers.assert_rounding_close)

peft = pytest.importorskip("peft")

CASES = {
    # name: (model factory, PEFT LoraConfig kwargs, lorakit LoraConfig kwargs)
    "bert": (
        tiny_bert,
        dict(r=4, lora_alpha=8, target_modules=["query", "key", "value"], modules_to_save=["classifier"]),
        dict(rank=4, alpha=8, targets=["query", "key", "value"], modules_to_save=["classifier"]),
    ),
    "bert-bias-patterns": (
        tiny_bert,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            bias="lora_only",
            use_rslora=True,
            rank_pattern={"value": 2},
            alpha_pattern={"query": 3},
        ),
        dict(
            rank=4,
            alpha=8,
            targets=["query", "value"],
            bias="lora_only",
            rslora=True,
            rank_pattern={"value": 2},
            alpha_pattern={"query": 3},
        ),
    ),
    "gpt2-conv1d": (
        tiny_gpt2,
        dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        dict(rank=4, alpha=16, targets=["c_attn", "c_proj", "c_fc"]),
    ),
    "llama": (
        tiny_llama,
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        dict(rank=8, alpha=16, targets="attention+mlp"),
    ),
    "llama-embedding": (
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
        dict(rank=4, alpha=8, targets=["embed_tokens", "q_proj"]),
    ),
    "llama-layers": (
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
        dict(rank=4, alpha=8, targets=["q_proj", "v_proj"], layers=[1]),
    ),
    # An eval-mode model: the adapters' dropout must stay off.
    "llama-dropout": (
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3),
        dict(rank=4, alpha=8, targets=["q_proj", "v_proj"], dropout=0.3),
    ),
    # modules_to_save by PEFT's rule, a plain suffix: "norm" is every *norm module to PEFT.
    "llama-saved-norm": (
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"]),
        dict(rank=4, alpha=8, targets=["q_proj"], modules_to_save=["norm"]),
    ),
    # ... and "classifier" is DistilBERT's pre_classifier too.
    "distilbert-classifier": (
        lambda: _tiny_distilbert(),
        dict(r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], modules_to_save=["classifier"]),
        dict(rank=4, alpha=8, targets=["q_lin", "v_lin"], modules_to_save=["classifier"]),
    ),
    # A tied lm_head: PEFT saves its table under lm_head's own name.
    "llama-tied-lm-head": (
        lambda: tiny_model("llama", tie_word_embeddings=True),
        dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]),
        dict(rank=4, alpha=8, targets=["lm_head", "q_proj"]),
    ),
    # bias="all" with a trained head: PEFT writes the head's bias three times.
    "bert-bias-all-head": (
        tiny_bert,
        dict(r=4, lora_alpha=8, target_modules=["query"], bias="all", modules_to_save=["classifier"]),
        dict(rank=4, alpha=8, targets=["query"], bias="all", modules_to_save=["classifier"]),
    ),
}


def _tiny_distilbert():
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3
    )
    return transformers.DistilBertForSequenceClassification(config).eval()


def _randomize_peft(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _peft_adapter_in_lorakit(make, cfg, tmp_path, ids):
    """A PEFT adapter of `cfg` on `make()` with random weights, saved and loaded by lorakit into a
    fresh `make()`: (PEFT's logits, the lorakit model)."""
    reference = peft.get_peft_model(make(), cfg).eval()
    _randomize_peft(reference)
    expected = logits(reference, ids)
    reference.save_pretrained(tmp_path)
    model = make()
    lorakit.load_adapter(model, tmp_path)
    return expected, model


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_lorakit(case, tmp_path, ids):
    make, peft_kwargs, _ = CASES[case]
    reference = peft.get_peft_model(make(), peft.LoraConfig(**peft_kwargs)).eval()
    _randomize_peft(reference)
    expected = logits(reference, ids)
    reference.save_pretrained(tmp_path)
    model = make()
    base = logits(model, ids)
    lorakit.load_adapter(model, tmp_path)
    got = logits(model, ids)
    assert (expected - base).abs().max() > 1e-3  # the adapter really does something
    assert_rounding_close(got, expected, n=TINY_MODEL_N)


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_adapter_loads_in_peft(case, tmp_path, ids):
    make, _, ours = CASES[case]
    model = make()
    base = logits(model, ids)
    lorakit.inject(model, lorakit.LoraConfig(**ours))
    randomize_adapter(model)
    for module in model.modules():
        if isinstance(module, lorakit.adapting.saved_modules.SavedModule):
            with torch.no_grad():
                module.copies["default"].weight.mul_(1.5)
    if ours.get("bias") in ("lora_only", "all"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and name.endswith("bias") and ".copies." not in name:
                    p.add_(0.1)
    expected = logits(model, ids)
    assert (expected - base).abs().max() > 1e-3
    lorakit.save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert_rounding_close(logits(reference, ids), expected, n=TINY_MODEL_N)
    # PEFT adapted exactly the modules lorakit did.
    theirs = {
        n.removeprefix("base_model.model.")
        for n, m in reference.named_modules()
        if hasattr(m, "lora_A") or hasattr(m, "lora_embedding_A")
    }
    mine = {n for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}
    assert theirs == mine


def test_peft_seq_cls_adapter_with_its_automatic_heads(tmp_path, ids):
    # PEFT writes modules_to_save ["classifier", "score"] for any SEQ_CLS adapter.
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    expected, model = _peft_adapter_in_lorakit(tiny_bert, cfg, tmp_path, ids)
    assert_rounding_close(logits(model, ids), expected, n=TINY_MODEL_N)


def test_peft_exclude_modules(tmp_path, ids):
    excluded = "bert.encoder.layer.0.attention.self.value"
    cfg = peft.LoraConfig(r=4, target_modules=["query", "value"], exclude_modules=[excluded])
    expected, model = _peft_adapter_in_lorakit(tiny_bert, cfg, tmp_path, ids)
    assert not isinstance(model.get_submodule(excluded), lorakit.LoraLayer)
    assert_rounding_close(logits(model, ids), expected, n=TINY_MODEL_N)


@pytest.mark.parametrize("init", ["orthogonal", "mica", "eva"])
def test_peft_start_only_inits_load_as_plain_lora(init, tmp_path, ids):
    # These inits choose where A and B start and leave the base alone: a trained adapter is plain LoRA.
    extra = {"eva_config": peft.EvaConfig()} if init == "eva" else {}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init, **extra)
    expected, model = _peft_adapter_in_lorakit(tiny_llama, cfg, tmp_path, ids)
    assert_rounding_close(logits(model, ids), expected, n=TINY_MODEL_N)


@pytest.mark.parametrize("alphas", [{"q_proj": 4, "layers.0.self_attn.q_proj": 32}, {"v_proj": 7, r".*_proj": 2}])
def test_patterns_whose_order_matters_survive_the_file(alphas, tmp_path, ids):
    # The file's keys are sorted; written as given, layer 0's q_proj read back alpha 32, not 4.
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"], alpha_pattern=alphas))
    randomize_adapter(model)
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    again = tiny_llama()
    lorakit.load_adapter(again, tmp_path)
    torch.testing.assert_close(logits(again, ids), expected, rtol=0, atol=1e-6)
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_rounding_close(logits(reference, ids), expected, n=TINY_MODEL_N)
