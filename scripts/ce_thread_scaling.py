"""Cross-entropy at 1 and 2 threads beside copy_ and a read: whether the one-pass kernel is bound
by arithmetic (its time halves with a second core) or by memory (the copy's does not).
Usage: python scripts/ce_thread_scaling.py"""
import time

import torch

import fused_loss  # noqa: F401  (registers the ops)

ops = torch.ops.fused_loss
def med(fn, n=7):
    fn(); ts = []
    for _ in range(n):
        a = time.perf_counter(); fn(); ts.append(time.perf_counter() - a)
    return sorted(ts)[len(ts)//2] * 1e3
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(4096, 32000).to(dt); t = torch.randint(0, 32000, (4096,)); out = torch.empty_like(x)
    for th in (1, 2):
        torch.set_num_threads(th)
        r = dict(copy=med(lambda: out.copy_(x)), read=med(lambda: x.sum()),
                 stats=med(lambda: ops.cross_entropy_forward(x, t, None, 1, -100, 0.0, False)),
                 onepass=med(lambda: ops.cross_entropy_forward(x, t, None, 1, -100, 0.0, True)),
                 softcap=med(lambda: ops.cross_entropy_forward(x, t, None, 1, -100, 0.0, True, 30.0)))
        print(dt, th, "threads:", "  ".join(f"{k} {v:.1f}" for k, v in r.items()), f"| onepass/copy {r['onepass']/r['copy']:.2f} softcap/onepass {r['softcap']/r['onepass']:.2f}", flush=True)
