"""torch.nn.functional-style API: same names, arguments, defaults and results as torch."""
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction as _Reduction

from . import composite, reference
from . import chunked_linear_cross_entropy as lce
from .cross_entropy_options import (CrossEntropyStats, check_options, composed_stats, shaped, stats_from_kernel,
                                    unbatch)
from .ops import REDUCTIONS, ops, require_kernel


def reduction_enum(reduction: str) -> int:
    if reduction == "elementwise_mean":  # torch's deprecated alias
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.", stacklevel=3)
        reduction = "mean"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return REDUCTIONS[reduction]


def _legacy_reduction(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        return _Reduction.legacy_get_string(size_average, reduce)
    return reduction


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
                                                    _legacy_reduction(size_average, reduce, reduction),
                                                    label_smoothing, softcap, temperature, z_loss) \
            if shaped(softcap, temperature) or z_loss else \
            reference.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                    label_smoothing)
        if not return_stats:
            return loss
        red = reduction_enum(_legacy_reduction(size_average, reduce, reduction))
        z = reference.shaped_logits(input, softcap, temperature)
        if input.dim() == 1:
            return loss, unbatch(composed_stats(input.unsqueeze(0), z.unsqueeze(0), target.unsqueeze(0), weight,
                                                ignore_index, red, z_loss, loss.dtype), red)
        return loss, composed_stats(input, z, target, weight, ignore_index, red, z_loss, loss.dtype)
    red = reduction_enum(_legacy_reduction(size_average, reduce, reduction))
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
        acc_loss = input.dtype in _HALF and _autocast_on(input)
        if acc_loss and weight is not None and weight.dtype != input.dtype:
            input, weight = _autocast_float32(input, weight)
            acc_loss = False
        loss_dtype = torch.float32 if acc_loss else input.dtype
        z, w = input, weight
        if not fused and shaped(softcap, temperature):
            # Shaped in float32 at least, as the kernel shapes 16-bit logits, and rounded once: the loss.
            z, w = _at_least_float32(input), None if weight is None else _at_least_float32(weight)
            z = reference.shaped_logits(z, softcap, temperature)
        # The gradient is written in the forward's pass when it will be needed (see README);
        # under torch.compile the backward recomputes it (no host read of the upstream gradient).
        loss, st, _ = ops.cross_entropy_forward(z, target, w, red, ignore_index, float(label_smoothing),
                                                _in_pass_grad(z), softcap if fused else None,
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
    input, target, weight = _autocast_float32(input, target, weight)
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
        z, t = _at_least_float32(input), _at_least_float32(target)
        w = None if weight is None else _at_least_float32(weight)
        z = reference.shaped_logits(z, softcap, temperature)
    loss = ops.cross_entropy_prob_forward(z, t, w, red, float(label_smoothing), _in_pass_grad(z, w))[0]
    if z_loss:
        terms, denominator = reference.z_loss_terms(z, t, w, ignore_index, z_loss)
        loss = loss + reference.reduce_terms(terms, composite.REDUCTION_NAMES[red], denominator)
    loss = loss.to(dtype)
    if not return_stats:
        return loss, None
    return loss, composed_stats(input, z, t, w, ignore_index, red, z_loss, loss.dtype)


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


_HALF = (torch.float16, torch.bfloat16)


def _autocast_on(t: Tensor) -> bool:
    """Whether autocast is on for the tensor's device: torch then computes these losses in float32
    (its fp32 policy: 16-bit floating arguments are cast to float32, float64 ones are not)."""
    return torch.is_autocast_enabled(t.device.type)


def _autocast_float32(*tensors):
    """The arguments as torch's autocast hands them to a loss: 16-bit floating tensors as float32
    where autocast is on for the first one's device; as given otherwise."""
    if not _autocast_on(tensors[0]):
        return tensors
    return tuple(t.float() if t is not None and t.dtype in _HALF else t for t in tensors)


def _check_floating_input(input: Tensor, name: str):
    if not input.dtype.is_floating_point:
        raise NotImplementedError(f"fused_loss.{name}: expected a floating point input, got {input.dtype}")


def _in_pass_grad(input: Tensor, weight: Optional[Tensor] = None) -> bool:
    """Whether a loss's forward should also write the input's gradient (used when the reduction
    is 'mean' or 'sum'): when it will be needed, and not under torch.compile, where the backward
    recomputes it (no host read of the upstream gradient), nor when `weight` needs a gradient
    (the backward then takes every gradient from the composite formula, ops.py)."""
    return (input.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not (weight is not None and weight.requires_grad))


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
    red = reduction_enum(_legacy_reduction(size_average, reduce, reduction))
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    _check_floating_input(input, "binary_cross_entropy_with_logits")
    input, target, weight, pos_weight = _autocast_float32(input, target, weight, pos_weight)
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
                                                        _in_pass_grad(input))[0]
    return loss.to(target.dtype)


