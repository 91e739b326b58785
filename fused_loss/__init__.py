"""fused_loss: fused, exact loss kernels for PyTorch, registered as torch ops."""
import torch  # noqa: F401  (loads libtorch before our library)

try:
    from . import _C  # noqa: F401  (registers the torch.ops.fused_loss operators)
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "fused_loss: the compiled extension fused_loss._C is missing or was built for another torch. "
        "Build it from the source tree with `pip install --no-build-isolation -e .` "
        f"(into the environment that has torch). Original error: {e}"
    ) from e

from . import ops  # noqa: F401,E402  (fake kernels and autograd)
from .functional import cross_entropy  # noqa: E402
from .modules import CrossEntropyLoss  # noqa: E402

__all__ = ["cross_entropy", "CrossEntropyLoss"]
__version__ = "0.1.0"
