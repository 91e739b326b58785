"""The CUDA cross-entropy kernels' host+device headers, run on the host through
tests/native/row_sums_driver.cpp (no GPU needed):
- row_sums.h, the per-thread row sums (max, sum of exponentials, entropy and linear sums
  gathered in one read, merged between threads): for rows split between 1 to 32 threads as the
  CUDA row kernels split them, the merged sums equal direct float64 formulas, with -inf, +inf and
  NaN logits;
- row_split.h, which elements each thread reads and writes: every element of a row exactly once,
  with its own value, nothing outside it, at every alignment, row length and group size."""
import math
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILER = shutil.which(os.environ.get("CXX", "c++"))
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler to build the driver")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = tmp_path_factory.mktemp("row_sums") / "driver"
    subprocess.run([COMPILER, "-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
                    f"-I{ROOT}/csrc/include", f"{ROOT}/tests/native/row_sums_driver.cpp", "-o", str(exe)],
                   check=True)
    return str(exe)


def _run(driver, cases, dtype):
    lines = [str(len(cases))]
    for x, u, threads, stats, linear in cases:
        lines.append(f"{len(x)} {threads} {int(stats)} {int(linear)}")
        lines.append(" ".join(repr(float(v)) for v in x))
        lines.append(" ".join(repr(float(v)) for v in u))
    out = subprocess.run([driver, "f" if dtype == torch.float32 else "d"], input="\n".join(lines) + "\n",
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [[float(v) for v in line.split()] for line in out if line]


def _expected(x, u):
    """max, log_sum, entropy, lin (relative to the shift: the max when finite, else 0), wsum and
    the raw max (NaN when the row holds one), in float64."""
    x, u = x.double(), u.double()
    finite_or_inf = x[~x.isnan()]
    m = finite_or_inf.max().item() if finite_or_inf.numel() else -math.inf
    shift = m if math.isfinite(m) else 0.0
    nan_row = bool(x.isnan().any()) or not math.isfinite(m)
    e = torch.exp(x - m) if math.isfinite(m) else None
    log_sum = math.nan if nan_row else math.log(e.sum().item())
    if nan_row:
        entropy = math.nan
    else:
        p = e / e.sum()
        entropy = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum().item()
    lin = (u * (x - shift)).sum().item()
    raw = math.nan if bool(x.isnan().any()) else m
    return m, log_sum, entropy, lin, u.sum().item(), raw


def _cases(seed):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for n in (1, 3, 4, 5, 17, 64, 129, 300):
        for threads in (1, 2, 4, 32):
            x = torch.randn(n, generator=g, dtype=torch.float64) * 5
            u = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
            cases.append((x, u, threads))
    special = []
    for threads in (1, 4, 32):
        x = torch.randn(40, generator=g, dtype=torch.float64)
        neg = x.clone()
        neg[:9] = -math.inf  # a thread's first values all -inf (the review's NaN)
        special.append(neg)
        scattered = x.clone()
        scattered[::3] = -math.inf
        special.append(scattered)
        special.append(torch.full((40,), -math.inf, dtype=torch.float64))
        pos = x.clone()
        pos[17] = math.inf
        special.append(pos)
        nan = x.clone()
        nan[5] = math.nan
        special.append(nan)
        special.append(x + 1e4)
        for s in special[-6:]:
            cases.append((s, torch.rand(40, generator=g, dtype=torch.float64) + 0.1, threads))
    return cases


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_merged_row_sums_equal_direct_formulas(driver, dtype, rtol):
    cases = _cases(0)
    results = _run(driver, [(x.to(dtype), u.to(dtype), t, True, True) for x, u, t in cases], dtype)
    assert len(results) == len(cases)
    for (x, u, threads), got in zip(cases, results):
        x, u = x.to(dtype), u.to(dtype)
        m, s, h, lin, wsum, raw, log_sum, entropy = got
        want = _expected(x, u)
        what = f"n={len(x)} threads={threads} x[:6]={x[:6].tolist()}"
        assert m == want[0], what
        for name, a, b in (("log_sum", log_sum, want[1]), ("entropy", entropy, want[2])):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rtol, abs=rtol), (name, what)
        if math.isfinite(want[3]):
            scale = (u.double() * (x.double() - (m if math.isfinite(m) else 0)).abs()).sum().item()
            assert lin == pytest.approx(want[3], abs=rtol * max(scale, 1.0)), ("lin", what)
        else:
            assert lin == want[3] or (math.isnan(lin) and math.isnan(want[3])), ("lin", what)
        assert wsum == pytest.approx(want[4], rel=rtol), ("wsum", what)
        assert (math.isnan(raw) and math.isnan(want[5])) or raw == want[5], ("raw", what)


def test_the_split_does_not_change_more_than_rounding(driver):
    """The same row over 1 and 32 threads: the same max, sums equal to rounding."""
    x = torch.randn(1000, dtype=torch.float64) * 3
    u = torch.rand(1000, dtype=torch.float64)
    one, many = _run(driver, [(x, u, 1, True, True), (x, u, 32, True, True)], torch.float64)
    assert one[0] == many[0]
    for a, b in zip(one[1:], many[1:]):
        assert a == pytest.approx(b, rel=1e-13, abs=1e-12)


def test_every_element_of_a_row_is_read_and_written_once(driver):
    run = subprocess.run([driver, "split"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
