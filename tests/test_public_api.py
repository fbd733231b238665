"""The public namespace: small, and the core free of Transformers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lorakit


def test_core_imports_neither_transformers_nor_the_cli():
    code = (
        "import sys, lorakit; "
        "print(sorted(m for m in ('transformers', 'tokenizers', 'matplotlib', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_is_exported():
    for name in (
        "LoraConfig",
        "inject",
        "trainable_parameters",
        "save_adapter",
        "load_adapter",
        "add_adapter",
        "set_adapter",
        "delete_adapter",
        "disabled",
        "merge",
        "unmerge",
        "unload",
    ):
        assert name in lorakit.__all__ and callable(getattr(lorakit, name))


def test_api_page_documents_every_public_name_once():
    readme = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    table = readme.split("## The public API", 1)[1].split("\n\n", 3)[2]
    documented = []
    for row in table.splitlines()[2:]:
        first = row.split("|")[1]
        documented += re.findall(r"`(\w+)[(`]", first)
    assert sorted(documented) == sorted(set(documented))  # once each
    assert set(documented) == set(lorakit.__all__)


def test_the_training_wing_is_imported_only_when_asked():
    code = (
        "import sys, lorakit; before = 'transformers' in sys.modules; cb = lorakit.SaveAdapterCallback; "
        "print(before, 'transformers' in sys.modules, cb.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "SaveAdapterCallback"]


def test_importing_the_command_line_loads_nothing_heavy():
    """The `lorakit` command handles Ctrl-C before torch imports (cli/main.py): importing the
    package and its cli package must not import torch."""
    code = (
        "import sys, lorakit, lorakit.cli; "
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves_and_a_submodule_never_hides_one():
    import lorakit.quant.convert  # a submodule is set on its package by the import system

    assert callable(lorakit.quantize) and lorakit.quantize.__module__ == "lorakit.quant.convert"
    for name in lorakit.__all__:
        assert getattr(lorakit, name).__name__ == name
    assert set(lorakit.__all__) <= set(dir(lorakit))
