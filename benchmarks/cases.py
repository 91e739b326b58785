"""Benchmark cases, defined once per loss: shapes users care about, a sweep for plots, the
inputs of a case and the fewest bytes its loss must move (the memory floor)."""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    loss: str
    shape: Tuple[int, ...]
    dtype: str
    label: str = ""
    sweep: str = ""  # name of the sweep this case belongs to ("" if none)
    options: Tuple[Tuple[str, object], ...] = ()  # keyword arguments of the loss, e.g. (("z_loss", 1e-4),)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)


@dataclass
class LossSpec:
    """make_inputs(case, device) -> (args, kwargs): the positional tensors (the first
    `differentiated` ones are differentiated) and the options. floor_bytes(case, mode) -> bytes a
    perfect kernel moves. floor_time, when given, replaces the memory floor by a measured one:
    floor_time(case, mode, device, args) -> seconds (for linear cross-entropy: its matrix
    products alone). shape_ok(shape) says whether an explicit --sizes shape fits the loss."""
    make_inputs: Callable
    floor_bytes: Callable
    presets: Dict[str, List[Case]] = field(default_factory=dict)
    differentiated: int = 1
    floor_time: Optional[Callable] = None
    shape_ok: Callable = lambda shape: True


# --- cross-entropy ---------------------------------------------------------------------------

def _ce_inputs(case: Case, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, c = case.shape[0], case.shape[1]
    x = torch.randn(case.shape, generator=gen).to(device=device, dtype=case.torch_dtype)
    t = torch.randint(0, c, (n, *case.shape[2:]), generator=gen).to(device)
    return (x, t), dict(case.options)


def _ce_floor(case: Case, mode: str) -> int:
    """Forward reads the logits once; the backward (and forward+backward) reads them once
    and writes the gradient once."""
    n = 1
    for s in case.shape:
        n *= s
    logits = n * torch.empty((), dtype=case.torch_dtype).element_size()
    return logits if mode == "forward" else 2 * logits


def _ce_cases():
    llm = [((4096, 32000), "float32", "LLM head, 32k vocab"), ((4096, 32000), "bfloat16", "LLM head, 32k vocab"),
           ((2048, 128256), "float32", "LLM head, 128k vocab")]
    default = [Case("cross_entropy", s, d, label) for s, d, label in llm]
    # The LLM options: all three at once (Gemma 2's softcap of 30, a sampling temperature,
    # PaLM's z-loss coefficient), and each alone in the full preset.
    every = (("softcap", 30.0), ("temperature", 0.7), ("z_loss", 1e-4))
    default.append(Case("cross_entropy", (4096, 32000), "float32", "LLM head, 32k vocab, softcap+temperature+z-loss",
                        options=every))
    options = [Case("cross_entropy", (4096, 32000), "float32", f"LLM head, 32k vocab, {k}", options=((k, v),))
               for k, v in every]
    options.append(Case("cross_entropy", (4096, 32000), "bfloat16", "LLM head, 32k vocab, softcap+temperature+z-loss",
                        options=every))
    sweep = [Case("cross_entropy", (1024, c), d, f"vocab sweep, C={c}", sweep="vocab")
             for d in ("float32", "bfloat16") for c in (8192, 32000, 65536, 128256, 256000)]
    extra = [Case("cross_entropy", (8192, 256000), "bfloat16", "LLM head, 256k vocab"),
             Case("cross_entropy", (8, 21, 256, 256), "float32", "segmentation, 21 classes")]
    quick = [Case("cross_entropy", (64, c), "float32", "tiny", sweep="tiny") for c in (1000, 4000)]
    quick.append(Case("cross_entropy", (32, 5000), "bfloat16", "tiny"))
    quick.append(Case("cross_entropy", (64, 1000), "float32", "tiny, options", options=every))
    return {"default": default, "full": default + options + sweep + extra, "sweep": sweep, "quick": quick}


# --- elementwise losses (BCE-with-logits, smooth L1, Huber, sigmoid focal) ------------------------

def _elementwise_inputs(options=None, binary_targets=False):
    """make_inputs for a loss of (input, target) of one shape; `options(case, device)` adds
    keyword arguments such as a pos_weight over the last dimension."""
    def make(case: Case, device: str):
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(case.shape, generator=gen) * 2).to(device=device, dtype=case.torch_dtype)
        y = torch.rand(case.shape, generator=gen)
        y = (y > 0.5).float() if binary_targets else y
        kw = options(case, device) if options else {}
        return (x, y.to(device=device, dtype=case.torch_dtype)), kw
    return make


def _elementwise_floor(case: Case, mode: str) -> int:
    """Forward reads input and target; backward (and forward + backward) reads them and
    writes the input's gradient."""
    n = 1
    for s in case.shape:
        n *= s
    size = torch.empty((), dtype=case.torch_dtype).element_size()
    return n * size * (2 if mode == "forward" else 3)


def _pos_weight(case, device):
    gen = torch.Generator(device="cpu").manual_seed(1)
    return {"pos_weight": (torch.rand(case.shape[-1:], generator=gen) * 3).to(device=device, dtype=case.torch_dtype)}


def _elementwise_cases(loss, default_shapes, label, sweep_shapes, quick_shape):
    default = [Case(loss, s, "float32", label) for s in default_shapes]
    bf16 = [Case(loss, s, "bfloat16", label) for s in default_shapes]
    sweep = [Case(loss, s, "float32", f"{label} sweep", sweep="numel") for s in sweep_shapes]
    return {"default": default, "full": default + bf16 + sweep, "sweep": sweep,
            "quick": [Case(loss, quick_shape, "float32", "tiny")]}


