"""patch() / unpatch(): run code its user cannot edit on fused_loss's kernels.

`patch()` replaces functions of `torch.nn.functional` by wrappers that call fused_loss when it
supports the call and torch's original otherwise. torch's loss modules (`torch.nn.CrossEntropyLoss`
and the others) call `torch.nn.functional.<name>` at each forward, so they, and instances built
before the patch, go through the wrappers too; their classes are left alone, so `isinstance` and
state dicts are untouched. Code that bound a function before the patch
(`from torch.nn.functional import cross_entropy`) keeps torch's.

A wrapper never fails where torch would not: tensor subclasses (DTensor, ...), functorch transforms
and devices without fused_loss kernels go straight to torch, and if the fused call raises, torch's
original is called with the same arguments: torch's error is what the caller sees, and if torch
succeeds instead, its result is returned with a warning (a case fused_loss does not support).
"""
import functools
import inspect
import warnings
from typing import Dict, Optional

import torch
import torch.nn.functional as torch_F
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import functional as fused_F
from . import ops

# name in torch.nn.functional -> (fused function, the registered op whose kernels decide the devices)
_TARGETS = {
    "cross_entropy": (fused_F.cross_entropy, "fused_loss::cross_entropy_forward"),
    "binary_cross_entropy_with_logits": (fused_F.binary_cross_entropy_with_logits,
                                         "fused_loss::binary_cross_entropy_with_logits_forward"),
    "smooth_l1_loss": (fused_F.smooth_l1_loss, "fused_loss::smooth_l1_loss_forward"),
    "huber_loss": (fused_F.huber_loss, "fused_loss::huber_loss_forward"),
    "linear_cross_entropy": (fused_F.linear_cross_entropy, "fused_loss::cross_entropy_forward_grad_in_place"),
}
PATCHABLE = tuple(name for name in _TARGETS if hasattr(torch_F, name))  # linear_cross_entropy: torch >= 2.13

_ORIGINAL_ATTR = "__fused_loss_original__"




# Tensors fused_loss computes on: plain ones, and torch.compile's stand-ins for them while it traces
# (torch.compile may keep the wrapper as one node of its graph and trace it later with these).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter, FakeTensor, FunctionalTensor)


def _fused_can_run(op: str, args, kwargs) -> bool:
    """Cheap checks, no data read: plain tensors (a subclass such as DTensor has its own dispatch),
    no functorch transform, and a device fused_loss has kernels for."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors:
        return False
    for t in tensors:
        if type(t) not in _PLAIN_TENSORS:
            return False
        if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    return (op, tensors[0].device.type) in ops.KERNELS


def _make_wrapper(name: str, original, fused, op: str):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if not _fused_can_run(op, args, kwargs):
            return original(*args, **kwargs)
        if torch.compiler.is_compiling():
            return fused(*args, **kwargs)  # traced once; an error here is an error at compile time
        try:
            return fused(*args, **kwargs)
        except Exception as fused_error:  # noqa: BLE001  (torch decides: its error, or its result)
            result = original(*args, **kwargs)
            warnings.warn(f"fused_loss.patch: torch.nn.functional.{name} fell back to torch, which accepted a call "
                          f"fused_loss does not support ({type(fused_error).__name__}: {fused_error})", stacklevel=2)
            return result

    # Our own module name, not torch's: torch.compile treats some functions of torch.nn.functional as
    # graph nodes, and must trace into this wrapper instead.
    # Nor __wrapped__, which it follows to torch's function.
    wrapper.__module__ = __name__
    del wrapper.__wrapped__
    wrapper.__signature__ = inspect.signature(original)  # for help() and IDEs
    setattr(wrapper, _ORIGINAL_ATTR, original)
    return wrapper


def _is_ours(fn) -> bool:
    return hasattr(fn, _ORIGINAL_ATTR)


class Patch:
    """What one `patch()` call replaced. Usable as a context manager: leaving the block restores
    exactly what this call replaced (an enclosing patch stays in place)."""

    def __init__(self, replaced: Dict[str, object]):
        self.replaced = replaced  # name -> torch's original

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def restore(self) -> None:
        for name, original in self.replaced.items():
            if _is_ours(getattr(torch_F, name)):
                setattr(torch_F, name, original)
        self.replaced = {}

    def __repr__(self):
        return f"fused_loss.Patch({sorted(self.replaced)})"


def patch(*, cross_entropy: bool = True, binary_cross_entropy_with_logits: bool = True,
          smooth_l1_loss: bool = True, huber_loss: bool = True, linear_cross_entropy: bool = True) -> Patch:
    """Route `torch.nn.functional.<loss>` (and so torch's loss modules) through fused_loss.

    Each flag chooses one function; `linear_cross_entropy` applies where torch has it (2.13+).
    Takes effect at once; returns a `Patch` that also works as a context manager:

        fused_loss.patch()                 # for the rest of the program (undo: fused_loss.unpatch())
        with fused_loss.patch():           # for one block
            train(model)

    Patching what is already patched does nothing (and the inner context leaves it patched)."""
    chosen = dict(cross_entropy=cross_entropy, binary_cross_entropy_with_logits=binary_cross_entropy_with_logits,
                  smooth_l1_loss=smooth_l1_loss, huber_loss=huber_loss, linear_cross_entropy=linear_cross_entropy)
    replaced = {}
    for name in PATCHABLE:
        current = getattr(torch_F, name)
        if not chosen[name] or _is_ours(current):
            continue
        fused, op = _TARGETS[name]
        setattr(torch_F, name, _make_wrapper(name, current, fused, op))
        replaced[name] = current
    return Patch(replaced)


def unpatch() -> None:
    """Restore torch's original functions (the same objects), whatever patched them."""
    for name in PATCHABLE:
        current = getattr(torch_F, name)
        while _is_ours(current):  # unwrap fully, should wrappers ever have been stacked
            current = getattr(current, _ORIGINAL_ATTR)
        setattr(torch_F, name, current)


def is_patched(name: Optional[str] = None) -> bool:
    """Whether `torch.nn.functional.<name>` (any of them, when name is None) is fused_loss's wrapper."""
    if name is not None:
        if name not in _TARGETS:
            raise ValueError(f"fused_loss.is_patched: unknown loss {name!r}; patchable: {list(PATCHABLE)}")
        return hasattr(torch_F, name) and _is_ours(getattr(torch_F, name))
    return any(_is_ours(getattr(torch_F, n)) for n in PATCHABLE)
