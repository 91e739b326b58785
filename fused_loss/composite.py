"""Each fused op's loss written in differentiable torch ops, for what the fused kernels do not
compute themselves:

- second and higher derivatives (the backward ops' own backward, see ops.py);
- torch.func transforms (grad, vjp, jacrev, jacfwd, hessian, vmap) and forward-mode AD
  (torch.autograd.forward_ad): the ops are registered through torch.library, whose autograd
  formulas functorch and forward mode cannot use, so the public functions compute with these
  compositions there (see `needs_composite`);
- the gradient of the class weights of probability targets (torch has it; rarely asked for).

Each function takes its op's arguments (reduction as torch's enum number). Where torch has the
loss, the composition is torch's own function, so these paths give torch's answer exactly.
"""
import torch

from . import reference  # torch's functions as bound at import (fused_loss.patch() may replace torch.nn.functional's)

REDUCTION_NAMES = ("none", "mean", "sum")  # at::Reduction's numbering


def cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing, softcap=None,
                          temperature=1.0, z_loss=0.0):
    return reference.cross_entropy_with_options(input, target, weight, ignore_index, REDUCTION_NAMES[reduction],
                                                label_smoothing, softcap, temperature, z_loss)


def cross_entropy_prob_forward(input, target, weight, reduction, label_smoothing):
    return reference.torch_cross_entropy(input, target, weight, reduction=REDUCTION_NAMES[reduction],
                                       label_smoothing=label_smoothing)


def binary_cross_entropy_with_logits_forward(input, target, weight, pos_weight, reduction):
    return reference.binary_cross_entropy_with_logits(input, target, weight, reduction=REDUCTION_NAMES[reduction],
                                                      pos_weight=pos_weight)


def smooth_l1_loss_forward(input, target, reduction, beta):
    return reference.smooth_l1_loss(input, target, reduction=REDUCTION_NAMES[reduction], beta=beta)


def huber_loss_forward(input, target, weight, reduction, delta):
    if weight is None:  # also for torch releases before huber_loss had a weight
        return reference.huber_loss(input, target, reduction=REDUCTION_NAMES[reduction], delta=delta)
    return reference.huber_loss(input, target, reduction=REDUCTION_NAMES[reduction], delta=delta, weight=weight)


def sigmoid_focal_loss_forward(input, target, reduction, alpha, gamma):
    return reference.sigmoid_focal_loss(input, target, alpha, gamma, REDUCTION_NAMES[reduction])


def tracked(t):
    """t itself if autograd tracks it (keeping the outer graph, for the next derivative), else
    a detached leaf that autograd can differentiate with respect to."""
    return t if t.requires_grad else t.detach().requires_grad_()


def vjp(loss_fn, tensors, needs, grad_loss):
    """Gradients of loss_fn(*tensors) under grad_loss for the tensors whose `needs` is set
    (None for the others), differentiable when grad mode is on (create_graph)."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [tracked(t) if n else t for t, n in zip(tensors, needs)]
        wanted = [t for t, n in zip(leaves, needs) if n]
        grads = iter(torch.autograd.grad(loss_fn(*leaves), wanted, grad_loss, create_graph=create_graph,
                                         allow_unused=True))
    return [next(grads) if n else None for n in needs]


def needs_composite(*tensors) -> bool:
    """True under a torch.func transform or when a tensor carries a forward-mode tangent:
    there the fused ops' autograd formulas do not apply, and the composition must be used."""
    # Not peek_interpreter_stack(): torch.compile traces that as never None, which silently sent every
    # compiled call down this composite path.
    if torch._C._are_functorch_transforms_active():
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False
