"""cross_entropy: torch's arguments and LLM options, the fused kernel's (N, C) and K-dim paths,
and the options composed around the kernel where it does not fuse them."""
from typing import Optional

import torch
from torch import Tensor

from .. import composite, reference
from ..cross_entropy_options import check_options, composed_stats, shaped, stats_from_kernel, unbatch
from ..ops import REDUCTIONS, ops, require_kernel
from .common import (HALF, at_least_float32, autocast_float32, autocast_on, in_pass_grad, legacy_reduction,
                     reduction_enum)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    return_stats: bool = False,
):
    """Drop-in for torch.nn.functional.cross_entropy, computed by one fused kernel.

    input: (C,), (N, C) or (N, C, d1, ..., dk) logits. target: class indices of shape
    (), (N) or (N, d1, ..., dk), or class probabilities of the input's shape.
    size_average and reduce are torch's deprecated arguments, kept so that positional
    calls mean the same thing.

    LLM options (keyword-only, off by default):
      softcap: logits become softcap * tanh(x / softcap) (Gemma 2);
      temperature: then divided by it;
      z_loss: adds z_loss * lse(z)^2 per token (PaLM), z the logits after softcap and
        temperature, weighted like the token's cross-entropy term (its class weight; 0 when
        ignored; 1 for probability targets) and reduced with it ('mean': same denominator);
      return_stats: return (loss, CrossEntropyStats): the z-loss part of the loss and, per
        token, the log-sum-exp, the entropy and whether the target's logit is the max, with
        the accuracy, all from the same pass over the logits.
    """
    softcap, temperature, z_loss = check_options(softcap, temperature, z_loss)
    require_kernel("fused_loss::cross_entropy_forward", input.device, "cross_entropy")
    if composite.needs_composite(input, target, weight):
        loss = reference.cross_entropy_with_options(input, target, weight, ignore_index,
                                                    legacy_reduction(size_average, reduce, reduction),
                                                    label_smoothing, softcap, temperature, z_loss) \
            if shaped(softcap, temperature) or z_loss else \
            reference.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                    label_smoothing)
        if not return_stats:
            return loss
        red = reduction_enum(legacy_reduction(size_average, reduce, reduction))
        z = reference.shaped_logits(input, softcap, temperature)
        if input.dim() == 1:
            return loss, unbatch(composed_stats(input.unsqueeze(0), z.unsqueeze(0), target.unsqueeze(0), weight,
                                                ignore_index, red, z_loss, loss.dtype), red)
        return loss, composed_stats(input, z, target, weight, ignore_index, red, z_loss, loss.dtype)
    red = reduction_enum(legacy_reduction(size_average, reduce, reduction))
    if input.dim() == 0:
        raise ValueError("cross_entropy: expected input of shape (C,), (N, C) or (N, C, d1, ..., dk), got a 0-dim tensor")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    probabilities = input.shape == target.shape  # torch's rule for soft targets
    unbatched = input.dim() == 1
    if unbatched:  # one row; torch also takes a class target of shape (1,) for it
        if not probabilities and target.dim() == 1:
            if target.shape[0] != 1:
                raise RuntimeError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
            target = target.squeeze(0)
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    options = (softcap, temperature, z_loss, return_stats)
    loss, stats = _cross_entropy_batched(input, target, weight, red, ignore_index, label_smoothing, probabilities,
                                         options)
    if unbatched:
        loss = loss.squeeze(0) if red == 0 else loss
        stats = unbatch(stats, red) if return_stats else None
    return (loss, stats) if return_stats else loss


