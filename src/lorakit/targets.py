"""Which modules of a model get LoRA adapters.

LoRA (Hu et al., 2021, arXiv:2106.09685) adds a low-rank update to chosen weight matrices; this
file chooses them. The user names them in one of three ways, with PEFT's matching rules so that a
target list means the same thing in both libraries:

- a list of names: a module matches when its dotted name equals an entry or ends with "." + entry;
- any other single string: a regular expression that must match the whole dotted name;
- a preset: "attention", "attention+mlp" (exact per architecture, by `model.config.model_type`,
  with a structural fallback for models we do not know) or "all-linear" (every linear layer but
  the output heads).

Nothing here imports transformers: architectures are recognised by duck typing, so the core runs
on any PyTorch model.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .config import PRESETS, check_targets
from .module_tree import inside, is_lora_layer, name_matches, output_embeddings, walk
from .quant.bnb import KINDS as QUANTIZED_KINDS
from .quant.bnb import quantized_kind

# Per architecture: (attention, mlp) patterns, each matched against the end of a module name on a
# dot boundary, so "attention\.output\.dense" matches "...layer.3.attention.output.dense" only.
_BERT = (
    [r"attention\.(self|attention)\.(query|key|value)", r"attention\.output\.dense"],
    # The block's own output.dense sits right under the block index; attention.output.dense does not.
    [r"intermediate\.dense", r"\d+\.output\.dense"],
)
_LLAMA = ([r"self_attn\.(q|k|v|o)_proj"], [r"mlp\.(gate|up|down)_proj"])
_ARCHITECTURES: dict[str, tuple[list[str], list[str]]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    # Transformers 5 renamed ViT's modules; the BERT-style names are those of earlier releases.
    "vit": (_BERT[0] + [r"attention\.(q|k|v|o)_proj"], _BERT[1] + [r"mlp\.fc[12]"]),
    "distilbert": ([r"attention\.(q|k|v|out)_lin"], [r"ffn\.lin[12]"]),
    "gpt2": ([r"attn\.(c_attn|c_proj)", r"crossattention\.(c_attn|q_attn|c_proj)"], [r"mlp\.(c_fc|c_proj)"]),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    # MoE models (Transformers 5): each layer's experts are fused 3-D parameters (mlp.experts.gate_up_proj,
    # down_proj), which no module wrapper holds; the presets that reach the MLP adapt them as
    # parameters (experts.resolve_parameters). Here only what is an nn.Linear: Qwen2-MoE's shared expert.
    "mixtral": (_LLAMA[0], []),
    "qwen3_moe": (_LLAMA[0], []),
    "olmoe": (_LLAMA[0], []),
    "gpt_oss": (_LLAMA[0], []),
    "qwen2_moe": (_LLAMA[0], [r"mlp\.shared_expert\.(gate|up|down)_proj"]),
    "phi": ([r"self_attn\.(q_proj|k_proj|v_proj|dense)"], [r"mlp\.fc[12]"]),
    "phi3": ([r"self_attn\.(qkv|o)_proj"], [r"mlp\.(gate_up|down)_proj"]),
    "opt": ([r"self_attn\.(q|k|v|out)_proj"], [r"\d+\.fc[12]"]),
    "bart": ([r"(self_attn|encoder_attn)\.(q|k|v|out)_proj"], [r"\d+\.fc[12]"]),
    "t5": ([r"(SelfAttention|EncDecAttention)\.[qkvo]"], [r"DenseReluDense\.(wi|wi_0|wi_1|wo)"]),
    "gpt_neox": ([r"attention\.(query_key_value|dense)"], [r"mlp\.dense_(h_to_4h|4h_to_h)"]),
    "falcon": ([r"self_attention\.(query_key_value|dense)"], [r"mlp\.dense_(h_to_4h|4h_to_h)"]),
}
_PRESET_PARTS = {"attention": ("attention",), "attention+mlp": ("attention", "mlp")}

# Top-level children that produce the model's outputs. They are freshly initialised for a new task
# (or tied to the input embeddings), so they are trained in full or left alone, never adapted.
# DistilBERT's pre_classifier is as new as its classifier.
# CLASSIFIER_HEADS: the names Transformers gives a sequence-classification head, in the order
# looked for (the head `lorakit train` trains in full; the one PEFT's all-linear leaves out).
CLASSIFIER_HEADS = ("classifier", "score")
_HEAD_NAMES = frozenset({"lm_head", "pre_classifier", "qa_outputs", "cls", "head", *CLASSIFIER_HEADS})

_ATTENTION_WORDS = ("attention", "attn")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate")


def adaptable_kind(module: nn.Module) -> str | None:
    """What kind of LoRA wrapper `module` takes: "linear", "conv1d_transposed", "embedding", "conv",
    "linear4bit" / "linear8bit" (bitsandbytes' quantized layers, quant/bnb.py), or None."""
    if is_lora_layer(module):
        return adaptable_kind(module.base_layer)
    quantized = quantized_kind(module)  # before nn.Linear: they subclass it
    if quantized is not None:
        return quantized
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    # Transformers' GPT-2 Conv1D is a linear layer storing its weight as (in, out), nf = out.
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and getattr(module, "nf", None) == weight.shape[1]
    ):
        return "conv1d_transposed"
    return None


