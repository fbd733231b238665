"""The training loop behind `lorakit train`: data in, a PEFT-layout adapter folder out.

One optimizer step sees a global batch of batch_size x grad_accum x processes examples, drawn
in a seeded order per epoch that depends only on (seed, epoch), so the position in the data is
the step number. The loss is summed and divided by the number of labelled examples (or tokens)
in the whole global batch: gradient accumulation and DistributedDataParallel give the update one
large batch would. Checkpoints (checkpoints.py) make a killed run continue bit for bit.

The output folder:
  adapter_config.json, adapter_model.safetensors  the adapter (PEFT layout)
  labels.json                                    classify: id2label / label2id
  metrics.jsonl                                  one line per step (loss, lr) and per evaluation
  loss.png                                       the loss curve
  run_config.json                                every option of the run, to repeat or resume it; at the
                                                 end also whether it learned (verdict.py)
  checkpoints/step-NNNNNN/                       with --save-every
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from ..adapting.manage import adapters, trainable_parameters
from ..files.adapter_file import save_adapter
from ..files.atomic import write_json_atomic
from ..files.peft_format import CONFIG_FILE, WEIGHTS_FILE
from ..layers.experts import expert_parameters
from ..tools.loraplus import param_groups
from . import distributed as dist_mod
from .checkpoints import Snapshot, choose_checkpoint, latest_checkpoint, resumable_checkpoints, save_checkpoint
from .data.batches import epoch_batches
from .errors import TrainingError
from .labels import LABELS_FILE, labels_json
from .new_tokens import write_tokenizer
from .options import RUN_FILE, RunConfig
from .prepare import Setup, prepare
from .report.metrics_log import METRICS_FILE, evaluations, fmt_one, fmt_result, fmt_size, write_metrics
from .report.plot import PLOT_FILE, plot_loss
from .report.progress import Progress, duration
from .report.verdict import Verdict, advice, judge, write_verdict
from .run_folder import RUN, check_out, clear_previous_run
from .run_lock import RunLock, check_unlocked
from .tasks import TASK_TYPES, evaluate, forward, label_count, loss_sum


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warmup over the first `warmup` of the steps, then linear decay to zero."""
    warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    return peak * max(0.0, (total - step) / max(1, total - warm))


def train(
    config: RunConfig, *, overwrite: bool = False, resume: bool = False, stream: TextIO | None = None
) -> dict[str, Any]:
    """Run training as configured; returns a summary (metrics before/after, adapter path and size,
    `learned` and `warning` as verdict.py judged the run)."""
    stream = stream if stream is not None else sys.stdout
    started = time.monotonic()
    config.check()
    world = dist_mod.setup(config.device)
    threads = torch.get_num_threads()
    run = None
    try:
        run = _Run(config, world, stream)
        run.start(overwrite, resume)
        run.loop()
        return run.finish(started)
    finally:
        if run is not None:
            run.close()
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
        dist_mod.teardown(world)


def _threads(config: RunConfig, world: dist_mod.World) -> int:
    if config.threads:
        return config.threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local))  # more threads than cores only makes them wait on each other


