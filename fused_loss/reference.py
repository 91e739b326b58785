"""Reference implementations in plain torch, shared by the tests and the benchmark runner.

Each entry has the signature of its fused_loss twin. Where torch has the loss itself the
reference is torch's own function.
"""
import torch
import torch.nn.functional as F

# torch's own functions, bound when fused_loss is imported: fused_loss.patch() may later replace
# them in torch.nn.functional, and the references (and composite.py) must stay torch's.
binary_cross_entropy_with_logits = F.binary_cross_entropy_with_logits
smooth_l1_loss = F.smooth_l1_loss
huber_loss = F.huber_loss
torch_cross_entropy = F.cross_entropy


def shaped_logits(input, softcap=None, temperature: float = 1.0):
    """The logits cross-entropy sees under its LLM options: softcap * tanh(x / softcap) (Gemma 2),
    then divided by the temperature."""
    z = input
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def token_weights(target, weight, ignore_index: int, dtype):
    """(w, valid) of class-index targets: each token's class weight (1 without weights; 0 where
    ignored), and the non-ignored mask. A uint8 target is compared as an integer, never wrapped."""
    target = target.long()
    valid = target != ignore_index
    if weight is None:
        return valid.to(dtype), valid
    return weight.reshape(-1).to(dtype)[torch.where(valid, target, 0)] * valid, valid


def reduce_terms(terms, reduction: str, denominator):
    """Per-token terms reduced as the loss: 'mean' divides by the loss's own denominator."""
    if reduction == "none":
        return terms
    return terms.sum() if reduction == "sum" else terms.sum() / denominator


def z_loss_terms(z, target, weight=None, ignore_index: int = -100, z_loss: float = 0.0):
    """Each token's z-loss term z_loss * w * logsumexp(z)^2 and the denominator of its 'mean':
    w is the token's class weight (1 without weights, 0 where ignored) for class-index targets,
    1 for probability targets. z: (N, C, d...) logits (classes in dim 1)."""
    if target.shape == z.shape:  # probabilities
        lse = torch.logsumexp(z, 1)
        w = torch.ones_like(lse)
    else:
        w, valid = token_weights(target, weight, ignore_index, z.dtype)
        # Ignored rows' logits do not enter at all (an ignored row of -inf would make 0 * inf).
        lse = torch.logsumexp(torch.where(valid.unsqueeze(1), z, 0), 1)
    return z_loss * w * lse * lse, w.sum()


def cross_entropy_with_options(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0, softcap=None, temperature: float = 1.0,
                               z_loss: float = 0.0):
    """fused_loss.cross_entropy with its LLM options, in plain torch: F.cross_entropy of the
    shaped logits, plus the z-loss terms reduced like the loss ('mean': over the same
    denominator, the weights of the non-ignored targets, or the rows for probabilities)."""
    if input.dim() == 1:  # one row, as F.cross_entropy takes it
        loss = cross_entropy_with_options(input.unsqueeze(0), target.unsqueeze(0), weight, ignore_index, reduction,
                                          label_smoothing, softcap, temperature, z_loss)
        return loss.squeeze(0) if reduction == "none" else loss
    z = shaped_logits(input, softcap, temperature)
    loss = torch_cross_entropy(z, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss == 0.0:
        return loss
    terms, denominator = z_loss_terms(z, target, weight, ignore_index, z_loss)
    return loss + reduce_terms(terms, reduction, denominator).to(loss.dtype)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, softcap=None, temperature: float = 1.0,
                  z_loss: float = 0.0):
    """torch's F.cross_entropy itself; with fused_loss's LLM options, cross_entropy_with_options."""
    if softcap is None and temperature == 1.0 and not z_loss:
        return torch_cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction
        reduction = _reduction.legacy_get_string(size_average, reduce)
    return cross_entropy_with_options(input, target, weight, ignore_index, reduction, label_smoothing, softcap,
                                      temperature, z_loss)


def linear_cross_entropy_with_options(input, linear_weight, target, *, linear_bias=None, weight=None,
                                      reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                                      softcap=None, temperature: float = 1.0, z_loss: float = 0.0):
    """fused_loss.linear_cross_entropy in plain torch: F.linear, then cross_entropy_with_options.
    input (..., H), linear_weight (V, H); the logits (..., V) are flattened to (rows, V) (target
    (...) or probabilities (..., V)) and a 'none' loss takes the target's row shape back."""
    logits = F.linear(input, linear_weight, linear_bias)
    rows = logits.shape[:-1]
    probabilities = target.shape == logits.shape
    flat = logits.reshape(-1, logits.shape[-1]) if logits.dim() != 1 else logits
    flat_target = (target.reshape(-1, logits.shape[-1]) if probabilities else target.reshape(-1)) \
        if logits.dim() != 1 else target
    loss = cross_entropy_with_options(flat, flat_target, weight, ignore_index, reduction, label_smoothing, softcap,
                                      temperature, z_loss)
    return loss.reshape(rows) if reduction == "none" else loss


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction: str = "mean",
                         ignore_index=None, label_smoothing: float = 0.0, options=None, softcap=None,
                         temperature: float = 1.0, z_loss: float = 0.0, chunk_size=None, return_stats=False):
    """The unfused computation, F.linear then F.cross_entropy (with the LLM options written in torch
    ops): the benchmarks' eager reference. Takes fused_loss.linear_cross_entropy's arguments;
    options, chunk_size and return_stats are ignored (it returns the loss only)."""
    if ignore_index is None:
        ignore_index = -100
    return linear_cross_entropy_with_options(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                             reduction=reduction, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing, softcap=softcap,
                                             temperature=temperature, z_loss=z_loss)


def sigmoid_focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"):
    """The semantics of torchvision.ops.sigmoid_focal_loss (RetinaNet), in torch ops:
    alpha_t * BCE-with-logits * (1 - p_t)^gamma, no alpha weighting when alpha < 0."""
    p = torch.sigmoid(inputs)
    ce = binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: 'none', 'mean', 'sum'")


REFERENCES = {
    "cross_entropy": cross_entropy,
    "binary_cross_entropy_with_logits": binary_cross_entropy_with_logits,
    "smooth_l1_loss": smooth_l1_loss,
    "huber_loss": huber_loss,
    "sigmoid_focal_loss": sigmoid_focal_loss,
    "linear_cross_entropy": linear_cross_entropy,
}