def _cross_entropy_batched(input, target, weight, red, ignore_index, label_smoothing, probabilities, options):
    """(loss, stats or None) of batched input: (N, C) or (N, C, d...)."""
    softcap, temperature, z_loss, return_stats = options
    if not probabilities:
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("fused_loss.cross_entropy: the loss is not differentiable with respect to argument "
                               "'weight' for class-index targets (as in torch); detach the weight")
        # torch gathers the weights of the targets for a smoothed, weighted mean (when not all
        # are ignored); that gather takes int64 targets and 1-D weights only.
        # (A function: it reads the targets, which only these rare cases need.)
        def gathers():
            return (weight is not None and label_smoothing > 0 and red == REDUCTIONS["mean"]
                    and bool((target != ignore_index).any()))

        if target.dtype == torch.uint8 and (input.dim() > 2 or gathers()):  # nll_loss2d takes int64 only too
            raise RuntimeError("fused_loss.cross_entropy: expected scalar type Long but found Byte (as torch, uint8 "
                               "targets are taken for (N, C) input, and with weights and label smoothing only "
                               "without reduction='mean')")
        if weight is not None and input.dim() > 2 and weight.dim() != 1 and weight.numel() == input.shape[1] \
                and not gathers():
            weight = weight.reshape(-1)  # torch's K-dim path takes any weight of C elements
        fused = input.dim() == 2  # the row kernel takes every option; other layouts compose them
        # Under autocast torch returns a float32 loss of the 16-bit logits cast to float32: the
        # kernel computes in float32 anyway and returns its loss unrounded (acc_loss), without a
        # float32 copy of the logits. (A weight of another dtype: both cast, as torch.)
        acc_loss = input.dtype in HALF and autocast_on(input)
        if acc_loss and weight is not None and weight.dtype != input.dtype:
            input, weight = autocast_float32(input, weight)
            acc_loss = False
        loss_dtype = torch.float32 if acc_loss else input.dtype
        z, w = input, weight
        if not fused and shaped(softcap, temperature):
            # Shaped in float32 at least, as the kernel shapes 16-bit logits, and rounded once: the loss.
            z, w = at_least_float32(input), None if weight is None else at_least_float32(weight)
            z = reference.shaped_logits(z, softcap, temperature)
        # The gradient is written in the forward's pass when it will be needed (see README);
        # under torch.compile the backward recomputes it (no host read of the upstream gradient).
        loss, st, _ = ops.cross_entropy_forward(z, target, w, red, ignore_index, float(label_smoothing),
                                                in_pass_grad(z), softcap if fused else None,
                                                temperature if fused else 1.0, z_loss, return_stats and fused,
                                                acc_loss)
        loss = loss.to(loss_dtype)
        if not return_stats:
            return loss, None
        if fused:
            return loss, stats_from_kernel(st, target, weight, ignore_index, red, loss.dtype)
        return loss, composed_stats(input, z, target, weight, ignore_index, red, z_loss, loss.dtype)
    if not target.dtype.is_floating_point:
        raise RuntimeError(f"Expected floating point type for target with class probabilities, got {target.dtype}")
    if ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    input, target, weight = autocast_float32(input, target, weight)
    dtype = torch.promote_types(input.dtype, target.dtype)  # torch promotes soft targets, and the weight
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
    input, target = input.to(dtype), target.to(dtype)
    if weight is not None:
        weight = weight.to(dtype)
    # Probability targets: the options composed around the fused kernel (see cross_entropy_options),
    # in float32 at least for 16-bit inputs, as the kernel computes; the loss rounded once.
    z, t, w = input, target, weight
    if shaped(softcap, temperature) or z_loss:
        z, t = at_least_float32(input), at_least_float32(target)
        w = None if weight is None else at_least_float32(weight)
        z = reference.shaped_logits(z, softcap, temperature)
    loss = ops.cross_entropy_prob_forward(z, t, w, red, float(label_smoothing), in_pass_grad(z, w))[0]
    if z_loss:
        terms, denominator = reference.z_loss_terms(z, t, w, ignore_index, z_loss)
        loss = loss + reference.reduce_terms(terms, composite.REDUCTION_NAMES[red], denominator)
    loss = loss.to(dtype)
    if not return_stats:
        return loss, None
    return loss, composed_stats(input, z, t, w, ignore_index, red, z_loss, loss.dtype)
