"""Reference implementations in plain torch, shared by the tests and the benchmark runner.

Each entry has the signature of its fused_loss twin. Where torch has the loss itself the
reference is torch's own function.
"""
import torch
import torch.nn.functional as F

cross_entropy = F.cross_entropy
binary_cross_entropy_with_logits = F.binary_cross_entropy_with_logits
smooth_l1_loss = F.smooth_l1_loss
huber_loss = F.huber_loss


def sigmoid_focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"):
    """The semantics of torchvision.ops.sigmoid_focal_loss (RetinaNet), in torch ops:
    alpha_t * BCE-with-logits * (1 - p_t)^gamma, no alpha weighting when alpha < 0."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
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
}
