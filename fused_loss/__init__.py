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
from .cross_entropy_options import CrossEntropyStats  # noqa: E402
from .functional import (  # noqa: E402
    binary_cross_entropy_with_logits,
    cross_entropy,
    huber_loss,
    linear_cross_entropy,
    sigmoid_focal_loss,
    smooth_l1_loss,
)
from .distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy  # noqa: E402
from .patching import Patch, is_patched, patch, unpatch  # noqa: E402
from .memory import cpu_cache_info, empty_cache, set_cpu_cache_limits  # noqa: E402
from .modules import (  # noqa: E402
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    HuberLoss,
    LinearCrossEntropyLoss,
    SmoothL1Loss,
)

__all__ = [
    "cross_entropy", "CrossEntropyStats", "binary_cross_entropy_with_logits", "smooth_l1_loss", "huber_loss", "sigmoid_focal_loss",
    "CrossEntropyLoss", "BCEWithLogitsLoss", "SmoothL1Loss", "HuberLoss",
    "linear_cross_entropy", "LinearCrossEntropyLoss",
    "cpu_cache_info", "set_cpu_cache_limits", "empty_cache",
    "patch", "unpatch", "is_patched", "Patch",
    "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
]
__version__ = "0.1.0"
