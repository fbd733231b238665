"""training/report/progress.py: the progress line on a terminal and in a log."""

from __future__ import annotations

import io


def test_progress_bar_redraws_on_a_terminal_and_prints_tenths_otherwise():
    from lorakit.training.report.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = Progress(4, stream=screen)
    for step in range(1, 5):
        bar.update(step, 1.0 / step, 1e-3)
        if step == 2:
            bar.clear()
            screen.write("epoch 1: ...\n")
    text = screen.getvalue()
    assert text.count("\n") == 2 and text.endswith("ETA 0s\n")  # one line redrawn, the epoch line kept apart
    assert "\repoch 1: ...\n\rstep 3/4" in text
    log = io.StringIO()
    bar = Progress(100, stream=log)
    for step in range(1, 101):
        bar.update(step, 0.5, 1e-3)
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("step 100/100 [" + "#" * 24 + "] loss 0.5000")
