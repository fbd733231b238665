"""The loss-curve PNG written next to the adapter: training loss per step (and a moving
average), held-out loss at each evaluation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from ...files.atomic import write_bytes_atomic
from .metrics_log import evaluations

PLOT_FILE = "loss.png"


def trailing_mean(values: list[float] | tuple[float, ...], window: int) -> np.ndarray:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    sums = np.cumsum(np.asarray(values, dtype=float))
    sums[window:] = sums[window:] - sums[:-window]
    return sums / np.minimum(np.arange(1, len(sums) + 1), window)


def plot_loss(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib.figure import Figure

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "eval" not in m]
    evals = [(m["step"], m["eval"]["loss"]) for m in evaluations(metrics)]
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="training loss (per step)")
        window = max(1, len(losses) // 20)
        if window > 1:
            ax.plot(
                steps,
                trailing_mean(losses, window),
                color="#25a",
                linewidth=1.6,
                label=f"training loss (mean of {window})",
            )
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="#d62", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
