"""The training loop behind `lorakit train`: data in, a PEFT-layout adapter folder out.

One optimizer step sees a global batch of batch_size x grad_accum x processes examples, drawn
in a seeded order per epoch that depends only on (seed, epoch), so the position in the data is
the step number. The loss is summed and divided by the number of labelled examples (or tokens)
in the whole global batch: gradient accumulation and DistributedDataParallel give the update one
large batch would. Checkpoints (trainer_state.py) make a killed run continue bit for bit.

The output folder:
  adapter_config.json, adapter_model.safetensors  the adapter (PEFT layout)
  labels.json                                    classify: id2label / label2id
  metrics.jsonl                                  one line per step (loss, lr) and per evaluation
  loss.png                                       the loss curve
  run_config.json                                every option of the run, to repeat or resume it
  checkpoints/step-NNNNNN/                       with --save-every
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from . import data as data_mod
from . import distributed as dist_mod
from .atomic import write_json_atomic
from .checkpoint import save_adapter
from .metrics import METRICS_FILE, fmt_one, fmt_result, fmt_size, read_metrics, write_metrics
from .model import adapters, inject, trainable_parameters
from .plot import plot_loss
from .progress import Progress, duration
from .run_config import RUN_FILE, RunConfig, TrainingError
from .tasks import (
    LABELS_FILE,
    TASK_TYPES,
    default_model,
    evaluate,
    forward,
    head_name,
    load_model,
    load_tokenizer,
    loss_sum,
    prepare,
    quiet_transformers,
)
from .trainer_state import STATE_FILE, latest_checkpoint, load_checkpoint, save_checkpoint

PLOT_FILE = "loss.png"
SPLIT_SEED = 0  # the held-out split is fixed by the data, not by --seed


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warmup over the first `warmup` of the steps, then linear decay to zero."""
    warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    return peak * max(0.0, (total - step) / max(1, total - warm))


