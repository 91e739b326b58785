"""Cross-entropy with class targets and every option of fused_loss.cross_entropy, in torch ops, one
block of rows at a time: each row's statistics (which parts of a row can each compute and then
merge), its loss, and its gradient, written out (no autograd) so that they also run where autograd
does not (inside a custom op's implementation).

Used where fused_loss's kernels do not apply: the class slices of vocab-parallel cross-entropy
(distributed.py: each rank's slice is a part of every row) and devices that have no fused_loss
cross-entropy kernel (chunked_linear_cross_entropy.py's chunks on CUDA, until its kernel exists).

Math (z = the logits after softcap and temperature, lse = M + log S from the merged statistics,
w the class weights, W = sum(w), eps the label smoothing, C the class count), per row that is not
ignored, exactly torch's cross_entropy with fused_loss's options:
    loss = (1 - eps) w_y (lse - z_y) + eps / C (W lse - sum_j w_j z_j) + z_loss w_y lse^2
    dloss/dz_j = p_j ((1 - eps) w_y + eps W / C + 2 z_loss w_y lse) - (1 - eps) w_y [j = y] - eps w_j / C
with p_j = exp((z_j - M) - log S) (the row max kept apart from the log of the sum, for precision).
"""
import math
from typing import List, Optional

import torch
from torch import Tensor

# Rows per block when a slice is reduced or differentiated: bounds the float32 temporaries.
BLOCK_BYTES = 64 << 20



def shaped(x: Tensor, softcap: Optional[float], temperature: float) -> Tensor:
    """z = softcap * tanh(x / softcap) / temperature, in float32 (float64 for float64)."""
    z = x.to(torch.promote_types(x.dtype, torch.float32))
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if temperature != 1.0:
        z = z / temperature
    return z


def block_stats(x: Tensor, local_target: Tensor, owned: Tensor, w_local: Optional[Tensor], opts) -> Tensor:
    """(4, rows) of one block: max, sum of exp(z - max), owned target logit (else 0), sum_j w_j z_j."""
    z = shaped(x, opts.softcap, opts.temperature)
    m = z.amax(dim=1) if z.shape[1] else z.new_full((z.shape[0],), -math.inf)  # an empty slice: -inf, sum 0
    s = torch.exp(z - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[:, None]).sum(dim=1)
    zy = torch.where(owned, z.gather(1, local_target[:, None]).squeeze(1), torch.zeros_like(m)) \
        if z.shape[1] else torch.zeros_like(m)
    if opts.label_smoothing > 0:
        a = (z * w_local).sum(dim=1) if w_local is not None else z.sum(dim=1)
    else:
        a = torch.zeros_like(m)
    return torch.stack([m, s, zy, a])


def block_grad(x: Tensor, local_target: Tensor, owned: Tensor, w_local: Optional[Tensor], max_: Tensor,
                log_sum: Tensor, lse: Tensor, wy: Tensor, row_scale: Tensor, opts, num_classes: int,
                weight_total) -> Tensor:
    """dloss/dx of one block (rows scaled by row_scale, which is 0 on ignored rows), float32."""
    z = shaped(x, opts.softcap, opts.temperature)
    eps = opts.label_smoothing
    p = torch.exp((z - max_[:, None]) - log_sum[:, None])
    coef = ((1 - eps) * wy + eps * weight_total / num_classes + 2 * opts.z_loss * wy * lse) * row_scale
    g = p * coef[:, None]
    if g.shape[1]:
        hot = torch.where(owned, -(1 - eps) * wy * row_scale, torch.zeros_like(wy))
        g.scatter_add_(1, local_target[:, None], hot[:, None])
    if eps > 0:
        w = w_local if w_local is not None else torch.ones((), dtype=g.dtype, device=g.device)
        g -= (eps / num_classes) * row_scale[:, None] * w
    if opts.temperature != 1.0:
        g = g / opts.temperature
    if opts.softcap is not None:  # d(softcap tanh(x / softcap))/dx = 1 - tanh^2
        g = g * (1 - torch.tanh(x.to(g.dtype) / opts.softcap) ** 2)
    return g


def rows_of(t: Tensor) -> Tensor:
    """(..., K) as (rows, K); K may be 0 (a rank holding no classes)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def rows_per_block(cols: int) -> int:
    return max(1, BLOCK_BYTES // (4 * max(cols, 1)))


class Options:
    def __init__(self, ignore_index, reduction, label_smoothing, softcap, temperature, z_loss):
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.softcap, self.temperature, self.z_loss = softcap, temperature, z_loss


class Rows:
    """What every rank knows about the rows once the statistics are merged."""

    def __init__(self, target, weight, class_start, local_classes, num_classes, opts, dtype):
        self.target = target
        self.valid = target != opts.ignore_index
        safe = torch.where(self.valid, target, torch.zeros_like(target))
        self.owned = self.valid & (safe >= class_start) & (safe < class_start + local_classes)
        self.local_target = torch.where(self.owned, safe - class_start, torch.zeros_like(safe))
        acc = torch.promote_types(dtype, torch.float32)
        self.wy = (weight.to(acc)[safe] if weight is not None else torch.ones_like(safe, dtype=acc)) * self.valid
        self.w_local = weight.to(acc)[class_start:class_start + local_classes] if weight is not None else None
        self.weight_total = weight.to(acc).sum() if weight is not None else float(num_classes)  # no host sync
        self.num_classes = num_classes

    def merge(self, gathered: List[Tensor], opts):
        """Rank-ordered merge of the gathered (4, rows) statistics: the loss per row and (M, log S, lse)."""
        maxes = torch.stack([g[0] for g in gathered])
        max_ = maxes.amax(dim=0)
        finite = torch.where(torch.isfinite(max_), max_, torch.zeros_like(max_))
        total = torch.zeros_like(max_)
        zy = torch.zeros_like(max_)
        a = torch.zeros_like(max_)
        for g in gathered:  # fixed order: every rank adds the same numbers in the same order
            total = total + g[1] * torch.exp(g[0] - finite)
            zy = zy + g[2]
            a = a + g[3]
        self.max_, self.log_sum = finite, torch.log(total)
        self.lse = self.max_ + self.log_sum
        eps = opts.label_smoothing
        loss = (1 - eps) * self.wy * (self.lse - zy)
        if eps > 0:
            loss = loss + (eps / self.num_classes) * (self.weight_total * self.lse - a)
        if opts.z_loss:
            loss = loss + opts.z_loss * self.wy * self.lse * self.lse
        self.row_loss = torch.where(self.valid, loss, torch.zeros_like(loss))

    def reduce(self, opts, out_dtype, batch_shape):
        if opts.reduction == "none":
            return self.row_loss.to(out_dtype).reshape(batch_shape)
        total = self.row_loss.sum()
        if opts.reduction == "sum":
            return total.to(out_dtype)
        return (total / self.wy.sum()).to(out_dtype)  # torch's weighted mean; 0/0 = NaN when all ignored

    def row_scale(self, grad_output: Tensor, opts) -> Tensor:
        g = grad_output.to(self.wy.dtype)
        if opts.reduction == "none":
            scale = g.reshape(-1)
        elif opts.reduction == "sum":
            scale = g.expand(self.wy.shape)
        else:
            scale = (g / self.wy.sum()).expand(self.wy.shape)
        return torch.where(self.valid, scale, torch.zeros_like(scale))
