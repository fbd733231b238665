"""Every use of torch's private API in lorakit, each checked once at import.

The fast kernels (fused.py, dora.py, quantized_fused.py), the path chooser (dispatch.py) and the
convolution wrapper (plain.py) rely on five things torch does not document as API:

- `grad_fn._saved_self`, `_saved_other`, `_saved_approximate`: what GELU and a product of two
  tensors keep for their own backward. A kernel whose input is such an output keeps those
  instead of its input, at no memory cost, and redoes the one elementwise op in backward
  (`recompute_recipe`);
- `torch._C._autograd._top_saved_tensors_default_hooks`: whether saved-tensor hooks (activation
  checkpointing, offloading) are active; under them the recipe is not used, because the tensors
  it keeps would escape the hooks' packing;
- `nn.Module._forward_hooks` / `_forward_pre_hooks`: whether a base layer has hooks, which only
  its own call runs (a kernel computes without calling it);
- `Tensor._version`: the counter every in-place write bumps (DoRA's norm cache is keyed by it);
- `nn.Conv1d._conv_forward` (and Conv2d's): a convolution's output without its bias (DoRA
  rescales that part of a convolution's output).

`check()` exercises each on small tensors and compares with what it must give; `CHECKS` is its
answer at import. Where one fails, what relies on it takes the answer that is always right:
no recipe (the kernel keeps its input itself), hooks assumed present (so dispatch.py runs the
layer's plain `reference_forward`), no cached norm, the bias subtracted from the convolution's
own output. A torch release that changes these makes
lorakit slower, never wrong; tests/test_torch_internals.py names the check that failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# (tensors autograd keeps anyway, the op that gives the input back from them)
Recipe = tuple[tuple[torch.Tensor, ...], Callable[..., torch.Tensor]]


@dataclass(frozen=True)
class Checks:
    """Which private behaviours hold on the torch in use (see the module docstring)."""

    saved_inputs: bool  # GELU / a product keep their inputs where `recompute_recipe` reads them
    saved_tensor_hooks: bool  # the query for active saved-tensor hooks answers truthfully
    module_hooks: bool  # a module's hook dicts list exactly the hooks registered on it
    versions: bool  # every in-place write bumps Tensor._version
    conv_without_bias: bool  # Conv._conv_forward(x, weight, None) is the convolution without its bias

    def failed(self) -> list[str]:
        return [f.name for f in fields(self) if not getattr(self, f.name)]


# ---- what the rest of lorakit calls ------------------------------------------------------------


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward or forward-pre hooks (True when that cannot be known)."""
    if not CHECKS.module_hooks:
        return True
    return bool(module._forward_hooks or module._forward_pre_hooks)


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active here (True when that cannot be known)."""
    return not CHECKS.saved_tensor_hooks or _saved_tensor_hooks_query()


def recompute_recipe(x: torch.Tensor) -> Recipe | None:
    """(tensors autograd keeps anyway, how to get x back from them), or None.

    When x is GELU's output, GELU keeps its input; when x is a product a * b of two tensors
    that both need gradients (SwiGLU's act(gate) * up), the product keeps both factors.
    Holding those instead of x costs no memory, and redoing the one elementwise op gives x
    back bit for bit. Autograd checks the kept tensors' versions on access, so an in-place
    change to them fails loudly rather than silently.
    """
    if not CHECKS.saved_inputs or saved_tensor_hooks_active():
        return None  # unchecked, or packed elsewhere (checkpointing, offloading): keep x plainly
    return _recipe(x)


def version(t: torch.Tensor) -> int | None:
    """`t`'s version counter, or None where there is none to trust (inference tensors)."""
    if not CHECKS.versions:
        return None
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def conv_without_bias(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of `conv` (nn.Conv1d / nn.Conv2d) on `x` without its bias; no hooks run."""
    if CHECKS.conv_without_bias:
        return conv._conv_forward(x, conv.weight, None)
    out = type(conv).forward(conv, x)
    if conv.bias is None:
        return out
    return out - conv.bias.view(-1, *[1] * (out.dim() - 2))


# ---- the private reads, one function each ------------------------------------------------------


def _saved_tensor_hooks_query() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):  # gone or changed: assume the worst
        return True


def _recipe(x: torch.Tensor) -> Recipe | None:
    fn = x.grad_fn
    kind = type(fn).__name__ if fn is not None else ""
    if kind not in ("GeluBackward0", "MulBackward0"):
        return None
    try:
        if kind == "GeluBackward0":
            sources, approximate = (fn._saved_self,), fn._saved_approximate
            redo = lambda s: F.gelu(s, approximate=approximate)  # noqa: E731
        else:
            sources, redo = (fn._saved_self, fn._saved_other), torch.mul
    except (AttributeError, RuntimeError):
        return None
    if any(not isinstance(t, torch.Tensor) or t.dtype != x.dtype for t in sources):
        return None
    if kind == "GeluBackward0" and sources[0].shape != x.shape:
        return None
    return sources, redo


# ---- the check ---------------------------------------------------------------------------------


def _saved_inputs_hold() -> bool:
    """GELU (both forms) and a product: the recipe finds their inputs and gives the output back."""
    # Fixed values, not random ones: importing lorakit must not move the global RNG.
    a = torch.linspace(-3.0, 3.0, 12).reshape(3, 4).requires_grad_()
    b = torch.linspace(0.5, -2.0, 12).reshape(3, 4).requires_grad_()
    cases = [(F.gelu(a, approximate=approx), (a,)) for approx in ("none", "tanh")] + [(a * b, (a, b))]
    for out, inputs in cases:
        recipe = _recipe(out)
        if recipe is None:
            return False
        sources, redo = recipe
        if len(sources) != len(inputs) or not all(torch.equal(s, i) for s, i in zip(sources, inputs)):
            return False
        if not torch.equal(redo(*sources), out):
            return False
    return _recipe(a + b) is None  # an op the recipe does not know


def _saved_tensor_hooks_hold() -> bool:
    """The query says no outside a saved_tensors_hooks block and yes inside one."""
    outside = _saved_tensor_hooks_query()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        inside = _saved_tensor_hooks_query()
    return not outside and inside


def _module_hooks_hold() -> bool:
    """Each kind of hook shows in the dicts while registered, and leaves them when removed."""
    module = nn.Identity()
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    for register in (module.register_forward_hook, module.register_forward_pre_hook):
        handle = register(lambda *args: None)
        seen = bool(module._forward_hooks or module._forward_pre_hooks)
        handle.remove()
        if not seen or module._forward_hooks or module._forward_pre_hooks:
            return False
    return True


def _versions_hold() -> bool:
    """An in-place write, and one through `copy_`, each bump the version counter."""
    t = torch.zeros(3)
    before = t._version
    t.add_(1.0)
    middle = t._version
    t.copy_(torch.ones(3))
    return before < middle < t._version


def _conv_without_bias_holds() -> bool:
    """A 1-D convolution padded with zeros, a 2-D one padded around: the convolution without the bias."""
    for conv_type, shape, mode in ((nn.Conv1d, (2, 3, 9), "zeros"), (nn.Conv2d, (2, 3, 7, 6), "circular")):
        conv = conv_type(3, 4, 3, padding=1, padding_mode=mode, device="meta")  # meta: no init, no RNG
        weight = torch.linspace(-1.0, 1.0, conv.weight.numel()).reshape(conv.weight.shape)
        conv.weight = nn.Parameter(weight)
        conv.bias = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.25]))
        x = torch.linspace(-2.0, 2.0, math.prod(shape)).reshape(shape)
        want = conv(x) - conv.bias.view(-1, *[1] * (len(shape) - 2))
        if not torch.allclose(conv._conv_forward(x, conv.weight, None), want, rtol=1e-5, atol=1e-5):
            return False
    return True


def check() -> Checks:
    """Run every probe now (each failing closed: an exception is a failed check)."""

    def holds(probe: Callable[[], bool]) -> bool:
        try:  # as in a plain program, even if lorakit is first imported under no_grad / inference_mode
            with torch.inference_mode(False), torch.enable_grad():
                return bool(probe())
        except Exception:  # noqa: BLE001 - any surprise from a private API means "do not rely on it"
            return False

    return Checks(
        saved_inputs=holds(_saved_inputs_hold),
        saved_tensor_hooks=holds(_saved_tensor_hooks_hold),
        module_hooks=holds(_module_hooks_hold),
        versions=holds(_versions_hold),
        conv_without_bias=holds(_conv_without_bias_holds),
    )


CHECKS = check()
