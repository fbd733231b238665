"""A one-line progress bar for training: steps, loss, learning rate, elapsed time and ETA.

On a terminal it redraws one line; otherwise (a log file, a test) it prints a line about every
tenth of the run, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, width: int = 24) -> None:
        self.total, self.start, self.width = total, start, width
        self.stream = stream if stream is not None else sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.began = time.monotonic()
        self.every = max(1, (total - start) // 10)
        self.drawn = 0  # width of the line on screen now (terminal only)

    def update(self, step: int, loss: float, lr: float) -> None:
        elapsed = time.monotonic() - self.began
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done else 0.0
        filled = int(self.width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        line = (
            f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:.4f}  lr {lr:.2e}  "
            f"{duration(elapsed)} elapsed, ETA {duration(eta)}"
        )
        if self.live:
            self.stream.write("\r" + line.ljust(self.drawn))
            self.drawn = 0 if step == self.total else len(line)
            if step == self.total:
                self.stream.write("\n")
        elif done % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Wipe the redrawn line so other output gets a clean line; the next update redraws it."""
        if self.live and self.drawn:
            self.stream.write("\r" + " " * self.drawn + "\r")
            self.stream.flush()
            self.drawn = 0

    def close(self) -> None:
        """End a redrawn line early (a stopped run), so later output starts on its own line."""
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
