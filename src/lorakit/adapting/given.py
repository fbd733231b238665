"""Tensors given for a new adapter (loading a file, `add_adapter_from_tensors`), checked against
the model before anything changes: shapes, ranks, dtypes, finite values. `TensorError` says which
module and which role (A, B, DoRA's m), so a file's loader can name the key."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LorakitError
from ..layers import experts
from ..layers.base import LoraLayer
from ..targets import adaptable_kind


class TensorError(LorakitError, ValueError):
    """A given A, B or DoRA magnitude ("m") that does not fit its module; `module` and `role` say which."""

    user_fixable = False  # the caller's tensors, given in Python; the CLI's come from files (AdapterFileError)

    def __init__(self, message: str, module: str, role: str) -> None:
        super().__init__(message)
        self.module, self.role = module, role


def given_pair(
    layer: LoraLayer, path: str, rank: int, pair: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A given (A, B), checked against the layer and the rank, where the layer keeps its adapters."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
        raise ValueError(f"module {path!r}: expected a pair of tensors (A, B)")
    a, b = pair
    axis = 1 if isinstance(layer, experts.LoraExpertParam) else 0  # experts: A is (E, r, in)
    given = a.shape[axis] if a.dim() > axis else 0
    if given != rank:
        raise TensorError(
            f"module {path!r}: A has rank {given}, but the config gives rank {rank} for {path!r}", path, "A"
        )
    for role, tensor, shape in zip(("A", "B"), (a, b), layer.pair_shapes(rank)):
        try:
            check_shape(f"module {path!r}: {role}", tensor, shape)
            check_values(f"module {path!r}: {role}", tensor)
        except ValueError as err:
            raise TensorError(str(err), path, role) from None
    device, dtype = layer.adapter_placement()
    return a.to(device, dtype), b.to(device, dtype)


def given_magnitude(layer: LoraLayer, path: str, magnitude: torch.Tensor | None) -> torch.Tensor:
    """A given DoRA magnitude vector, checked against the layer, on the base weight's device and dtype."""
    if not isinstance(magnitude, torch.Tensor):
        raise ValueError(f"module {path!r}: no DoRA magnitude given (the config has use_dora)")
    try:
        check_shape(f"module {path!r}: the DoRA magnitude", magnitude, layer.magnitude_shape())
        check_values(f"module {path!r}: the DoRA magnitude", magnitude)
    except ValueError as err:
        raise TensorError(str(err), path, "m") from None
    weight = layer.base_layer.weight
    return magnitude.to(weight.device, weight.dtype)


def load_copy(clone: nn.Module, state: dict[str, torch.Tensor] | None, path: str) -> None:
    """Fill a modules_to_save copy from `state`, which must match it key for key and shape for shape."""
    if state is None:
        raise ValueError(f"saved: no weights given for {path!r} (modules_to_save)")
    expected = clone.state_dict()
    for k, v in expected.items():
        if k not in state:
            raise ValueError(f"missing key {path}.{k!r} (modules_to_save)")
        check_shape(f"'{path}.{k}'", state[k], v.shape)
        check_values(f"'{path}.{k}'", state[k], like=v)
    for k in state:
        if k not in expected:
            raise ValueError(f"unexpected key {path}.{k!r} (modules_to_save {path!r})")
    clone.load_state_dict(state)


def check_shape(what: str, tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{what} has shape {tuple(tensor.shape)}, but this model needs {tuple(shape)} "
            "(was the adapter trained on another base model?)"
        )


def check_values(what: str, tensor: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Refuse integer or boolean values where the model holds floats (`like`: the tensor they
    replace; default a float one), and NaN or infinite values anywhere."""
    if (like is None or like.is_floating_point()) and not tensor.is_floating_point():
        raise ValueError(f"{what} has dtype {tensor.dtype}, but this model needs floating-point values")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{what} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}")


def get_adapted(model: nn.Module, path: str) -> nn.Module | None:
    """The module at `path`, which must exist and be able to carry an adapter (None for an
    expert parameter, which can)."""
    if experts.host_and_layer(model, path) is not None:
        return None
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the adapter names module {path!r}, which this model does not have") from None
    if adaptable_kind(module) is None:
        raise ValueError(f"module {path!r} ({type(module).__name__}) cannot carry a LoRA adapter")
    return module
