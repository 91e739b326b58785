"""Fake kernels and autograd for the torch.ops.fused_loss operators.

The schemas live in csrc/fused_loss.cpp and the kernels in csrc/<backend>/. Each
backward is itself a registered op, so torch.compile traces it like any other.

Higher-order derivatives. Every backward op is differentiable too: its own backward (a
second derivative, needed by double backward, gradient penalties and gradgradcheck) is
the vector-Jacobian product of the first derivative of the loss written in torch ops
(fused_loss/composite.py), so it is exact to any order. First derivatives stay fused.
"""
import math
import os

import torch
from torch.library import register_autograd, register_fake

from . import composite

ops = torch.ops.fused_loss

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction's numbering

# The CUDA kernels are compiled and linked in CI but have not yet run on a GPU (issue 10): until a
# GPU run has verified them, they are used only when FUSED_LOSS_CUDA_UNVERIFIED=1 (read at import),
# so that an unverified kernel can never give a silent wrong answer. Remove the gate once verified.
CUDA_VERIFIED = False
USE_CUDA_KERNELS = CUDA_VERIFIED or os.environ.get("FUSED_LOSS_CUDA_UNVERIFIED", "0") == "1"

# (op, device type) pairs that have a kernel to use, asked of the dispatcher once, at import (every
# kernel is registered by then), so that torch.compile traces a set lookup.
KERNELS = frozenset(
    (op, device) for op in torch._C._dispatch_get_all_op_names() if op.startswith("fused_loss::")
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"), ("meta", "Meta"))
    if torch._C._dispatch_has_kernel_for_dispatch_key(op, key) and (device != "cuda" or USE_CUDA_KERNELS))


def require_kernel(op: str, device: torch.device, name: str) -> None:
    """A clear error where this build has no kernel of `op` to use on the device (today: CUDA),
    instead of the dispatcher's (or an unverified kernel's)."""
    if (op, device.type) not in KERNELS:
        unverified = device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        why = ("its CUDA kernel is built but not yet verified on a GPU (FUSED_LOSS_CUDA_UNVERIFIED=1 uses it)"
               if unverified else f"this build has no {device.type} kernel for it")
        raise NotImplementedError(f"fused_loss.{name}: {why}; use torch's loss, or fused_loss.patch(), which "
                                  f"falls back to torch's")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(input: torch.Tensor):
    """Rows of an (N, C, d1, ..., dk) input: N * d1 * ... * dk."""
    return input.shape[0] * math.prod(input.shape[2:])


def _row_shape(input: torch.Tensor):
    return (input.shape[0], *input.shape[2:])


def _check_input(input: torch.Tensor):
    torch._check(input.dim() >= 2, lambda: f"expected input of shape (N, C, ...), got {tuple(input.shape)}")
    torch._check(input.dtype.is_floating_point, lambda: f"expected a floating point input, got {input.dtype}")


def _in_pass_grad_fake(input: torch.Tensor, compute_grad: bool, reduction: int):
    """A forward's in-pass gradient output (csrc: in_pass_gradient): the input's shape, contiguous,
    for compute_grad with reduction mean or sum; else empty."""
    if compute_grad and reduction != 0:
        return torch.empty_like(input, memory_format=torch.contiguous_format)
    return input.new_empty((0,))


def _row_stats_fake(input: torch.Tensor, parts: int):
    return input.new_empty((parts, _rows(input)), dtype=acc_dtype(input.dtype))


def _grad_pair_fake(input, target, input_grad, target_grad):
    """(grad_input, grad_target) of a backward op: contiguous, or empty when not asked for."""
    dx = torch.empty_like(input, memory_format=torch.contiguous_format) if input_grad else input.new_empty((0,))
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if target_grad else target.new_empty((0,))
    return dx, dt


# --- second derivatives ------------------------------------------------------------------

