"""LoRA on the fused expert parameters of Mixture-of-Experts models (Transformers 5).

Transformers 5 keeps a MoE layer's experts as 3-D parameters of one module (`mlp.experts`):
`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) for Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE; gpt-oss
stores them transposed, (E, H, 2I) and (E, I, H), with a bias per expert. No nn.Linear holds them,
so each adapted parameter gets its own low-rank pair per expert, as PEFT's `target_parameters`
defines it: rank r per expert, expert e's weight changes by scaling * B[e] A[e].

- `LoraExpertParam` is the LoraLayer of one such parameter (adapters by name, merge, enable flag:
  everything `LoraLayer` gives); its path is the parameter's own name (`...mlp.experts.gate_up_proj`).
- `LoraExperts` replaces the experts module in place and holds it as `base_layer`, with one
  `LoraExpertParam` child per adapted parameter. Its forward runs the experts the way
  Transformers' `grouped_mm` implementation does (tokens sorted by expert, one grouped matmul per
  projection) and adds each expert's low-rank update on the same sorted tokens: a token meets only
  the experts it is routed to, and no expert's full delta weight is ever built. With no live
  adapter it calls the experts module itself, so `disabled` is the base bitwise.

Adapter tensors here are per expert: A (E, r, in), B (E, out, r). PEFT's file layout flattens
them, A (r*E, in) expert-major and B (out, r*E) rank-major; `to_peft` / `from_peft` convert.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..targets import layer_index
from .base import LoraLayer
from .experts_grouped import grouped_forward
from .experts_grouped import projections as _projections
from .precision import precise

__all__ = [
    "LoraExpertParam",
    "LoraExperts",
    "expert_parameters",
    "from_peft",
    "grouped_forward",
    "is_experts",
    "to_peft",
]


# -- what counts as an experts module ----------------------------------------------------------
def is_experts(module: nn.Module) -> bool:
    """Whether `module` is a Transformers 5 experts module this file can run (fused 3-D weights,
    the `use_experts_implementation` attributes, no expert parallelism, no post-expert norm)."""
    if isinstance(module, LoraExperts):
        return True
    if not (isinstance(getattr(module, "num_experts", None), int) and hasattr(module, "is_transposed")):
        return False
    if getattr(module, "has_post_expert_norm", False) or getattr(module, "_is_expert_parallel", False):
        return False
    names = _projections(module)
    return all(isinstance(getattr(module, n, None), torch.Tensor) and getattr(module, n).dim() == 3 for n in names)


def expert_parameters(model: nn.Module) -> list[str]:
    """Names of every fused expert parameter LoRA can adapt, in model order
    (`model.layers.0.mlp.experts.gate_up_proj`, ...; never the experts' biases)."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, LoraExperts) or (is_experts(module) and not _inside_host(model, path)):
            experts = module.base_layer if isinstance(module, LoraExperts) else module
            found += [f"{path}.{name}" for name in _projections(experts)]
    return found


def _inside_host(model: nn.Module, path: str) -> bool:
    parent = path.rpartition(".")[0]
    return path.endswith(".base_layer") and isinstance(model.get_submodule(parent) if parent else model, LoraExperts)


def to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (E, r, in), B (E, out, r)) -> PEFT's (A (r*E, in), B (out, r*E)); B's column k*E + e is
    expert e's k-th (peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight)."""
    experts, rank, fan_in = a.shape
    return a.reshape(experts * rank, fan_in), b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)


def from_peft(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A (r*E, in), B (out, r*E)) -> (A (E, r, in), B (E, out, r)), each contiguous."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] % num_experts or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"PEFT expert pair of shapes {tuple(a.shape)}, {tuple(b.shape)} does not split into {num_experts} experts"
        )
    rank = a.shape[0] // num_experts
    return (
        a.reshape(num_experts, rank, a.shape[1]).contiguous(),
        b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1).contiguous(),
    )


