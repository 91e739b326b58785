"""The CUDA kernels (elementwise losses so far): CPU-vs-CUDA agreement of values and gradients,
bitwise determinism run to run, and a CUDA-graph capture of forward and backward. Skipped unless
a GPU is visible, the CUDA kernels were built, and (until they are verified) FUSED_LOSS_CUDA_UNVERIFIED=1
(scripts/cuda_check.sh compile-checks them on machines without a GPU)."""
import pytest
import torch

import fused_loss

HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fused_loss::smooth_l1_loss_forward", "CUDA")
USED = ("fused_loss::smooth_l1_loss_forward", "cuda") in fused_loss.ops.KERNELS
pytestmark = [
    pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="no GPU visible, or fused_loss was built without its CUDA kernels"),
    pytest.mark.skipif(HAS_CUDA_KERNELS and not USED, reason="the CUDA kernels are not yet verified: run with "
                       "FUSED_LOSS_CUDA_UNVERIFIED=1 to test them (scripts/gpu_session.sh does)"),
]

DTYPES = [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-12, 1e-12), (torch.bfloat16, 1e-2, 1e-2),
          (torch.float16, 1e-3, 1e-3)]


def _losses():
    return {
        "bce": lambda x, t, **kw: fused_loss.binary_cross_entropy_with_logits(
            x, t, weight=kw.get("w"), pos_weight=kw.get("pw"), reduction=kw["reduction"]),
        "smooth_l1": lambda x, t, **kw: fused_loss.smooth_l1_loss(x, t, reduction=kw["reduction"], beta=0.5),
        "huber": lambda x, t, **kw: fused_loss.huber_loss(x, t, reduction=kw["reduction"], delta=0.7,
                                                          weight=kw.get("w_full")),
        "focal": lambda x, t, **kw: fused_loss.sigmoid_focal_loss(x, t, reduction=kw["reduction"]),
    }


def _case(dtype, shape=(37, 1029), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    pw = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    w_full = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, t, dict(w=w, pw=pw, w_full=w_full)


@pytest.mark.parametrize("name", list(_losses()))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype, rtol, atol", DTYPES)
def test_cuda_equals_cpu(name, reduction, dtype, rtol, atol):
    fn = _losses()[name]
    x, t, kw = _case(dtype)
    results = []
    for device in ("cpu", "cuda"):
        xd, td = x.to(device).requires_grad_(), t.to(device).requires_grad_()
        kwd = {k: v.to(device) for k, v in kw.items()}
        loss = fn(xd, td, reduction=reduction, **kwd)
        up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape).to(device)
        grads = torch.autograd.grad(loss, (xd, td), up)
        results.append([loss.cpu(), *[g.cpu() for g in grads]])
    for cpu, cuda in zip(*results):
        assert cuda.dtype == cpu.dtype and cuda.shape == cpu.shape
        torch.testing.assert_close(cuda, cpu, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(_losses()))
def test_bitwise_deterministic(name):
    """Two runs of forward and backward give the same bits (fixed-order reductions, no atomics)."""
    fn = _losses()[name]
    x, t, kw = _case(torch.float32, shape=(1024, 1031), seed=1)
    kw = {k: v.cuda() for k, v in kw.items()}
    outs = []
    for _ in range(2):
        xd = x.cuda().requires_grad_()
        loss = fn(xd, t.cuda(), reduction="mean", **kw)
        outs.append((loss.detach().clone(), torch.autograd.grad(loss, xd)[0]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_cuda_graph_capture_of_forward_and_backward():
    x = torch.randn(4096, 513, device="cuda", requires_grad=True)
    t = torch.rand(4096, 513, device="cuda")
    pos_weight = torch.rand(513, device="cuda") + 0.5

    def step():
        loss = (fused_loss.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight)
                + fused_loss.smooth_l1_loss(x, t, beta=0.5) + fused_loss.huber_loss(x, t))
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as CUDA graphs require
        for _ in range(2):
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    x_ref = x.detach().clone().requires_grad_()
    ref = (torch.nn.functional.binary_cross_entropy_with_logits(x_ref, t, pos_weight=pos_weight)
           + torch.nn.functional.smooth_l1_loss(x_ref, t, beta=0.5) + torch.nn.functional.huber_loss(x_ref, t))
    ref.backward()
    torch.testing.assert_close(captured, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_bad_input_on_cuda_raises():
    x = torch.randn(4, 5, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="Target size|must be the same"):
        fused_loss.smooth_l1_loss(x, torch.randn(4, 6, device="cuda"))
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fused_loss.smooth_l1_loss_forward(x, torch.randn(4, 5), 1, 1.0, False)
