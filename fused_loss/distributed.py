"""Vocab-parallel cross-entropy: the classes of an LM head split across the ranks of a process group.

Each rank holds a contiguous slice of the classes, `[class_start, class_start + C_r)` (slices may
differ in size), of the logits (`vocab_parallel_cross_entropy`) or of the head's weight
(`vocab_parallel_linear_cross_entropy`); the target (global class indices) is the same on every
rank. The ranks exchange per-row statistics only, never logits:

- each rank reduces its slice of each row to (max, sum of exp below the max, target logit if it
  owns the target, class-weighted sum of logits for label smoothing): 4 floats per row;
- one all_gather hands every rank every rank's statistics, and each rank merges them in rank
  order, so all ranks compute bitwise the same log-sum-exp and loss (deterministic), without the
  three all-reduces of torch's `loss_parallel`;
- the gradient of a slice needs only the global (max, log-sum) and the rank's own logits: the
  backward communicates nothing (the linear variant all-reduces its input's gradient, which every
  rank's slice of the head contributes to).

When the slice's offset and the class count are not given, one more small all_gather of the slice
sizes (and row counts) finds them: at most two collectives per forward. Each rank's (offset, size,
class count) also rides in the statistics' all_gather, so slices that do not split the classes
exactly are refused on every rank alike, at no extra collective.

The per-row math: fused_loss/composed_cross_entropy.py.
"""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .composed_cross_entropy import Options, Rows, block_grad, block_stats, rows_of, rows_per_block
from .cross_entropy_options import check_options
from .functional import reduction_enum

# ---------------------------------------------------------------------------------------------
# The group and the slices


def _group_world_rank(process_group) -> Tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("fused_loss.vocab_parallel: a process_group was given but torch.distributed "
                               "is not initialized")
        return 1, 0
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def _slices(local_classes: int, rows: int, process_group, world: int, rank: int, class_start, num_classes,
            device) -> Tuple[int, int, int]:
    """(class_start, num_classes, collectives used) of this rank's slice."""
    if (class_start is None) != (num_classes is None):
        raise ValueError("fused_loss.vocab_parallel: give both class_start and num_classes, or neither "
                         "(then the slice sizes are gathered from the ranks)")
    if class_start is not None:
        if not (0 <= class_start and class_start + local_classes <= num_classes):
            raise ValueError(f"fused_loss.vocab_parallel: the slice [{class_start}, {class_start + local_classes}) "
                             f"does not fit in num_classes={num_classes}")
        return int(class_start), int(num_classes), 0
    if world == 1:
        return 0, local_classes, 0
    # The row counts ride along: ranks with different rows would otherwise fail (or hang) in the
    # statistics' all_gather; here every rank sees the same sizes and raises the same error.
    sizes = _all_gather(torch.tensor([local_classes, rows], dtype=torch.int64, device=device), process_group, world)
    sizes = torch.stack(sizes).tolist()
    if len({r for _, r in sizes}) > 1:
        raise ValueError(f"fused_loss.vocab_parallel: the ranks have different numbers of rows "
                         f"{[r for _, r in sizes]}; the target must be the same on every rank")
    sizes = [c for c, _ in sizes]
    return sum(sizes[:rank]), sum(sizes), 1