def _broadcast_like_torch(input: Tensor, target: Tensor):
    """torch's pointwise regression losses broadcast mismatched shapes, with a warning."""
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. Please ensure they have the same size.",
            stacklevel=3,
        )
        input, target = torch.broadcast_tensors(input, target)
    return input, target


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
    red = reduction_enum(_legacy_reduction(size_average, reduce, reduction))
    input, target = _autocast_float32(input, target)
    dtype = torch.promote_types(input.dtype, target.dtype)  # computed and returned in it, as in torch
    if not dtype.is_floating_point:
        input, target = _broadcast_like_torch(input, target)
        if beta == 0:  # torch's beta = 0 is l1_loss, which takes integers
            return F.l1_loss(input, target, reduction=("none", "mean", "sum")[red])
        raise NotImplementedError(f"fused_loss.smooth_l1_loss: expected a floating point input or target, got {dtype}")
    # Promoted before broadcasting: a broadcast argument's gradient is then summed in that dtype.
    input, target = _broadcast_like_torch(input.to(dtype), target.to(dtype))
    if beta < 0:
        raise RuntimeError("smooth_l1_loss does not support negative values for beta.")
    return ops.smooth_l1_loss_forward(input, target, red, float(beta), _in_pass_grad(input))[0]


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
    input, target, weight = _autocast_float32(input, target, weight)
    # torch computes in the promoted dtype and returns the input's (promoted with the weight's,
    # which multiplies the result).
    dtype, out_dtype = torch.promote_types(input.dtype, target.dtype), input.dtype
    if weight is not None and weight.dtype.is_floating_point:
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
        dtype = torch.promote_types(dtype, weight.dtype)
    if not input.dtype.is_floating_point:
        raise RuntimeError(f"result type {dtype} can't be cast to the desired output type {input.dtype}")
    input, target = _broadcast_like_torch(input.to(dtype), target.to(dtype))  # promoted first, as smooth L1
    if delta <= 0:
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    if weight is not None:
        weight = weight.to(dtype)
    loss = ops.huber_loss_forward(input, target, weight, red, float(delta), _in_pass_grad(input, weight))[0]
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
    _check_floating_input(inputs, "sigmoid_focal_loss")
    if not targets.dtype.is_floating_point:  # torchvision's formula fails there too (inside BCE)
        raise RuntimeError(f"fused_loss.sigmoid_focal_loss: expected floating point targets, got {targets.dtype}")
    inputs, targets = _autocast_float32(inputs, targets)  # float32 under autocast, as torchvision's result
    dtype = torch.promote_types(inputs.dtype, targets.dtype)
    inputs = inputs.to(dtype)
    return ops.sigmoid_focal_loss_forward(inputs, targets.to(dtype), REDUCTIONS[reduction], float(alpha), float(gamma),
                                          _in_pass_grad(inputs))[0]


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
    return_stats: bool = False,
    _loss_dtype: Optional[torch.dtype] = None,
):
    """Drop-in for torch.nn.functional.linear_cross_entropy (torch >= 2.13): the loss of
    cross_entropy(linear(input, linear_weight, linear_bias), target), computed in chunks of rows
    that never hold more than one chunk of logits, with the gradients of input, linear_weight
    and linear_bias computed during the forward (see fused_loss/chunked_linear_cross_entropy.py).

    input: (in_features,), (N, in_features) or, beyond torch, (..., in_features) with any
    leading dimensions (target then has the leading shape). ignore_index=None means -100 for
    class-index targets, as in torch (and must stay None for probability targets).
    options: torch's LinearCrossEntropyOptions or None; always chunked here, so only its
    batch_chunk_size is used (as chunk_size, when chunk_size is not given).

    Beyond torch (keyword-only): softcap, temperature, z_loss and return_stats as in
    fused_loss.cross_entropy; chunk_size: rows per chunk (default: from N, V and a memory budget).

    Fused: class-index targets with (V, in_features) weights. Computed unfused (F.linear, then
    fused_loss.cross_entropy; the logits are materialised): probability targets,
    K-dimensional weights (V, d1, ..., dk, in_features), and torch.func transforms or
    forward-mode AD. Under autocast, as torch: the products in the autocast dtype, the loss in
    float32.
    """
    softcap, temperature, z_loss = check_options(softcap, temperature, z_loss, "linear_cross_entropy")
    if input.dim() < 1 or (input.dim() > 2 and linear_weight.dim() > 2):  # torch takes 1 or 2 dims; we take more for 2-D weights
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    batch, in_features = tuple(input.shape[:-1]), input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError("expected equal input and linear_weight last dimensions (in_features), "
                           f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    num_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and not batch:
        raise RuntimeError(f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
                           f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}")
    logits_shape = (*batch, num_classes, *out_features)
    probabilities = tuple(target.shape) == logits_shape
    if probabilities and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else ignore_index
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"fused_loss.linear_cross_entropy: chunk_size must be a positive int or None, got {chunk_size!r}")
    red = reduction_enum(reduction)
    if label_smoothing > 1.0:  # as torch: a negative or NaN smoothing is none
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    loss_dtype = None  # the input's
    if torch.is_autocast_enabled(input.device.type):
        # As torch under autocast: the product in the autocast dtype (F.linear casts its float32
        # operands), the cross-entropy and so the loss in float32.
        low = torch.get_autocast_dtype(input.device.type)
        input, linear_weight, linear_bias = (
            t.to(low) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (input, linear_weight, linear_bias))
        loss_dtype = torch.float32 if input.dtype != torch.float64 else None
        with torch.autocast(input.device.type, enabled=False):
            out = linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                       reduction=reduction, ignore_index=ignore_index,
                                       label_smoothing=label_smoothing, options=options, softcap=softcap,
                                       temperature=temperature, z_loss=z_loss, chunk_size=chunk_size,
                                       return_stats=return_stats, _loss_dtype=loss_dtype)
        return out
    if input.dtype != linear_weight.dtype:
        raise RuntimeError("expected m1 and m2 to have the same dtype, but got: "
                           f"{_c_type(input.dtype)} != {_c_type(linear_weight.dtype)}")
    if not input.dtype.is_floating_point:
        raise NotImplementedError(f"fused_loss.linear_cross_entropy: expected a floating point input, got {input.dtype}")
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
              softcap=softcap, temperature=temperature, z_loss=z_loss, return_stats=return_stats)
    if out_features or probabilities or composite.needs_composite(input, linear_weight, linear_bias, weight):
        return _linear_cross_entropy_unfused(input, linear_weight, linear_bias, target, batch, num_classes, out_features,
                                             probabilities, kw)
    if tuple(target.shape) != batch:
        if not (input.dim() == 1 and tuple(target.shape) == (1,)):  # torch takes (1,) for one row, as ()
            _raise_target_shape_error(input, target, logits_shape)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("fused_loss.linear_cross_entropy: the loss is not differentiable with respect to argument "
                           "'weight' for class-index targets (as in torch); detach the weight")
    x, t = input.reshape(math.prod(batch), in_features), target.reshape(-1)  # not -1: in_features may be 0
    n = x.shape[0]
    if chunk_size is None:
        chunk_size = lce.default_chunk_size(n, in_features, num_classes, input.dtype, input.device)
    grad_on = torch.is_grad_enabled()
    flags = (input.requires_grad and grad_on, linear_weight.requires_grad and grad_on,
             linear_bias is not None and linear_bias.requires_grad and grad_on)
    loss, st, *_ = lce.linear_cross_entropy_forward(x, linear_weight, t, linear_bias, weight, red, ignore_index,
                                                    float(label_smoothing), softcap, temperature, z_loss,
                                                    int(chunk_size), *flags, return_stats)
    loss = loss.to(_loss_dtype or input.dtype)  # the op's loss is in the accumulation dtype
    if red == 0:
        loss = loss.reshape(target.shape if input.dim() > 1 else ())
    if not return_stats:
        return loss
    stats = stats_from_kernel(st, t, weight, ignore_index, red, loss.dtype)
    rows = batch if input.dim() > 1 else ()
    stats = CrossEntropyStats(stats.z_loss.reshape(rows) if red == 0 else stats.z_loss,
                              stats.lse.reshape(rows), stats.entropy.reshape(rows), stats.correct.reshape(rows),
                              stats.accuracy)
    return loss, stats


