"""The options of a training run, defined once.

`RunConfig` holds every option with its default and its command-line form; `add_run_options`
builds the `lorakit train` options from it, `RunConfig.from_args` reads them back, and
`run_config.json` in the output folder stores it, from which a run is resumed (`--resume`) or
repeated (`--repeat`).

The mechanism is any dataclass's: `option()` fields, `add_options` (the parser from them) and
`check_options` (every value against its definition); `lorakit serve` defines its options so too.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import INIT_MODES, LoraConfig
from ..files.expert_layout import LAYOUTS as EXPERT_LAYOUTS
from ..files.json_file import read_json
from ..quant.convert import KINDS as QUANTIZE_KINDS
from .data import examples as data_mod
from .errors import TrainingError
from .new_tokens import check_tokens
from .option_check import number_problem

RUN_FILE = "run_config.json"
DEFAULT_OUT = "runs/sentiment"


def _targets(value: str) -> str | list[str]:
    """`q_proj,v_proj` is a list of names; anything else (a preset, a regex) stays one string."""
    if "," in value and not any(c in value for c in "()[]|*+?\\^$"):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _names(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def option(default: Any, group: str, help: str, **cli: Any) -> Any:
    """A RunConfig field and its command-line option (`--name-with-dashes`).

    `cli` holds argparse's keywords (metavar, type, choices), `exclusive`, the name of a group
    of options of which one may be given, and `valid`, the range a number must lie in
    (`">= 1"`, `"[0, 1)"`; see option_check.py), which `RunConfig.check` enforces.
    """
    return field(default=default, metadata={"group": group, "help": help, **cli})


_WHAT, _LORA, _TRAINING, _OUTPUT = "what to train", "LoRA", "training", "output"


@dataclass
class RunConfig:
    """Every option of a run; saved as run_config.json so the run can be repeated or resumed."""

    model: str | None = option(
        None,
        _WHAT,
        "local Hugging Face model folder, or a hub id where the network allows (default: the bundled all-MiniLM-L6-v2)",
        metavar="FOLDER|HUB_ID",
    )
    data: str = option(
        data_mod.BUNDLED,
        _WHAT,
        "CSV/TSV (header line) or JSONL file; columns text,label | "
        f"prompt,completion | messages (default: {data_mod.BUNDLED})",
        metavar="FILE",
    )
    task: str | None = option(None, _WHAT, "default: inferred from the data's columns", choices=data_mod.TASKS)
    labels: list[str] | None = option(
        None,
        _WHAT,
        "classify: the label set in id order, comma-separated (default: the data's labels, sorted)",
        metavar="A,B,...",
        type=_names,
    )
    eval_data: str | None = option(
        None, _WHAT, "held-out file (same format and columns as --data)", metavar="FILE", exclusive="held out"
    )
    eval_split: float = option(
        0.2,
        _WHAT,
        "fraction of --data held out, a fixed split (default: 0.2)",
        metavar="FRACTION",
        exclusive="held out",
        valid="(0, 1)",
    )
    quantize: str | None = option(
        None,
        _WHAT,
        "QLoRA: quantize the base model's linear layers (the heads stay in "
        "full precision); needs bitsandbytes (pip install 'lorakit[quant]')",
        choices=QUANTIZE_KINDS,
    )
    loftq: bool = option(
        False,
        _LORA,
        "with --quantize: start the adapters from the quantization error (LoftQ, one iteration) instead of B = 0",
    )
    rank: int = option(8, _LORA, "rank r of each adapter (default: 8)", metavar="R", valid=">= 1")
    alpha: float = option(16.0, _LORA, "scale: alpha / rank (default: 16)", metavar="A", valid="> 0")
    targets: str | list[str] = option(
        "attention",
        _LORA,
        "attention | attention+mlp | all-linear | comma-separated module names | a regex (default: attention)",
        metavar="WHICH",
        type=_targets,
    )
    dropout: float = option(0.0, _LORA, "dropout on the adapters' input (default: 0)", metavar="P", valid="[0, 1)")
    rslora: bool = option(
        False,
        _LORA,
        "scale by alpha / sqrt(rank) (rank-stabilised LoRA): steps "
        "sqrt(rank) x those of plain LoRA at the same --lr, so lower --lr about as much "
        "(bundled task, rank 8: --lr 3.5e-4 gives 94.00%%; the default 1e-3 is at the "
        "edge: 45.50%%, chance, with 2 threads)",
    )
    dora: bool = option(False, _LORA, "DoRA: also train a magnitude per output feature (weight-decomposed LoRA)")
    add_tokens: list[str] | None = option(
        None,
        _LORA,
        "causal-lm: add these special tokens to the "
        "tokenizer and train only their embedding rows (and the output "
        "head's), saved in PEFT's layout with the tokenizer",
        metavar="TOKEN,...",
        type=_names,
    )
    init: str = option(
        "default",
        _LORA,
        "how A and B start; pissa / olora take the top of the base weight's "
        "SVD / QR and leave the residual in the base (default: default)",
        choices=INIT_MODES,
    )
    epochs: int = option(3, _TRAINING, "passes over the data (default: 3)", metavar="N", valid=">= 1")
    max_steps: int | None = option(
        None,
        _TRAINING,
        "stop after this many optimizer steps (overrides --epochs)",
        metavar="N",
        type=int,
        valid=">= 1",
    )
    lr: float = option(1e-3, _TRAINING, "peak learning rate (default: 1e-3)", valid="> 0")
    warmup: float = option(
        0.1, _TRAINING, "fraction of steps to warm up over (default: 0.1)", metavar="FRACTION", valid="[0, 1)"
    )
    weight_decay: float = option(0.0, _TRAINING, "AdamW weight decay (default: 0)", metavar="W", valid=">= 0")
    loraplus_ratio: float | None = option(
        None,
        _TRAINING,
        "LoRA+: B's learning rate is R x --lr (the "
        "paper suggests 16; default: off, one rate); lower --lr by about "
        "sqrt(R) (bundled task, R 16: --lr 2.5e-4 gives 94.75%%; 1e-3 does "
        "not learn)",
        metavar="R",
        type=float,
        valid="> 0",
    )
    batch_size: int = option(
        16, _TRAINING, "examples per process per micro-batch (default: 16)", metavar="N", valid=">= 1"
    )
    grad_accum: int = option(1, _TRAINING, "micro-batches per optimizer step (default: 1)", metavar="N", valid=">= 1")
    max_length: int = option(
        128,
        _TRAINING,
        "tokens per example; above the model's position limit it is lowered "
        "to that limit, with a notice (default: 128)",
        metavar="TOKENS",
        valid=">= 2",
    )
    train_on_inputs: bool = option(
        False,
        _TRAINING,
        "causal-lm: train on every token (prompts, system and user "
        "turns too), not only the completions or the assistant's turns",
    )
    packing: bool = option(
        False,
        _TRAINING,
        "causal-lm: pack examples into rows of up to --max-length "
        "tokens (positions restart per example, no attention across them); --batch-size "
        "counts rows",
    )
    seed: int = option(
        0, _TRAINING, "seed for the initial weights, order and dropout (default: 0)", metavar="N", valid="[-1e12, 1e12]"
    )  # seed * 1_000_003 + epoch seeds a torch.Generator (64 bits)
    bf16: bool = option(
        False, _TRAINING, "compute in bfloat16 (autocast; with --quantize also the 4-bit layers' compute dtype)"
    )
    device: str = option("auto", _TRAINING, "default: cuda if available", choices=("auto", "cpu", "cuda"))
    threads: int | None = option(
        None, _TRAINING, "CPU threads per process (default: the cores / processes)", metavar="N", type=int, valid=">= 1"
    )
    save_every: int | None = option(
        None, _OUTPUT, "write a checkpoint every N optimizer steps", metavar="N", type=int, valid=">= 1"
    )
    out: str = option(DEFAULT_OUT, _OUTPUT, f"output folder (default: {DEFAULT_OUT})", metavar="FOLDER")
    expert_layout: str = option(
        "fused",
        _OUTPUT,
        "how an adapter on MoE experts is written: fused (PEFT's "
        "target_parameters; read by PEFT, lorakit, and vLLM for gpt-oss) or per-expert "
        "(a 2-D pair per expert under the checkpoint's names; read by vLLM for Qwen3-MoE, "
        "Qwen2-MoE, OLMoE, Mixtral, DeepSeek, and by lorakit) (default: fused)",
        choices=EXPERT_LAYOUTS,
    )
    extra: dict[str, Any] = field(default_factory=dict)  # facts found at start (model path, sizes); not an option

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainingError(f"{where}: unknown run options {unknown}")
        return cls(**raw)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        """The RunConfig of parsed `lorakit train` options (see `add_run_options`)."""
        return options_from_args(cls, args)

    def check(self) -> None:
        """Every option against its definition (type, `valid` range, choices); run before anything is written."""
        check_options(self, TrainingError)
        names = self.labels
        if names is not None and not (isinstance(names, list) and names and all(isinstance(x, str) for x in names)):
            raise TrainingError(f"--labels must be a list of names, got {self.labels!r}")
        if self.loftq and not self.quantize:
            raise TrainingError("--loftq starts the adapters from the quantization error; it needs --quantize")
        if self.add_tokens is not None:
            check_tokens(self.add_tokens)
        targets = self.targets
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise TrainingError(f"--targets must be a preset, a regex or a list of module names, got {targets!r}")

    def lora(self, modules_to_save: list[str]) -> LoraConfig:
        try:
            return LoraConfig(
                rank=self.rank,
                alpha=self.alpha,
                dropout=self.dropout,
                targets=self.targets,
                rslora=self.rslora,
                use_dora=self.dora,
                init=self.init,
                modules_to_save=modules_to_save,
            )
        except ValueError as err:
            raise TrainingError(f"LoRA options: {err}") from None

    def to_json(self) -> dict[str, Any]:
        """What run_config.json holds."""
        return {"lorakit_run": 1, "config": asdict(self)}


def option_fields(config_class: type) -> list[Field]:
    """The fields of a dataclass that `option()` made: its command-line options."""
    return [f for f in fields(config_class) if "group" in f.metadata]


def run_option_fields() -> list[Field]:
    """The options of `lorakit train` (RunConfig's)."""
    return option_fields(RunConfig)


def options_from_args(config_class: type, args: argparse.Namespace) -> Any:
    """The `config_class` of options parsed by a parser that `add_options` built."""
    return config_class(**{f.name: getattr(args, f.name) for f in option_fields(config_class)})


def check_options(config: Any, error: type[Exception]) -> None:
    """Every `option()` field of the dataclass `config` against its definition (type, `valid`
    range, choices); the first that is wrong is an `error` naming its flag and what is valid."""
    for f in option_fields(type(config)):
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        optional = f.default is None
        if "choices" in f.metadata:
            if not (value in f.metadata["choices"] or (optional and value is None)):
                raise error(f"{flag} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
            continue
        kind = f.metadata.get("type") or (str if optional else type(f.default))
        if kind in (int, float):
            wanted = number_problem(value, kind, f.metadata.get("valid"), optional)
            if wanted:
                raise error(f"{flag} must be {wanted}, got {value!r}")
        elif kind in (str, bool) and not (isinstance(value, kind) or (optional and value is None)):
            raise error(f"{flag} must be {'a string' if kind is str else 'true or false'}, got {value!r}")


def add_run_options(parser: argparse.ArgumentParser, only: Collection[str] | None = None) -> dict[str, Any]:
    """Add every RunConfig option (or those named in `only`) to `parser`; returns the argument
    groups by title."""
    return add_options(parser, RunConfig, only)


def add_options(
    parser: argparse.ArgumentParser, config_class: type, only: Collection[str] | None = None
) -> dict[str, Any]:
    """Add every `option()` field of `config_class` (or those named in `only`) to `parser`, in
    argument groups, with the fields' defaults; returns the groups by title, for the caller's own
    options."""
    groups: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for f in option_fields(config_class):
        if only is not None and f.name not in only:
            continue
        meta = dict(f.metadata)
        group_name, help_text = meta.pop("group"), meta.pop("help")
        meta.pop("valid", None)
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        target = groups[group_name]
        together = meta.pop("exclusive", None)
        if together is not None:
            if together not in exclusive:
                exclusive[together] = target.add_mutually_exclusive_group()
            target = exclusive[together]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            target.add_argument(flag, action="store_true", help=help_text)
            continue
        if "type" not in meta and "choices" not in meta and default is not None:
            meta["type"] = type(default)
        target.add_argument(flag, default=default, help=help_text, **meta)
    return groups


def read_run(out: str | Path) -> RunConfig:
    """The RunConfig saved in a run folder (for --resume and for eval's defaults)."""
    file = Path(out) / RUN_FILE
    if not file.is_file():
        raise TrainingError(f"{file}: missing; {out} is not a lorakit run folder")
    raw = read_json(file, TrainingError)
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise TrainingError(f"{file}: expected an object with a 'config' object")
    config = RunConfig.from_dict(raw["config"], str(file))
    try:
        config.check()
    except TrainingError as err:
        raise TrainingError(f"{file}: {err}") from None
    return config
