"""nn.Module wrappers: torch's own modules (same state, same repr), computed by fused_loss."""
import torch
from torch import Tensor

from . import functional as F


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss (an instance of it too), with a fused kernel."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        F.reduction_enum(self.reduction)  # fail at construction, not at the first batch
        if self.label_smoothing > 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {self.label_smoothing}")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)