def _gather_stats(stats: Tensor, class_start: int, local_classes: int, num_classes: int, process_group,
                  world: int) -> List[Tensor]:
    """Every rank's (4, rows) statistics, in rank order, by one all_gather. Each rank's
    (class_start, C_r, C) rides along in one extra column, so that slices given by
    class_start/num_classes which overlap, leave a gap or disagree on C are refused at no extra
    collective, on every rank alike (they all see the same gathered values)."""
    if world == 1:
        return [stats]
    meta = torch.tensor([class_start, local_classes, num_classes, 0], dtype=stats.dtype, device=stats.device)
    gathered = _all_gather(torch.cat([stats, meta[:, None]], dim=1), process_group, world)
    if num_classes <= 2 / torch.finfo(stats.dtype).eps:  # the integers survive the float (2**24 in float32)
        slices = torch.stack([g[:3, -1] for g in gathered])
        ok = _tiles(slices)
        msg = "fused_loss.vocab_parallel: the ranks' class slices do not split [0, num_classes) into disjoint parts"
        if stats.device.type == "cuda":  # no host synchronisation: the check fails the stream instead
            torch._assert_async(ok, msg)
        elif not bool(ok):
            raise ValueError(f"{msg}: (class_start, size, num_classes) of each rank: "
                             f"{[tuple(int(v) for v in r) for r in slices.tolist()]}")
    return [g[:, :-1] for g in gathered]


def _tiles(slices: Tensor) -> Tensor:
    """Whether the (world, 3) rows (start, size, C) cover [0, C) exactly once, in any order (empty
    slices anywhere), as a 0-dim bool tensor: the non-empty slices, sorted by start, must each
    start where the ones before end, and their sizes add up to C."""
    start, size, total = slices.unbind(1)
    order = torch.argsort(start * 2 + (size > 0).to(start.dtype), stable=True)  # empties before a tie
    start, size = start[order], size[order]
    before = torch.cumsum(size, 0) - size
    return ((start == before) | (size == 0)).all() & (size.sum() == total[0]) & (total == total[0]).all()


def _all_gather(t: Tensor, process_group, world: int) -> List[Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=process_group)
    return out


def _check_target(target: Tensor, num_classes: int, ignore_index: int) -> None:
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if target.device.type == "cuda":  # no host synchronisation: the check fails the stream instead
        torch._assert_async(~bad.any(), "fused_loss.vocab_parallel: target out of range")
    elif bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"fused_loss.vocab_parallel: target {value} is out of bounds for {num_classes} classes")


def _prepare(target: Tensor, logits_shape, weight, ignore_index, reduction, label_smoothing, softcap, temperature,
             z_loss, name):
    reduction_enum(reduction)
    softcap, temperature, z_loss = check_options(softcap, temperature, z_loss, name)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if target.dtype != torch.int64:
        raise RuntimeError(f"fused_loss.{name}: expected a class-index target of dtype int64, got {target.dtype}")
    if tuple(target.shape) != tuple(logits_shape[:-1]):
        raise ValueError(f"fused_loss.{name}: expected a target of shape {tuple(logits_shape[:-1])} "
                         f"(the logits' leading dimensions), got {tuple(target.shape)}")
    return Options(ignore_index, reduction, label_smoothing, softcap, temperature, z_loss)


def _check_weight(weight, num_classes, name):
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != num_classes):
        raise ValueError(f"fused_loss.{name}: expected a class weight of shape ({num_classes},) (all the classes, "
                         f"the same on every rank), got {tuple(weight.shape)}")


# ---------------------------------------------------------------------------------------------
# Logits sliced by class


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, process_group, world, rank, class_start, num_classes, opts):
        x = rows_of(logits)
        rows = Rows(target.reshape(-1), weight, class_start, x.shape[1], num_classes, opts, x.dtype)
        step = rows_per_block(x.shape[1])
        stats = torch.cat([block_stats(x[i:i + step], rows.local_target[i:i + step], rows.owned[i:i + step],
                                        rows.w_local, opts) for i in range(0, x.shape[0], step)], dim=1) \
            if x.shape[0] else x.new_zeros((4, 0), dtype=rows.wy.dtype)
        rows.merge(_gather_stats(stats, class_start, x.shape[1], num_classes, process_group, world), opts)
        ctx.save_for_backward(logits)
        ctx.rows, ctx.opts = rows, opts
        return rows.reduce(opts, logits.dtype, target.shape)

    @staticmethod
    @once_differentiable  # the statistics are not part of a graph: no second derivative
    def backward(ctx, grad_output):
        logits, = ctx.saved_tensors
        rows, opts = ctx.rows, ctx.opts
        x = rows_of(logits)
        scale = rows.row_scale(grad_output, opts)
        grad = torch.empty_like(x)
        step = rows_per_block(x.shape[1])
        for i in range(0, x.shape[0], step):
            sl = slice(i, i + step)
            grad[sl] = block_grad(x[sl], rows.local_target[sl], rows.owned[sl], rows.w_local, rows.max_[sl],
                                   rows.log_sum[sl], rows.lse[sl], rows.wy[sl], scale[sl], opts, rows.num_classes,
                                   rows.weight_total)
        return grad.reshape(logits.shape), None, None, None, None, None, None, None, None


