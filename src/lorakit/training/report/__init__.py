"""What a run reports: `metrics.jsonl` (`metrics_log.py`), the loss curve (`plot.py`), the
progress line (`progress.py`), and whether the run learned (`verdict.py`)."""