def epoch_batches(lengths: list[int], seed: int, epoch: int, size: int) -> list[list[int]]:
    """The global batches of one epoch, a pure function of (seed, epoch).

    A seeded shuffle, cut into pools of 50 batches; each pool is sorted by length before it is
    cut into batches (less padding, so less compute), then the batches are shuffled. The last
    len % size examples of the shuffle sit this epoch out.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    order = order[: len(order) // size * size]
    batches: list[list[int]] = []
    pool = 50 * size
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[k : k + size] for k in range(0, len(chunk), size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# ---- setting up ----------------------------------------------------------------------------


@dataclass
class _Setup:
    task: str
    train: data_mod.Encoded
    held_out: data_mod.Encoded
    labels: list[str] | None
    model_name: str
    model: torch.nn.Module
    describe: dict[str, Any]


def _prepare(config: RunConfig, world: dist_mod.World) -> _Setup:
    """Read and check the data, load model and tokenizer, add the adapter: all before any write."""
    train_set = data_mod.read_dataset(config.data)
    task = config.task or data_mod.infer_task(train_set)
    data_mod.validate(train_set, task)
    if config.eval_data:
        held_set = data_mod.read_dataset(config.eval_data)
        data_mod.validate(held_set, task)
        how = f"from {config.eval_data}"
    else:
        train_set, held_set = data_mod.split(train_set, config.eval_split, SPLIT_SEED)
        how = f"a fixed {config.eval_split:.0%} split"
    labels = None
    if task == "classify":
        labels = [data_mod.label_name(x) for x in config.labels] if config.labels else data_mod.label_set(train_set)
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise TrainingError(f"--labels must name at least 2 different labels, got {labels}")
        origin = "--labels" if config.labels else f"the training data {train_set.source}"
        data_mod.check_labels(train_set, labels, origin)
        data_mod.check_labels(held_set, labels, origin)
    global_batch = config.batch_size * config.grad_accum * world.size
    if len(train_set) < global_batch:
        raise TrainingError(
            f"{train_set.source}: {len(train_set)} training examples, fewer than one global batch "
            f"({config.batch_size} x {config.grad_accum} x {world.size} processes)"
        )
    model_name = config.model or default_model()
    if Path(model_name).is_dir():
        model_name = str(Path(model_name).resolve())  # the adapter names its base wherever it is read
    quiet_transformers()
    tokenizer = load_tokenizer(model_name)
    train_enc = data_mod.encode(train_set, task, tokenizer, config.max_length, labels)
    held_enc = data_mod.encode(held_set, task, tokenizer, config.max_length, labels)
    torch.manual_seed(config.seed)  # the new classifier head's initial weights
    model = load_model(model_name, task, labels)  # float32 weights; --bf16 autocasts the compute
    prepare(model, tokenizer)
    saved = [head_name(model)] if task == "classify" else []
    inject(model, config.lora(saved))
    model.to(world.device)
    describe = {
        "data": f"{train_set.source}: {len(train_set)} training examples, {len(held_set)} held out ({how})",
        "model": f"{model_name if config.model else 'all-MiniLM-L6-v2 (bundled)'} ({type(model).__name__})",
        "saved": saved,
    }
    return _Setup(task, train_enc, held_enc, labels, model_name, model, describe)


def _check_out(out: Path, overwrite: bool, resume: bool) -> None:
    if resume:
        return
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TrainingError(
                f"--out {out} already exists and is not empty; pass --overwrite to replace it, "
                f"or `lorakit train --resume {out}` to continue it"
            )
        if not ((out / RUN_FILE).exists() or (out / "adapter_config.json").exists()):
            raise TrainingError(
                f"--out {out} holds files that are not a lorakit run (no {RUN_FILE}); "
                "refusing to delete them even with --overwrite; choose another --out"
            )


# ---- the run -------------------------------------------------------------------------------


def train(config: RunConfig, *, overwrite: bool = False, resume: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Run training as configured; returns a summary (metrics before/after, adapter path and size)."""
    stream = stream if stream is not None else sys.stdout
    started = time.monotonic()
    config.check()
    world = dist_mod.setup(config.device)
    threads = torch.get_num_threads()
    try:
        return _run(config, world, overwrite, resume, stream, started)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
        dist_mod.teardown(world)


def _threads(config: RunConfig, world: dist_mod.World) -> int:
    if config.threads:
        return config.threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local))  # more threads than cores only makes them wait on each other