# -- one adapted parameter -----------------------------------------------------------------------
class ExpertWeight(nn.Module):
    """What a `LoraExpertParam` sees as its base layer: one 3-D parameter of the experts module
    (`weight`) and its per-expert bias (`bias`, gpt-oss), read live, owned by the experts module
    (held outside the module tree, so the state dict has each tensor once)."""

    def __init__(self, experts: nn.Module, parameter_name: str) -> None:
        super().__init__()
        object.__setattr__(self, "experts", experts)
        self.parameter_name = parameter_name

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.experts, self.parameter_name)

    @property
    def bias(self) -> torch.Tensor | None:
        return (
            getattr(self.experts, self.parameter_name + "_bias", None)
            if getattr(self.experts, "has_bias", False)
            else None
        )

    def extra_repr(self) -> str:
        return f"{self.parameter_name}: {tuple(self.weight.shape)}"


class LoraExpertParam(LoraLayer):
    """LoRA on one fused expert parameter: per expert e, W[e] + scaling * B[e] A[e] (r per expert)."""

    supports_dora = False

    def __init__(self, experts: nn.Module, parameter_name: str) -> None:
        weight = getattr(experts, parameter_name, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
            raise ValueError(f"{parameter_name!r} is not a 3-D expert parameter of {type(experts).__name__}")
        if not weight.is_floating_point() or type(weight).__name__ not in ("Parameter", "Tensor"):
            raise ValueError(
                f"LoRA on experts needs full-precision expert weights; {parameter_name!r} is "
                f"{type(weight).__name__} of {weight.dtype} (quantized experts are not supported)"
            )
        super().__init__(ExpertWeight(experts, parameter_name))
        self.parameter_name = parameter_name
        self.num_experts = weight.shape[0]
        self.transposed = bool(getattr(experts, "is_transposed", False))  # stored (E, in, out)
        d1, d2 = weight.shape[1:]
        self.in_features, self.out_features = (d1, d2) if self.transposed else (d2, d1)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()

    def pair_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.num_experts, rank, self.in_features), (self.num_experts, self.out_features, rank)

    def build_pair(self, rank: int, init: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._new_pair(rank)
        with torch.no_grad():
            flat = a.view(self.num_experts * rank, self.in_features)
            if init == "gaussian":
                nn.init.normal_(flat, std=1.0 / rank)
            else:  # kaiming-uniform with a=sqrt(5): nn.Linear's own init, fan_in = in (PEFT's too)
                nn.init.kaiming_uniform_(flat, a=math.sqrt(5))
            nn.init.zeros_(b)
        return a, b

    def pissa(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise ValueError(
            f"init='pissa' is not supported on fused expert weights ({self.parameter_name!r}); use "
            "init='default' or 'gaussian', or leave the experts out of the targets"
        )

    def olora(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise ValueError(
            f"init='olora' is not supported on fused expert weights ({self.parameter_name!r}); use "
            "init='default' or 'gaussian', or leave the experts out of the targets"
        )

    def _store_pair(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)

    def _drop_pair(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name], self.lora_B[name]

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[1]

    @staticmethod
    def rank_of(a: torch.Tensor) -> int:
        """The rank of a given A (E, r, in)."""
        return a.shape[1]

    def delta_from(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        delta = torch.bmm(precise(b), precise(a)) * scaling  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise TypeError("an expert parameter's update depends on each token's expert; LoraExperts computes it")

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("an expert parameter has no output of its own; LoraExperts computes the experts")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.parameter_name!r} is run by its LoraExperts module, not called on its own")

    def terms(self) -> list[tuple[torch.Tensor, torch.Tensor, float, float]]:
        """(A, B, scaling, dropout) of each live adapter, what the experts forward adds."""
        p = self.dropout if self.training else {}
        return [(*self.pair(n), self.scaling[n], p.get(n, 0.0)) for n in self.live_adapters()]


class ExpertSlice:
    """Expert `e` of a LoraExpertParam seen as a plain linear layer's adapters (its pairs,
    scalings and shapes): what per-module arithmetic (combine) works on."""

    def __init__(self, layer: LoraExpertParam, expert: int) -> None:
        self.layer, self.expert = layer, expert
        self.scaling = layer.scaling
        self.out_dim = 1 if layer.transposed else 0  # the base weight's own layout of this expert

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.layer.pair(name)
        return a[self.expert], b[self.expert]

    def pair_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.layer.in_features), (self.layer.out_features, rank)


# -- the experts module with its adapted parameters ----------------------------------------------
class LoraExperts(nn.Module):
    """The experts module, adapted: `base_layer` is the original, each adapted parameter a child
    `LoraExpertParam` named like the parameter."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        if not is_experts(experts):
            raise ValueError(f"{type(experts).__name__} is not a fused experts module lorakit can run")
        self.base_layer = experts

    def params(self) -> list[LoraExpertParam]:
        """The adapted parameters, in the order the forward uses them."""
        return [self._modules[n] for n in _projections(self.base_layer) if n in self._modules]

    def add_param(self, layer: LoraExpertParam) -> None:
        self.add_module(layer.parameter_name, layer)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        routing = next((p.routing for p in self.params() if p.routing is not None), None)
        if routing is not None:
            return _mixed(self, routing, hidden_states, top_k_index, top_k_weights)
        terms = {p.parameter_name: p.terms() for p in self.params()}
        if not any(terms.values()):
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        return grouped_forward(self.base_layer, hidden_states, top_k_index, top_k_weights, terms)

    def reference_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The plain computation the grouped path is pinned to: per expert, its weights plus the
        live adapters' full deltas, over the tokens routed to it."""
        experts = self.base_layer
        adapted = {p.parameter_name: p for p in self.params()}
        weights = {}
        for name in _projections(experts):
            w = getattr(experts, name)
            layer = adapted.get(name)
            for n in layer.live_adapters() if layer is not None else []:
                w = w + layer.delta_weight(n).to(w.dtype)
            weights[name] = w if experts.is_transposed else w.transpose(1, 2)  # (E, in, out)
        first, second = _projections(experts)
        out = torch.zeros_like(hidden_states)
        for e in range(experts.num_experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            h = hidden_states[token] @ weights[first][e]
            if experts.has_bias:
                h = h + getattr(experts, first + "_bias")[e]
            h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
            h = h @ weights[second][e]
            if experts.has_bias:
                h = h + getattr(experts, second + "_bias")[e]
            out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"experts={self.base_layer.num_experts}, adapted={[p.parameter_name for p in self.params()]}"


def _mixed(
    host: LoraExperts, routing, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Inside `mixed_batch`: the base experts for every token (base rows bitwise the base), then
    each route's tokens again through that route's weighted adapters. Tokens are rows of
    (rows, seq) flattened, so token t belongs to route t // (tokens / routes)."""
    if host.training:
        raise RuntimeError("mixed_batch is for inference: call model.eval() first")
    if any(p.merged for p in host.params()):
        raise ValueError("adapters are merged into the weights; call lorakit.unmerge(model) before mixed_batch")
    out = host.base_layer(hidden_states, top_k_index, top_k_weights)
    routes, tokens = routing.routes, hidden_states.shape[0]
    if tokens % len(routes):
        raise ValueError(f"mixed_batch: the experts got {tokens} tokens, not a whole number per route ({len(routes)})")
    per_route = tokens // len(routes)
    groups: dict[tuple, list[int]] = {}
    for i, route in enumerate(routes):
        if route:
            groups.setdefault(route, []).append(i)
    enabled = all(p.enabled for p in host.params())
    for route, indices in groups.items() if enabled else ():
        terms = {
            p.parameter_name: [(*p.pair(n), p.scaling[n] * w, 0.0) for n, w in route if n in p.scaling]
            for p in host.params()
        }
        if not any(terms.values()):
            continue
        rows = torch.tensor(indices, device=hidden_states.device)
        take = (rows[:, None] * per_route + torch.arange(per_route, device=rows.device)).reshape(-1)
        out[take] = grouped_forward(host.base_layer, hidden_states[take], top_k_index[take], top_k_weights[take], terms)
    return out


# -- which expert parameters an adapter takes ----------------------------------------------------
EXPERT_PRESETS = ("attention+mlp", "all-linear")  # the presets that reach the experts by themselves


def resolve_parameters(model: nn.Module, config, exclude: list[str] = ()) -> list[str]:
    """The expert parameters `config` adapts, in model order: those `target_parameters` names by
    PEFT's rule (the full name, or a suffix after a "."), and with a preset that reaches the MLP
    every one; then `layers` and `exclude` as for modules. A `target_parameters` entry that names
    no expert parameter is an error naming what exists (a parameter that is not a fused expert
    weight included)."""
    found = expert_parameters(model)
    chosen: set[str] = set()
    if isinstance(config.targets, str) and config.targets in EXPERT_PRESETS:
        chosen.update(found)
    for entry in config.target_parameters:
        named = [p for p in found if p == entry or p.endswith("." + entry)]
        if not named:
            other = [n for n, _ in _all_parameter_names(model) if n == entry or n.endswith("." + entry)]
            what = (
                (
                    f"it names {other[0]!r}, which is not a fused 3-D expert weight (lorakit adapts the "
                    "gate_up_proj / up_proj / down_proj of Transformers' experts modules)"
                )
                if other
                else "it names no parameter of the model"
            )
            raise ValueError(
                f"target_parameters entry {entry!r} selects no expert parameter: {what}. " + _describe(found)
            )
        chosen.update(named)
    if config.layers is not None:
        chosen = {p for p in chosen if layer_index(p, config.layers_pattern) in config.layers}
    chosen = {p for p in chosen if not any(p == e or p.endswith("." + e) or f".{e}." in f".{p}." for e in exclude)}
    return [p for p in found if p in chosen]


def _all_parameter_names(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # A wrapped experts module's own names, as PEFT strips ".base_layer" before matching.
    return [(n.replace(".base_layer.", "."), p) for n, p in model.named_parameters()]


def _describe(found: list[str]) -> str:
    if not found:
        return "The model has no fused expert parameters."
    kinds = sorted({p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in found})
    return f"The model's expert parameters ({len(found)}), by name: {', '.join(kinds)}."


def expert_hint(model: nn.Module, targets) -> str:
    """A line for an error about `targets` that name expert parameters, not modules."""
    entries = [targets] if isinstance(targets, str) else list(targets or [])
    found = expert_parameters(model)
    named = [e for e in entries if any(p == e or p.endswith("." + e) for p in found)]
    if not named:
        return ""
    return (
        f"{named[0]!r} is a fused expert parameter, not a module: pass it as "
        f"target_parameters=[{named[0]!r}] (or use the preset 'attention+mlp' / 'all-linear').\n"
    )


def host_and_layer(model: nn.Module, path: str) -> tuple[str, nn.Module, LoraExpertParam | None] | None:
    """For an expert parameter `path`: (the experts module's path, that module (plain or the
    LoraExperts holding it), the parameter's existing LoraExpertParam or None); None when `path`
    is no expert parameter."""
    host_path, _, name = path.rpartition(".")
    try:
        host = model.get_submodule(host_path) if host_path else model
    except AttributeError:
        return None
    experts = host.base_layer if isinstance(host, LoraExperts) else host
    if not is_experts(experts) or name not in _projections(experts):
        return None
    layer = host._modules.get(name) if isinstance(host, LoraExperts) else None
    return host_path, host, layer


def new_layer(host: nn.Module, name: str) -> LoraExpertParam:
    """A LoraExpertParam for parameter `name` of `host` (plain experts or LoraExperts), in its mode."""
    experts = host.base_layer if isinstance(host, LoraExperts) else host
    return LoraExpertParam(experts, name).train(experts.training)


def unwrap(model: nn.Module, path: str, layer: LoraExpertParam, replace) -> None:
    """Take the adapter-less `layer` out of its LoraExperts; a LoraExperts left with none gives
    its place back to the experts module (`replace(model, path, module)` does the swap)."""
    host_path = path.rpartition(".")[0]
    host = model.get_submodule(host_path)
    del host._modules[layer.parameter_name]
    if not host.params():
        replace(model, host_path, host.base_layer)
