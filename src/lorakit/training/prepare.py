"""Everything a run needs before its first step, done before anything is written: the data read
and checked, the tokenizer and model loaded, --max-length held to the model's position limit,
the adapter added. (The output folder's checks are in run_folder.py.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapting.manage import add_adapter_from_tensors, inject, set_adapter
from ..adapting.token_rows import add_token_rows
from ..config import LoraConfig
from ..files.expert_layout import check_layout
from ..quant.bnb import quantized_kind
from ..quant.convert import quantize
from ..quant.loftq import loftq_pairs
from ..targets import resolve_targets
from .base_model import default_model, fit_max_length, load_base
from .data import examples as data_mod
from .data.packing import Packed, check_model, efficiency, pack
from .distributed import World
from .errors import TrainingError
from .new_tokens import add_tokens
from .options import RunConfig
from .tasks import head_name

SPLIT_SEED = 0  # the held-out split is fixed by the data, not by --seed


@dataclass
class Setup:
    task: str
    train: data_mod.Encoded
    held_out: data_mod.Encoded
    labels: list[str] | None
    model_name: str  # the base model's folder (absolute) or hub id, as the adapter names it
    model: torch.nn.Module
    describe: dict[str, Any]  # what to tell the user: "data", "model", "saved" (heads trained in full),
    # "max_length" (the tokens per example used), "train_examples", "held_out_examples", "notices"
    tokenizer: Any = None


def held_out_set(config: RunConfig) -> data_mod.Dataset:
    """The run's held-out set, as training builds it (also what `lorakit eval` rebuilds)."""
    if config.eval_data:
        return data_mod.read_dataset(config.eval_data)
    return data_mod.split(data_mod.read_dataset(config.data), config.eval_split, SPLIT_SEED)[1]


def prepare(config: RunConfig, world: World) -> Setup:
    """Read and check the data, load model and tokenizer, add the adapter: all before any write."""
    train_set = data_mod.read_dataset(config.data)
    task = config.task or data_mod.infer_task(train_set)
    data_mod.validate(train_set, task)
    for flag, given in (("--packing", config.packing), ("--add-tokens", config.add_tokens)):
        if given and task != "causal-lm":
            raise TrainingError(f"{flag} is for causal-lm training; the task here is {task}")
    if config.eval_data:
        held_set = data_mod.read_dataset(config.eval_data)
        data_mod.validate(held_set, task)
        how = f"from {config.eval_data}"
    else:
        train_set, held_set = data_mod.split(train_set, config.eval_split, SPLIT_SEED)
        how = f"a fixed {config.eval_split:.0%} split"
    labels = run_labels(config, task, train_set, held_set)
    global_batch = config.batch_size * config.grad_accum * world.size
    if len(train_set) < global_batch:
        raise TrainingError(
            f"{train_set.source}: {len(train_set)} training examples, fewer than one global batch "
            f"({config.batch_size} x {config.grad_accum} x {world.size} processes)"
        )
    model_name = config.model or default_model()
    if Path(model_name).is_dir():
        model_name = str(Path(model_name).resolve())  # the adapter names its base wherever it is read
    # float32 weights (--bf16 autocasts the compute); the seed sets a new classifier head's weights
    model, tokenizer = load_base(model_name, task, labels, seed=config.seed)
    new_ids = add_tokens(tokenizer, model, config.add_tokens, model_name) if config.add_tokens else []
    max_length, notice = fit_max_length(config.max_length, model, "--max-length")
    train_enc = data_mod.encode(train_set, task, tokenizer, max_length, labels, config.train_on_inputs)
    held_enc = data_mod.encode(held_set, task, tokenizer, max_length, labels, config.train_on_inputs)
    notices = [n for n in (notice, data_mod.cut_notice(train_enc, max_length)) if n]
    saved = [head_name(model)] if task == "classify" else []
    lora = config.lora(saved)
    _check_rank(model, lora)
    try:
        pairs = loftq_pairs(model, lora, config.quantize, _compute_dtype(config.bf16)) if config.loftq else None
        quantized = quantize_base(model, config.quantize, config.bf16)
        if pairs is None:
            inject(model, lora)
        else:  # LoftQ: the pairs found on the full-precision weights, added to the quantized base
            heads = {name: model.get_submodule(name).state_dict() for name in saved}
            add_adapter_from_tensors(model, "default", lora, pairs, saved=heads)
            set_adapter(model, "default")
    except ImportError as err:  # LoftQ quantizes to measure the error
        raise TrainingError(f"--quantize {config.quantize}: {err}") from None
    except ValueError as err:
        raise TrainingError(f"--targets {config.targets!r}: {err}") from None
    try:
        check_layout(model, config.expert_layout)  # before training, not when the adapter is written
    except ValueError as err:
        raise TrainingError(f"--expert-layout {config.expert_layout}: {err}") from None
    if new_ids:
        try:
            add_token_rows(model, new_ids)  # after the adapter: adding it freezes everything else
        except ValueError as err:
            raise TrainingError(f"--add-tokens: {err}") from None
    model.to(world.device)
    packed = ""
    if config.packing:
        train_enc, held_enc, packed = _pack(train_enc, held_enc, model, max_length, config, world)
    describe = {
        "data": f"{train_set.source}: {len(train_set)} training examples, {len(held_set)} held out ({how}){packed}",
        "train_examples": len(train_set),
        "held_out_examples": len(held_set),
        "model": f"{model_name if config.model else 'all-MiniLM-L6-v2 (bundled)'} ({type(model).__name__}){quantized}",
        "saved": saved,
        "max_length": max_length,
        "notices": notices,
    }
    if new_ids:
        added = ", ".join(f"{token} (id {i})" for token, i in zip(config.add_tokens, new_ids))
        describe["notices"].append(
            f"added tokens {added}; their embedding rows train, and the tokenizer is written with the adapter"
        )
    return Setup(task, train_enc, held_enc, labels, model_name, model, describe, tokenizer)