def _run(config: RunConfig, world: dist_mod.World, overwrite: bool, resume: bool, stream: TextIO, started: float) -> dict:
    say = (lambda *a: print(*a, file=stream, flush=True)) if world.main else (lambda *a: None)
    out = Path(config.out)
    _check_out(out, overwrite, resume)
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise TrainingError(f"{out}: no checkpoint to resume from (train with --save-every N to write them)")
        saved_world = json.loads((checkpoint / STATE_FILE).read_text()).get("processes", 1)
        if saved_world != world.size:
            raise TrainingError(
                f"{checkpoint} was written by a run of {saved_world} process(es); resume it with the same number "
                f"(now {world.size}), so the global batches and random states line up"
            )
    if world.device.type == "cpu":
        torch.set_num_threads(_threads(config, world))
    s = _prepare(config, world)
    model, task = s.model, s.task
    config.extra = {
        "model_path": s.model_name,
        "task": task,
        "labels": s.labels,
        "train_examples": len(s.train),
        "held_out_examples": len(s.held_out),
        "processes": world.size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if world.main and not resume:
        if out.is_dir() and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_FILE, {"lorakit_run": 1, "config": asdict(config)})
    dist_mod.barrier(world)

    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in trained]
    optimizer = torch.optim.AdamW([p for _, p in trained], lr=config.lr, weight_decay=config.weight_decay)
    global_batch = config.batch_size * config.grad_accum * world.size
    per_epoch = len(s.train) // global_batch
    total = config.max_steps or config.epochs * per_epoch
    metrics: list[dict[str, Any]] = []
    step = 0
    random.seed(config.seed)
    torch.manual_seed(config.seed + world.rank)  # dropout masks differ between processes
    if checkpoint is not None:
        state, rng = load_checkpoint(checkpoint, model, optimizer, names)
        step = state["step"]
        _restore_rng(rng, world)
        metrics = read_metrics(checkpoint / METRICS_FILE)

    _announce(say, s, config, total, per_epoch, global_batch, world)

    def held_out() -> dict[str, float]:
        return evaluate(model, s.held_out, max(config.batch_size, 32), world.device, config.bf16)

    if checkpoint is None:
        before = held_out()
        metrics.append({"step": 0, "epoch": 0.0, "eval": before})
        say(f"before training: held-out {fmt_result(before)}")
    else:
        before = next((m["eval"] for m in metrics if m["step"] == 0 and "eval" in m), {})
        say(f"resuming from {checkpoint} (step {step} of {total})")

    net = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    # Predictions each example adds to the loss: 1 (classify), its completion tokens (causal-lm).
    counts = [1 if task == "classify" else sum(t != data_mod.IGNORE for t in labels[1:]) for labels in s.train.labels]
    adapter_kwargs = {"base_model_name_or_path": s.model_name, "task_type": TASK_TYPES[task],
                      "extra_files": _label_files(s.labels)}
    progress = Progress(total, start=step) if world.main else None
    lengths = [len(ids) for ids in s.train.input_ids]
    batches_of: tuple[int, list[list[int]]] = (-1, [])
    model.train()
    while step < total:
        epoch = step // per_epoch
        if epoch != batches_of[0]:
            batches_of = (epoch, epoch_batches(lengths, config.seed, epoch, global_batch))
        chosen = batches_of[1][step % per_epoch]
        denominator = max(1, sum(counts[i] for i in chosen))
        step_loss = dist_mod.all_sum(world, _backward(net, s, chosen, denominator, config, world))
        if not math.isfinite(step_loss):
            if progress:
                progress.close()
            _stop(out, step, step_loss, config, metrics, world)
        lr = lr_at(step, total, config.lr, config.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics.append({"step": step, "epoch": round(step / per_epoch, 4), "loss": step_loss, "lr": lr})
        if progress:
            progress.update(step, step_loss, lr)
        if step % per_epoch == 0 or step == total:
            result = held_out()
            metrics.append({"step": step, "epoch": round(step / per_epoch, 4), "eval": result})
            if progress:
                progress.clear()
            say(f"epoch {step / per_epoch:.4g}: held-out {fmt_result(result)}")
        if config.save_every and step % config.save_every == 0:
            rng = _rng_states(world)
            if world.main:
                state = {"epoch": step / per_epoch, "total_steps": total, "processes": world.size,
                         "schedule": {"kind": "linear", "peak": config.lr, "warmup": config.warmup}}
                save_checkpoint(out, step, model, optimizer, names, state, rng, adapter_kwargs, metrics)
                write_metrics(out, metrics)
            dist_mod.barrier(world)

    after = next(m["eval"] for m in reversed(metrics) if "eval" in m)
    summary: dict[str, Any] = {"before": before, "after": after, "out": str(out), "steps": step}
    if world.main:
        save_adapter(model, out, **adapter_kwargs)
        write_metrics(out, metrics)
        plot_loss(metrics, out / PLOT_FILE, f"lorakit: {s.describe['model']}, {task}")
        size = (out / "adapter_model.safetensors").stat().st_size
        summary["adapter_bytes"] = size
        key = "accuracy" if task == "classify" else "perplexity"
        was = f" (before: {fmt_one(key, before[key])})" if key in before else ""
        say(f"after training: held-out {fmt_result(after)}{was}")
        extras = ", labels.json" if s.labels else ""
        say(f"adapter: {out}/adapter_model.safetensors ({fmt_size(size)}) + adapter_config.json{extras}")
        say(f"also in {out}: {METRICS_FILE}, {PLOT_FILE}, {RUN_FILE}")
        say(f"done in {duration(time.monotonic() - started)}")
    dist_mod.barrier(world)
    return summary


def _backward(net: torch.nn.Module, s: _Setup, chosen: list[int], denominator: int, config: RunConfig,
              world: dist_mod.World) -> float:
    """Gradients of this process's share of one global batch; returns its part of the step's loss.

    The global batch is cut into grad_accum micro-batches, each into one slice per process.
    """
    chunk = config.batch_size * world.size
    local = 0.0
    for k in range(config.grad_accum):
        micro = chosen[k * chunk : (k + 1) * chunk]
        batch = s.train.batch(micro[world.rank * config.batch_size : (world.rank + 1) * config.batch_size])
        last = k == config.grad_accum - 1
        with contextlib.nullcontext() if last or not world.distributed else net.no_sync():
            logits = forward(net, batch, world.device, config.bf16)
            loss = loss_sum(s.task, logits, batch["labels"].to(world.device)) / denominator
            (loss * world.size).backward()  # DDP averages over processes; undo that to sum
        local += float(loss.detach())
    return local


def _announce(say, s: _Setup, config: RunConfig, total: int, per_epoch: int, global_batch: int,
              world: dist_mod.World) -> None:
    """What is about to be trained, as a person wants to read it."""
    trainable, everything = trainable_parameters(s.model)
    record = adapters(s.model)["default"]
    kinds = sorted({p.rsplit(".", 1)[-1] for p in record.modules})
    say(f"lorakit train: {s.describe['model']}, task {s.task}")
    say(f"data: {s.describe['data']}")
    if s.labels:
        say(f"labels: {', '.join(s.labels)}")
    head = f"; {', '.join(s.describe['saved'])} trained in full" if s.describe["saved"] else ""
    say(f"LoRA: rank {config.rank}, alpha {config.alpha:g}{' (rsLoRA)' if config.rslora else ''} on "
        f"{len(record.modules)} modules ({', '.join(kinds)}){head}")
    say(f"trainable parameters: {trainable:,} of {everything:,} ({100 * trainable / everything:.2f}%)")
    say(f"steps: {total} ({per_epoch} per epoch, global batch {global_batch}"
        f"{f', {world.size} processes' if world.distributed else ''})")


def _stop(out: Path, step: int, loss: float, config: RunConfig, metrics: list, world: dist_mod.World) -> None:
    if world.main:
        write_metrics(out, metrics)
    kept = latest_checkpoint(out)
    where = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint was written (use --save-every N)"
    raise TrainingError(
        f"the training loss is {loss} (not finite) at step {step + 1}; stopped before updating the weights "
        f"with it. No adapter was written; {where}. Try a lower --lr (now {config.lr:g}) or check the data; "
        f"`lorakit train --resume {out}` continues from the checkpoint."
    )


def _rng_states(world: dist_mod.World) -> dict[str, torch.Tensor]:
    states = {f"cpu.rank{r}": t for r, t in enumerate(dist_mod.gather_rng(world, torch.get_rng_state()))}
    if world.device.type == "cuda":
        gathered = dist_mod.gather_rng(world, torch.cuda.get_rng_state(world.device))
        states.update({f"cuda.rank{r}": t for r, t in enumerate(gathered)})
    return states


def _restore_rng(rng: dict[str, torch.Tensor], world: dist_mod.World) -> None:
    torch.set_rng_state(rng[f"cpu.rank{world.rank}"])
    if world.device.type == "cuda" and f"cuda.rank{world.rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.rank{world.rank}"], world.device)


def _label_files(labels: list[str] | None) -> dict[str, Any] | None:
    if not labels:
        return None
    return {LABELS_FILE: {"id2label": {str(i): n for i, n in enumerate(labels)},
                          "label2id": {n: i for i, n in enumerate(labels)}}}
