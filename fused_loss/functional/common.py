"""What every loss of the functional API shares: torch's reduction names and legacy arguments,
torch's autocast policy for losses, the input checks, when a forward writes the gradient in its
pass, and torch's broadcast of the pointwise regression losses."""
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction

from ..ops import REDUCTIONS


def reduction_enum(reduction: str) -> int:
    if reduction == "elementwise_mean":  # torch's deprecated alias
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.", stacklevel=3)
        reduction = "mean"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return REDUCTIONS[reduction]


def legacy_reduction(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        return _Reduction.legacy_get_string(size_average, reduce)
    return reduction


def at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


HALF = (torch.float16, torch.bfloat16)


def autocast_on(t: Tensor) -> bool:
    """Whether autocast is on for the tensor's device: torch then computes these losses in float32
    (its fp32 policy: 16-bit floating arguments are cast to float32, float64 ones are not)."""
    return torch.is_autocast_enabled(t.device.type)


def autocast_float32(*tensors):
    """The arguments as torch's autocast hands them to a loss: 16-bit floating tensors as float32
    where autocast is on for the first one's device; as given otherwise."""
    if not autocast_on(tensors[0]):
        return tensors
    return tuple(t.float() if t is not None and t.dtype in HALF else t for t in tensors)


def check_floating_input(input: Tensor, name: str):
    if not input.dtype.is_floating_point:
        raise NotImplementedError(f"fused_loss.{name}: expected a floating point input, got {input.dtype}")


def in_pass_grad(input: Tensor, weight: Optional[Tensor] = None) -> bool:
    """Whether a loss's forward should also write the input's gradient (used when the reduction
    is 'mean' or 'sum'): when it will be needed, and not under torch.compile, where the backward
    recomputes it (no host read of the upstream gradient), nor when `weight` needs a gradient
    (the backward then takes every gradient from the composite formula, ops.py)."""
    return (input.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not (weight is not None and weight.requires_grad))


def broadcast_like_torch(input: Tensor, target: Tensor):
    """torch's pointwise regression losses broadcast mismatched shapes, with a warning."""
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. Please ensure they have the same size.",
            stacklevel=3,
        )
        input, target = torch.broadcast_tensors(input, target)
    return input, target
