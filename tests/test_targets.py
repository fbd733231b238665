"""Target selection: presets checked name by name on tiny random Transformers models, matching rules, errors."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import targets
from lorakit.targets import adaptable_kind, adaptable_modules, layer_index, output_head_names, resolve_targets

BLOCKS = 2
DECODER_KW = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=BLOCKS,
    num_attention_heads=4,
    intermediate_size=64,
    num_key_value_heads=2,
    head_dim=8,
    pad_token_id=0,
)
BERT_KW = dict(vocab_size=100, hidden_size=32, num_hidden_layers=BLOCKS, num_attention_heads=4, intermediate_size=64)
T5_KW = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=BLOCKS, num_heads=4)

# name -> (builder, attention names, mlp names, heads). "{i}" stands for each block index.
_BERT_ATTN = ["encoder.layer.{i}.attention.self." + p for p in ("query", "key", "value")]
_BERT_ATTN += ["encoder.layer.{i}.attention.output.dense"]
_BERT_MLP = ["encoder.layer.{i}.intermediate.dense", "encoder.layer.{i}.output.dense"]
_LLAMA_ATTN = ["model.layers.{i}.self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
_LLAMA_MLP = ["model.layers.{i}.mlp." + p for p in ("gate_proj", "up_proj", "down_proj")]


def _prefixed(prefix: str, names: list[str]) -> list[str]:
    return [prefix + n for n in names]


def _llama_like(config: type, model: type, heads: set[str] | None = None) -> tuple:
    return (lambda: model(config(**DECODER_KW)), _LLAMA_ATTN, _LLAMA_MLP, heads or {"lm_head"})


def _t5_attn() -> list[str]:
    enc = ["encoder.block.{i}.layer.0.SelfAttention." + p for p in "qkvo"]
    dec = ["decoder.block.{i}.layer.0.SelfAttention." + p for p in "qkvo"]
    return enc + dec + ["decoder.block.{i}.layer.1.EncDecAttention." + p for p in "qkvo"]


ARCHITECTURES = {
    "bert": (
        lambda: tf.BertForSequenceClassification(tf.BertConfig(**BERT_KW)),
        _prefixed("bert.", _BERT_ATTN),
        _prefixed("bert.", _BERT_MLP),
        {"classifier"},
    ),
    "roberta": (
        lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**BERT_KW)),
        _prefixed("roberta.", _BERT_ATTN),
        _prefixed("roberta.", _BERT_MLP),
        {"classifier"},
    ),
    "xlm-roberta": (
        lambda: tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(**BERT_KW)),
        _prefixed("roberta.", _BERT_ATTN),
        _prefixed("roberta.", _BERT_MLP),
        {"classifier"},
    ),
    "distilbert": (
        lambda: tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=BLOCKS, n_heads=4, hidden_dim=64)
        ),
        ["distilbert.transformer.layer.{i}.attention." + p for p in ("q_lin", "k_lin", "v_lin", "out_lin")],
        ["distilbert.transformer.layer.{i}.ffn.lin1", "distilbert.transformer.layer.{i}.ffn.lin2"],
        {"pre_classifier", "classifier"},
    ),
    "gpt2": (
        lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=BLOCKS, n_head=4)),
        ["transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_proj"],
        ["transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj"],
        {"lm_head"},
    ),
    "llama": _llama_like(tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": _llama_like(tf.MistralConfig, tf.MistralForCausalLM),
    "qwen2": _llama_like(tf.Qwen2Config, tf.Qwen2ForSequenceClassification, {"score"}),
    "qwen3": _llama_like(tf.Qwen3Config, tf.Qwen3ForCausalLM),
    "gemma": _llama_like(tf.GemmaConfig, tf.GemmaForCausalLM),
    "gemma2": _llama_like(tf.Gemma2Config, tf.Gemma2ForCausalLM),
    "gemma3_text": _llama_like(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
    # Transformers 5 fuses Mixtral's experts into one tensor per layer: nothing in the mlp to wrap.
    "mixtral": (
        lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**DECODER_KW, num_local_experts=2)),
        _LLAMA_ATTN,
        [],
        {"lm_head"},
    ),
    "phi": (
        lambda: tf.PhiForCausalLM(tf.PhiConfig(**DECODER_KW)),
        ["model.layers.{i}.self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "dense")],
        ["model.layers.{i}.mlp.fc1", "model.layers.{i}.mlp.fc2"],
        {"lm_head"},
    ),
    "phi3": (
        lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**DECODER_KW)),
        ["model.layers.{i}.self_attn.qkv_proj", "model.layers.{i}.self_attn.o_proj"],
        ["model.layers.{i}.mlp.gate_up_proj", "model.layers.{i}.mlp.down_proj"],
        {"lm_head"},
    ),
    "opt": (
        lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=BLOCKS,
                num_attention_heads=4,
                ffn_dim=64,
                word_embed_proj_dim=32,
            )
        ),
        ["model.decoder.layers.{i}.self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
        ["model.decoder.layers.{i}.fc1", "model.decoder.layers.{i}.fc2"],
        {"lm_head"},
    ),
    "bart": (
        lambda: tf.BartForConditionalGeneration(
            tf.BartConfig(
                vocab_size=100,
                d_model=32,
                encoder_layers=BLOCKS,
                decoder_layers=BLOCKS,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
            )
        ),
        [
            f"model.{side}.layers.{{i}}.{attn}.{p}"
            for side, attn in [("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn")]
            for p in ("q_proj", "k_proj", "v_proj", "out_proj")
        ],
        [f"model.{side}.layers.{{i}}.{p}" for side in ("encoder", "decoder") for p in ("fc1", "fc2")],
        {"lm_head"},
    ),
    "t5": (
        lambda: tf.T5ForConditionalGeneration(tf.T5Config(**T5_KW)),
        _t5_attn(),
        [
            "encoder.block.{i}.layer.1.DenseReluDense.wi",
            "encoder.block.{i}.layer.1.DenseReluDense.wo",
            "decoder.block.{i}.layer.2.DenseReluDense.wi",
            "decoder.block.{i}.layer.2.DenseReluDense.wo",
        ],
        {"lm_head"},
    ),
    "t5-gated": (
        lambda: tf.T5ForConditionalGeneration(tf.T5Config(**T5_KW, feed_forward_proj="gated-gelu")),
        _t5_attn(),
        [
            f"{side}.block.{{i}}.layer.{n}.DenseReluDense.{p}"
            for side, n in (("encoder", 1), ("decoder", 2))
            for p in ("wi_0", "wi_1", "wo")
        ],
        {"lm_head"},
    ),
    "gpt_neox": (
        lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**BERT_KW)),
        ["gpt_neox.layers.{i}.attention.query_key_value", "gpt_neox.layers.{i}.attention.dense"],
        ["gpt_neox.layers.{i}.mlp.dense_h_to_4h", "gpt_neox.layers.{i}.mlp.dense_4h_to_h"],
        {"lm_head"},
    ),
    "falcon": (
        lambda: tf.FalconForCausalLM(
            tf.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=BLOCKS, num_attention_heads=4)
        ),
        ["transformer.h.{i}.self_attention.query_key_value", "transformer.h.{i}.self_attention.dense"],
        ["transformer.h.{i}.mlp.dense_h_to_4h", "transformer.h.{i}.mlp.dense_4h_to_h"],
        {"lm_head"},
    ),
}
# ViT's module names changed in Transformers 5; the test takes whichever naming the installed version has.
_VIT_KW = dict(
    hidden_size=32, num_hidden_layers=BLOCKS, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)
_VIT_NEW = (
    ["vit.layers.{i}.attention." + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
    ["vit.layers.{i}.mlp.fc1", "vit.layers.{i}.mlp.fc2"],
)
_VIT_OLD = (
    ["vit.encoder.layer.{i}.attention.attention." + p for p in ("query", "key", "value")]
    + ["vit.encoder.layer.{i}.attention.output.dense"],
    _prefixed("vit.", _BERT_MLP),
)


@functools.cache
def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(**_VIT_KW))
    return ARCHITECTURES[arch][0]()


def expected(arch: str) -> tuple[list[str], list[str], set[str]]:
    if arch == "vit":
        names = {n for n, _ in build(arch).named_modules()}
        attention, mlp = _VIT_NEW if "vit.layers.0.attention.q_proj" in names else _VIT_OLD
        heads = {"classifier"}
    else:
        _, attention, mlp, heads = ARCHITECTURES[arch]
    unfold = lambda templates: [t.format(i=i) for i in range(BLOCKS) for t in templates]  # noqa: E731
    return unfold(attention), unfold(mlp), heads


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


ALL_ARCHS = sorted(ARCHITECTURES) + ["vit"]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_presets_are_exact(arch, monkeypatch):
    model = build(arch)
    attention, mlp, heads = expected(arch)
    assert set(attention).isdisjoint(mlp)
    # With the structural fallback disabled, only the architecture's own preset can match.
    monkeypatch.setattr(targets, "_structural_part", lambda model, name: None)
    got_attention = resolve_targets(model, "attention")
    assert set(got_attention) == set(attention)
    assert len(got_attention) == len(attention)
    assert set(resolve_targets(model, "attention+mlp")) == set(attention) | set(mlp)
    assert output_head_names(model) == heads
    # Each half of the table on its own: BERT's mlp "output.dense" must not reach into attention.
    model_type = model.config.model_type
    for patterns, names in zip(targets._ARCHITECTURES[model_type], (attention, mlp)):
        matched = {n for n in linear_names(model) if any(_ends_with(n, p) for p in patterns)}
        assert matched == set(names)


def _ends_with(name: str, pattern: str) -> bool:
    return re.search(r"(?:^|\.)(?:" + pattern + r")$", name) is not None


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_all_linear_skips_only_the_heads(arch):
    model = build(arch)
    _, _, heads = expected(arch)
    chosen = resolve_targets(model, "all-linear")
    in_heads = lambda n: any(n == h or n.startswith(h + ".") for h in heads)  # noqa: E731
    assert chosen == [n for n in linear_names(model) if not in_heads(n)]
    assert any(in_heads(n) for n in linear_names(model))  # there was a head to skip


def test_all_linear_keeps_bert_pooler_and_skips_roberta_head_container():
    assert "bert.pooler.dense" in resolve_targets(build("bert"), "all-linear")
    chosen = resolve_targets(build("roberta"), "all-linear")
    assert "classifier.dense" not in chosen and "classifier.out_proj" not in chosen


def test_preset_order_follows_the_model():
    chosen = resolve_targets(build("llama"), "attention+mlp")
    assert chosen[:4] == ["model.layers.0.self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert chosen[4] == "model.layers.0.mlp.gate_proj"
    assert chosen[7] == "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2", "llama"])
def test_structural_fallback_agrees_with_presets(arch, monkeypatch):
    model = build(arch)
    attention, mlp, _ = expected(arch)
    monkeypatch.setattr(model.config, "model_type", "unknown-arch")
    assert set(resolve_targets(model, "attention")) == set(attention)
    assert set(resolve_targets(model, "attention+mlp")) == set(attention) | set(mlp)


class MyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(8, 8) for _ in range(4))


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)


class AttentionBlock(nn.Module):
    """A block whose class name says attention though it also holds the mlp."""

    def __init__(self) -> None:
        super().__init__()
        self.mixer = MyAttention()  # attention by class name
        self.cross_attn = Plain()  # attention by its own name
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(AttentionBlock() for _ in range(2))
        self.proj = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 10)


def test_structural_fallback_on_a_custom_model():
    model = CustomNet()
    attention = [
        f"blocks.{i}.{p}" for i in range(2) for p in ("mixer.q", "mixer.k", "mixer.v", "mixer.out", "cross_attn.proj")
    ]
    mlp = [f"blocks.{i}.mlp.{j}" for i in range(2) for j in (0, 2)]
    assert set(resolve_targets(model, "attention")) == set(attention)
    assert set(resolve_targets(model, "attention+mlp")) == set(attention) | set(mlp)
    all_linear = resolve_targets(model, "all-linear")
    assert "proj" in all_linear and "lm_head" not in all_linear and "embed" not in all_linear
    assert len(all_linear) == len(attention) + len(mlp) + 1


def test_known_model_type_with_unknown_names_falls_back_to_structure():
    model = CustomNet()
    model.config = type("Config", (), {"model_type": "llama"})()
    assert len(resolve_targets(model, "attention")) == 10


def test_suffix_list_matches_on_dot_boundaries():
    model = build("bert")
    assert resolve_targets(model, ["query", "value"]) == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    ]
    assert resolve_targets(model, ["bert.encoder.layer.1.attention.self.query"]) == [
        "bert.encoder.layer.1.attention.self.query"
    ]
    assert resolve_targets(model, ["attention.output.dense"]) == [
        f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)
    ]
    # "output.dense" is a suffix of both the attention and the block output, as in PEFT.
    assert len(resolve_targets(model, ["output.dense"])) == 4
    # An entry matching nothing is fine while another one matches.
    assert resolve_targets(model, ["q_proj", "key"]) == [f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)]
    with pytest.raises(ValueError, match="selects no module"):
        resolve_targets(model, ["uery"])


def test_regex_must_match_the_whole_name():
    model = build("bert")
    chosen = resolve_targets(model, r".*\.layer\.1\.attention\.self\.(query|key)")
    assert chosen == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]
    with pytest.raises(ValueError, match=r"pass \['query'\]"):
        resolve_targets(model, "query")
    with pytest.raises(ValueError, match="not a valid regex"):
        resolve_targets(model, "(query")


def test_layers_keep_only_those_blocks():
    assert resolve_targets(build("llama"), "attention", layers=[1]) == [t.format(i=1) for t in _LLAMA_ATTN]
    t5 = resolve_targets(build("t5"), "attention", layers=[1])
    assert len(t5) == 12 and all(".block.1.layer." in n for n in t5)
    # Modules outside any block are dropped.
    assert resolve_targets(build("bert"), "all-linear", layers=[0])[-1] == "bert.encoder.layer.0.output.dense"
    with pytest.raises(ValueError, match=r"layers \[7\] hold none .* blocks \[0, 1\]"):
        resolve_targets(build("llama"), "attention", layers=[0, 7])


def test_exclude_drops_modules_and_everything_inside():
    bert = build("bert")
    assert resolve_targets(bert, "attention", exclude=["key"]) == [
        n for n in expected("bert")[0] if not n.endswith(".key")
    ]
    assert resolve_targets(bert, "attention", exclude=["layer.0"]) == [t.format(i=1) for t in ARCHITECTURES["bert"][1]]
    roberta = build("roberta")
    assert resolve_targets(roberta, r".*(dense|out_proj)", exclude=("classifier",)) == [
        n for n in linear_names(roberta) if n.endswith("dense") and not n.startswith("classifier")
    ]
    assert resolve_targets(bert, ["query", "key"], exclude="key") == resolve_targets(bert, ["query"])
    with pytest.raises(ValueError, match=r"exclude=\['query'\]"):
        resolve_targets(bert, ["query"], exclude=["query"])


def test_nothing_matched_lists_adaptable_modules_compactly():
    model = tf.BertForSequenceClassification(tf.BertConfig(**(BERT_KW | {"num_hidden_layers": 12})))
    with pytest.raises(ValueError) as err:
        resolve_targets(model, ["q_proj", "v_proj"])
    message = str(err.value)
    assert "['q_proj', 'v_proj']" in message
    assert "bert.encoder.layer.{0..11}.attention.self.query (linear)" in message
    assert "bert.embeddings.word_embeddings (embedding)" in message
    assert "classifier (linear)" in message
    assert len(message.splitlines()) < 40


def test_span_folds_runs():
    assert targets._span([0, 1, 2, 5, 7, 8]) == "{0..2,5,7..8}"
    assert targets._span([3]) == "3"


def test_naming_only_non_adaptable_modules_is_an_error():
    model = build("bert")
    with pytest.raises(ValueError, match=r"'LayerNorm' names only modules LoRA cannot adapt") as err:
        resolve_targets(model, ["query", "LayerNorm"])
    assert "bert.encoder.layer.0.attention.output.LayerNorm (LayerNorm)" in str(err.value)
    with pytest.raises(ValueError, match=r"'attention' names only modules LoRA cannot adapt"):
        resolve_targets(model, ["attention"])  # BertAttention containers
    with pytest.raises(ValueError, match="names only modules LoRA cannot adapt"):
        resolve_targets(model, r".*LayerNorm")
    with pytest.raises(ValueError, match="non-empty list"):
        resolve_targets(model, [])


def test_kinds():
    assert adaptable_kind(nn.Linear(2, 3)) == "linear"
    assert adaptable_kind(Conv1D(6, 4)) == "conv1d_transposed"
    assert adaptable_kind(nn.Embedding(5, 3)) == "embedding"
    assert adaptable_kind(nn.Conv1d(2, 3, 3)) == "conv"
    assert adaptable_kind(nn.Conv2d(2, 3, 3)) == "conv"
    assert adaptable_kind(nn.Conv3d(2, 3, 3)) is None
    assert adaptable_kind(nn.LayerNorm(3)) is None
    assert adaptable_kind(nn.Sequential(nn.Linear(2, 2))) is None


def test_conv1d_is_recognised_by_shape_not_name_alone():
    class Conv1D(nn.Module):  # same class name, an ordinary (out, in, kernel) convolution weight
        def __init__(self) -> None:
            super().__init__()
            self.nf = 4
            self.weight = nn.Parameter(torch.zeros(4, 2, 3))

    assert adaptable_kind(Conv1D()) is None

    class Conv1D(nn.Module):  # 2-D weight stored (out, in), unlike Transformers' (in, out)
        def __init__(self) -> None:
            super().__init__()
            self.nf = 4
            self.weight = nn.Parameter(torch.zeros(4, 2))

    assert adaptable_kind(Conv1D()) is None


class FakeLora(nn.Module):
    is_lora_layer = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(4, 2, bias=False)


def test_lora_wrapper_reports_its_base_and_is_not_entered():
    assert adaptable_kind(FakeLora(Conv1D(6, 4))) == "conv1d_transposed"
    assert adaptable_kind(FakeLora(nn.Embedding(5, 4))) == "embedding"
    model = nn.Sequential()
    model.add_module("wrapped", FakeLora(nn.Linear(4, 4)))
    model.add_module("plain", nn.Linear(4, 4))
    assert adaptable_modules(model) == ["wrapped", "plain"]
    assert resolve_targets(model, r".*") == ["wrapped", "plain"]
    with pytest.raises(ValueError, match="selects no module"):
        resolve_targets(model, ["lora_A"])

    class NotAWrapper(nn.Module):  # the flag alone, without base_layer, is not a wrapper
        is_lora_layer = True

        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

    assert adaptable_modules(nn.Sequential(NotAWrapper())) == ["0.inner"]


def test_multihead_attention_out_proj_is_not_adaptable():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    assert adaptable_modules(model) == ["1"]


@pytest.mark.parametrize(
    "name, index",
    [
        ("bert.encoder.layer.3.attention.self.query", 3),
        ("transformer.h.2.attn.c_attn", 2),
        ("model.layers.5.self_attn.q_proj", 5),
        ("block.1.layer.0.SelfAttention.q", 1),
        ("decoder.block.4.layer.2.DenseReluDense.wo", 4),
        ("model.layers.1.block_sparse_moe.experts.3.w1", 1),
        ("visual.transformer.resblocks.7.attn.out_proj", 7),
        ("features.4", 4),
        ("0.layers.3.attn.q", 3),  # a Sequential(model, head) around a decoder: the block, not the 0
        ("lm_head", None),
        ("bert.pooler.dense", None),
    ],
)
def test_layer_index(name, index):
    assert layer_index(name) == index


@pytest.mark.parametrize(
    "name, pattern, index",
    [
        ("layers.0.blocks.2.attn.qkv", "blocks", 2),
        ("layers.0.blocks.2.attn.qkv", "layers", 0),
        ("layers.0.blocks.2.attn.qkv", ["blocks", "layers"], 2),  # the first pattern that matches counts
        ("layers.0.blocks.2.attn.qkv", ["layers", "blocks"], 0),
        ("layers.0.blocks.2.attn.qkv", "block", None),  # a whole path segment, not a part of one
        ("layers.0.blocks.2.attn.qkv", "ayers", None),
        ("encoder.stages.1.layers.3.conv", "(stages|layers)", 1),  # a regex fragment, as in PEFT
        ("encoder.stages.1.layers.3.conv", "stages|layers", None),  # PEFT's regex then has no index
    ],
)
def test_layer_index_with_a_pattern(name, pattern, index):
    assert layer_index(name, pattern) == index


def test_layers_pattern_chooses_the_block_list():
    from helpers import SwinLike

    chosen = resolve_targets(SwinLike(), ["qkv"], layers=[2], layers_pattern="blocks")
    assert chosen == ["layers.0.blocks.2.attn.qkv", "layers.1.blocks.2.attn.qkv"]
    assert resolve_targets(SwinLike(), ["qkv"], layers=[1]) == [f"layers.1.blocks.{i}.attn.qkv" for i in range(3)]
    with pytest.raises(ValueError, match="layers \\[5\\] hold none .*counted by layers_pattern 'blocks'"):
        resolve_targets(SwinLike(), ["qkv"], layers=[5], layers_pattern="blocks")


def test_output_heads():
    assert output_head_names(tf.BertForMaskedLM(tf.BertConfig(**BERT_KW))) == {"cls", "cls.predictions.decoder"}
    assert output_head_names(tf.BertModel(tf.BertConfig(**BERT_KW))) == set()

    class Wrapper(nn.Module):  # the user's own module around a causal LM
        def __init__(self) -> None:
            super().__init__()
            self.backbone = build("gpt2")

    assert output_head_names(Wrapper()) == {"backbone.lm_head"}
    assert "backbone.lm_head" not in resolve_targets(Wrapper(), "all-linear")


def test_long_lists_are_cut_short():
    model = nn.ModuleDict({f"head_{c}": nn.Linear(2, 2) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"})
    with pytest.raises(ValueError) as err:
        resolve_targets(model, ["nothing"])
    message = str(err.value)
    assert "The model's adaptable modules (40):" in message and "  ... and 10 more" in message
    assert len(message.splitlines()) < 40


def test_modules_trained_in_full_are_not_entered():
    class FakeSaved(nn.Module):  # the shape of lorakit's modules_to_save wrapper
        is_saved_module = True

        def __init__(self, original: nn.Module) -> None:
            super().__init__()
            self.original = original
            self.copies = nn.ModuleDict({"default": nn.Linear(4, 4)})

    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("classifier", FakeSaved(nn.Linear(4, 2)))
    assert adaptable_modules(model) == ["body"]