def _grad_of_grads(loss_fn, grad_loss, primals, wrt, cotangents, create_graph):
    """Backward of a backward op: the first derivatives of loss_fn(*primals) under the
    upstream gradient grad_loss, differentiated against `cotangents` with respect to
    grad_loss and the primals. wrt[i] says whether primal i has a first derivative (an
    output of the backward op); cotangents[i] is its incoming gradient (None if none), one per
    primal. Returns the gradients of (grad_loss, *primals)."""
    with torch.enable_grad():
        gl = composite.tracked(grad_loss)
        ps = [composite.tracked(p) if p is not None and p.is_floating_point() else p for p in primals]
        firsts_wrt = [p for p, w in zip(ps, wrt) if w]
        firsts = torch.autograd.grad(loss_fn(*ps), firsts_wrt, gl, create_graph=True, allow_unused=True)
        cots_wrt = [c for c, w in zip(cotangents, wrt) if w]  # aligned with firsts
        pairs = [(f, c) for f, c in zip(firsts, cots_wrt) if f is not None and c is not None]
        inputs = [gl] + [p for p in ps if p is not None and p.requires_grad]
        if not pairs:
            grads = [None] * len(inputs)
        else:
            outs, cots = zip(*pairs)
            grads = list(torch.autograd.grad(outs, inputs, cots, create_graph=create_graph, allow_unused=True))
    it = iter(grads)
    result = [next(it)]
    for p in ps:
        result.append(next(it) if p is not None and p.requires_grad else None)
    return result


def _grad_pair(dx, dt, input_grad, target_grad):
    """The cotangents of a backward op's (grad_input, grad_target) that exist."""
    return [dx if input_grad else None, dt if target_grad else None]


# --- class-index targets -------------------------------------------------------------

@register_fake("fused_loss::cross_entropy_forward")
def _(input, target, weight, reduction, ignore_index, label_smoothing, compute_grad, softcap=None, temperature=1.0,
      z_loss=0.0, return_stats=False, acc_loss=False):
    _check_input(input)
    torch._check(tuple(target.shape) == _row_shape(input), lambda: "target shape does not match input")
    loss = input.new_empty(target.shape if reduction == 0 else (),
                           dtype=acc_dtype(input.dtype) if acc_loss else input.dtype)
    return loss, _row_stats_fake(input, 5 if return_stats else 2), _in_pass_grad_fake(input, compute_grad, reduction)


@register_fake("fused_loss::cross_entropy_forward_grad_in_place")
def _(input, target, weight, reduction, ignore_index, label_smoothing, softcap=None, temperature=1.0, z_loss=0.0,
      return_stats=False):
    _check_input(input)
    torch._check(input.dim() == 2 and input.is_contiguous() and reduction != 0,
                 lambda: "fused_loss.cross_entropy_forward_grad_in_place: expected contiguous (N, C) logits and "
                         "reduction 'mean' or 'sum'")
    torch._check(tuple(target.shape) == _row_shape(input), lambda: "target shape does not match input")
    return input.new_empty((), dtype=acc_dtype(input.dtype)), _row_stats_fake(input, 5 if return_stats else 2)


@register_fake("fused_loss::cross_entropy_backward_into")
def _(grad_input, grad_loss, input, target, weight, stats, reduction, ignore_index, label_smoothing, softcap=None,
      temperature=1.0, z_loss=0.0):
    return None


@register_fake("fused_loss::cross_entropy_backward")
def _(grad_loss, input, target, weight, stats, reduction, ignore_index, label_smoothing, softcap=None,
      temperature=1.0, z_loss=0.0):
    _check_input(input)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _is_exactly_one(t: torch.Tensor) -> bool:
    """Whether an upstream gradient is the scalar 1, where reading it costs nothing (a CPU
    tensor, outside tracing); elsewhere False, and the caller takes its general path."""
    if t.numel() != 1 or t.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch._subclasses.fake_tensor.is_fake(t) or torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    return t.item() == 1.0


def _keep_in_pass_grad(ctx, grad: torch.Tensor):
    """Keeps a forward's in-pass gradient (empty when not computed) until the backward takes it.
    An attribute, not a saved tensor: dropped when handed out, autograd can then keep the buffer
    as x.grad without a copy, and a user writing into it later does not trip the saved-tensor
    version check of a retained graph."""
    ctx.in_pass_grad = grad if grad.numel() > 0 else None


