import pytest
import torch

import fused_loss  # noqa: F401  (registers the ops)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    import fused_loss._C as C

    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, extension {C.__file__}"
