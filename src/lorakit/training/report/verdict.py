"""Whether a finished run learned, and what to tell the user when it did not.

A run did not learn when
  - its held-out result after training is no better than before: accuracy for classify (the
    loss decides only when both are 100%), held-out loss for causal-lm; a non-finite held-out
    value counts as no better; or
  - its training loss ends above where it started: the mean of the last tenth of the steps
    against the mean of the first tenth (at least a quarter of a short run, at most 50 steps),
    so that no single noisy step decides; it rose when the end is over 1% and over two standard
    errors of the difference above the start.
A non-finite training loss stops the run at once (loop.py); `advice` gives that message its
cause and next step too.

The warning says what happened, the likely cause and one concrete next step. rsLoRA and LoRA+
take larger steps than plain LoRA at the same --lr, so their advice lowers --lr by that factor
(sqrt(rank) for rsLoRA, sqrt(ratio) for LoRA+, which keeps the geometric mean of A's and B's
rates at the old --lr); bench/quality.py measured that such rates learn on the bundled task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...files.atomic import write_json_atomic
from ...files.json_file import read_json
from ..errors import TrainingError
from ..options import RUN_FILE, RunConfig
from .metrics_log import write_metrics

_ROSE, _FELL = 1.01, 0.9  # smoothed end / start above which the loss rose, below which it fell
_STILL = 1e-3  # a held-out loss that changed by less than this fraction: the weights barely moved


@dataclass(frozen=True)
class Verdict:
    learned: bool
    what: str = ""  # what happened, one sentence
    advice: str = ""  # the likely cause and a next step, one sentence

    @property
    def warning(self) -> str | None:
        return f"{self.what} {self.advice}" if not self.learned else None

    def record(self) -> dict[str, Any]:
        """The machine-readable fields for metrics.jsonl and run_config.json."""
        return {"learned": self.learned, "warning": self.warning}

    def lines(self) -> list[str]:
        """The run's last lines when it did not learn (none when it did)."""
        return [] if self.learned else [f"warning: {self.what}", f"  {self.advice}"]


def write_verdict(out: Path, metrics: list[dict[str, Any]], verdict: Verdict) -> None:
    """Write metrics.jsonl with the verdict as its last line (at the last entry's step) and add
    the verdict's fields to run_config.json."""
    write_metrics(out, [*metrics, {"step": metrics[-1]["step"] if metrics else 0, **verdict.record()}])
    run = read_json(out / RUN_FILE, TrainingError)
    write_json_atomic(out / RUN_FILE, {**run, **verdict.record()})


def smoothed_ends(losses: list[float]) -> tuple[float, float, float] | None:
    """Mean training loss over the first and over the last tenth of the steps (at least a quarter
    of a short run, at most 50 steps), and the noise of their difference (two standard errors);
    None under 2 steps."""
    if len(losses) < 2:
        return None
    window = max(1, min(50, max(len(losses) // 10, min(5, len(losses) // 4))))
    first, last = losses[:window], losses[-window:]
    mean_first, mean_last = sum(first) / window, sum(last) / window
    if window == 1:
        return mean_first, mean_last, 0.0
    spread = sum((x - mean_first) ** 2 for x in first) + sum((x - mean_last) ** 2 for x in last)
    return mean_first, mean_last, 2 * math.sqrt(spread / (window - 1) / window)


def judge(
    task: str, before: dict[str, float], after: dict[str, float], losses: list[float], config: RunConfig
) -> Verdict:
    """The verdict of a run that ran to its end: `before`/`after` are the held-out results,
    `losses` the training loss of every step."""
    key = "accuracy" if task == "classify" else "loss"
    ends = smoothed_ends(losses)
    rose = ends is not None and ends[1] > ends[0] * _ROSE and ends[1] - ends[0] > ends[2]
    worse = key in before and _no_better(key, before, after)
    if not (worse or rose):
        return Verdict(True)
    parts = []
    if worse:
        parts.append(
            f"held-out {key} {_value(key, after.get(key, math.nan))} after training, {_value(key, before[key])} before"
        )
    if ends is not None:
        parts.append(f"training loss {ends[0]:.4g} over the first steps, {ends[1]:.4g} over the last")
    what = f"this run did not learn ({'; '.join(parts)})."
    return Verdict(False, what, advice(config, _trend(before, after, ends)))


def _trend(before: dict[str, float], after: dict[str, float], ends: tuple[float, float, float] | None) -> str:
    was, now = before.get("loss", math.nan), after.get("loss", math.nan)
    if math.isfinite(was) and math.isfinite(now) and abs(now - was) <= _STILL * abs(was):
        return "still"  # the held-out set is the same before and after: no noise hides a change there
    if ends is None:
        return "flat"
    if ends[1] > ends[0] * _ROSE and ends[1] - ends[0] > ends[2]:
        return "rose"
    return "fell" if ends[1] < ends[0] * _FELL and ends[0] - ends[1] > ends[2] else "flat"


def _value(key: str, value: float) -> str:
    return f"{100 * value:.2f}%" if key == "accuracy" else f"{value:.4g}"


def _no_better(key: str, before: dict[str, float], after: dict[str, float]) -> bool:
    was, now = before[key], after.get(key, math.nan)
    if not (math.isfinite(now) and math.isfinite(after.get("loss", 0.0))):
        return True
    if key == "loss":
        return now >= was
    if now == was == 1.0:  # nothing left to gain in accuracy: the loss says whether it learned
        return after["loss"] >= before["loss"]
    return now <= was


def advice(config: RunConfig, trend: str) -> str:
    """The likely cause and a next step, for a run whose training loss `trend`: "rose" (or went
    non-finite), "flat", "fell" (but the held-out result did not improve), or that stood "still"
    (its held-out loss did not change: the weights barely moved)."""
    lr = config.lr
    if trend == "still":
        return (
            f"Likely cause: the weights barely moved (--lr {fmt_lr(lr)} is too small for this run, or it "
            f"is too short). Next: try --lr {fmt_lr(lr * 10)} or more --epochs."
        )
    if trend == "fell":
        return (
            "Likely cause: the model fits the training data but not the held-out set. Next: check that "
            "the held-out data is like the training data, or train on more data / fewer --epochs."
        )
    larger, factor = [], 1.0
    if config.rslora:
        larger.append(
            f"--rslora scales the update by alpha/sqrt(rank) instead of alpha/rank: "
            f"{math.sqrt(config.rank):.3g}x larger steps"
        )
        factor *= math.sqrt(config.rank)
    if config.loraplus_ratio and config.loraplus_ratio > 1:
        ratio = config.loraplus_ratio
        larger.append(f"--loraplus-ratio {ratio:g} steps B at {fmt_lr(ratio * lr)}")
        factor *= math.sqrt(ratio)
    if larger:
        return (
            f"Likely cause: the step is too large at --lr {fmt_lr(lr)} ({'; '.join(larger)}). "
            f"Next: try --lr {fmt_lr(lr / factor)}."
        )
    settled = "" if trend == "rose" else " (the model settled on one answer) or the data carries no signal"
    return f"Likely cause: the step is too large{settled}. Next: try --lr {fmt_lr(lr / 3)}."


def fmt_lr(value: float) -> str:
    """`3.5e-4`, `1e-3`, `0.02`: two significant digits, the form one types after --lr."""
    if value >= 0.01:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
