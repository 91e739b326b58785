"""The pointwise losses (a value per element, then the reduction): BCE-with-logits, smooth L1,
Huber and sigmoid focal loss, each one fused pass over input and target."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import composite, reference
from ..ops import REDUCTIONS, ops, require_kernel
from .common import (autocast_float32, broadcast_like_torch, check_floating_input, in_pass_grad, legacy_reduction,
                     reduction_enum)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[Tensor] = None,
) -> Tensor:
    """Drop-in for torch.nn.functional.binary_cross_entropy_with_logits: one fused pass.
    weight broadcasts to the input's shape; pos_weight along the last (class) dimension, as in
    torch. Soft targets in [0, 1]; gradients w.r.t. input and target."""
    require_kernel("fused_loss::binary_cross_entropy_with_logits_forward", input.device,
                   "binary_cross_entropy_with_logits")
    if composite.needs_composite(input, target, weight, pos_weight):
        return reference.binary_cross_entropy_with_logits(input, target, weight, size_average, reduce, reduction,
                                                          pos_weight)
    red = reduction_enum(legacy_reduction(size_average, reduce, reduction))
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    check_floating_input(input, "binary_cross_entropy_with_logits")
    input, target, weight, pos_weight = autocast_float32(input, target, weight, pos_weight)
    if not target.dtype.is_floating_point:
        raise RuntimeError(f"result type {input.dtype} can't be cast to the desired output type {target.dtype}")
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is not None and w.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("fused_loss.binary_cross_entropy_with_logits: the loss is not differentiable with "
                               f"respect to argument '{name}' (as in torch); detach it")
    # torch returns the target's dtype; we compute in the promoted one (weights included, as
    # torch's intermediates are), then round once.
    dtype = torch.promote_types(input.dtype, target.dtype)
    for w in (weight, pos_weight):
        if w is not None:
            dtype = torch.promote_types(dtype, w.dtype)
    weight = None if weight is None else weight.to(dtype)
    pos_weight = None if pos_weight is None else pos_weight.to(dtype)
    input = input.to(dtype)
    loss = ops.binary_cross_entropy_with_logits_forward(input, target.to(dtype), weight, pos_weight, red,
                                                        in_pass_grad(input))[0]
    return loss.to(target.dtype)


def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    beta: float = 1.0,
) -> Tensor:
    """Drop-in for torch.nn.functional.smooth_l1_loss (beta = 0 is L1, NaN-free)."""
    require_kernel("fused_loss::smooth_l1_loss_forward", input.device, "smooth_l1_loss")
    if composite.needs_composite(input, target):
        return reference.smooth_l1_loss(input, target, size_average, reduce, reduction, beta)
    red = reduction_enum(legacy_reduction(size_average, reduce, reduction))
    input, target = autocast_float32(input, target)
    dtype = torch.promote_types(input.dtype, target.dtype)  # computed and returned in it, as in torch
    if not dtype.is_floating_point:
        input, target = broadcast_like_torch(input, target)
        if beta == 0:  # torch's beta = 0 is l1_loss, which takes integers
            return F.l1_loss(input, target, reduction=("none", "mean", "sum")[red])
        raise NotImplementedError(f"fused_loss.smooth_l1_loss: expected a floating point input or target, got {dtype}")
    # Promoted before broadcasting: a broadcast argument's gradient is then summed in that dtype.
    input, target = broadcast_like_torch(input.to(dtype), target.to(dtype))
    if beta < 0:
        raise RuntimeError("smooth_l1_loss does not support negative values for beta.")
    return ops.smooth_l1_loss_forward(input, target, red, float(beta), in_pass_grad(input))[0]


def huber_loss(input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0,
               weight: Optional[Tensor] = None) -> Tensor:
    """Drop-in for torch.nn.functional.huber_loss; weight (the input's shape) multiplies each
    element's loss before the reduction, as in torch."""
    require_kernel("fused_loss::huber_loss_forward", input.device, "huber_loss")
    if composite.needs_composite(input, target, weight):
        return reference.huber_loss(input, target, reduction, delta, weight=weight)
    red = reduction_enum(reduction)
    if weight is not None and weight.size() != input.size():  # before broadcasting, as torch
        raise ValueError("Weights and input must have the same size.")
    input, target, weight = autocast_float32(input, target, weight)
    # torch computes in the promoted dtype and returns the input's (promoted with the weight's,
    # which multiplies the result).
    dtype, out_dtype = torch.promote_types(input.dtype, target.dtype), input.dtype
    if weight is not None and weight.dtype.is_floating_point:
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
        dtype = torch.promote_types(dtype, weight.dtype)
    if not input.dtype.is_floating_point:
        raise RuntimeError(f"result type {dtype} can't be cast to the desired output type {input.dtype}")
    input, target = broadcast_like_torch(input.to(dtype), target.to(dtype))  # promoted first, as smooth L1
    if delta <= 0:
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    if weight is not None:
        weight = weight.to(dtype)
    loss = ops.huber_loss_forward(input, target, weight, red, float(delta), in_pass_grad(input, weight))[0]
    return loss.to(out_dtype)


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """torchvision.ops.sigmoid_focal_loss in one fused pass: alpha_t * BCE * (1 - p_t)^gamma,
    no alpha weighting when alpha < 0."""
    require_kernel("fused_loss::sigmoid_focal_loss_forward", inputs.device, "sigmoid_focal_loss")
    if composite.needs_composite(inputs, targets):
        return reference.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)
    if reduction not in REDUCTIONS:
        raise ValueError(f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: "
                         "'none', 'mean', 'sum'")
    if targets.size() != inputs.size():
        raise ValueError(f"Target size ({targets.size()}) must be the same as input size ({inputs.size()})")
    check_floating_input(inputs, "sigmoid_focal_loss")
    if not targets.dtype.is_floating_point:  # torchvision's formula fails there too (inside BCE)
        raise RuntimeError(f"fused_loss.sigmoid_focal_loss: expected floating point targets, got {targets.dtype}")
    inputs, targets = autocast_float32(inputs, targets)  # float32 under autocast, as torchvision's result
    dtype = torch.promote_types(inputs.dtype, targets.dtype)
    inputs = inputs.to(dtype)
    return ops.sigmoid_focal_loss_forward(inputs, targets.to(dtype), REDUCTIONS[reduction], float(alpha), float(gamma),
                                          in_pass_grad(inputs))[0]
