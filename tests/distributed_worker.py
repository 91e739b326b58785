"""One rank of the 2-process gloo checks of tests/test_distributed.py (run as a script: rank,
world size, store file, output file). Every rank builds the same full logits from a seed, takes its
slice of the classes, and compares fused_loss's vocab-parallel results with the unsharded ones;
failures are written to the output file (one JSON list per rank), so one pair of processes checks
every case."""
import datetime
import functools
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fused_loss
from fused_loss import reference
from helpers import assert_close_to_torch  # tests/ is this script's directory: on sys.path

OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.2),
    dict(weighted=True, label_smoothing=0.1),
    dict(weighted=True, reduction="sum", ignore_index=3),
    dict(softcap=3.0, temperature=0.8, z_loss=1e-2),
    dict(softcap=2.0, weighted=True, label_smoothing=0.3, z_loss=0.1, reduction="none"),
]
SPLITS = {"even": [12, 12], "uneven": [5, 19], "empty slice": [0, 24]}


def full_case(seed, dtype, rows=29, classes=24, hidden=16):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=g)
    target[::6] = -100
    target[1] = 3
    weight = torch.rand(classes, generator=g, dtype=torch.float64) + 0.5
    hidden_states = torch.randn(rows, hidden, generator=g, dtype=torch.float64).to(dtype)
    head = (torch.randn(classes, hidden, generator=g, dtype=torch.float64) / 2).to(dtype)
    bias = torch.randn(classes, generator=g, dtype=torch.float64).to(dtype)
    return logits, target, weight, hidden_states, head, bias


def kwargs_of(opts, weight, target):
    """The call's keyword arguments; with another ignore_index, the target's -100 become class 0."""
    kw = {k: v for k, v in opts.items() if k != "weighted"}
    if "ignore_index" in kw:
        target.masked_fill_(target == -100, 0)
    if opts.get("weighted"):
        kw["weight"] = weight
    return kw


def unsharded(logits, target, kw):
    return reference.cross_entropy_with_options(
        logits, target, kw.get("weight"), kw.get("ignore_index", -100), kw.get("reduction", "mean"),
        kw.get("label_smoothing", 0.0), kw.get("softcap"), kw.get("temperature", 1.0), kw.get("z_loss", 0.0))


def close(got, want, what, atol, rtol):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_plain(rank, split, opts, dtype):
    sizes = SPLITS[split]
    start = sum(sizes[:rank])
    logits, target, weight, *_ = full_case(1, dtype, classes=sum(sizes))
    kw = kwargs_of(opts, weight if dtype == torch.float64 else weight.to(torch.float32), target)
    full = logits.detach().to(torch.float64, copy=True).requires_grad_()
    want = unsharded(full, target, {**kw, "weight": kw["weight"].double()} if "weight" in kw else kw)
    upstream = torch.linspace(0.5, 1.5, want.numel(), dtype=torch.float64).reshape(want.shape)
    want.backward(upstream)
    shard = logits[:, start:start + sizes[rank]].detach().clone().requires_grad_()
    got = fused_loss.vocab_parallel_cross_entropy(shard, target, **kw)
    assert got.dtype == dtype, (got.dtype, dtype)
    got.backward(upstream.to(got.dtype))
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
    close(got.double(), want.detach(), "loss", **tol)
    close(shard.grad.double(), full.grad[:, start:start + sizes[rank]], "grad", **tol)


def check_linear(rank, split, opts, with_bias, dtype=torch.float64):
    """With bfloat16, the unsharded reference is float64 of the same bfloat16 values."""
    sizes = SPLITS[split]
    start = sum(sizes[:rank])
    _, target, weight, hidden_states, head, bias = full_case(2, dtype, classes=sum(sizes))
    kw = kwargs_of(opts, weight, target)
    x, w, b = (t.double().clone().requires_grad_() for t in (hidden_states, head, bias))
    want = unsharded(F.linear(x, w, b if with_bias else None), target, kw)
    upstream = torch.linspace(0.5, 1.5, want.numel(), dtype=torch.float64).reshape(want.shape)
    want.backward(upstream)
    x2 = hidden_states.clone().requires_grad_()
    w2 = head[start:start + sizes[rank]].clone().requires_grad_()
    b2 = bias[start:start + sizes[rank]].clone().requires_grad_() if with_bias else None
    if dtype != torch.float64 and "weight" in kw:
        kw["weight"] = kw["weight"].float()
    got = fused_loss.vocab_parallel_linear_cross_entropy(x2, w2, target, linear_bias_shard=b2, chunk_size=7, **kw)
    assert got.dtype == dtype, (got.dtype, dtype)
    got.backward(upstream.to(dtype))
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=3e-2, rtol=3e-2)
    close(got.double(), want.detach(), "loss", **tol)
    close(x2.grad.double(), x.grad, "input grad", **tol)
    close(w2.grad.double(), w.grad[start:start + sizes[rank]], "weight grad", **tol)
    if with_bias:
        close(b2.grad.double(), b.grad[start:start + sizes[rank]], "bias grad", **tol)