def _dtensor_parts(logits, target, process_group):
    """A DTensor of logits sharded on the class dimension over a 1-D mesh: its local shard (taken
    differentiably), the mesh's group and the offset of this rank's classes (as torch's Shard
    splits: torch.chunk's ceil(C / world) classes per rank, fewer or none on the last ones).
    (torch's _StridedShard, not contiguous, is not a Shard and is refused.)"""
    from torch.distributed.tensor import DTensor, Shard

    mesh = logits.device_mesh
    if mesh.ndim != 1 or len(logits.placements) != 1 or not isinstance(logits.placements[0], Shard) \
            or logits.placements[0].dim % logits.ndim != logits.ndim - 1:
        raise ValueError(f"fused_loss.vocab_parallel_cross_entropy: a DTensor of logits must be sharded on its last "
                         f"(class) dimension over a 1-D mesh, got placements {logits.placements} on a "
                         f"{mesh.ndim}-D mesh")
    if process_group is not None:
        raise ValueError("fused_loss.vocab_parallel_cross_entropy: with a DTensor, the group is its mesh's; "
                         "do not pass process_group")
    group = mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    num_classes = logits.shape[-1]
    size, start = Shard.local_shard_size_and_offset(num_classes, world, rank)  # torch's own split
    local = logits.to_local()
    if local.shape[-1] != size:
        raise ValueError("fused_loss.vocab_parallel_cross_entropy: the DTensor's local shard does not have the "
                         "size torch's Shard placement gives it")
    if isinstance(target, DTensor):
        target = target.full_tensor()
    return local, target, group, start, num_classes


def vocab_parallel_cross_entropy(logits_shard: Tensor, target: Tensor, process_group=None, *,
                                 weight: Optional[Tensor] = None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0, softcap: Optional[float] = None,
                                 temperature: float = 1.0, z_loss: float = 0.0, class_start: Optional[int] = None,
                                 num_classes: Optional[int] = None) -> Tensor:
    """Cross-entropy of logits whose classes are split across the ranks of `process_group`
    (None: the default group; no torch.distributed or a group of 1: the whole logits here).

    logits_shard: (..., C_r), this rank's contiguous slice of the C classes; target: (...), global
    class indices (int64), the same on every rank. class_start, num_classes: this slice's first class
    and C. Give them when you know them (a fixed head: they save a collective, one round trip, per
    call); when not given, the ranks' slice sizes (and row counts, which must agree) are gathered
    by one small all_gather and the slices are taken in rank order. Either way, slices that overlap,
    leave a gap or disagree on C raise a ValueError on every rank (checked on values that ride in
    the statistics' all_gather). weight: class weights of all C classes, the same on every rank.
    The other arguments are fused_loss.cross_entropy's (with its LLM options). Returns the same loss
    on every rank, a plain tensor (the input's dtype; per row of the target's shape for 'none'),
    equal to cross_entropy of the whole logits; the gradient reaches each rank's slice.
    logits_shard may also be a DTensor sharded on its last dimension over a 1-D mesh (code written
    for torch's loss_parallel): its local shard and its mesh's group are used, and the gradient
    reaches the DTensor. Per forward: one all_gather of 4 floats per row (plus the sizes' one);
    the backward communicates nothing.
    """
    name = "vocab_parallel_cross_entropy"
    from torch.distributed.tensor import DTensor

    if isinstance(logits_shard, DTensor):
        logits_shard, target, process_group, class_start, num_classes = _dtensor_parts(logits_shard, target,
                                                                                        process_group)
    if not logits_shard.is_floating_point():
        raise NotImplementedError(f"fused_loss.{name}: expected floating point logits, got {logits_shard.dtype}")
    if logits_shard.dim() == 0:
        raise ValueError(f"fused_loss.{name}: expected logits of shape (..., C_r), got a 0-dim tensor")
    opts = _prepare(target, logits_shard.shape, weight, ignore_index, reduction, label_smoothing, softcap,
                    temperature, z_loss, name)
    world, rank = _group_world_rank(process_group)
    class_start, num_classes, _ = _slices(logits_shard.shape[-1], target.numel(), process_group, world, rank,
                                          class_start, num_classes, target.device)
    _check_weight(weight, num_classes, name)
    _check_target(target, num_classes, ignore_index)
    return _VocabParallelCrossEntropy.apply(logits_shard, target, weight, process_group, world, rank, class_start,
                                            num_classes, opts)