def adaptable_modules(model: nn.Module) -> list[str]:
    """Names of every module that can take a LoRA adapter, in model order."""
    return [name for name, module, parent in walk(model) if _adaptable(module, parent)]


def layer_index(name: str, pattern: str | list[str] | None = None) -> int | None:
    """Index of the transformer block that the module `name` sits in, or None.

    The index is the number after the first block list in the path ("layer", "layers", "h",
    "block", "blocks" and names ending that way); T5's "block.1.layer.0" is block 1, not its
    sub-layer 0. Paths without a known block list fall back to their first number.

    `pattern` (PEFT's layers_pattern) names the block list instead: the number after the first
    path segment it matches whole; several are tried in order, the first that matches counts.
    """
    if pattern is not None:
        for entry in [pattern] if isinstance(pattern, str) else pattern:
            found = re.match(rf"(?:^|.*?\.){entry}\.(?P<index>\d+)\.", name)
            if found:  # (a pattern with a bare "|" can match without the index: PEFT then has none)
                return int(found["index"]) if found["index"] is not None else None
        return None
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdecimal()]
    for i in numbered:
        if i > 0 and _is_block_list(parts[i - 1]):
            return int(parts[i])
    return int(parts[numbered[0]]) if numbered else None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the model's outputs, which presets never adapt."""
    heads = {name for name, _ in model.named_children() if name in _HEAD_NAMES}
    # Ask every module, not just the root, so a causal LM wrapped in the user's own module still
    # has its lm_head found.
    walked = list(walk(model))
    outputs = {id(out) for out in map(output_embeddings, [model] + [m for _, m, _ in walked]) if out is not None}
    heads.update(name for name, module, _ in walked if id(module) in outputs)
    return heads


def resolve_targets(
    model: nn.Module,
    targets: str | list[str],
    layers: list[int] | None = None,
    exclude: list[str] | tuple[str, ...] = (),
    layers_pattern: str | list[str] | None = None,
) -> list[str]:
    """Names of the modules to adapt, in model order.

    `targets` is a list of names, a regex or a preset (see the module docstring); `layers` keeps
    only modules inside those transformer blocks (counted by `layers_pattern`, see `layer_index`);
    `exclude` names modules never adapted, along with
    everything inside them. Raises ValueError, naming what was asked and what exists, when a target
    names only modules LoRA cannot adapt or when nothing is left to adapt.
    """
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)  # one name, not its letters
    walked = list(walk(model))
    kinds = {name: adaptable_kind(module) for name, module, parent in walked if _adaptable(module, parent)}
    hint = ""
    targets = check_targets(targets)
    if isinstance(targets, list):
        chosen = set()
        for entry in targets:
            chosen |= _matching(entry, lambda name, entry=entry: name_matches(name, entry), walked, kinds)
    elif targets in PRESETS:
        chosen = _preset(model, targets, kinds)
    else:
        pattern = re.compile(targets)
        chosen = _matching(targets, lambda name: pattern.fullmatch(name) is not None, walked, kinds)
        if not chosen and any(name_matches(name, targets) for name in kinds):
            hint = f"A single string is a regex over the whole name; to match by name suffix, pass [{targets!r}].\n"

    if layers is not None:
        in_blocks = {name: layer_index(name, layers_pattern) for name in chosen}
        missing = sorted(set(layers) - set(in_blocks.values()))
        present = sorted({i for i in in_blocks.values() if i is not None})
        if missing and chosen:
            raise ValueError(
                f"layers {missing} hold none of the modules that targets {targets!r} selects; "
                f"those sit in blocks {present or 'none (no block index in their names)'}"
                + (f", counted by layers_pattern {layers_pattern!r}" if layers_pattern is not None else "")
            )
        chosen = {name for name in chosen if in_blocks[name] in layers}
    chosen = {name for name in chosen if not any(inside(name, entry) for entry in exclude)}

    if not chosen:
        asked = f"targets {targets!r}"
        asked += f" with layers={list(layers)}" if layers is not None else ""
        asked += f" and layers_pattern={layers_pattern!r}" if layers_pattern is not None else ""
        asked += f" and exclude={list(exclude)}" if exclude else ""
        raise ValueError(
            f"{asked} selects no module LoRA can adapt.\n"
            + hint
            + "A list entry matches a module whose name equals it or ends with '.' + entry; a single "
            f"string is a regex that must match the whole name; presets are {', '.join(PRESETS)}.\n"
            + _describe_adaptable(kinds)
        )
    return [name for name in kinds if name in chosen]