def _c_type(dtype: torch.dtype) -> str:
    """The C++ name torch's messages give a dtype (float, double, c10::BFloat16, c10::Half)."""
    return {torch.float32: "float", torch.float64: "double", torch.bfloat16: "c10::BFloat16",
            torch.float16: "c10::Half"}.get(dtype, str(dtype).replace("torch.", ""))


def _raise_target_shape_error(input, target, logits_shape):
    """torch's error for a class-index target that does not fit the logits: asked of torch's
    own cross_entropy on meta tensors (shapes only, no data), else ours."""
    if input.dim() <= 2:
        try:
            reference.torch_cross_entropy(torch.empty(logits_shape, device="meta", dtype=input.dtype), target.to("meta"))
        except (RuntimeError, ValueError, IndexError) as e:
            raise type(e)(str(e)) from None
        except AssertionError as e:  # a meta decomposition's assert, where torch's kernel raises RuntimeError
            raise RuntimeError(str(e)) from None
    raise ValueError(f"fused_loss.linear_cross_entropy: expected a class-index target of shape {tuple(input.shape[:-1])} "
                     f"(input's leading dimensions) or class probabilities of shape {tuple(logits_shape)}, "
                     f"got {tuple(target.shape)}")


def _linear_cross_entropy_unfused(input, linear_weight, linear_bias, target, batch, num_classes, out_features,
                                  probabilities, kw):
    """F.linear, then fused_loss.cross_entropy on the materialised logits: probability targets,
    K-dimensional weights, and torch.func transforms."""
    flat_classes = math.prod(out_features) * num_classes
    logits = F.linear(input, linear_weight.reshape(flat_classes, input.shape[-1]),
                      None if linear_bias is None else linear_bias.reshape(flat_classes))
    if out_features:  # (N, C, d1, ..., dk), as torch
        return cross_entropy(logits.reshape(*batch, num_classes, *out_features), target, **kw)
    if input.dim() <= 2:
        return cross_entropy(logits, target, **kw)
    # (..., V) with more leading dimensions: rows of (N, V), the 'none' loss and the per-token
    # statistics reshaped back.
    rows_target = target.reshape(-1, num_classes) if probabilities else target.reshape(-1)
    out = cross_entropy(logits.reshape(-1, num_classes), rows_target, **kw)
    loss, stats = out if kw["return_stats"] else (out, None)
    if kw["reduction"] == "none":
        loss = loss.reshape(batch)
    if stats is None:
        return loss
    def back(s):
        return s.reshape(batch)
    stats = CrossEntropyStats(back(stats.z_loss) if kw["reduction"] == "none" else stats.z_loss, back(stats.lse),
                              back(stats.entropy), back(stats.correct), stats.accuracy)
    return loss, stats
