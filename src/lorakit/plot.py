"""The loss-curve PNG written next to the adapter: training loss per step (and a moving
average), held-out loss at each evaluation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic


def plot_loss(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib.figure import Figure

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "eval" not in m]
    evals = [(m["step"], m["eval"]["loss"]) for m in metrics if "eval" in m]
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="training loss (per step)")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, color="#25a", linewidth=1.6, label=f"training loss (mean of {window})")
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
