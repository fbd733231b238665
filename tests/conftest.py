"""Shared fixtures: tiny random Transformers models (no download) and adapter helpers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_bert(num_labels: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def randomize_adapter(model, name: str = "default", std: float = 0.2, seed: int = 1) -> None:
    """Give adapter `name` non-zero A and B, so comparisons cannot pass trivially."""
    import lorakit

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, lorakit.LoraLayer) and name in module.adapter_names:
                for p in module.adapter_parameters(name).values():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def snapshot(model) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Module structure and every tensor, to check that a failed call changed nothing."""
    structure = [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return structure, state


def assert_unchanged(model, before: tuple[list[str], dict[str, torch.Tensor]]) -> None:
    structure, state = snapshot(model)
    assert structure == before[0]
    assert state.keys() == before[1].keys()
    for k in state:
        assert torch.equal(state[k], before[1][k]), k


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(7))
