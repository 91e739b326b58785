"""Benchmark output: progress bar, terminal table, CSV rows, and the markdown report, plots
and README table made from the CSV. `python -m benchmarks.report CSV [--readme README.md]`
regenerates them from a CSV alone."""
import argparse
import csv
import os
import sys
from collections import defaultdict

COLUMNS = ["run", "device", "device_name", "torch", "fused_loss", "commit", "bandwidth_gbs", "loss", "label",
           "sweep", "shape", "dtype", "mode", "provider", "status", "median_ms", "p20_ms", "p80_ms", "floor_ms",
           "peak_mem_mb", "note"]
README_BEGIN, README_END = "<!-- benchmark-table:begin -->", "<!-- benchmark-table:end -->"


def progress(items, desc):
    """tqdm when installed (the 'bench' extra), else one line per item."""
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr)
    except ImportError:
        def plain():
            for i, item in enumerate(items):
                print(f"{desc} {i + 1}/{len(items)}", file=sys.stderr, flush=True)
                yield item
        return plain()


def append_csv(path, rows):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _case_key(r):
    return (r["loss"], r["label"], r["shape"], r["dtype"], r["mode"])


def latest_rows(rows):
    """The newest row of each (case, mode, provider)."""
    best = {}
    for r in rows:
        k = _case_key(r) + (r["provider"],)
        if k not in best or r["run"] >= best[k]["run"]:
            best[k] = r
    return list(best.values())


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def with_ratios(rows):
    """Adds x_floor, vs_torch and vs_compile, each from rows of the same run."""
    by = {(r["run"],) + _case_key(r) + (r["provider"],): r for r in rows}
    out = []
    for r in rows:
        r = dict(r)
        t, floor = _num(r["median_ms"]), _num(r["floor_ms"])
        r["x_floor"] = t / floor if t and floor else None
        for other, col in (("torch", "vs_torch"), ("torch_compile", "vs_compile")):
            o = by.get((r["run"],) + _case_key(r) + (other,))
            ot = _num(o["median_ms"]) if o and o["status"] == "ok" else None
            r[col] = ot / t if ot and t and r["status"] == "ok" else None
        out.append(r)
    return out


def _fmt(v, spec, suffix=""):
    return "" if v is None else format(v, spec) + suffix


def table_rows(rows):
    """Header and cells of the summary table."""
    head = ["loss", "case", "shape", "dtype", "mode", "provider", "median ms (p20-p80)", "x floor", "speed-up vs eager",
            "vs compile", "peak MB", "copy GB/s", "status"]
    body = []
    order = {"fused_loss": 0, "torch": 1, "torch_compile": 2, "liger": 3, "cce": 4}
    for r in sorted(with_ratios(rows), key=lambda r: (_case_key(r), order.get(r["provider"], 9))):
        t = _num(r["median_ms"])
        timing = "" if t is None else f"{t:.3g} ({_num(r['p20_ms']):.3g}-{_num(r['p80_ms']):.3g})"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
        body.append([r["loss"], r["label"], r["shape"], r["dtype"], r["mode"], r["provider"], timing,
                     _fmt(r["x_floor"], ".2f", "x"), _fmt(r["vs_torch"], ".1f", "x"), _fmt(r["vs_compile"], ".1f", "x"),
                     r["peak_mem_mb"], r["bandwidth_gbs"], status])
    return head, body


def terminal_table(rows):
    head, body = table_rows(rows)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def markdown_table(rows):
    head, body = table_rows(rows)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in b) + " |" for b in body]
    return "\n".join(out)


def plot_sweeps(rows, out_dir, device):
    """One PNG per (loss, sweep, mode, dtype): time and peak memory against the swept size,
    one line per provider. Needs matplotlib (the 'bench' extra); returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = defaultdict(list)
    for r in rows:
        if r["sweep"] and r["status"] in ("ok", "wrong") and _num(r["median_ms"]) is not None:
            groups[(r["loss"], r["sweep"], r["mode"], r["dtype"])].append(r)
    written = []
    for (loss, sweep, mode, dtype), rs in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for prov in sorted({r["provider"] for r in rs}):
            pts = sorted(((_size(r["shape"]), _num(r["median_ms"]), _num(r["peak_mem_mb"])) for r in rs
                          if r["provider"] == prov), key=lambda p: p[0])
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax_m.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=prov)
        floor = sorted({(_size(r["shape"]), _num(r["floor_ms"])) for r in rs})
        ax_t.plot([p[0] for p in floor], [p[1] for p in floor], "k--", label="memory floor")
        for ax, what in ((ax_t, "time (ms, median)"), (ax_m, "peak memory of the step (MB)")):
            ax.set_xlabel(f"{sweep}: last dimension" if sweep else "size")
            ax.set_ylabel(what)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"{loss}, {mode}, {dtype} on {device}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{device}-{loss}-{sweep}-{mode}-{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _size(shape):
    return int(shape.split("x")[-1] if "x" in shape else shape)


def write_report(csv_path):
    """<device>.md (latest result of every case) and the sweep plots beside the CSV."""
    rows = latest_rows(read_csv(csv_path))
    out_dir = os.path.dirname(os.path.abspath(csv_path))
    device = os.path.splitext(os.path.basename(csv_path))[0]
    name = rows[0]["device_name"] if rows else device
    md_path = os.path.join(out_dir, f"{device}.md")
    with open(md_path, "w") as f:
        f.write(f"# Benchmarks on {name}\n\nGenerated from `{os.path.basename(csv_path)}` by `benchmarks/report.py`: "
                "the newest result of each case. Ratios compare rows of the same run; `x floor` is the median "
                "time over the memory floor (the bytes the loss must move at the copy bandwidth measured in that "
                "run; for linear_cross_entropy, the time of its matrix products alone, measured in that run)."
                "\n\n")
        f.write(markdown_table(rows) + "\n")
    return [md_path] + plot_sweeps(rows, out_dir, device)


def update_readme(readme, csv_path, include_sweeps=False):
    rows = [r for r in latest_rows(read_csv(csv_path)) if include_sweeps or not r["sweep"]]
    rows = [r for r in rows if r["label"] not in ("tiny", "custom")]
    with open(readme) as f:
        text = f.read()
    a, b = text.index(README_BEGIN), text.index(README_END)
    meta = rows[0] if rows else {}
    commits = ", ".join(sorted({r["commit"] for r in rows})) or "?"
    block = (f"{README_BEGIN}\n_Measured on {meta.get('device_name', '?')}, torch {meta.get('torch', '?')}, "
             f"commit(s) {commits}; generated from `benchmarks/results/{os.path.basename(csv_path)}` "
             f"by `python -m benchmarks.report`._\n\n{markdown_table(rows)}\n")
    with open(readme, "w") as f:
        f.write(text[:a] + block + text[b:])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.report")
    p.add_argument("csv")
    p.add_argument("--readme", help="rewrite the benchmark table of this README from the CSV")
    a = p.parse_args(argv)
    print("\n".join(write_report(a.csv)))
    if a.readme:
        update_readme(a.readme, a.csv)


if __name__ == "__main__":
    main()
