"""Chunked linear + cross-entropy: the loss of `input @ linear_weight.T (+ linear_bias)` without
ever holding the (N, V) logits.

The tokens are cut into chunks of rows. For each chunk, one matrix product (ATen, in the input's
dtype) writes the chunk's logits into one reused buffer; the fused cross-entropy kernel
(`torch.ops.fused_loss.cross_entropy_forward_grad_in_place`) turns them, in one pass and in
place, into the chunk's loss and its logit gradient `g` (LLM options included); two more products fold `g`
into the gradients: `d_input[chunk] = g @ W` and `d_weight += g.T @ chunk` (and `d_bias +=
g.sum(0)`). All of it happens during the forward: the backward only scales what the forward
computed by the upstream gradient (nothing to do when that is exactly 1).

`reduction='mean'` needs the denominator of the whole batch (the class weights of the
non-ignored targets, torch's definition, label smoothing and z-loss included), not a chunk's:
the chunks are reduced with 'sum' and the loss and the gradients divided by that denominator
once at the end, on the device (no host synchronisation). `reduction='none'` keeps each row's
statistics (max and log-sum, 2 floats per row) and the backward recomputes each chunk's logits,
their gradient for the per-row upstream gradient (`cross_entropy_backward`), and the products.

Peak extra memory: the gradients themselves (the weight's in float32 for 16-bit inputs) and one
chunk of logits, which the kernel overwrites with their gradient
(`cross_entropy_forward_grad_in_place`).

Everything here is device-generic: ATen products and the dispatcher's cross-entropy kernel, no
host read of any tensor, no data-dependent Python branching.
"""
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor

from . import composite, reference
from .composed_cross_entropy import Options, Rows, block_grad, block_stats
from .ops import KERNELS, REDUCTIONS, _is_exactly_one, acc_dtype, ops

# Bytes of one chunk of logits when chunk_size is not given: small enough to stay a fraction of
# the gradients' own size on the CPU (where the products are slow and large chunks gain little),
# larger on GPUs, whose matrix products need more rows to be efficient.
CHUNK_BYTES = {"cpu": 64 << 20}
CHUNK_BYTES_OTHER = 256 << 20
# At least this many rows per chunk (or N), even where that takes more than the logits budget:
# each chunk reads and writes all of d_weight (V x H) once, and short products are less
# efficient. Measured on 2 CPU cores, (N, H, V) = (8192, 2048, 32000) float32, fused step over
# the three products alone: 256 rows 1.09-1.17x, 512 rows 0.96-1.07x, 1024 rows 0.97-1.03x.
MIN_CHUNK_ROWS = 512


