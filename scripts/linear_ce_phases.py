"""Where linear_cross_entropy's time goes: its chunked loop (logits product, the in-place
cross-entropy kernel, the d_input and d_weight products) timed per phase, beside the three
unchunked products. Usage: python scripts/linear_ce_phases.py [N H V [chunk ...]]."""
import sys
import time

import torch

import fused_loss  # noqa: F401  (registers the ops)


def chunked(x, w, t, rows):
    n, h = x.shape
    ops = torch.ops.fused_loss
    spent = dict(logits=0.0, cross_entropy=0.0, d_input=0.0, d_weight=0.0)
    buf, dx, dw = torch.empty(rows, w.shape[0]), torch.empty(n, h), torch.empty_like(w)
    for s in range(0, n, rows):
        xc, lc = x[s:s + rows], buf[: min(rows, n - s)]
        marks = [time.perf_counter()]
        torch.mm(xc, w.t(), out=lc)
        marks.append(time.perf_counter())
        ops.cross_entropy_forward_grad_in_place(lc, t[s:s + rows], None, 2, -100, 0.0)
        marks.append(time.perf_counter())
        torch.mm(lc, w, out=dx[s:s + rows])
        marks.append(time.perf_counter())
        torch.mm(lc.t(), xc, out=dw) if s == 0 else dw.addmm_(lc.t(), xc)
        marks.append(time.perf_counter())
        for k, (a, b) in zip(spent, zip(marks, marks[1:])):
            spent[k] += b - a
    return spent


def unchunked(x, w):
    marks = [time.perf_counter()]
    logits = x @ w.t()
    marks.append(time.perf_counter())
    logits @ w
    marks.append(time.perf_counter())
    logits.t() @ x
    marks.append(time.perf_counter())
    return dict(zip(("logits", "d_input", "d_weight"), (b - a for a, b in zip(marks, marks[1:]))))


def main():
    n, h, v = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (8192, 2048, 32000)
    chunks = [int(a) for a in sys.argv[4:]] or [512, 1024, n]
    torch.manual_seed(0)
    x, w, t = torch.randn(n, h) * 0.05, torch.randn(v, h) * 0.05, torch.randint(0, v, (n,))
    unchunked(x, w)  # warm-up
    for rows in chunks:
        spent = chunked(x, w, t, rows)
        print(f"chunks of {rows} rows: " + ", ".join(f"{k} {s:.2f} s" for k, s in spent.items())
              + f"; total {sum(spent.values()):.2f} s", flush=True)
    spent = unchunked(x, w)
    print("unchunked products: " + ", ".join(f"{k} {s:.2f} s" for k, s in spent.items())
          + f"; total {sum(spent.values()):.2f} s")


if __name__ == "__main__":
    main()
