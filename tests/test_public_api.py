"""The public namespace: small, and the core free of Transformers."""

from __future__ import annotations

import subprocess
import sys

import lorakit


def test_core_imports_neither_transformers_nor_the_cli():
    code = "import sys, lorakit; print(sorted(m for m in ('transformers', 'tokenizers', 'matplotlib', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_is_exported():
    for name in ("LoraConfig", "inject", "trainable_parameters", "save_adapter", "load_adapter", "add_adapter",
                 "set_adapter", "delete_adapter", "disabled", "merge", "unmerge", "unload"):
        assert name in lorakit.__all__ and callable(getattr(lorakit, name))
