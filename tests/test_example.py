"""examples/train_lm.py: a few steps with each loss give the same losses; the comparison plot is
written; two data-parallel processes (torchrun, gloo) give the single process's losses."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_lm.py")
TINY = ["--steps", "4", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16",
        "--batch-size", "4", "--vocab-size", "3000", "--quiet"]


def _example():
    spec = importlib.util.spec_from_file_location("train_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_and_torch_losses_coincide(dtype, tmp_path):
    example = _example()
    runs = {kind: example.main([*TINY, "--dtype", dtype, "--loss", kind, "--out", str(tmp_path)])
            for kind in ("torch", "fused")}
    fused, ref = torch.tensor(runs["fused"]["losses"]), torch.tensor(runs["torch"]["losses"])
    assert len(fused) == 4 and bool(torch.isfinite(fused).all())
    assert not torch.equal(ref[0], ref[-1])  # it trains: the curve moves
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused, ref, **tol)
    example.plot(runs, str(tmp_path / "loss_curves.png"))
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics-fused.json").read_text())["losses"] == runs["fused"]["losses"]


def test_two_data_parallel_processes_equal_one(tmp_path):
    single = _example().main([*TINY, "--loss", "fused"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", SCRIPT, *TINY,
           "--loss", "fused", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun with 2 processes did not finish in 240 s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = json.loads((tmp_path / "metrics-fused.json").read_text())
    assert ddp["processes"] == 2
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-5)