def _preset(model: nn.Module, preset: str, kinds: dict[str, str]) -> set[str]:
    """The linear layers a preset selects, never an output head."""
    heads = output_head_names(model)
    linear = [
        name
        for name, kind in kinds.items()
        if kind in ("linear", "conv1d_transposed", *QUANTIZED_KINDS) and not any(inside(name, head) for head in heads)
    ]
    if preset == "all-linear":
        return set(linear)
    parts = _PRESET_PARTS[preset]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _ARCHITECTURES:
        attention, mlp = _ARCHITECTURES[model_type]
        tails = attention + (mlp if "mlp" in parts else [])
        pattern = re.compile(r"(?:^|\.)(?:" + "|".join(tails) + r")$")
        chosen = {name for name in linear if pattern.search(name)}
        if chosen:
            return chosen
        # A known model type whose modules are named otherwise (a new release, a custom variant):
        # its structure is a better guide than an empty result.
    return {name for name in linear if _structural_part(model, name) in parts}


def _structural_part(model: nn.Module, name: str) -> str | None:
    """Whether the module `name` sits in an attention or an mlp block, judged by its enclosing modules."""
    parts = name.split(".")
    in_output = False
    # Nearest enclosing module first, so an "mlp" inside a class called "AttentionBlock" is mlp.
    # "output" alone is weak: BERT's attention.output.dense is attention, its output.dense is mlp.
    for depth in range(len(parts) - 1, 0, -1):
        enclosing = model.get_submodule(".".join(parts[:depth]))
        words = f"{type(enclosing).__name__} {parts[depth - 1]}".lower()
        if any(word in words for word in _ATTENTION_WORDS):
            return "attention"
        if any(word in words for word in _MLP_WORDS):
            return "mlp"
        in_output = in_output or "output" in words
    return "mlp" if in_output else None


def _matching(
    entry: str,
    matches: Callable[[str], bool],
    walked: list[tuple[str, nn.Module, nn.Module]],
    kinds: dict[str, str],
) -> set[str]:
    """Adaptable modules that `entry` names; an error if it names only modules LoRA cannot adapt."""
    named = [(name, module) for name, module, _ in walked if matches(name)]
    chosen = {name for name, _ in named if name in kinds}
    if named and not chosen:
        shown = [f"  {name} ({type(module).__name__})" for name, module in named[:10]]
        shown += [f"  ... and {len(named) - 10} more"] if len(named) > 10 else []
        raise ValueError(
            f"target {entry!r} names only modules LoRA cannot adapt (it takes nn.Linear, Transformers' "
            f"Conv1D, nn.Embedding, nn.Conv1d and nn.Conv2d):\n" + "\n".join(shown + [_describe_adaptable(kinds)])
        )
    return chosen


def _describe_adaptable(kinds: dict[str, str], limit: int = 30) -> str:
    """The adaptable module names, with repeated blocks folded: "h.{0..11}.attn.c_attn (linear)"."""
    if not kinds:
        return "The model has no module LoRA can adapt (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d)."
    groups: dict[tuple[str | None, ...], list[tuple[int, ...]]] = {}
    for name, kind in kinds.items():
        parts = name.split(".")
        key = tuple(None if part.isdecimal() else part for part in parts) + (kind,)
        groups.setdefault(key, []).append(tuple(int(part) for part in parts if part.isdecimal()))
    lines = []
    for key, indices in groups.items():
        *parts, kind = key
        spans = iter(_span(sorted({index[i] for index in indices})) for i in range(len(indices[0])))
        lines.append("  " + ".".join(next(spans) if part is None else part for part in parts) + f" ({kind})")
    if len(lines) > limit:
        lines = lines[:limit] + [f"  ... and {len(lines) - limit} more"]
    return f"The model's adaptable modules ({len(kinds)}):\n" + "\n".join(lines)


def _span(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "{0..2,5}"; a single value stays bare."""
    if len(values) == 1:
        return str(values[0])
    runs, start = [], values[0]
    for value, following in zip(values, values[1:] + [None]):
        if following != value + 1:
            runs.append(f"{start}..{value}" if value > start else str(start))
            start = following
    return "{" + ",".join(runs) + "}"


def _adaptable(module: nn.Module, parent: nn.Module) -> bool:
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj, so a
    # wrapper there would be silently bypassed.
    return adaptable_kind(module) is not None and not isinstance(parent, nn.MultiheadAttention)


def _is_block_list(part: str) -> bool:
    part = part.lower()
    return part == "h" or part.endswith(("layer", "layers", "block", "blocks"))