# ---------------------------------------------------------------------------------------------
# The head's weight sliced by class: the logits exist one block of rows at a time


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Forward: one product per block of rows, reduced to statistics at once (pass 1), one all_gather.
    Backward: the product again per block (pass 2), its gradient, and the two products of the
    linear layer; then d_input is summed over the ranks. Four products in all, against the three of
    holding each block's gradient from the forward: that would need the merged statistics inside
    pass 1, i.e. one collective per block; this keeps the forward to one (and, unlike holding
    gradients, lets 'none' take any upstream gradient)."""

    @staticmethod
    def forward(ctx, input, weight_shard, bias_shard, target, class_weight, process_group, world, rank, class_start,
                num_classes, opts, chunk):
        x = rows_of(input)
        rows = Rows(target.reshape(-1), class_weight, class_start, weight_shard.shape[0], num_classes, opts,
                     input.dtype)
        parts = []
        for i in range(0, x.shape[0], chunk):
            logits = torch.nn.functional.linear(x[i:i + chunk], weight_shard, bias_shard)
            parts.append(block_stats(logits, rows.local_target[i:i + chunk], rows.owned[i:i + chunk],
                                      rows.w_local, opts))
        stats = torch.cat(parts, dim=1) if parts else x.new_zeros((4, 0), dtype=rows.wy.dtype)
        rows.merge(_gather_stats(stats, class_start, weight_shard.shape[0], num_classes, process_group, world),
                   opts)
        ctx.save_for_backward(input, weight_shard, bias_shard)
        ctx.rows, ctx.opts, ctx.chunk, ctx.group, ctx.world = rows, opts, chunk, process_group, world
        return rows.reduce(opts, input.dtype, target.shape)

    @staticmethod
    @once_differentiable  # the statistics are not part of a graph: no second derivative
    def backward(ctx, grad_output):
        input, weight_shard, bias_shard = ctx.saved_tensors
        rows, opts, chunk = ctx.rows, ctx.opts, ctx.chunk
        x = rows_of(input)
        scale = rows.row_scale(grad_output, opts)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        d_x = torch.zeros_like(x) if need_x else None
        acc = torch.promote_types(weight_shard.dtype, torch.float32)
        d_w = torch.zeros(weight_shard.shape, dtype=acc, device=weight_shard.device) if need_w else None
        d_b = torch.zeros(weight_shard.shape[0], dtype=acc, device=weight_shard.device) \
            if need_b and bias_shard is not None else None
        for i in range(0, x.shape[0], chunk):
            sl = slice(i, i + chunk)
            logits = torch.nn.functional.linear(x[sl], weight_shard, bias_shard)
            g = block_grad(logits, rows.local_target[sl], rows.owned[sl], rows.w_local, rows.max_[sl],
                            rows.log_sum[sl], rows.lse[sl], rows.wy[sl], scale[sl], opts, rows.num_classes,
                            rows.weight_total)
            if d_x is not None:
                d_x[sl] = (g.to(weight_shard.dtype) @ weight_shard).to(d_x.dtype)
            if d_w is not None:
                d_w += g.t() @ x[sl].to(acc)
            if d_b is not None:
                d_b += g.sum(0)
        if d_x is not None and ctx.world > 1:  # every rank's slice of the head contributes to d_input
            dist.all_reduce(d_x, group=ctx.group)
        return (d_x.reshape(input.shape) if d_x is not None else None,
                d_w.to(weight_shard.dtype) if d_w is not None else None,
                d_b.to(bias_shard.dtype) if d_b is not None else None,
                None, None, None, None, None, None, None, None, None)


def vocab_parallel_linear_cross_entropy(input: Tensor, weight_shard: Tensor, target: Tensor, process_group=None, *,
                                        linear_bias_shard: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                                        ignore_index: int = -100, reduction: str = "mean",
                                        label_smoothing: float = 0.0, softcap: Optional[float] = None,
                                        temperature: float = 1.0, z_loss: float = 0.0,
                                        class_start: Optional[int] = None, num_classes: Optional[int] = None,
                                        chunk_size: Optional[int] = None) -> Tensor:
    """vocab_parallel_cross_entropy of `input @ weight_shard.T (+ linear_bias_shard)`, a
    tensor-parallel LM head whose rows (classes) are split across the ranks, without ever holding
    the logits: they exist one chunk of rows at a time (chunk_size rows; default: about 64 MiB of
    float32 logits, at least 256 rows).

    input: (..., H), the same on every rank; weight_shard: (C_r, H), this rank's classes; target
    (...). Gradients: weight_shard's (and the bias's) are this rank's; input's is summed over the
    ranks in the backward (one all_reduce of N x H values, as the backward of Megatron's
    column-parallel input copy), so every rank gets the full gradient. Per forward: one all_gather
    of 4 floats per row (plus the slice sizes' one when class_start/num_classes are not given).
    The other arguments are vocab_parallel_cross_entropy's."""
    name = "vocab_parallel_linear_cross_entropy"
    if input.dim() < 1 or weight_shard.dim() != 2 or input.shape[-1] != weight_shard.shape[1]:
        raise ValueError(f"fused_loss.{name}: expected input (..., H) and weight_shard (C_r, H), got "
                         f"{tuple(input.shape)} and {tuple(weight_shard.shape)}")
    if not input.is_floating_point() or input.dtype != weight_shard.dtype:
        raise RuntimeError(f"fused_loss.{name}: expected floating point input and weight_shard of one dtype, got "
                           f"{input.dtype} and {weight_shard.dtype}")
    if linear_bias_shard is not None and tuple(linear_bias_shard.shape) != (weight_shard.shape[0],):
        raise ValueError(f"fused_loss.{name}: expected linear_bias_shard of shape ({weight_shard.shape[0]},), got "
                         f"{tuple(linear_bias_shard.shape)}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"fused_loss.{name}: chunk_size must be a positive int or None, got {chunk_size!r}")
    opts = _prepare(target, (*input.shape[:-1], weight_shard.shape[0]), weight, ignore_index, reduction,
                    label_smoothing, softcap, temperature, z_loss, name)
    world, rank = _group_world_rank(process_group)
    class_start, num_classes, _ = _slices(weight_shard.shape[0], target.numel(), process_group, world, rank,
                                          class_start, num_classes, target.device)
    _check_weight(weight, num_classes, name)
    _check_target(target, num_classes, ignore_index)
    chunk = chunk_size or max(256, rows_per_block(weight_shard.shape[0]))
    return _VocabParallelLinearCrossEntropy.apply(input, weight_shard, linear_bias_shard, target, weight,
                                                  process_group, world, rank, class_start, num_classes, opts, chunk)
