"""torch.nn.functional-style API: same names, arguments, defaults and results as torch.
One module per kind of loss: cross_entropy.py (rows over classes), pointwise.py (a value per
element), linear_cross_entropy.py (an LLM head's product and loss); common.py what they share."""
from .common import reduction_enum
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .pointwise import binary_cross_entropy_with_logits, huber_loss, sigmoid_focal_loss, smooth_l1_loss

__all__ = ["reduction_enum", "cross_entropy", "linear_cross_entropy", "binary_cross_entropy_with_logits",
           "huber_loss", "sigmoid_focal_loss", "smooth_l1_loss"]
