"""torch.nn.functional-style API: same names, arguments, defaults and results as torch."""
from typing import Optional

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction

from .ops import REDUCTIONS, ops


def reduction_enum(reduction: str) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return REDUCTIONS[reduction]


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Drop-in for torch.nn.functional.cross_entropy, computed by one fused kernel.

    input: (C,), (N, C) or (N, C, d1, ..., dk) logits. target: class indices of shape
    (), (N) or (N, d1, ..., dk), or class probabilities of the input's shape.
    size_average and reduce are torch's deprecated arguments, kept so that positional
    calls mean the same thing.
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    red = reduction_enum(reduction)
    if input.dim() == 0:
        raise ValueError("cross_entropy: expected input of shape (C,), (N, C) or (N, C, d1, ..., dk), got a 0-dim tensor")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    probabilities = input.shape == target.shape  # torch's rule for soft targets
    if input.dim() == 1:  # unbatched: one row
        input, target = input.unsqueeze(0), target.unsqueeze(0)
        loss = _cross_entropy_batched(input, target, weight, red, ignore_index, label_smoothing, probabilities)
        return loss.squeeze(0) if red == 0 else loss
    return _cross_entropy_batched(input, target, weight, red, ignore_index, label_smoothing, probabilities)


def _cross_entropy_batched(input, target, weight, red, ignore_index, label_smoothing, probabilities):
    if not probabilities:
        return ops.cross_entropy_forward(input, target, weight, red, ignore_index, float(label_smoothing))[0]
    if not target.dtype.is_floating_point:
        raise RuntimeError(f"Expected floating point type for target with class probabilities, got {target.dtype}")
    if ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    dtype = torch.promote_types(input.dtype, target.dtype)  # torch promotes soft targets
    input, target = input.to(dtype), target.to(dtype)
    if weight is not None:
        weight = weight.to(dtype)
    return ops.cross_entropy_prob_forward(input, target, weight, red, float(label_smoothing))[0]