def _take_in_pass_grad(ctx, grad_loss, backward_into):
    """The forward's in-pass gradient, dropped from ctx either way: returned as it is, once, for
    an upstream gradient of exactly 1 (loss.backward() on 'mean' or 'sum') when the result need
    not be differentiable (no create_graph); else None, and the caller recomputes. So a later
    backward through a retained graph, or any other upstream gradient, never reads or scales a
    buffer that may have been handed out.
    backward_into(buffer): where the upstream gradient lives on a device that the host should not
    wait for (CUDA), the op that checks it there, leaves the buffer as it is for exactly 1 and
    else recomputes the gradient into it; the buffer is then returned (it is handed out once)."""
    grad, ctx.in_pass_grad = ctx.in_pass_grad, None
    if grad is None or grad_loss is None or torch.is_grad_enabled():
        return None
    if _is_exactly_one(grad_loss):
        return grad
    if grad_loss.device.type == "cuda" and not torch.compiler.is_compiling():
        backward_into(grad)
        return grad
    return None


def _ce_setup_context(ctx, inputs, output):
    input, target, weight, reduction, ignore_index, label_smoothing, compute_grad, *options = inputs
    softcap, temperature, z_loss = (options + [None, 1.0, 0.0][len(options):])[:3]  # schema defaults
    _, stats, grad = output
    ctx.mark_non_differentiable(stats, grad)
    ctx.set_materialize_grads(False)  # no zero-filled N x C "gradients" for stats and grad
    ctx.save_for_backward(input, target, weight, stats[:2])  # the backward reads max and log_sum
    ctx.args = (reduction, ignore_index, label_smoothing, softcap, temperature, z_loss)
    ctx.n_inputs = len(inputs)
    _keep_in_pass_grad(ctx, grad)


def _ce_backward(ctx, grad_loss, grad_stats, grad_grad):
    none = (None,) * (ctx.n_inputs - 1)
    in_pass = _take_in_pass_grad(ctx, grad_loss, lambda buffer: ops.cross_entropy_backward_into(
        buffer, grad_loss, *ctx.saved_tensors, *ctx.args))
    if grad_loss is None:  # no gradient reached the loss (grads are not materialised)
        return (None, *none)
    input, target, weight, stats = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise NotImplementedError("fused_loss.cross_entropy: the derivative for 'weight' is not implemented "
                                  "for class-index targets (as in torch)")
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = in_pass if in_pass is not None else \
            ops.cross_entropy_backward(grad_loss, input, target, weight, stats, *ctx.args)
    return (grad_input, *none)


register_autograd("fused_loss::cross_entropy_forward", _ce_backward, setup_context=_ce_setup_context)


def _ce_grad_setup_context(ctx, inputs, output):
    grad_loss, input, target, weight, stats, *args = inputs
    ctx.save_for_backward(grad_loss, input, target, weight)
    ctx.args = args  # reduction, ignore_index, label_smoothing[, softcap, temperature, z_loss]
    ctx.n_inputs = len(inputs)


def _ce_grad_backward(ctx, grad_dx):
    grad_loss, input, target, weight = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise NotImplementedError("fused_loss.cross_entropy: the derivative for 'weight' is not implemented "
                                  "for class-index targets (as in torch)")
    gl, gx, _ = _grad_of_grads(lambda x, t: composite.cross_entropy_forward(x, t, weight, *ctx.args), grad_loss,
                               [input, target], [True, False], [grad_dx, None], torch.is_grad_enabled())
    return (gl, gx, *(None,) * (ctx.n_inputs - 2))


register_autograd("fused_loss::cross_entropy_backward", _ce_grad_backward, setup_context=_ce_grad_setup_context)


# --- probability targets -------------------------------------------------------------

@register_fake("fused_loss::cross_entropy_prob_forward")
def _(input, target, weight, reduction, label_smoothing, compute_grad=False):
    _check_input(input)
    torch._check(target.shape == input.shape, lambda: "probability targets must have the input's shape")
    loss = input.new_empty(_row_shape(input) if reduction == 0 else ())
    return loss, _row_stats_fake(input, 3), _in_pass_grad_fake(input, compute_grad, reduction)