def check_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    logits, target, *_ = full_case(3, torch.float64, classes=13)  # uneven: torch gives 7 and 6 classes
    full = logits.clone().requires_grad_()
    want = unsharded(full, target, dict(label_smoothing=0.1))
    want.backward()
    dt = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
    got = fused_loss.vocab_parallel_cross_entropy(dt, target, label_smoothing=0.1)
    got.backward()
    close(got, want.detach(), "dtensor loss", atol=1e-12, rtol=1e-10)
    close(dt.grad.full_tensor(), full.grad, "dtensor grad", atol=1e-12, rtol=1e-10)


def check_collectives(rank):
    """The plain op's forward: one all_gather of statistics (two with the slice sizes); backward: none."""
    calls = []
    original = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "all_gather_into_tensor",
                                                         "broadcast", "reduce_scatter", "all_to_all")}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return original[name](*args, **kwargs)
        return call

    logits, target, *_ = full_case(4, torch.float64)
    shard = logits[:, rank * 12:(rank + 1) * 12].clone().requires_grad_()
    try:
        for name in original:
            setattr(dist, name, counting(name))
        loss = fused_loss.vocab_parallel_cross_entropy(shard, target, class_start=rank * 12, num_classes=24)
        forward_known, calls[:] = list(calls), []
        loss.backward()
        backward, calls[:] = list(calls), []
        fused_loss.vocab_parallel_cross_entropy(shard, target)
        forward_gathered = list(calls)
    finally:
        for name, fn in original.items():
            setattr(dist, name, fn)
    assert forward_known == ["all_gather"], forward_known
    assert backward == [], backward
    assert forward_gathered == ["all_gather", "all_gather"], forward_gathered


def check_batched_and_bitwise_equal(rank, world):
    """(B, T, C_r) slices with a (B, T) target; every rank's loss and row losses are bitwise equal
    (the statistics are merged in rank order from the same gathered values)."""
    sizes = SPLITS["uneven"]
    start = sum(sizes[:rank])
    logits, target, *_ = full_case(6, torch.float32, rows=30, classes=sum(sizes))
    logits, target = logits.reshape(5, 6, -1), target.reshape(5, 6)
    mine = slice(start, start + sizes[rank])

    def unsharded_loss_and_grad(logits):
        full = logits.clone().requires_grad_()
        want = F.cross_entropy(full.transpose(1, 2), target, label_smoothing=0.1)  # torch's (N, C, d) layout
        want.backward()
        return want.detach(), full.grad[..., mine]

    want, want_grad = unsharded_loss_and_grad(logits)
    float64 = functools.cache(lambda: unsharded_loss_and_grad(logits.double()))  # tests/helpers.py's rule
    shard = logits[..., mine].clone().requires_grad_()
    got = fused_loss.vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1)
    got.backward()
    assert_close_to_torch(got.detach(), want, lambda: float64()[0], "batched loss", tol=dict(atol=1e-5, rtol=1e-5))
    assert_close_to_torch(shard.grad, want_grad, lambda: float64()[1], "batched grad", tol=dict(atol=1e-6, rtol=1e-5))
    per_row = fused_loss.vocab_parallel_cross_entropy(shard.detach(), target, reduction="none", z_loss=1e-3)
    assert per_row.shape == target.shape, per_row.shape
    for mine in (got.detach(), per_row):
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        assert all(torch.equal(every[0], t) for t in every), "the ranks' losses differ"


