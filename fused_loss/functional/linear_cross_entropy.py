"""linear_cross_entropy: torch's F.linear_cross_entropy arguments and cross-entropy's LLM options,
the head's product and loss chunked (chunked_linear_cross_entropy.py) so the logits never exist."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import chunked_linear_cross_entropy as lce
from .. import composite, reference
from ..cross_entropy_options import CrossEntropyStats, check_options, stats_from_kernel
from .common import reduction_enum
from .cross_entropy import cross_entropy


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
