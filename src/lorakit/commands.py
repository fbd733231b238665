"""What each `lorakit` subcommand does, once cli.py has parsed its arguments."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import data as data_mod
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, AdapterFileError, load_adapter, read_adapter_config
from .atomic import write_folder_atomic
from .metrics import METRICS_FILE, fmt_result
from .model import unload
from .run_config import RUN_FILE, RunConfig, TrainingError, read_run
from .tasks import (
    LABELS_FILE,
    TASK_OF_TYPE,
    ModelError,
    evaluate,
    load_model,
    load_tokenizer,
    prepare,
    quiet_transformers,
)
from .train import SPLIT_SEED, train
from .trainer_state import CheckpointError

USER_ERRORS = (data_mod.DataError, ModelError, AdapterFileError, TrainingError, CheckpointError,
               FileExistsError, FileNotFoundError, ValueError)


def run_command(args: argparse.Namespace) -> int:
    return {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
            "merge": cmd_merge, "inspect": cmd_inspect}[args.command](args)


# ---- train ---------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        config = read_run(args.resume)
        config.out = args.resume
        train(config, resume=True)
        return 0
    if args.repeat:
        config = read_run(args.repeat)
        if Path(args.out).resolve() == Path(args.repeat).resolve():
            raise TrainingError(f"--repeat {args.repeat} needs another --out (it would replace the run it repeats)")
        config.out, config.extra = args.out, {}
        train(config, overwrite=args.overwrite)
        return 0
    config = RunConfig(
        model=args.model, data=args.data, task=args.task, eval_data=args.eval_data, eval_split=args.eval_split,
        labels=args.labels, rank=args.rank, alpha=args.alpha, targets=args.targets, dropout=args.dropout,
        rslora=args.rslora, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_length=args.max_length, seed=args.seed, bf16=args.bf16, device=args.device, threads=args.threads,
        save_every=args.save_every, out=args.out,
    )
    train(config, overwrite=args.overwrite)
    return 0


# ---- loading a trained adapter -------------------------------------------------------------


def adapter_facts(folder: str | Path) -> dict[str, Any]:
    """Task, base model and label names of an adapter folder, checked."""
    folder = Path(folder)
    config, facts = read_adapter_config(folder)
    task_type = facts.get("task_type")
    if task_type not in TASK_OF_TYPE:
        raise AdapterFileError(
            f"{folder / CONFIG_FILE}: task_type is {task_type!r}; lorakit runs {' or '.join(TASK_OF_TYPE)} adapters"
        )
    labels = None
    if TASK_OF_TYPE[task_type] == "classify":
        file = folder / LABELS_FILE
        if not file.is_file():
            raise AdapterFileError(f"{file}: missing; a classifier adapter needs its label names (id2label)")
        try:
            id2label = json.loads(file.read_text(encoding="utf-8"))["id2label"]
            labels = [id2label[str(i)] for i in range(len(id2label))]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise AdapterFileError(f"{file}: expected {{\"id2label\": {{\"0\": name, ...}}}} ({err})") from None
    return {"config": config, "task": TASK_OF_TYPE[task_type], "base": facts.get("base_model_name_or_path"),
            "labels": labels, "facts": facts}


def load_trained(folder: str, model_name: str | None, adapter: bool = True):
    """(model, tokenizer, facts): the base model with the adapter loaded (or not)."""
    facts = adapter_facts(folder)
    base = model_name or facts["base"]
    if not base:
        raise AdapterFileError(f"{Path(folder) / CONFIG_FILE}: base_model_name_or_path is empty; pass --model")
    quiet_transformers()
    tokenizer = load_tokenizer(base)
    model = load_model(base, facts["task"], facts["labels"])
    prepare(model, tokenizer)
    if adapter:
        load_adapter(model, folder)
    model.eval()
    facts["base"] = base
    return model, tokenizer, facts


# ---- eval ----------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    facts = adapter_facts(args.adapter)
    run = read_run(args.adapter) if (Path(args.adapter) / RUN_FILE).is_file() else None
    max_length = args.max_length or (run.max_length if run else 128)
    if args.data:
        dataset = data_mod.read_dataset(args.data)
    elif run is not None:
        dataset = _held_out(run)
    else:
        raise TrainingError(f"{args.adapter}: no {RUN_FILE} to find the held-out set; pass --data FILE")
    data_mod.validate(dataset, facts["task"])
    if facts["labels"]:
        data_mod.check_labels(dataset, facts["labels"], f"the adapter's {LABELS_FILE}")
    model, tokenizer, facts = load_trained(args.adapter, args.model)
    encoded = data_mod.encode(dataset, facts["task"], tokenizer, max_length, facts["labels"])
    result = evaluate(model, encoded, args.batch_size, torch.device("cpu"))
    if args.json:
        print(json.dumps({"examples": len(dataset), **result}, indent=2))
        return 0
    print(f"{args.adapter} on {dataset.source} ({len(dataset)} examples): {fmt_result(result)}")
    return 0


def _held_out(run: RunConfig) -> data_mod.Dataset:
    """The run's held-out set, rebuilt exactly as training built it."""
    if run.eval_data:
        return data_mod.read_dataset(run.eval_data)
    return data_mod.split(data_mod.read_dataset(run.data), run.eval_split, SPLIT_SEED)[1]


