"""Cross-entropy's LLM options (softcap, temperature, z_loss) and its per-token statistics.

For (N, C) logits with class-index targets (the LLM case) all of it is fused into the
kernel's one pass: the logits are shaped as they are loaded, the z-loss is part of each
row's loss and gradient coefficients, and the statistics come from the same pass. For other
layouts (K-dim input, probability targets) the options are composed around the fused kernel
with torch ops: exact, but the shaped logits are materialised and read again.
"""
import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import reference
from .composite import REDUCTION_NAMES
from .ops import acc_dtype


class CrossEntropyStats(NamedTuple):
    """What `cross_entropy(..., return_stats=True)` returns beside the loss; detached, for
    logging and RL. Per-token tensors have the target's shape (the row shape for probability
    targets) and the accumulation dtype (float32, float64 for float64 input); ignored tokens
    hold 0 (False for `correct`). For probability targets, `correct` asks whether the target's
    most probable class has the largest logit."""
    z_loss: Tensor  # the z-loss part of the loss, reduced as the loss (0 when z_loss=0)
    lse: Tensor  # per token: logsumexp of the (shaped) logits
    entropy: Tensor  # per token: entropy of softmax of the (shaped) logits, in nats
    correct: Tensor  # per token: the target's logit is the max (ties count; see cross_entropy)
    accuracy: Tensor  # correct tokens / non-ignored tokens (NaN if none), float32


def check_options(softcap, temperature, z_loss, name="cross_entropy"):
    """The options as floats, or an error that names fused_loss.<name> (the kernel checks them too)."""
    if softcap is not None:
        softcap = float(softcap)
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"fused_loss.{name}: softcap must be a positive finite number or None, got {softcap}")
    temperature, z_loss = float(temperature), float(z_loss)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"fused_loss.{name}: temperature must be a positive finite number, got {temperature}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"fused_loss.{name}: z_loss must be a non-negative finite number, got {z_loss}")
    return softcap, temperature, z_loss


def shaped(softcap, temperature) -> bool:
    return softcap is not None or temperature != 1.0


def _reduce(terms: Tensor, reduction: int, denominator: Tensor, dtype) -> Tensor:
    return reference.reduce_terms(terms, REDUCTION_NAMES[reduction], denominator).to(dtype)


def _accuracy(correct: Tensor, valid: Tensor) -> Tensor:
    return correct.sum(dtype=torch.float32) / valid.sum(dtype=torch.float32)


def stats_from_kernel(st: Tensor, target, weight, ignore_index, reduction, loss_dtype) -> CrossEntropyStats:
    """The statistics from the row kernel's (5, rows) output: max, log_sum, entropy, correct, z term."""
    shape = target.shape
    w, valid = reference.token_weights(target, weight, ignore_index, st.dtype)
    correct = st[3].view(shape) != 0
    # A row whose max is +-inf has a NaN log_sum (its loss is NaN); its lse is torch's, the max.
    lse = torch.where(st[0].isinf() & st[1].isnan(), st[0], st[0] + st[1])
    return CrossEntropyStats(_reduce(st[4].view(shape), reduction, w.sum(), loss_dtype), lse.view(shape),
                             st[2].view(shape), correct, _accuracy(correct, valid))


@torch.no_grad()
def composed_stats(x: Tensor, z: Tensor, target, weight, ignore_index, reduction, z_loss,
                   loss_dtype) -> CrossEntropyStats:
    """The same statistics with torch ops, from the logits x and the shaped logits z ((N, C, d...))."""
    x, z = x.detach(), z.detach().to(acc_dtype(z.dtype))
    lse = torch.logsumexp(z, 1)
    entropy = torch.special.entr(torch.softmax(z, 1)).sum(1)  # 0 log 0 = 0
    terms, denominator = reference.z_loss_terms(z, target, weight, ignore_index, z_loss)
    z_term = _reduce(terms, reduction, denominator, loss_dtype)
    # correct: compared on the logits before shaping, as the kernel does (see cross_entropy).
    if target.shape == z.shape:  # probabilities: the most probable target class
        correct = x.gather(1, target.argmax(1, keepdim=True)).squeeze(1) == x.amax(1)
        return CrossEntropyStats(z_term, lse, entropy, correct, _accuracy(correct, torch.ones_like(correct)))
    _, valid = reference.token_weights(target, None, ignore_index, z.dtype)
    t = torch.where(valid, target.long(), 0).unsqueeze(1)
    correct = (x.gather(1, t).squeeze(1) == x.amax(1)) & valid
    zero = torch.zeros((), dtype=lse.dtype)
    return CrossEntropyStats(z_term, torch.where(valid, lse, zero), torch.where(valid, entropy, zero), correct,
                             _accuracy(correct, valid))


def unbatch(stats: CrossEntropyStats, reduction: int) -> CrossEntropyStats:
    """Statistics of a (C,) input computed as one row of (1, C): per-token fields lose the row."""
    def sq(t):
        return t.squeeze(0)
    return CrossEntropyStats(stats.z_loss.squeeze(0) if reduction == 0 else stats.z_loss, sq(stats.lse),
                             sq(stats.entropy), sq(stats.correct), stats.accuracy)
