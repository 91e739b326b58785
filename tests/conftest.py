import os
import tempfile

# A fresh inductor cache per run: the shared one keys compiled graphs on torch, not on our
# fake kernels, and replays graphs compiled for another build of fused_loss.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fused_loss_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402

import fused_loss  # noqa: F401  (registers the ops)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    import fused_loss._C as C

    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, extension {C.__file__}"


# Hypothesis profiles for tests/test_fuzz.py: "ci" (default; derandomized, so CI runs are
# reproducible) and "long" (`pytest tests/test_fuzz.py --hypothesis-profile=long`). Registered
# here, not in the test module, because --hypothesis-profile is loaded before modules import.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is only needed by test_fuzz.py (which then skips)
    settings = None
if settings is not None:
    _fuzz = dict(deadline=None, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=60, derandomize=True, report_multiple_bugs=False, **_fuzz)
    settings.register_profile("long", max_examples=2500, **_fuzz)
    settings.load_profile("ci")
