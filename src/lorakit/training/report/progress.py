"""The training progress line: steps, loss, learning rate, elapsed time and ETA, drawn by tqdm.

On a terminal tqdm redraws one line; otherwise (a log file, a test) a line is printed about
every tenth of the run, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

_WIDTH = 24  # characters of the bar itself


def duration(seconds: float) -> str:
    """`42s`, `3m07s`, `1h05m`"""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _Bar(tqdm):
    """tqdm with one more field for the line's format: `stats` (loss, lr, times)."""

    stats = ""

    @property
    def format_dict(self) -> dict[str, Any]:
        return dict(super().format_dict, stats=self.stats)


class Progress:
    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None) -> None:
        self.total, self.start = total, start
        self.stream = stream if stream is not None else sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.format = f"step {{n:>{len(str(total))}}}/{{total}} [{{bar:{_WIDTH}}}] {{stats}}"
        self.began = time.monotonic()
        self.every = max(1, (total - start) // 10)
        self.bar: _Bar | None = None
        if self.live:  # ascii "-#": '-' for the empty part, '#' for the done part
            self.bar = _Bar(
                total=total,
                initial=start,
                file=self.stream,
                bar_format=self.format,
                ascii="-#",
                mininterval=0,
                miniters=1,
                delay=1e-9,
                dynamic_ncols=False,
            )

    def update(self, step: int, loss: float, lr: float) -> None:
        elapsed = time.monotonic() - self.began
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done else 0.0
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {duration(elapsed)} elapsed, ETA {duration(eta)}"
        if self.bar is not None:
            self.bar.stats = stats
            self.bar.update(step - self.bar.n)
            if step == self.total:
                self.close()
        elif done % self.every == 0 or step == self.total:
            line = tqdm.format_meter(step, self.total, elapsed, bar_format=self.format, ascii="-#", stats=stats)
            self.stream.write(line + "\n")
            self.stream.flush()

    def clear(self) -> None:
        """Wipe the redrawn line so other output gets a clean line; the next update redraws it."""
        if self.bar is not None:
            self.bar.clear()

    def close(self) -> None:
        """End a redrawn line (the run finished or stopped), so later output starts on its own line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
