"""Helpers over adapters that are not part of a layer: arithmetic (`combine`, `arithmetic.py`)
and optimizer parameter groups (LoRA+, `loraplus.py`)."""