def default_chunk_size(n: int, in_features: int, num_classes: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: as many as fit the logits budget of the device (CHUNK_BYTES), at least
    MIN_CHUNK_ROWS, then balanced so that every chunk has about the same number of rows (a
    multiple of 8 where that does not make one chunk more)."""
    if n <= 0:
        return 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES_OTHER)
    rows = max(MIN_CHUNK_ROWS, budget // max(1, num_classes * itemsize))
    if rows >= n:
        return n
    chunks = -(-n // rows)
    rows = -(-n // chunks)  # balanced
    rounded = -(-rows // 8) * 8
    return rounded if -(-n // rounded) == chunks else rows


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(n, start + chunk_size)


def _denominator(target: Tensor, weight: Optional[Tensor], ignore_index: int, num_classes: int, dtype) -> Tensor:
    """torch's denominator of a 'mean' cross-entropy: the sum of the class weights of the
    non-ignored targets (their count without weights), computed on the device. Out-of-range
    targets are clamped here; the kernel reports them."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum(dtype=dtype)
    index = torch.where(valid, target.long(), 0).clamp(0, max(num_classes - 1, 0))
    return (weight.to(dtype)[index] * valid).sum()


_MIXED_ADDMM = {}


def _mixed_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch multiplies `dtype` matrices into a float32 `out` on the device
    (addmm's out_dtype: CUDA, in recent torch), asked once per (device type, dtype) with a 2x2
    product (an older torch refuses the dtype mix, and the weight's gradient then takes the tile
    path)."""
    key = (device.type, dtype)
    if key not in _MIXED_ADDMM:
        ok = device.type == "cuda"
        if ok:
            try:
                a = torch.zeros((2, 2), dtype=dtype, device=device)
                out = torch.zeros((2, 2), dtype=torch.float32, device=device)
                torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
            except (RuntimeError, TypeError):
                ok = False
        _MIXED_ADDMM[key] = ok
    return _MIXED_ADDMM[key]


def _add_weight_grad(d_weight: Tensor, g: Tensor, x: Tensor, tile: Optional[Tensor], first: bool):
    """d_weight += g.T @ x (d_weight = g.T @ x for the first chunk: no zero-filled start), the
    product in g's dtype, accumulated in d_weight's (float32 for 16-bit inputs with several
    chunks: each chunk's product is rounded once, their sum is not)."""
    if d_weight.dtype == g.dtype:
        if first:
            torch.mm(g.t(), x, out=d_weight)
        else:
            d_weight.addmm_(g.t(), x)
        return
    if tile is None:  # cuBLAS: a 16-bit product accumulated into float32 (see _mixed_addmm)
        torch.addmm(d_weight, g.t(), x, beta=0 if first else 1, out_dtype=d_weight.dtype, out=d_weight)
        return
    # Elsewhere (the CPU, or a torch without the mixed-dtype product) the product goes through a
    # 16-bit tile of at most tile.shape[0] classes, added to the float32 accumulator. (The
    # mixed-dtype add costs about a tenth of the bf16 product's time per chunk on 2 CPU cores: the
    # price of float32 accumulation.)
    rows = tile.shape[0]
    for v0, v1 in _chunks(d_weight.shape[0], rows):
        part = tile[: v1 - v0]
        torch.mm(g[:, v0:v1].t(), x, out=part)
        if first:
            d_weight[v0:v1].copy_(part)
        else:
            d_weight[v0:v1].add_(part)


class _ComposedChunkOps:
    """Stand-ins for the three cross-entropy ops the loop calls, in torch ops, for devices that have
    no fused_loss kernel of them (CUDA, until its cross-entropy kernels exist): the same arguments
    and results (without statistics), from composed_cross_entropy's per-row math over one chunk, so
    the loop still never holds more than one chunk of logits. Slower than the kernels (several
    passes, float32 temporaries of the chunk's size)."""

    @staticmethod
    def _rows(logits, target, weight, reduction, ignore_index, label_smoothing, softcap, temperature, z_loss):
        eps = label_smoothing if label_smoothing > 0 else 0.0  # torch: a negative or NaN smoothing is none
        opts = Options(ignore_index, composite.REDUCTION_NAMES[reduction], eps, softcap, temperature, z_loss)
        classes = logits.shape[1]
        rows = Rows(target, weight, 0, classes, classes, opts, logits.dtype)
        rows.merge([block_stats(logits, rows.local_target, rows.owned, rows.w_local, opts)], opts)
        return rows, opts

    @staticmethod
    def _grad(logits, rows, opts, scale):
        return block_grad(logits, rows.local_target, rows.owned, rows.w_local, rows.max_, rows.log_sum, rows.lse,
                          rows.wy, torch.where(rows.valid, scale, torch.zeros_like(scale)), opts, rows.num_classes,
                          rows.weight_total)

    @staticmethod
    def cross_entropy_forward_grad_in_place(logits, target, weight, reduction, ignore_index, label_smoothing,
                                            softcap=None, temperature=1.0, z_loss=0.0, return_stats=False):
        if return_stats:
            raise NotImplementedError(f"fused_loss.linear_cross_entropy: return_stats needs fused_loss's "
                                      f"cross-entropy kernel, which this build lacks for {logits.device.type}")
        rows, opts = _ComposedChunkOps._rows(logits, target, weight, reduction, ignore_index, label_smoothing,
                                             softcap, temperature, z_loss)
        logits.copy_(_ComposedChunkOps._grad(logits, rows, opts, torch.ones_like(rows.wy)))  # reduction 'sum'
        return rows.row_loss.sum(), logits.new_empty((0,), dtype=rows.wy.dtype)

    @staticmethod
    def cross_entropy_forward(logits, target, weight, reduction, ignore_index, label_smoothing, compute_grad,
                              softcap=None, temperature=1.0, z_loss=0.0, return_stats=False):
        if return_stats:
            _ComposedChunkOps.cross_entropy_forward_grad_in_place(logits, target, weight, reduction, ignore_index,
                                                                  label_smoothing, return_stats=True)
        rows, _ = _ComposedChunkOps._rows(logits, target, weight, reduction, ignore_index, label_smoothing,
                                          softcap, temperature, z_loss)
        stats = torch.stack([rows.max_, rows.log_sum])  # (2, rows), as the kernel's
        return rows.row_loss.to(logits.dtype), stats, logits.new_empty((0,))

    @staticmethod
    def cross_entropy_backward(grad_loss, logits, target, weight, stats, reduction, ignore_index, label_smoothing,
                               softcap=None, temperature=1.0, z_loss=0.0):
        rows, opts = _ComposedChunkOps._rows(logits, target, weight, reduction, ignore_index, label_smoothing,
                                             softcap, temperature, z_loss)
        return _ComposedChunkOps._grad(logits, rows, opts, grad_loss.to(rows.wy.dtype)).to(logits.dtype)


def chunk_ops(device: torch.device):
    """The cross-entropy ops of one chunk: fused_loss's kernels where this build has them."""
    if ("fused_loss::cross_entropy_forward_grad_in_place", device.type) in KERNELS:
        return ops
    return _ComposedChunkOps


def _chunked(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
             weight: Optional[Tensor], reduction: int, ignore_index: int, label_smoothing: float,
             softcap: Optional[float], temperature: float, z_loss: float, chunk_size: int, input_grad: bool,
             weight_grad: bool, bias_grad: bool, return_stats: bool, grad_loss: Optional[Tensor] = None,
             stats_in: Optional[Tensor] = None):
    """The chunked loop behind both ops.

    Forward (grad_loss None): (loss, stats, d_input, d_weight, d_bias); for mean/sum the
    gradients are those of an upstream gradient of 1 (empty tensors where not asked for);
    for 'none' no gradient is computed and stats holds each row's (max, log_sum).
    Backward (grad_loss given): the gradients for that upstream gradient (per row for 'none',
    with stats_in the forward's statistics; a scalar for mean/sum, recomputed from scratch).
    """
    n, h = input.shape
    v = linear_weight.shape[0]
    dtype, device = input.dtype, input.device
    ce = chunk_ops(device)
    acc = acc_dtype(dtype)
    backward = grad_loss is not None
    grads = (input_grad or weight_grad or bias_grad) and (reduction != 0 or backward)
    per_row = reduction == 0
    # The kernel reduces each chunk with 'sum'; 'mean' divides by the whole batch's denominator at the end.
    ce_reduction = 0 if per_row else REDUCTIONS["sum"]
    empty = input.new_empty((0,))

    loss_sum = torch.zeros((), dtype=acc, device=device)
    # The loss stays in the accumulation dtype: the caller rounds it to the input's (or, under autocast,
    # keeps the float32 torch gives).
    loss_rows = torch.empty((n,), dtype=acc, device=device) if per_row and not backward else None
    keep_stats = not backward and (per_row or return_stats)
    stats = torch.empty((5 if return_stats else 2, n), dtype=acc, device=device) if keep_stats else \
        torch.empty((0,), dtype=acc, device=device)
    d_input = torch.empty_like(input, memory_format=torch.contiguous_format) if grads and input_grad else empty
    # One chunk needs no accumulator: the product in the input's dtype is d_weight, as unfused.
    w_acc = acc if n > chunk_size else dtype
    d_weight = (torch.empty((v, h), dtype=w_acc, device=device) if grads and weight_grad and n > 0 else
                torch.zeros((v, h) if grads and weight_grad else (0,), dtype=w_acc, device=device))
    d_bias = (torch.zeros((v,), dtype=acc, device=device) if grads and bias_grad else empty)

    logits_buf = input.new_empty((min(chunk_size, n), v)) if n > 0 else None
    tile = None
    if grads and weight_grad and w_acc != dtype and not _mixed_addmm(device, dtype):
        tile = input.new_empty((max(1, min(v, logits_buf.numel() // max(1, h))), h))
    w_t = linear_weight.t()

    # The scale of the gradients: 1/denominator for 'mean', times the upstream gradient in the
    # backward. A denominator of 0 (every token ignored, or the targets' class weights sum to 0)
    # is torch's 0/0: NaN gradients for the rows not ignored, 0 for the ignored ones. So d_input
    # is scaled per row (`row_scale`: 0 for ignored rows, whose gradient is 0 anyway), and the
    # weight's and bias's gradients are NaN where a row is not ignored, else 0.
    scale = row_scale = None
    denominator = None
    if reduction == REDUCTIONS["mean"]:
        denominator = _denominator(target, weight, ignore_index, v, acc)
        scale = 1 / denominator
    if backward and not per_row:
        gl = grad_loss.to(acc)
        scale = gl if scale is None else scale * gl
    if scale is not None and grads:
        valid = target != ignore_index
        if denominator is not None:
            zero = denominator == 0
            row_scale = torch.where(valid, torch.where(zero, torch.nan, scale), 0).unsqueeze(1)
            scale = torch.where(zero, torch.where(valid.any(), torch.nan, 0), scale)
        else:
            row_scale = torch.where(valid, scale, 0).unsqueeze(1)
    # float16 (max 65504): each chunk's logit gradient is scaled before the products, as torch
    # does, so that the unscaled ('sum') weight gradient never has to fit float16's range (a
    # chunk of rows sharing a target class overflows it, e.g. 4096 rows with |x| = 40).
    prescale = grads and scale is not None and dtype == torch.float16

    for start, end in _chunks(n, chunk_size):
        x, t = input[start:end], target[start:end]
        logits = logits_buf[: end - start]
        if linear_bias is None:
            torch.mm(x, w_t, out=logits)
        else:
            torch.addmm(linear_bias, x, w_t, out=logits)
        if backward and per_row:
            g = ce.cross_entropy_backward(grad_loss[start:end], logits, t, weight, stats_in[:2, start:end], 0,
                                           ignore_index, label_smoothing, softcap, temperature, z_loss)
        else:
            options = (softcap, temperature, z_loss, return_stats and not backward)
            # The logits become their gradient: no second buffer of their size; also without
            # gradients for mean/sum, for the chunk's loss in the accumulation dtype.
            if grads or not per_row:
                loss, st = ce.cross_entropy_forward_grad_in_place(logits, t, weight, ce_reduction, ignore_index,
                                                                   label_smoothing, *options)
                g = logits
            else:
                loss, st, _ = ce.cross_entropy_forward(logits, t, weight, ce_reduction, ignore_index,
                                                        label_smoothing, False, *options)
            if not backward:
                if per_row:
                    loss_rows[start:end].copy_(loss)
                else:
                    loss_sum += loss
                if keep_stats:
                    stats[:, start:end].copy_(st)
        if not grads:
            continue
        if prescale:
            g.mul_(row_scale[start:end])
        if input_grad:
            torch.mm(g, linear_weight, out=d_input[start:end])
        if weight_grad:
            _add_weight_grad(d_weight, g, x, tile, start == 0)
        if bias_grad:
            d_bias += g.sum(0, dtype=acc)
        del g

    if grads and scale is not None and not prescale:
        if input_grad:
            d_input.mul_(row_scale)
        if weight_grad:
            d_weight.mul_(scale)
        if bias_grad:
            d_bias.mul_(scale)
    d_weight = d_weight.to(dtype) if grads and weight_grad else input.new_empty((0,))
    d_bias = d_bias.to(dtype) if grads and bias_grad else input.new_empty((0,))
    if backward:
        return d_input, d_weight, d_bias
    if per_row:
        loss = loss_rows
    elif denominator is not None:  # a denominator of 0: NaN, as torch's 0/0 (even where smoothing adds more)
        loss = torch.where(denominator == 0, torch.nan, loss_sum / denominator)
    else:
        loss = loss_sum
    return loss, stats, d_input, d_weight, d_bias


# --- the ops ------------------------------------------------------------------------------------

@torch.library.custom_op("fused_loss::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor], weight: Optional[Tensor],
    reduction: int, ignore_index: int, label_smoothing: float, softcap: Optional[float], temperature: float,
    z_loss: float, chunk_size: int, input_grad: bool, weight_grad: bool, bias_grad: bool, return_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, stats, d_input, d_weight, d_bias) of cross_entropy(input @ linear_weight.T +
    linear_bias, target) for input (N, H), linear_weight (V, H), target (N,). With reduction mean
    or sum, the gradients asked for (input_grad, weight_grad, bias_grad) are those of an upstream
    gradient of 1, computed in the same chunked pass (others are empty). stats: (2, N) row max
    and log-sum for 'none' ((5, N) with return_stats: entropy, correct, z term too), else empty."""
    return _chunked(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                    softcap, temperature, z_loss, chunk_size, input_grad, weight_grad, bias_grad, return_stats)


@torch.library.custom_op("fused_loss::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_loss: Tensor, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
    weight: Optional[Tensor], stats: Tensor, reduction: int, ignore_index: int, label_smoothing: float,
    softcap: Optional[float], temperature: float, z_loss: float, chunk_size: int, input_grad: bool, weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_input, d_weight, d_bias) for the upstream gradient grad_loss (per row for 'none', with
    the forward's stats; a scalar for mean/sum, recomputed without stats), empty where not asked."""
    return _chunked(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                    softcap, temperature, z_loss, chunk_size, input_grad, weight_grad, bias_grad, False,
                    grad_loss=grad_loss, stats_in=stats)


def _grads_fake(input, linear_weight, input_grad, weight_grad, bias_grad, computed=True):
    def empty():
        return input.new_empty((0,))
    return (torch.empty_like(input, memory_format=torch.contiguous_format) if computed and input_grad else empty(),
            input.new_empty(linear_weight.shape) if computed and weight_grad else empty(),
            input.new_empty(linear_weight.shape[:1]) if computed and bias_grad else empty())


@linear_cross_entropy_forward.register_fake
def _(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, softcap,
      temperature, z_loss, chunk_size, input_grad, weight_grad, bias_grad, return_stats):
    torch._check(input.dim() == 2 and linear_weight.dim() == 2, lambda: "expected 2-D input and linear_weight")
    torch._check(input.shape[1] == linear_weight.shape[1], lambda: "input and linear_weight differ in in_features")
    torch._check(target.shape == input.shape[:1], lambda: "expected target of shape (N,)")
    n = input.shape[0]
    loss = input.new_empty((n,) if reduction == 0 else (), dtype=acc_dtype(input.dtype))
    keep = reduction == 0 or return_stats
    stats = input.new_empty((5 if return_stats else 2, n) if keep else (0,), dtype=acc_dtype(input.dtype))
    return (loss, stats, *_grads_fake(input, linear_weight, input_grad, weight_grad, bias_grad, reduction != 0))


@linear_cross_entropy_backward.register_fake
def _(grad_loss, input, linear_weight, target, linear_bias, weight, stats, reduction, ignore_index, label_smoothing,
      softcap, temperature, z_loss, chunk_size, input_grad, weight_grad, bias_grad):
    return _grads_fake(input, linear_weight, input_grad, weight_grad, bias_grad)


# --- autograd -----------------------------------------------------------------------------------

def _traced(t: Tensor) -> bool:
    """Whether t is a tensor being traced (torch.compile, make_fx, opcheck's AOT checks), where
    buffers are never scaled in place."""
    return torch.compiler.is_compiling() or is_fake(t) or isinstance(t, FunctionalTensor)


def _setup_context(ctx, inputs, output):
    (input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, softcap,
     temperature, z_loss, chunk_size, input_grad, weight_grad, bias_grad, _) = inputs
    _, stats, d_input, d_weight, d_bias = output
    ctx.mark_non_differentiable(stats, d_input, d_weight, d_bias)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, stats if reduction == 0 else None)
    ctx.args = (reduction, ignore_index, label_smoothing, softcap, temperature, z_loss, chunk_size)
    # The gradients from the forward, until handed out (as ops.py keeps cross-entropy's): an
    # attribute, not saved tensors, so that autograd can keep each buffer as .grad without a
    # copy and a later in-place accumulation into it trips no saved-tensor version check.
    ctx.in_pass = None
    if reduction != 0:
        ctx.in_pass = (d_input if input_grad else None, d_weight if weight_grad else None,
                       d_bias if bias_grad else None)


def _composite_grads(ctx, grad_loss, needs):
    """Differentiable gradients (create_graph: double backward) from the unfused formula."""
    input, linear_weight, target, linear_bias, weight, _ = ctx.saved_tensors
    reduction, ignore_index, label_smoothing, softcap, temperature, z_loss, _ = ctx.args

    def loss_fn(x, w, b):
        return reference.linear_cross_entropy_with_options(
            x, w, target, linear_bias=b, weight=weight, reduction=composite.REDUCTION_NAMES[reduction],
            ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap, temperature=temperature,
            z_loss=z_loss)
    return composite.vjp(loss_fn, [input, linear_weight, linear_bias], needs, grad_loss)


def _backward(ctx, grad_loss, grad_stats, grad_d_input, grad_d_weight, grad_d_bias):
    nones = (None,) * 11  # the non-tensor arguments
    in_pass, ctx.in_pass = ctx.in_pass, None  # handed out (or dropped) once, never read twice
    if grad_loss is None:
        return (None, None, None, None, None, *nones)
    if ctx.needs_input_grad[4]:
        raise NotImplementedError("fused_loss.linear_cross_entropy: the derivative for 'weight' is not "
                                  "implemented for class-index targets (as in torch)")
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]]
    if not any(needs):
        return (None, None, None, None, None, *nones)
    if torch.is_grad_enabled():  # create_graph: the result must itself be differentiable
        gx, gw, gb = _composite_grads(ctx, grad_loss, needs)
        return (gx, gw, None, gb, None, *nones)
    if in_pass is not None and all(g is not None for g, need in zip(in_pass, needs) if need):
        wanted = [g if need else None for g, need in zip(in_pass, needs)]
        if _traced(grad_loss):
            # Traced (torch.compile): a product, so that every call of the compiled backward is right.
            wanted = [None if g is None else g * grad_loss for g in wanted]
        elif not _is_exactly_one(grad_loss):
            # Scaled in place: these buffers were never handed out, nobody else can see them.
            for g in wanted:
                if g is not None:
                    g.mul_(grad_loss)
        return (wanted[0], wanted[1], None, wanted[2], None, *nones)
    # Recomputed: 'none' (per-row upstream gradients), or a second backward through a retained graph.
    input, linear_weight, target, linear_bias, weight, stats = ctx.saved_tensors
    reduction, ignore_index, label_smoothing, softcap, temperature, z_loss, chunk_size = ctx.args
    if stats is None:
        stats = torch.empty((0,), dtype=acc_dtype(input.dtype), device=input.device)
    gx, gw, gb = linear_cross_entropy_backward(grad_loss, input, linear_weight, target, linear_bias, weight, stats,
                                               reduction, ignore_index, label_smoothing, softcap, temperature, z_loss,
                                               chunk_size, *needs)
    return (gx if needs[0] else None, gw if needs[1] else None, None, gb if needs[2] else None, None, *nones)


linear_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)
