"""The per-expert layout of an expert adapter: one 2-D LoRA pair per expert and projection, the
way vLLM reads MoE adapters for most model classes (see docs/moe.md for which engine reads what).

Transformers 5 holds a layer's experts fused (`mlp.experts.gate_up_proj`, (E, 2I, H)), but its
checkpoints keep them apart (`mlp.experts.{e}.gate_proj.weight`, (I, H)), and so does vLLM's
per-expert LoRA loader (`FusedMoEWithLoRA`, models whose `is_3d_moe_weight` is false: Qwen3-MoE,
Qwen2-MoE, OLMoE, Mixtral, DeepSeek ...). This layout names expert e's pairs as the checkpoint
names its weights:

    <experts path>.{e}.<gate>.lora_A.weight (r, H)   .lora_B.weight (I, r)   rows 0..I-1 of B[e]
    <experts path>.{e}.<up>.lora_A.weight   (r, H)   .lora_B.weight (I, r)   rows I..2I-1 of B[e]
    <experts path>.{e}.<down>.lora_A.weight (r, I)   .lora_B.weight (H, r)

gate and up share expert e's A (the fused pair's rank-r inputs), so each is exactly the fused
update's slice. The split is Transformers' own (conversion_mapping.py: gate and up concatenated
along the output dimension); the names and the experts path per model family as there
(Mixtral: `block_sparse_moe.experts.{e}.w1` / `w3` / `w2`). gpt-oss keeps its experts fused in
its checkpoint, transposed, gate and up interleaved, and vLLM reads its adapters in PEFT's fused
layout: it has no per-expert layout here.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..adapting.registry import adapters
from ..config import LoraConfig
from ..errors import LorakitError
from ..layers.experts import LoraExpertParam, LoraExperts, expert_parameters
from . import peft_format as fmt

LAYOUTS = ("fused", "per-expert")  # save_adapter(expert_layout=...): PEFT's 3-D layout, or this one


class ExpertLayoutError(LorakitError, ValueError):
    """An adapter that cannot be written in the per-expert layout; the message says why."""


# Per model family: (fused experts path segment, checkpoint's), gate, up, down names. Transformers
# 5.25 conversion_mapping.py: these model types convert their checkpoints like qwen2_moe / mixtral.
_QWEN2_MOE = (None, "gate_proj", "up_proj", "down_proj")
_MIXTRAL = ((".mlp.experts", ".block_sparse_moe.experts"), "w1", "w3", "w2")
_FAMILIES = {
    **dict.fromkeys(
        [
            "qwen2_moe",
            "qwen3_moe",
            "olmoe",
            "flex_olmo",
            "deepseek_v2",
            "deepseek_v3",
            "qwen3_next",
            "glm4_moe",
            "dots1",
            "ernie4_5_moe",
            "hunyuan_v1_moe",
        ],
        _QWEN2_MOE,
    ),
    **dict.fromkeys(["mixtral", "minimax"], _MIXTRAL),
}


def expert_paths(model: nn.Module, record) -> list[str]:
    """An adapter's expert parameters (its paths whose layer is a `LoraExpertParam`), in its order."""
    return [p for p in record.modules if isinstance(model.get_submodule(p), LoraExpertParam)]


def check_layout(model: nn.Module, layout: str, name: str = "default") -> None:
    """Raise ExpertLayoutError now if adapter `name` could not be saved in `layout` (a run checks
    this before it trains)."""
    if layout == "per-expert":
        per_expert_pairs(model, name, expert_paths(model, adapters(model)[name]))