def _pack(
    train: data_mod.Encoded,
    held: data_mod.Encoded,
    model: torch.nn.Module,
    max_length: int,
    config: RunConfig,
    world: World,
) -> tuple[Packed, Packed, str]:
    """--packing: both sets in rows of up to `max_length` tokens, once the model is known to keep
    packed examples apart; returns them and what to tell the user."""
    check_model(model, train.input_ids, world.device)
    lengths = [len(ids) for ids in train.input_ids]
    train_rows, held_rows = pack(train, max_length), pack(held, max_length)
    global_batch = config.batch_size * config.grad_accum * world.size
    if len(train_rows) < global_batch:
        raise TrainingError(
            f"--packing: the {len(train)} training examples fill {len(train_rows)} rows of up to "
            f"{max_length} tokens, fewer than one global batch ({config.batch_size} x {config.grad_accum} x "
            f"{world.size} processes); lower --batch-size (it counts rows with --packing)"
        )
    packed = efficiency(lengths, config.batch_size, packing_to=max_length, seed=config.seed)
    unpacked = efficiency(lengths, config.batch_size, seed=config.seed)
    return (
        train_rows,
        held_rows,
        (
            f"; packed into {len(train_rows)} rows of up to {max_length} tokens "
            f"({packed:.0%} of the tokens are not padding; unpacked {unpacked:.0%})"
        ),
    )


def quantize_base(model: torch.nn.Module, kind: str | None, bf16: bool) -> str:
    """QLoRA (--quantize): quantize the base's linear layers, heads kept in full precision; the
    4-bit layers compute in bf16 with --bf16, else float32. Returns what to tell the user."""
    if kind is None:
        return ""
    try:
        quantize(model, kind, compute_dtype=_compute_dtype(bf16))
    except (ImportError, ValueError) as err:
        raise TrainingError(f"--quantize {kind}: {err}") from None
    count = sum(quantized_kind(m) is not None for m in model.modules())
    return f", {count} linear layers quantized to {kind}"


def _compute_dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


def _check_rank(model: torch.nn.Module, lora: LoraConfig) -> None:
    """--rank above the size of every layer it adapts: each pair would hold more numbers than its
    weight (and a slip like --rank 100000000 would allocate until the machine runs out)."""
    try:
        modules = resolve_targets(model, lora.targets, exclude=lora.modules_to_save)
    except ValueError:
        return  # inject says what is wrong with the targets
    widest = max(max(model.get_submodule(m).weight.shape) for m in modules)
    if lora.rank > widest:
        raise TrainingError(
            f"--rank {lora.rank} is above the size of every layer it adapts (the largest is {widest}); "
            f"a LoRA pair that large holds more numbers than its weight: use --rank <= {widest}"
        )


def run_labels(
    config: RunConfig, task: str, train_set: data_mod.Dataset, *others: data_mod.Dataset
) -> list[str] | None:
    """classify: the label set (from --labels or the training data), checked against every set."""
    if task != "classify":
        return None
    labels = [data_mod.label_name(x) for x in config.labels] if config.labels else data_mod.label_set(train_set)
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise TrainingError(f"--labels must name at least 2 different labels, got {labels}")
    origin = "--labels" if config.labels else f"the training data {train_set.source}"
    for dataset in (train_set, *others):
        data_mod.check_labels(dataset, labels, origin)
    return labels