# ---- generate ------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer, facts = load_trained(args.adapter, args.model, adapter=not args.no_adapter)
    if facts["task"] == "classify":
        enc = tokenizer(args.prompt, return_tensors="pt", truncation=True)
        with torch.no_grad():
            probs = model(**enc).logits.float().softmax(-1)[0]
        best = int(probs.argmax())
        print(f"{facts['labels'][best]}  ({', '.join(f'{n} {p:.3f}' for n, p in zip(facts['labels'], probs.tolist()))})")
        return 0
    prompt = args.prompt
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=model.config.pad_token_id)
    text = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(text if text.strip() else "(no text: the model produced only special tokens, e.g. end-of-text)")
    return 0


# ---- merge ---------------------------------------------------------------------------------


def cmd_merge(args: argparse.Namespace) -> int:
    target = Path(args.out)
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    model, tokenizer, facts = load_trained(args.adapter, args.model)
    plain = unload(model, merge=True)

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_folder_atomic(target, fill, args.overwrite)
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    print(f"merged {args.adapter} into {facts['base']}: {target} ({size / 2**20:.1f} MB of safetensors); "
          f"load it with {type(plain).__name__}.from_pretrained({str(target)!r})")
    return 0


# ---- inspect -------------------------------------------------------------------------------


def inspect_adapter(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    config, facts = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFileError(f"{weights}: missing")
    shapes: dict[str, list[int]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shapes[key] = list(f.get_slice(key).get_shape())
    count = sum(int(torch.Size(s).numel()) for s in shapes.values())
    lora = sum(int(torch.Size(s).numel()) for k, s in shapes.items() if ".lora_" in k)
    modules = facts.get("target_modules") or []
    info: dict[str, Any] = {
        "folder": str(folder),
        "base_model": facts.get("base_model_name_or_path"),
        "task_type": facts.get("task_type"),
        "rank": config.rank,
        "alpha": config.alpha,
        "rslora": config.rslora,
        "dropout": config.dropout,
        "targets": sorted({m.rsplit(".", 1)[-1] for m in modules}) if isinstance(modules, list) else modules,
        "target_modules": len(modules) if isinstance(modules, list) else modules,
        "modules_to_save": config.modules_to_save,
        "parameters": count,
        "lora_parameters": lora,
        "file_bytes": weights.stat().st_size,
    }
    if (folder / LABELS_FILE).is_file():
        info["labels"] = list(json.loads((folder / LABELS_FILE).read_text())["id2label"].values())
    metrics = folder / METRICS_FILE
    if metrics.is_file():
        evals = [json.loads(x) for x in metrics.read_text().splitlines() if '"eval"' in x]
        if evals:
            info["held_out"] = {"before": evals[0]["eval"], "after": evals[-1]["eval"], "steps": evals[-1]["step"]}
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("base model", info["base_model"]),
        ("task", f"{info['task_type']} ({TASK_OF_TYPE.get(info['task_type'], '?')})"),
        ("LoRA", f"rank {info['rank']}, alpha {info['alpha']:g}{', rsLoRA' if info['rslora'] else ''}, "
                 f"dropout {info['dropout']:g}"),
        ("targets", f"{info['target_modules']} modules: {', '.join(info['targets']) if isinstance(info['targets'], list) else info['targets']}"),
        ("trained in full", ", ".join(info["modules_to_save"]) or "-"),
        ("parameters", f"{info['parameters']:,} ({info['lora_parameters']:,} in LoRA pairs)"),
        ("file size", f"{info['file_bytes'] / 1024:.1f} KB ({WEIGHTS_FILE})"),
    ]
    if "labels" in info:
        rows.append(("labels", ", ".join(info["labels"])))
    if "held_out" in info:
        h = info["held_out"]
        rows.append(("held out", f"before {fmt_result(h['before'])}; after {h['steps']} steps {fmt_result(h['after'])}"))
    width = max(len(k) for k, _ in rows)
    print(info["folder"])
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0