@register_fake("fused_loss::cross_entropy_prob_backward_into")
def _(grad_input, grad_loss, input, target, weight, stats, reduction, label_smoothing):
    return None


@register_fake("fused_loss::cross_entropy_prob_backward")
def _(grad_loss, input, target, weight, stats, reduction, label_smoothing, input_grad, target_grad):
    _check_input(input)
    return _grad_pair_fake(input, target, input_grad, target_grad)


def _ce_prob_setup_context(ctx, inputs, output):
    input, target, weight, reduction, label_smoothing, *_ = inputs
    _, stats, grad = output
    ctx.mark_non_differentiable(stats, grad)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, target, weight, stats)
    ctx.args = (reduction, label_smoothing)
    ctx.n_inputs = len(inputs)
    _keep_in_pass_grad(ctx, grad)  # the input's


def _ce_prob_backward(ctx, grad_loss, grad_stats, grad_grad):
    in_pass = _take_in_pass_grad(ctx, grad_loss, lambda buffer: ops.cross_entropy_prob_backward_into(
        buffer, grad_loss, *ctx.saved_tensors, *ctx.args))
    none = (None,) * (ctx.n_inputs - 3)
    if grad_loss is None:  # no gradient reached the loss (grads are not materialised)
        return (None, None, None, *none)
    input, target, weight, stats = ctx.saved_tensors
    need_input, need_target, need_weight = ctx.needs_input_grad[:3]
    if need_weight:
        # Rare (torch differentiates the weight of probability targets; we follow): the
        # composite formula gives every gradient, the weight's included.
        grads = composite.vjp(lambda x, t, w: composite.cross_entropy_prob_forward(x, t, w, *ctx.args),
                              [input, target, weight], [need_input, need_target, True], grad_loss)
        return (*grads, *none)
    if not (need_input or need_target):
        return (None, None, None, *none)
    # The input's gradient from the forward where it can be handed out; the target's is always
    # computed here.
    dx = None
    if need_input and in_pass is not None:
        dx, need_input = in_pass, False
    if need_input or need_target:
        gx, gt = ops.cross_entropy_prob_backward(grad_loss, input, target, weight, stats, *ctx.args, need_input,
                                                 need_target)
        dx = gx if need_input else dx
    return dx, (gt if need_target else None), None, *none


register_autograd("fused_loss::cross_entropy_prob_forward", _ce_prob_backward, setup_context=_ce_prob_setup_context)


def _ce_prob_grad_setup_context(ctx, inputs, output):
    grad_loss, input, target, weight, stats, reduction, label_smoothing, input_grad, target_grad = inputs
    ctx.save_for_backward(grad_loss, input, target, weight)
    ctx.args = (reduction, label_smoothing)
    ctx.flags = (input_grad, target_grad)


def _ce_prob_grad_backward(ctx, grad_dx, grad_dt):
    grad_loss, input, target, weight = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise NotImplementedError("fused_loss.cross_entropy: second derivatives with respect to 'weight' are not "
                                  "implemented")
    gl, gx, gt = _grad_of_grads(lambda x, t: composite.cross_entropy_prob_forward(x, t, weight, *ctx.args),
                                grad_loss, [input, target], list(ctx.flags), _grad_pair(grad_dx, grad_dt, *ctx.flags),
                                torch.is_grad_enabled())
    return gl, gx, gt, None, None, None, None, None, None


register_autograd("fused_loss::cross_entropy_prob_backward", _ce_prob_grad_backward,
                  setup_context=_ce_prob_grad_setup_context)


# --- elementwise losses ----------------------------------------------------------------------
# Each has <name>_forward(input, target, <tensor operands>, reduction, <params>, compute_grad)
# -> (loss, grad) and <name>_backward(grad, input, target, <tensor operands>, reduction,
# <params>, input_grad, target_grad) -> (grad_input, grad_target). The forward's grad is the
# input's gradient for an upstream gradient of 1, written in the loss's pass (compute_grad with
# reduction mean or sum; otherwise empty).

