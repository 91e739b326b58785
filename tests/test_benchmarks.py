"""The benchmark runner end to end on its tiny preset."""
import csv
import glob
import importlib.util
import os

import pytest

from benchmarks import cli, report
from benchmarks.providers import PROVIDERS


def test_runner_quick_preset_writes_csv_report_and_plot(tmp_path, capsys):
    rc = cli.main(["--sizes", "quick", "--out", str(tmp_path), "--providers", "fused_loss", "torch", "liger",
                   "--min-reps", "2", "--max-reps", "3", "--budget", "0.1"])
    assert rc == 0
    (csv_path,) = glob.glob(str(tmp_path / "*.csv"))
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.COLUMNS
        rows = list(reader)
    providers = {r["provider"] for r in rows}
    assert providers == {"fused_loss", "torch", "liger"}
    for r in rows:
        if r["provider"] == "liger":  # CUDA-only peer on a CPU run: skipped with a reason, not an error
            assert r["status"] == "skipped" and "CUDA" in r["note"]
        else:
            assert r["status"] == "ok", r
            assert float(r["median_ms"]) > 0 and float(r["floor_ms"]) > 0
            assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
    assert os.path.exists(csv_path[:-4] + ".md")
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib (the 'bench' extra) is not installed: no plots")
    assert glob.glob(str(tmp_path / "*.png"))
    assert "fused_loss" in capsys.readouterr().out


def test_missing_peer_is_reported_not_raised():
    if importlib.util.find_spec("liger_kernel") is None:
        assert "not installed" in PROVIDERS["liger"].why_not("cross_entropy", "cuda")
    assert PROVIDERS["cce"].why_not("cross_entropy", "cpu")


def test_wrong_provider_is_flagged(tmp_path, monkeypatch, capsys):
    """A provider whose result disagrees with torch eager is reported 'wrong'."""
    real = PROVIDERS["fused_loss"].make
    monkeypatch.setattr(PROVIDERS["fused_loss"], "make", lambda loss: (lambda *a, **k: real(loss)(*a, **k) * 1.01))
    rc = cli.main(["--sizes", "64x1000", "--out", str(tmp_path), "--providers", "fused_loss", "torch",
                   "--min-reps", "1", "--max-reps", "1", "--budget", "0", "--no-save"])
    assert rc == 0
    fused_line = next(line for line in capsys.readouterr().out.splitlines() if " fused_loss " in line)
    assert "wrong: relative error" in fused_line