def check_dtensor_last_dim(rank, world):
    """Shard(-1) of (B, T, C) logits, reduction 'none' (a plain (B, T) tensor on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    logits, target, *_ = full_case(7, torch.float64, rows=12, classes=11)
    logits, target = logits.reshape(3, 4, 11), target.reshape(3, 4)
    full = logits.clone().requires_grad_()
    want = unsharded(full.reshape(12, 11), target.reshape(12), dict(reduction="none", z_loss=1e-2)).reshape(3, 4)
    upstream = torch.linspace(0.5, 1.5, 12, dtype=torch.float64).reshape(3, 4)
    want.backward(upstream)
    dt = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_()
    got = fused_loss.vocab_parallel_cross_entropy(dt, target, reduction="none", z_loss=1e-2)
    assert type(got) is torch.Tensor and got.shape == (3, 4), (type(got), got.shape)
    got.backward(upstream)
    close(got, want.detach(), "dtensor loss", atol=1e-12, rtol=1e-10)
    close(dt.grad.full_tensor(), full.grad, "dtensor grad", atol=1e-12, rtol=1e-10)


def check_inconsistent_slices(rank):
    """Slices given by class_start/num_classes that overlap, leave a gap or disagree on C, and row
    counts that differ, raise the same error on every rank (no hang, no silent wrong loss)."""
    logits, target, *_ = full_case(8, torch.float64)
    shard = logits[:, rank * 12:(rank + 1) * 12]
    for what, kw in [("overlap", dict(class_start=0, num_classes=24)),
                     ("gap", dict(class_start=rank * 12, num_classes=25)),
                     ("class counts", dict(class_start=rank * 12, num_classes=24 + rank))]:
        try:
            fused_loss.vocab_parallel_cross_entropy(shard, target, **kw)
        except ValueError as e:
            assert str(e).startswith("fused_loss.") and "slices" in str(e), str(e)
        else:
            raise AssertionError(f"no error for slices with a {what}")
    rows = 5 + rank
    try:
        fused_loss.vocab_parallel_cross_entropy(shard[:rows], target[:rows])
    except ValueError as e:
        assert str(e).startswith("fused_loss.") and "rows" in str(e), str(e)
    else:
        raise AssertionError("no error for ranks with different rows")


def check_linear_collectives(rank):
    """The linear op: one all_gather in the forward, one all_reduce of d_input in the backward."""
    calls = []
    original = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return original[name](*args, **kwargs)
        return call

    _, target, _, hidden_states, head, _ = full_case(9, torch.float64)
    x = hidden_states.clone().requires_grad_()
    w = head[rank * 12:(rank + 1) * 12].clone().requires_grad_()
    try:
        for name in original:
            setattr(dist, name, counting(name))
        loss = fused_loss.vocab_parallel_linear_cross_entropy(x, w, target, class_start=rank * 12, num_classes=24,
                                                              chunk_size=4)
        forward, calls[:] = list(calls), []
        loss.backward()
        backward = list(calls)
    finally:
        for name, fn in original.items():
            setattr(dist, name, fn)
    assert forward == ["all_gather"], forward  # one, whatever the number of chunks (8 here)
    assert backward == ["all_reduce"], backward


def check_bad_target(rank):
    logits, target, *_ = full_case(5, torch.float64)
    target[2] = 24
    try:
        fused_loss.vocab_parallel_cross_entropy(logits[:, rank * 12:(rank + 1) * 12], target)
    except IndexError as e:
        assert "fused_loss" in str(e) and "24" in str(e), str(e)
    else:
        raise AssertionError("no error for a target out of range")


def main():
    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    # A short timeout: a collective that one rank skipped fails the run instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    cases = [(f"plain {split} {opts} {dtype}", lambda s=split, o=opts, d=dtype: check_plain(rank, s, o, d))
             for split in SPLITS for opts in OPTIONS for dtype in (torch.float64,)]
    cases += [(f"plain uneven {opts} bfloat16", lambda o=opts: check_plain(rank, "uneven", o, torch.bfloat16))
              for opts in OPTIONS[:4]]
    cases += [(f"linear {split} {opts} bias={b}", lambda s=split, o=opts, b=b: check_linear(rank, s, o, b))
              for split in ("even", "uneven") for opts in OPTIONS[::2] for b in (False, True)]
    cases += [(f"linear uneven {opts} bfloat16", lambda o=opts: check_linear(rank, "uneven", o, True, torch.bfloat16))
              for opts in OPTIONS[3:5]]
    cases += [("dtensor", lambda: check_dtensor(rank, world)), ("collectives", lambda: check_collectives(rank)),
              ("bad target", lambda: check_bad_target(rank)),
              ("batched, bitwise equal on the ranks", lambda: check_batched_and_bitwise_equal(rank, world)),
              ("dtensor Shard(-1)", lambda: check_dtensor_last_dim(rank, world)),
              ("inconsistent slices", lambda: check_inconsistent_slices(rank)),
              ("linear collectives", lambda: check_linear_collectives(rank))]
    failures = []
    for name, case in cases:
        try:
            case()
        except Exception:  # noqa: BLE001  (reported; the next case runs)
            failures.append(f"rank {rank}, {name}:\n{traceback.format_exc()}")
            print(failures[-1], flush=True)
        dist.barrier()  # both ranks at the same case: a failure on one rank must not shift the collectives
    with open(out, "w") as f:
        json.dump({"cases": len(cases), "failures": failures}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip the interpreter's teardown: gloo's threads sometimes abort in static destructors at exit
    # ("terminate called without an active exception") after everything above has finished.
    sys.stdout.flush()
    os._exit(0)
