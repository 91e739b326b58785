"""nn.Module wrappers: torch's own modules (same state, same repr), computed by fused_loss."""
import torch
from torch import Tensor

from . import functional as F
from .cross_entropy_options import check_options


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss (an instance of it too), with a fused kernel, and
    fused_loss.cross_entropy's keyword-only LLM options (softcap, temperature, z_loss,
    return_stats: then forward returns (loss, CrossEntropyStats))."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, softcap=None, temperature=1.0, z_loss=0.0, return_stats=False):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        F.reduction_enum(self.reduction)  # fail at construction, not at the first batch
        if self.label_smoothing > 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {self.label_smoothing}")
        self.softcap, self.temperature, self.z_loss = check_options(softcap, temperature, z_loss)
        self.return_stats = return_stats

    def forward(self, input: Tensor, target: Tensor):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing, softcap=self.softcap,
                               temperature=self.temperature, z_loss=self.z_loss, return_stats=self.return_stats)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """Drop-in for torch.nn.BCEWithLogitsLoss (an instance of it too), with a fused kernel."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean", pos_weight=None):
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        F.reduction_enum(self.reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight, pos_weight=self.pos_weight,
                                                  reduction=self.reduction)


class SmoothL1Loss(torch.nn.SmoothL1Loss):
    """Drop-in for torch.nn.SmoothL1Loss, with a fused kernel."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", beta=1.0):
        super().__init__(size_average, reduce, reduction, beta)
        F.reduction_enum(self.reduction)
        if self.beta < 0:
            raise ValueError("smooth_l1_loss does not support negative values for beta.")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class HuberLoss(torch.nn.HuberLoss):
    """Drop-in for torch.nn.HuberLoss, with a fused kernel."""

    def __init__(self, reduction="mean", delta=1.0):
        super().__init__(reduction, delta)
        F.reduction_enum(self.reduction)
        if self.delta <= 0:
            raise ValueError("huber_loss does not support non-positive values for delta.")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """Drop-in for torch.nn.LinearCrossEntropyLoss (an instance of it too: same parameters, state
    dict and repr), computed by fused_loss.linear_cross_entropy (chunked, never holding the
    logits), with its keyword-only options softcap, temperature, z_loss, chunk_size and
    return_stats (forward then returns (loss, CrossEntropyStats))."""

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None, softcap=None,
                 temperature=1.0, z_loss=0.0, chunk_size=None, return_stats=False):
        super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device, dtype=dtype,
                         reduction=reduction, weight=weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options)
        F.reduction_enum(self.reduction)  # fail at construction, not at the first batch
        self.softcap, self.temperature, self.z_loss = check_options(softcap, temperature, z_loss,
                                                                    "LinearCrossEntropyLoss")
        if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
            raise ValueError(f"fused_loss.LinearCrossEntropyLoss: chunk_size must be a positive int or None, "
                             f"got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.return_stats = return_stats

    def forward(self, input: Tensor, target: Tensor):
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = (self.linear.bias.reshape((self.num_classes, *self.out_features))
                       if self.linear.bias is not None else None)
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                      reduction=self.reduction, ignore_index=self.ignore_index,
                                      label_smoothing=self.label_smoothing, options=self.options,
                                      softcap=self.softcap, temperature=self.temperature, z_loss=self.z_loss,
                                      chunk_size=self.chunk_size, return_stats=self.return_stats)