class _Run:
    """One run's state between its steps: the setup, optimizer, step, metrics and where it writes."""

    def __init__(self, config: RunConfig, world: dist_mod.World, stream: TextIO) -> None:
        self.config, self.world = config, world
        self.out = Path(config.out)
        self._stream = stream
        self.setup: Setup
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        self.before: dict[str, float] = {}
        self.lock = RunLock(self.out)  # rank 0 holds it from the first write to the end of the run
        self.claimed = False  # whether this run has begun to change its folder (a refused one has not)

    def say(self, *parts: Any) -> None:
        if self.world.main:
            print(*parts, file=self._stream, flush=True)

    # -- before the first step ---------------------------------------------------------------
    def start(self, overwrite: bool, resume: bool) -> None:
        """Check everything (options, folder, data, model); then lock the folder and write
        run_config.json, or restore a checkpoint; build the optimizer."""
        config, world, out = self.config, self.world, self.out
        inputs = [("--data", config.data), ("--eval-data", config.eval_data), ("--model", config.model)]
        if resume:
            RUN.check_destination(out, "--resume")
            check_unlocked(out)
            RUN.check_inputs(out, inputs)
            resumable_checkpoints(out)  # before the model is loaded
        else:
            check_out(out, overwrite, inputs)
        if world.device.type == "cpu":
            torch.set_num_threads(_threads(config, world))
        self.setup = setup = prepare(config, world)
        config.extra = {
            "model_path": setup.model_name,
            "task": setup.task,
            "labels": setup.labels,
            "train_examples": setup.describe["train_examples"],  # len(setup.train) counts rows with --packing
            "held_out_examples": setup.describe["held_out_examples"],
            "max_length": setup.describe.get("max_length", config.max_length),
            "processes": world.size,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        groups = param_groups(setup.model, config.lr, config.loraplus_ratio, config.weight_decay)
        name_of = {id(p): n for n, p in setup.model.named_parameters() if p.requires_grad}
        self.names = [name_of[id(p)] for g in groups for p in g["params"]]  # the optimizer's order
        self.optimizer = torch.optim.AdamW(groups)
        self.global_batch = config.batch_size * config.grad_accum * world.size
        self.per_epoch = len(setup.train) // self.global_batch
        self.total = config.max_steps or config.epochs * self.per_epoch
        self._claim(overwrite, resume)
        notices = list(setup.describe.get("notices", []))
        random.seed(config.seed)
        torch.manual_seed(config.seed + world.rank)  # dropout masks differ between processes
        checkpoint = None
        if resume:
            restored, damaged = choose_checkpoint(
                out, setup.model, self.optimizer, self.names, world.size, world.device
            )
            restored.apply(setup.model, self.optimizer)
            self.claimed = True
            checkpoint, self.step, self.metrics = restored.folder, restored.state["step"], restored.metrics
            _restore_rng(restored.rng, world)
            notices += damaged

        self._announce(notices)
        if checkpoint is None:
            self.before = self._held_out()
            self.metrics.append({"step": 0, "epoch": 0.0, "eval": self.before})
            self.say(f"before training: held-out {fmt_result(self.before)}")
        else:
            self.before = next((m["eval"] for m in evaluations(self.metrics) if m["step"] == 0), {})
            self.say(f"resuming from {checkpoint} (step {self.step} of {self.total})")

    def _claim(self, overwrite: bool, resume: bool) -> None:
        """Rank 0 locks the folder, checks it again (no other run can change it now), removes
        the previous run's files (--overwrite) and writes run_config.json. Every rank learns
        whether that worked."""
        error: BaseException | None = None
        if self.world.main:
            try:
                self.lock.acquire()
                if not resume:
                    RUN.check_contents(self.out, overwrite)
                    self._write_start()
            except BaseException as err:
                error = err
        if dist_mod.all_sum(self.world, float(error is not None)):
            if error is not None:
                raise error
            raise TrainingError("the run's folder could not be claimed; see process 0's error")

    def _write_start(self) -> None:
        try:
            self.claimed = True
            clear_previous_run(self.out)
            write_json_atomic(self.out / RUN_FILE, self.config.to_json())
        except OSError as err:
            raise TrainingError(f"--out {self.out}: cannot write there ({err})") from None

    def close(self) -> None:
        """Let go of the folder; a run that never wrote there leaves no trace of itself."""
        self.lock.release(abandon=not self.claimed)

    def _announce(self, notices: list[str]) -> None:
        """What is about to be trained, as a person wants to read it."""
        s, config = self.setup, self.config
        trainable, everything = trainable_parameters(s.model)
        record = adapters(s.model)["default"]
        expert = set(expert_parameters(s.model))  # fused MoE expert weights, adapted as parameters
        kinds = sorted({p.rsplit(".", 1)[-1] for p in record.modules if p not in expert})
        experts = sorted({p.rsplit(".", 1)[-1] for p in record.modules if p in expert})
        on_experts = (
            f" and {sum(p in expert for p in record.modules)} expert parameters ({', '.join(experts)})"
            if experts
            else ""
        )
        self.say(f"lorakit train: {s.describe['model']}, task {s.task}")
        self.say(f"data: {s.describe['data']}")
        if s.labels:
            self.say(f"labels: {', '.join(s.labels)}")
        head = f"; {', '.join(s.describe['saved'])} trained in full" if s.describe["saved"] else ""
        variant = "".join(
            [
                " (rsLoRA)" if config.rslora else "",
                ", DoRA" if config.dora else "",
                f", {config.init} init" if config.init != "default" else "",
                f", LoRA+ ratio {config.loraplus_ratio:g}" if config.loraplus_ratio else "",
            ]
        )
        self.say(
            f"LoRA: rank {config.rank}, alpha {config.alpha:g}{variant} on "
            f"{len(record.modules) - len(expert & set(record.modules))} modules ({', '.join(kinds)}){on_experts}{head}"
        )
        self.say(f"trainable parameters: {trainable:,} of {everything:,} ({100 * trainable / everything:.2f}%)")
        processes = f", {self.world.size} processes" if self.world.distributed else ""
        self.say(f"steps: {self.total} ({self.per_epoch} per epoch, global batch {self.global_batch}{processes})")
        for notice in notices:
            self.say(f"notice: {notice}")

    def _held_out(self) -> dict[str, float]:
        batch = max(self.config.batch_size, 32)
        return evaluate(self.setup.model, self.setup.held_out, batch, self.world.device, self.config.bf16)

    # -- the steps ---------------------------------------------------------------------------
    def loop(self) -> None:
        config, world, s = self.config, self.world, self.setup
        net = s.model
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [world.device.index] if world.device.type == "cuda" else None
            net = DistributedDataParallel(s.model, device_ids=ids)
        progress = Progress(self.total, start=self.step) if world.main else None
        lengths = [len(ids) for ids in s.train.input_ids]
        batches_of: tuple[int, list[list[int]]] = (-1, [])
        s.model.train()
        while self.step < self.total:
            epoch = self.step // self.per_epoch
            if epoch != batches_of[0]:
                batches_of = (epoch, epoch_batches(lengths, config.seed, epoch, self.global_batch))
            chosen = batches_of[1][self.step % self.per_epoch]
            denominator = max(1, label_count(s.task, s.train.batch(chosen)["labels"]))
            step_loss = dist_mod.all_sum(world, self._backward(net, chosen, denominator))
            if not math.isfinite(step_loss):
                if progress:
                    progress.close()
                self._stop(step_loss)
            lr = lr_at(self.step, self.total, config.lr, config.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # LoRA+: B's group runs at a multiple
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            epoch_now = round(self.step / self.per_epoch, 4)
            self.metrics.append({"step": self.step, "epoch": epoch_now, "loss": step_loss, "lr": lr})
            if progress:
                progress.update(self.step, step_loss, lr)
            if self.step % self.per_epoch == 0 or self.step == self.total:
                result = self._held_out()
                self.metrics.append({"step": self.step, "epoch": epoch_now, "eval": result})
                if progress:
                    progress.clear()
                self.say(f"epoch {self.step / self.per_epoch:.4g}: held-out {fmt_result(result)}")
            if config.save_every and self.step % config.save_every == 0:
                self._save_checkpoint()

    def _backward(self, net: torch.nn.Module, chosen: list[int], denominator: int) -> float:
        """Gradients of this process's share of one global batch; returns its part of the step's loss.

        The global batch is cut into grad_accum micro-batches, each into one slice per process.
        """
        config, world, s = self.config, self.world, self.setup
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

    def _adapter_files(self) -> dict[str, Any]:
        """save_adapter's keywords for this run's adapter folder (and each checkpoint's)."""
        s = self.setup
        extra = {LABELS_FILE: labels_json(s.labels)} if s.labels else None
        return {"base_model_name_or_path": s.model_name, "task_type": TASK_TYPES[s.task], "extra_files": extra}

    def _save_checkpoint(self) -> None:
        rng = _rng_states(self.world)
        if self.world.main:
            state = {
                "epoch": self.step / self.per_epoch,
                "total_steps": self.total,
                "processes": self.world.size,
                "schedule": {"kind": "linear", "peak": self.config.lr, "warmup": self.config.warmup},
            }
            snap = Snapshot(
                self.step, self.setup.model, self.optimizer, self.names, state, rng, self._adapter_files(), self.metrics
            )
            save_checkpoint(self.out, snap)
            write_metrics(self.out, self.metrics)
        dist_mod.barrier(self.world)

    def _stop(self, loss: float) -> None:
        kept = latest_checkpoint(self.out)
        where = (
            f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint was written (use --save-every N)"
        )
        what = (
            f"the training loss is {loss} (not finite) at step {self.step + 1}; stopped before updating "
            "the weights with it."
        )
        verdict = Verdict(False, what, advice(self.config, "rose"))
        if self.world.main:
            self.metrics.append({"step": self.step + 1, "loss": loss})
            write_verdict(self.out, self.metrics, verdict)
        raise TrainingError(
            f"{what} No adapter was written; {where}. {verdict.advice} Or check the data; "
            f"`lorakit train --resume {self.out}` continues from the checkpoint."
        )

    # -- after the last step -----------------------------------------------------------------
    def finish(self, started: float) -> dict[str, Any]:
        """Write the adapter folder, the metrics and the plot; say what was done."""
        out, s = self.out, self.setup
        after = evaluations(self.metrics)[-1]["eval"]
        losses = [m["loss"] for m in self.metrics if "loss" in m]
        verdict = judge(s.task, self.before, after, losses, self.config)
        summary: dict[str, Any] = {
            "before": self.before,
            "after": after,
            "out": str(out),
            "steps": self.step,
            **verdict.record(),
        }
        if self.world.main:
            save_adapter(s.model, out, **self._adapter_files(), expert_layout=self.config.expert_layout)
            if self.config.add_tokens:  # the adapter's new token ids mean nothing without it
                write_tokenizer(s.tokenizer, out)
            write_verdict(out, self.metrics, verdict)
            plot_loss(self.metrics, out / PLOT_FILE, f"lorakit: {s.describe['model']}, {s.task}")
            size = (out / WEIGHTS_FILE).stat().st_size
            summary["adapter_bytes"] = size
            key = "accuracy" if s.task == "classify" else "perplexity"
            was = f" (before: {fmt_one(key, self.before[key])})" if key in self.before else ""
            self.say(f"after training: held-out {fmt_result(after)}{was}")
            extras = f", {LABELS_FILE}" if s.labels else ""
            extras += ", the tokenizer" if self.config.add_tokens else ""
            self.say(f"adapter: {out}/{WEIGHTS_FILE} ({fmt_size(size)}) + {CONFIG_FILE}{extras}")
            self.say(f"also in {out}: {METRICS_FILE}, {PLOT_FILE}, {RUN_FILE}")
            self.say(f"done in {duration(time.monotonic() - started)}")
            for line in verdict.lines():  # last, where the eye lands
                self.say(line)
        dist_mod.barrier(self.world)
        return summary


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
