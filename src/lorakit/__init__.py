"""lorakit: LoRA fine-tuning for PyTorch models, with adapter files in PEFT's layout.

The core (this namespace) needs only torch and safetensors and works on any nn.Module.

Every public name is imported on first use (PEP 562's module `__getattr__`): `import lorakit`
itself loads nothing heavy, so the `lorakit` command starts, and can handle Ctrl-C, before
torch is imported (cli/main.py). `lorakit.quantize` stays the function even after the module of
the same name is imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# Each public name and the module that defines it. The wings' names (SaveAdapterCallback,
# AdapterStore) are here too: importing the core never loads a wing.
_WHERE = {
    **dict.fromkeys(
        ["AdapterFileError", "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter"],
        "lorakit.files.adapter_file",
    ),
    **dict.fromkeys(["CombineReport", "combine"], "lorakit.tools.arithmetic"),
    "LoraConfig": "lorakit.config",
    "LorakitError": "lorakit.errors",
    "LoraLayer": "lorakit.layers.base",
    **dict.fromkeys(["LoraConv", "LoraEmbedding", "LoraLinear"], "lorakit.layers.plain"),
    "loftq_pairs": "lorakit.quant.loftq",
    "param_groups": "lorakit.tools.loraplus",
    **dict.fromkeys(["MixedBatch", "mixed_batch"], "lorakit.adapting.mixed"),
    **dict.fromkeys(
        [
            "active_adapters",
            "adapters",
            "add_adapter",
            "add_adapter_from_tensors",
            "delete_adapter",
            "disabled",
            "inject",
            "merge",
            "set_adapter",
            "trainable_parameters",
            "unload",
            "unmerge",
        ],
        "lorakit.adapting.manage",
    ),
    **dict.fromkeys(["dequantize", "quantize"], "lorakit.quant.convert"),
    "LoraQuantLinear": "lorakit.layers.quantized",
    "SaveAdapterCallback": "lorakit.training.trainer_callback",
    "AdapterStore": "lorakit.serving.store",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


class _Namespace(types.ModuleType):
    """The package's module type: importing a submodule whose name is also a public name
    (`lorakit.quantize`) does not hide that name (the import system sets the submodule as an
    attribute of its package)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}" and name in _WHERE:
            return  # the submodule stays in sys.modules; the attribute is the public name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Namespace

__all__ = [
    "AdapterFileError",
    "AdapterStore",
    "CombineReport",
    "LoraConfig",
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraQuantLinear",
    "LorakitError",
    "MixedBatch",
    "SaveAdapterCallback",
    "active_adapters",
    "adapter_state_dict",
    "adapters",
    "add_adapter",
    "add_adapter_from_tensors",
    "combine",
    "delete_adapter",
    "dequantize",
    "disabled",
    "inject",
    "load_adapter",
    "loftq_pairs",
    "merge",
    "mixed_batch",
    "param_groups",
    "quantize",
    "read_adapter_config",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
