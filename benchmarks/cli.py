"""python -m benchmarks: measure every loss against torch eager, torch.compile and the memory
floor on this machine; print a table, append the rows to benchmarks/results/<device>.csv,
and write a markdown report and plots from that CSV."""
import argparse
import datetime
import os
import platform
import re
import subprocess
import sys

import torch

import fused_loss

from . import report
from .cases import DTYPES, LOSSES, select_cases
from .measure import copy_bandwidth, peak_memory, percentile, time_step
from .providers import PROVIDERS

MODES = ("forward", "backward", "full")
# Relative error (2-norm) allowed against torch eager before a result counts as wrong.
REL_TOL = {"float64": 1e-9, "float32": 1e-5, "bfloat16": 2e-2, "float16": 1e-2}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_info(device: str):
    """(file-safe device name, human-readable name)."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        return _slug(name), name
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"cpu-{_slug(model)}-{threads}t", f"{model} ({threads} threads)"


def project_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        # The results this runner appends do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    if ours.shape != ref.shape:
        return float("inf")
    if (ours.isnan() != ref.isnan()).any():
        return float("inf")
    finite = ~ref.isnan()
    denom = ref[finite].norm().item()
    return (ours[finite] - ref[finite]).norm().item() / (denom if denom > 0 else 1.0)


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def make_step(fn, args, kwargs, mode):
    """(setup, step) for a mode; the arguments that require grad are the differentiated leaves.
    'forward' is the loss alone, under torch.no_grad (as in evaluation: no provider prepares a
    backward)."""
    leaves = _leaves(args)

    def setup():
        for leaf in leaves:
            leaf.grad = None
        return fn(*args, **kwargs) if mode == "backward" else None

    def forward(_):
        with torch.no_grad():
            return fn(*args, **kwargs)

    if mode == "forward":
        return setup, forward
    if mode == "full":
        return setup, lambda _: fn(*args, **kwargs).backward()
    return setup, lambda loss: loss.backward()


def result_of(fn, args, kwargs, mode):
    """(loss, [gradient of each differentiated argument]) ([] for 'forward')."""
    loss = fn(*args, **kwargs)
    grads = [] if mode == "forward" else list(torch.autograd.grad(loss, _leaves(args)))
    return loss.detach(), grads


def run_case(case, mode, providers, device, opts, meta):
    spec = LOSSES[case.loss]
    args, kwargs = spec.make_inputs(case, device)
    args = tuple(a.requires_grad_() if i < spec.differentiated else a for i, a in enumerate(args))
    # Bandwidth measured beside each case (copying a buffer of the input's size), so that the
    # floor and the providers see the same state of a shared machine.
    bandwidth = copy_bandwidth(device, args[0].numel() * args[0].element_size())
    floor_ms = (spec.floor_time(case, mode, device, args) * 1e3 if spec.floor_time
                else spec.floor_bytes(case, mode) / bandwidth * 1e3)
    meta = dict(meta, bandwidth_gbs=round(bandwidth / 1e9, 2))
    ref = result_of(PROVIDERS["torch"].make(case.loss), args, kwargs, mode)
    rows = []
    for name in providers:
        prov = PROVIDERS[name]
        if not prov.applies(case.loss):  # a provider of other losses only: no row at all
            continue
        row = dict(meta, loss=case.loss, provider=name, mode=mode, dtype=case.dtype, shape=case.shape_str,
                   label=case.label, sweep=case.sweep, floor_ms=round(floor_ms, 4), median_ms="", p20_ms="",
                   p80_ms="", peak_mem_mb="", status="ok", note="")
        reason = prov.why_not(case.loss, device)
        if reason:
            rows.append(dict(row, status="skipped", note=reason))
            continue
        try:
            fn = prov.make(case.loss)
            got = result_of(fn, args, kwargs, mode)
            err = max([rel_error(got[0], ref[0])] + [rel_error(a, b) for a, b in zip(got[1], ref[1])])
            if err > REL_TOL[case.dtype]:
                row.update(status="wrong", note=f"relative error {err:.2e} against torch eager")
            setup, step = make_step(fn, args, kwargs, mode)
            times = time_step(setup, step, device, warmup=opts.warmup, min_reps=opts.min_reps,
                              max_reps=opts.max_reps, budget_s=opts.budget)
            mem = peak_memory(setup, step, device)
            row.update(median_ms=round(percentile(times, 50) * 1e3, 4), p20_ms=round(percentile(times, 20) * 1e3, 4),
                       p80_ms=round(percentile(times, 80) * 1e3, 4),
                       peak_mem_mb=round(mem / 2**20, 2) if mem >= 0 else "")
            if not row["note"]:
                row["note"] = f"{len(times)} reps"
        except NotImplementedError as e:  # the provider does not take this case's options
            row.update(status="skipped", note=str(e).splitlines()[0][:160])
        except Exception as e:  # a provider failing must not stop the run
            row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        rows.append(row)
        for leaf in _leaves(args):
            leaf.grad = None
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--loss", nargs="+", choices=sorted(LOSSES), default=sorted(LOSSES))
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="restrict to these dtypes (default: each case's own)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=["forward", "full"])
    p.add_argument("--sizes", default="default",
                   help="preset (quick, default, full, sweep; llm_head: the large linear_cross_entropy cases) or "
                        "shapes such as 4096x32000,1024x128256 (NxHxV for linear_cross_entropy)")
    p.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), default=None,
                   help="default: fused_loss torch torch_compile torch_lce torch_lce_chunked (the last two for "
                        "linear_cross_entropy only) (+ liger cce on cuda)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timing per provider and case")
    p.add_argument("--no-save", action="store_true", help="print only; write no CSV, report or plots")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    providers = opts.providers or (["fused_loss", "torch", "torch_compile", "torch_lce", "torch_lce_chunked"] +
                                   (["liger", "cce"] if opts.device == "cuda" else []))
    cases = select_cases(opts.loss, opts.sizes, opts.dtype)
    if not cases:
        print(f"no cases for --sizes {opts.sizes} --dtype {opts.dtype}", file=sys.stderr)
        return 2
    dev_slug, dev_name = device_info(opts.device)
    meta = dict(run=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), device=dev_slug,
                device_name=dev_name, torch=torch.__version__, fused_loss=fused_loss.__version__,
                commit=project_commit())
    print(f"{dev_name}; torch {torch.__version__}; commit {meta['commit']}")
    work = [(c, m) for c in cases for m in opts.mode]
    rows = []
    for case, mode in report.progress(work, desc="benchmark"):
        rows += run_case(case, mode, providers, opts.device, opts, meta)
    print(report.terminal_table(rows))
    if not opts.no_save:
        os.makedirs(opts.out, exist_ok=True)
        csv_path = os.path.join(opts.out, f"{dev_slug}.csv")
        report.append_csv(csv_path, rows)
        written = report.write_report(csv_path)
        print(f"rows appended to {csv_path}; wrote {', '.join(written)}")
    return 0
