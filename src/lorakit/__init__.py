"""lorakit: LoRA fine-tuning for PyTorch models, with adapter files in PEFT's layout.

The core (this namespace) needs only torch and safetensors and works on any nn.Module.
"""

from .adapter_file import (
    AdapterFileError,
    adapter_state_dict,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from .arithmetic import CombineReport, combine
from .config import LoraConfig
from .layer_base import LoraLayer
from .layers import LoraConv, LoraEmbedding, LoraLinear
from .loftq import loftq_pairs
from .loraplus import param_groups
from .mixed import MixedBatch, mixed_batch
from .model import (
    active_adapters,
    adapters,
    add_adapter,
    add_adapter_from_tensors,
    delete_adapter,
    disabled,
    inject,
    merge,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from .quantize import dequantize, quantize
from .quantized_layer import LoraQuantLinear

__version__ = "0.1.0"

# Names of the wings, imported on first use so that `import lorakit` needs only torch and
# safetensors (and never loads a wing).
_WINGS = {
    "SaveAdapterCallback": "lorakit.training.trainer_callback",
    "AdapterStore": "lorakit.serving.store",
}


def __getattr__(name: str):
    if name in _WINGS:
        import importlib

        return getattr(importlib.import_module(_WINGS[name]), name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


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