def _elementwise_fake_forward(input, target, reduction, compute_grad):
    torch._check(input.dtype.is_floating_point, lambda: f"expected a floating point input, got {input.dtype}")
    torch._check(target.shape == input.shape, lambda: "target must have the input's shape")
    return input.new_empty(input.shape if reduction == 0 else ()), _in_pass_grad_fake(input, compute_grad, reduction)


def _register_elementwise_autograd(name: str, n_tensors: int):
    """Fake kernels and autograd for <name>_forward and <name>_backward, whose first n_tensors arguments are
    tensors (input, target, then optional weights) and the rest plain options (the forward's
    last one is compute_grad). A weight that needs a gradient (Huber's; torch refuses it for
    BCE before any op is called) gets all gradients from the composition."""
    backward_op = getattr(ops, f"{name}_backward")
    backward_into_op = getattr(ops, f"{name}_backward_into")
    loss_fn = getattr(composite, f"{name}_forward")

    # Fake kernels: forward (*tensors, reduction, *params, compute_grad); backward
    # (grad, input, target, *operands, reduction, *params, input_grad, target_grad).
    register_fake(f"fused_loss::{name}_forward",
                  lambda *a: _elementwise_fake_forward(a[0], a[1], a[n_tensors], a[-1]))
    register_fake(f"fused_loss::{name}_backward", lambda *a: _grad_pair_fake(a[1], a[2], a[-2], a[-1]))
    register_fake(f"fused_loss::{name}_backward_into", lambda *a: None)

    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)  # no zero-filled "gradient" of the grad output
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.options = inputs[n_tensors:-1]  # reduction and parameters (not compute_grad)
        _keep_in_pass_grad(ctx, grad)

    def backward(ctx, grad, grad_grad):
        in_pass = _take_in_pass_grad(ctx, grad, lambda buffer: backward_into_op(buffer, grad, *ctx.saved_tensors,
                                                                                *ctx.options))
        nones = [None] * (len(ctx.needs_input_grad) - 2)
        if grad is None:  # no gradient reached the loss (grads are not materialised)
            return (None, None, *nones)
        tensors = ctx.saved_tensors
        if any(ctx.needs_input_grad[2:n_tensors]):
            grads = composite.vjp(lambda *ts: loss_fn(*ts, *ctx.options), list(tensors),
                                  list(ctx.needs_input_grad[:n_tensors]), grad)
            return (*grads, *[None] * (len(ctx.needs_input_grad) - n_tensors))
        need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The forward's gradient where it can be handed out; anything else is recomputed.
        dx = in_pass if need_input else None
        dt = None
        recompute = need_input and dx is None
        if recompute or need_target:
            gx, gt = backward_op(grad, *tensors, *ctx.options, recompute, need_target)
            dx = gx if recompute else dx
            dt = gt if need_target else None
        return (dx, dt, *nones)

    register_autograd(f"fused_loss::{name}_forward", backward, setup_context=setup_context)

    # The backward op: (grad, *tensors, *options, input_grad, target_grad).
    def grad_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:1 + n_tensors])
        ctx.options = inputs[1 + n_tensors:-2]
        ctx.flags = inputs[-2:]

    def grad_backward(ctx, grad_dx, grad_dt):
        grad, input, target, *operands = ctx.saved_tensors
        if any(ctx.needs_input_grad[3:1 + n_tensors]):
            raise NotImplementedError(f"fused_loss.{name}: gradients w.r.t. weights are not implemented")
        gl, gx, gt = _grad_of_grads(lambda x, t: loss_fn(x, t, *operands, *ctx.options), grad, [input, target],
                                    list(ctx.flags), _grad_pair(grad_dx, grad_dt, *ctx.flags),
                                    torch.is_grad_enabled())
        return (gl, gx, gt, *[None] * (len(ctx.needs_input_grad) - 3))

    register_autograd(f"fused_loss::{name}_backward", grad_backward, setup_context=grad_setup_context)


_register_elementwise_autograd("binary_cross_entropy_with_logits", 4)
_register_elementwise_autograd("smooth_l1_loss", 2)
_register_elementwise_autograd("huber_loss", 3)
_register_elementwise_autograd("sigmoid_focal_loss", 2)