def per_expert_pairs(
    model: nn.Module, name: str, parameters: list[str]
) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """Per-expert module path -> (the fused parameter it comes from, A (r, in), B (out, r)) for
    adapter `name` on the expert `parameters`; ExpertLayoutError where the model has no such layout."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _FAMILIES.get(model_type)
    if family is None:
        known = ", ".join(sorted(_FAMILIES))
        why = (
            "its checkpoints keep the experts fused and vLLM reads its adapters in the fused layout"
            if model_type == "gpt_oss"
            else f"lorakit knows the per-expert names of {known}"
        )
        raise ExpertLayoutError(
            f"no per-expert layout for model type {model_type!r}: {why}; save it with "
            "expert_layout='fused' (PEFT's target_parameters layout)"
        )
    rename, gate, up, down = family
    pairs: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
    for param in parameters:
        owner, _, short = param.rpartition(".")
        layer = model.get_submodule(param)
        experts = model.get_submodule(owner)
        experts = experts.base_layer if isinstance(experts, LoraExperts) else experts
        if layer.transposed:
            raise ExpertLayoutError(
                f"{param}: stored (experts, in, out); lorakit knows no per-expert checkpoint "
                "layout for transposed experts"
            )
        a, b = (t.detach() for t in layer.pair(name))  # (E, r, in), (E, out, r)
        path = owner.replace(*rename) if rename else owner
        if short == "gate_up_proj":
            width = experts.down_proj.shape[-1]  # down_proj (E, H, I): I
            if b.shape[1] != 2 * width:
                raise ExpertLayoutError(
                    f"{param}: {b.shape[1]} outputs, not gate and up of {width} each (down_proj takes {width})"
                )
            for e in range(layer.num_experts):
                pairs[f"{path}.{e}.{gate}"] = (param, a[e], b[e, :width])
                pairs[f"{path}.{e}.{up}"] = (param, a[e], b[e, width:])
        elif short in ("up_proj", "down_proj"):
            for e in range(layer.num_experts):
                pairs[f"{path}.{e}.{up if short == 'up_proj' else down}"] = (param, a[e], b[e])
        else:
            raise ExpertLayoutError(f"{param}: lorakit knows no per-expert name for {short!r}")
    return pairs


# ---- reading it back --------------------------------------------------------------------------

_PER_EXPERT = re.compile(r"(.+)\.(\d+)\.([^.]+)")


def gather_per_expert(
    model: nn.Module, config: LoraConfig, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """`pairs` with every per-expert pair of a fused expert parameter gathered into lorakit's
    per-expert pair of that parameter, and the parameters so found; `config` gets their exact rank
    and alpha (and target_parameters). Gate and up pairs that share A (as lorakit writes them) keep
    rank r; others become rank 2r, [A_gate; A_up] with B block-diagonal, the same update exactly.
    ExpertLayoutError names a missing or misshapen expert pair."""
    groups, family = _groups(model, list(pairs))
    if not groups:
        return pairs, []
    _, gate, up, down = family
    gathered: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    exact: dict[str, tuple[int, float]] = {}
    for owner, by_expert in groups.items():
        experts = model.get_submodule(owner)
        experts = experts.base_layer if isinstance(experts, LoraExperts) else experts
        count = experts.down_proj.shape[0]
        for names, param in (((gate, up), "gate_up_proj"), ((down,), "down_proj")):
            paths = [[by_expert.get(e, {}).get(n) for n in names] for e in range(count)]
            if all(p is None for row in paths for p in row):
                continue
            absent = next(
                (f"{owner}.{e}.{n}" for e, row in enumerate(paths) for n, p in zip(names, row) if p is None), None
            )
            if absent is not None:
                raise ExpertLayoutError(
                    f"missing key {fmt.key(absent, fmt.LINEAR_KEYS['A'])} (the file holds other "
                    f"experts' pairs of {owner}.{param}, per expert)"
                )
            scaling = config.scaling_for(paths[0][0])  # the gathered pair's; any other folded into B
            rows = [[_scaled(pairs[p], config.scaling_for(p) / scaling) for p in row] for row in paths]
            try:
                a, b, rank = _stack(rows)
            except RuntimeError as err:  # torch.stack / cat of misfit shapes
                raise ExpertLayoutError(f"the per-expert pairs of {owner}.{param} do not fit together: {err}") from None
            gathered[f"{owner}.{param}"] = (a, b)
            exact[f"{owner}.{param}"] = (rank, scaling * (math.sqrt(rank) if config.rslora else rank))
    if not gathered:
        return pairs, []
    taken = {p for owner in groups for row in groups[owner].values() for p in row.values()}
    config.rank_pattern = {re.escape(p): r for p, (r, _) in exact.items()} | config.rank_pattern
    config.alpha_pattern = {re.escape(p): a for p, (_, a) in exact.items()} | config.alpha_pattern
    config.target_parameters = sorted(set(config.target_parameters) | set(gathered))
    return {p: v for p, v in pairs.items() if p not in taken} | gathered, list(gathered)


def per_expert_parameters(model: nn.Module, module_names) -> list[str]:
    """The fused expert parameters of `model` that per-expert module names (a file's target_modules:
    whole per-expert names, or the bare checkpoint names "gate_proj" ...) stand for, in model order."""
    if isinstance(module_names, str) or not module_names:
        return []
    groups, family = _groups(model, [m for m in module_names if isinstance(m, str)])
    if not family:
        return []
    _, gate, up, down = family
    bare = {m for m in module_names if m in (gate, up, down)}
    for owner in {p.rpartition(".")[0] for p in expert_parameters(model)} if bare else ():
        groups.setdefault(owner, {}).setdefault(0, {}).update(dict.fromkeys(bare, ""))
    wanted = set()
    for owner, by_expert in groups.items():
        names = {n for row in by_expert.values() for n in row}
        wanted |= {f"{owner}.gate_up_proj"} if names & {gate, up} else set()
        wanted |= {f"{owner}.down_proj"} if down in names else set()
    return [p for p in expert_parameters(model) if p in wanted]


def _groups(model: nn.Module, paths) -> tuple[dict[str, dict[int, dict[str, str]]], tuple]:
    """Per-expert module paths grouped as fused experts owner -> expert -> checkpoint name -> path,
    and the model family's names; empty where the model has no per-expert layout or no experts."""
    family = _FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    if family is None:
        return {}, ()
    rename, gate, up, down = family
    if not any((found := _PER_EXPERT.fullmatch(p)) and found.group(3) in (gate, up, down) for p in paths):
        return {}, family  # (no walk over the model for a file of ordinary modules)
    owners = {p.rpartition(".")[0] for p in expert_parameters(model)}
    groups: dict[str, dict[int, dict[str, str]]] = {}
    for path in paths:
        found = _PER_EXPERT.fullmatch(path)
        if found and found.group(3) in (gate, up, down):
            owner = found.group(1).replace(rename[1], rename[0]) if rename else found.group(1)
            if owner in owners:
                groups.setdefault(owner, {}).setdefault(int(found.group(2)), {})[found.group(3)] = path
    return groups, family


def _scaled(pair: tuple[torch.Tensor, torch.Tensor], factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    return pair if factor == 1 else (pair[0], pair[1] * factor)


def _stack(rows: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A (E, r, in), B (E, out, r), r) from each expert's pairs (one, or gate and up)."""
    shared = all(len(row) == 1 or torch.equal(row[0][0], row[1][0]) for row in rows)
    a_rows = [row[0][0] if shared else torch.cat([a for a, _ in row]) for row in rows]
    b_rows = [torch.cat([b for _, b in row]) if shared else torch.block_diag(*[b for _, b in row]) for row in rows]
    a, b = torch.stack(a_rows), torch.stack(b_rows)
    return a, b, a.shape[1]