# --- linear cross-entropy (the LLM head: input (N, H), linear_weight (V, H)) -------------------------

def _lce_inputs(case: Case, device: str):
    """(input, linear_weight, target) of a case of shape (N, H, V): activations of unit scale and
    a weight of Linear's scale (logits of about unit scale); input and weight are differentiated."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, h, v = case.shape
    x = torch.randn(n, h, generator=gen).to(device=device, dtype=case.torch_dtype)
    w = (torch.randn(v, h, generator=gen) / h ** 0.5).to(device=device, dtype=case.torch_dtype)
    t = torch.randint(0, v, (n,), generator=gen).to(device)
    return (x, w, t), dict(case.options)


def _lce_floor_bytes(case: Case, mode: str) -> int:
    """Not a memory-bound loss: what it must move is its inputs and the gradients (the floor
    column of these cases is the products' time, _lce_floor_time)."""
    n, h, v = case.shape
    size = torch.empty((), dtype=case.torch_dtype).element_size()
    return (n * h + v * h) * size * (1 if mode == "forward" else 2)


def _lce_floor_time(case: Case, mode: str, device: str, args) -> float:
    """Seconds of the matrix products alone, unchunked, in the case's dtype: the logits
    (forward), plus d_input = g @ W and d_weight = g.T @ x (backward, full), g of the logits'
    size. The fastest of a few runs (a shared machine)."""
    from .measure import time_step

    x, w = args[0].detach(), args[1].detach()
    logits = torch.mm(x, w.t())
    d_x, d_w = torch.empty_like(x), torch.empty_like(w)

    def products(_):
        torch.mm(x, w.t(), out=logits)
        if mode != "forward":
            torch.mm(logits, w, out=d_x)
            torch.mm(logits.t(), x, out=d_w)
    times = time_step(lambda: None, products, device, warmup=1, min_reps=2, max_reps=5, budget_s=1.0)
    del logits
    return min(times)


def _lce_cases():
    small = [Case("linear_cross_entropy", (1024, 512, 8192), "float32", "LLM head (small)")]
    # The cases: tens of seconds per step on 2 CPU cores; in the full and llm_head presets only.
    large = [Case("linear_cross_entropy", (8192, 2048, 32000), "float32", "LLM head, 32k vocab"),
             Case("linear_cross_entropy", (4096, 4096, 128256), "float32", "LLM head, 128k vocab"),
             Case("linear_cross_entropy", (8192, 2048, 32000), "bfloat16", "LLM head, 32k vocab"),
             Case("linear_cross_entropy", (4096, 4096, 128256), "bfloat16", "LLM head, 128k vocab")]
    every = (("softcap", 30.0), ("temperature", 0.7), ("z_loss", 1e-4))
    options = [Case("linear_cross_entropy", (1024, 512, 8192), "float32", "LLM head (small), softcap+temperature+z-loss",
                    options=every)]
    quick = [Case("linear_cross_entropy", (64, 32, 1000), "float32", "tiny")]
    return {"default": small, "full": small + options + large, "llm_head": large, "quick": quick}


LOSSES: Dict[str, LossSpec] = {
    "linear_cross_entropy": LossSpec(_lce_inputs, _lce_floor_bytes, _lce_cases(), differentiated=2,
                                     floor_time=_lce_floor_time, shape_ok=lambda shape: len(shape) == 3),
    "cross_entropy": LossSpec(_ce_inputs, _ce_floor, _ce_cases()),
    "binary_cross_entropy_with_logits": LossSpec(
        _elementwise_inputs(_pos_weight), _elementwise_floor,
        _elementwise_cases("binary_cross_entropy_with_logits", [(8192, 1000)], "multi-label head, pos_weight",
                           [(1024, 1000), (8192, 1000), (65536, 1000)], (64, 100))),
    "smooth_l1_loss": LossSpec(
        _elementwise_inputs(), _elementwise_floor,
        _elementwise_cases("smooth_l1_loss", [(1 << 24,)], "box regression, 2^24 elements",
                           [(1 << 16,), (1 << 20,), (1 << 24,)], (4096,))),
    "huber_loss": LossSpec(
        _elementwise_inputs(), _elementwise_floor,
        _elementwise_cases("huber_loss", [(1 << 24,)], "regression, 2^24 elements", [], (4096,))),
    "sigmoid_focal_loss": LossSpec(
        _elementwise_inputs(lambda case, device: {"reduction": "mean"}, binary_targets=True), _elementwise_floor,
        _elementwise_cases("sigmoid_focal_loss", [(8192, 1000)], "detection head (RetinaNet)",
                           [(1024, 1000), (8192, 1000), (65536, 1000)], (64, 100))),
}


def parse_shape(text: str) -> Tuple[int, ...]:
    """'4096x32000' -> (4096, 32000)."""
    return tuple(int(s) for s in text.lower().split("x") if s)


def select_cases(losses, sizes: str, dtypes=None) -> List[Case]:
    """Cases of `losses` from a preset name (quick/default/full/sweep) or explicit shapes
    ("4096x32000,1024x128256"), optionally restricted to `dtypes`."""
    out = []
    for loss in losses:
        spec = LOSSES[loss]
        if sizes in spec.presets:
            cases = list(spec.presets[sizes])
        elif any(sizes in other.presets for other in LOSSES.values()):  # a preset this loss has no cases in
            cases = []
        else:
            shapes = [parse_shape(s) for s in sizes.split(",") if s]  # "4096x32000,1024x128256"
            cases = [Case(loss, s, d, "custom") for s in shapes if spec.shape_ok(s) for d in (dtypes or ["float32"])]
        if dtypes:
            cases = [c for c in cases if c.dtype in dtypes]
        out += cases
    return out
