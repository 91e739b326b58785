"""Who computes the loss: fused_loss, torch eager, torch.compile, and on CUDA the best peers
when importable. A provider that cannot run a case says why (it is then reported skipped)."""
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

import fused_loss
from fused_loss.reference import REFERENCES


@dataclass
class Provider:
    name: str
    # why_not(loss, device) -> None when it can run, else the reason it is skipped
    why_not: Callable[[str, str], Optional[str]]
    # make(loss) -> a function with the loss's signature
    make: Callable[[str], Callable]
    # the losses it computes (None: every loss); for the others it is not listed at all
    losses: Optional[Tuple[str, ...]] = None

    def applies(self, loss: str) -> bool:
        return self.losses is None or loss in self.losses


def _fused(loss):
    return getattr(fused_loss, loss)


def _fused_why_not(loss, device):
    if not hasattr(fused_loss, loss):
        return f"fused_loss has no {loss}"
    if device == "cuda" and not _has_cuda_kernels():
        return "fused_loss was built without CUDA kernels"
    return None


def _has_cuda_kernels() -> bool:
    try:
        x = torch.zeros(1, 2, device="cuda")
        torch.ops.fused_loss.cross_entropy_forward(x, torch.zeros(1, dtype=torch.long, device="cuda"), None, 1, -100, 0.0,
                                                   False)
        return True
    except (NotImplementedError, RuntimeError):
        return False


def _compiled(loss):
    torch._dynamo.reset()  # a fresh cache per case: no recompilation limits across cases
    return torch.compile(REFERENCES[loss], dynamic=False)


def _module_missing(module):
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def _liger(loss):
    if loss == "linear_cross_entropy":  # (untested here: no GPU on the machine this was written on)
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def lce(input, linear_weight, target, *, z_loss=0.0, **kw):
            return liger_fused_linear_cross_entropy(input, linear_weight, target, lse_square_scale=z_loss, **kw)

        return lce
    from liger_kernel.transformers.functional import liger_cross_entropy

    def ce(input, target, **kw):
        return liger_cross_entropy(input, target, **kw)

    return ce


def _liger_why_not(loss, device):
    if device != "cuda":
        return "liger-kernel runs on CUDA only"
    if loss not in ("cross_entropy", "linear_cross_entropy"):
        return f"liger-kernel is not compared for {loss}"
    return _module_missing("liger_kernel")


def _cce(loss):
    """Cut Cross-Entropy's linear_cross_entropy(embeddings, classifier, targets) (untested here:
    no GPU on the machine this was written on)."""
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

    def lce(input, linear_weight, target, *, softcap=None, **kw):
        if kw:
            raise NotImplementedError(f"cut-cross-entropy is not compared with options {sorted(kw)}")
        return cce_linear_cross_entropy(input, linear_weight, target, softcap=softcap)

    return lce


def _cce_why_not(loss, device):
    if device != "cuda":
        return "cut-cross-entropy runs on CUDA only"
    if loss != "linear_cross_entropy":
        return "cut-cross-entropy only computes linear cross-entropy"
    return _module_missing("cut_cross_entropy")


def _torch_lce(chunked):
    """torch's own F.linear_cross_entropy (torch >= 2.13): its reference path (options=None), or
    its chunked path (options=nn.LinearCrossEntropyOptions(), its defaults)."""
    def make(loss):
        options = torch.nn.LinearCrossEntropyOptions() if chunked else None

        def lce(input, linear_weight, target, **kw):
            ours = sorted(set(kw) & {"softcap", "temperature", "z_loss"})
            if ours:
                raise NotImplementedError(f"torch's F.linear_cross_entropy has no {', '.join(ours)}")
            return torch.nn.functional.linear_cross_entropy(input, linear_weight, target, options=options, **kw)

        return lce
    return make


def _torch_lce_why_not(loss, device):
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    return None


PROVIDERS = {
    "fused_loss": Provider("fused_loss", _fused_why_not, _fused),
    "torch": Provider("torch", lambda loss, device: None if loss in REFERENCES else "no reference", lambda loss: REFERENCES[loss]),
    "torch_compile": Provider("torch_compile", lambda loss, device: None if loss in REFERENCES else "no reference", _compiled),
    "liger": Provider("liger", _liger_why_not, _liger),
    "cce": Provider("cce", _cce_why_not, _cce),
    "torch_lce": Provider("torch_lce", _torch_lce_why_not, _torch_lce(False), losses=("linear_cross_entropy",)),
    "torch_lce_chunked": Provider("torch_lce_chunked", _torch_lce_why_not, _torch_lce(True),
                                  losses=("linear_cross_entropy",)),
}
