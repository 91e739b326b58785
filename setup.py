"""Builds fused_loss._C with torch.utils.cpp_extension.

CPU kernels use at::vec::Vectorized, whose width is chosen at compile time by the
CPU_CAPABILITY macros (ATen builds each kernel once per capability and dispatches at
run time; we build once, for the best capability of the build machine). Override with
FUSED_LOSS_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 when building for another machine.
CUDA kernels (csrc/cuda/**/*.cu) are added when torch has CUDA and a CUDA toolkit is found;
FUSED_LOSS_CUDA=0 skips them (FUSED_LOSS_NO_CUDA=1 too), FUSED_LOSS_CUDA=1 requires them.
TORCH_CUDA_ARCH_LIST chooses the GPUs (default: Ampere and Hopper, 8.0;9.0 with PTX of 9.0);
MAX_JOBS bounds the parallel compiles (torch's ninja build reads it).
FUSED_LOSS_SANITIZE=1 builds the C++ code with AddressSanitizer and UBSan (-O1, -g) for
scripts/sanitize.sh; such a build only loads with the sanitizer runtime preloaded.
"""
import glob
import os
import platform

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def host_capability() -> str:
    """Best at::vec capability this machine runs (x86 only; else DEFAULT)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "DEFAULT"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "DEFAULT"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "AVX2"
    return "DEFAULT"


def cpu_flags() -> list:
    cap = os.environ.get("FUSED_LOSS_CPU_CAPABILITY", host_capability()).upper()
    if cap not in CAPABILITY_FLAGS:
        raise ValueError(f"FUSED_LOSS_CPU_CAPABILITY must be one of {sorted(CAPABILITY_FLAGS)}, got {cap}")
    # -ffp-contract=off: GCC would otherwise fuse a*b+c differently in different inlined
    # copies of a kernel (e.g. the serial and the OpenMP path), breaking bitwise determinism.
    # No -std: torch's extension builder adds the standard its headers need (C++20 from torch 2.13;
    # torch 2.14's refuse C++17).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", f"-DFUSED_LOSS_CPU_CAPABILITY=\"{cap}\""]
    if cap != "DEFAULT":
        flags += [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"] + CAPABILITY_FLAGS[cap]
    return flags


def sanitize_flags() -> list:
    """ASan + UBSan for our C++ only (not nvcc); these come after Python's CFLAGS and cpu_flags(), so
    -O1 overrides -O3 and -fno-wrapv Python's -fwrapv (which would hide signed overflow from UBSan).
    -fsanitize-recover=address lets ASAN_OPTIONS=halt_on_error=0 list every finding in one run.
    -Wno-*uninitialized: with the sanitizers, GCC 12 warns ~1500 times on its own AVX-512 headers'
    `__Y = __Y` idiom (the normal build keeps these warnings)."""
    if os.environ.get("FUSED_LOSS_SANITIZE", "0") != "1":
        return []
    return ["-DFUSED_LOSS_SANITIZE", "-fsanitize=address,undefined", "-fsanitize-recover=address", "-fno-omit-frame-pointer", "-g", "-O1",
            "-fno-wrapv", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]


DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# nvcc: warnings in our device code are errors (-Werror all-warnings would also fail on torch's own
# headers' warnings, which we cannot fix; cross-execution-space calls are the class that matters).
# --fmad=false: no contraction into FMAs, as the CPU build (-ffp-contract=off), so that a forward's
# in-pass gradient and the backward's have the same bits, on every architecture.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--fmad=false",
              "-Werror", "cross-execution-space-call,reorder,default-stream-launch",
              "-Xcudafe", "--diag_error=20011"]


def use_cuda() -> bool:
    """FUSED_LOSS_CUDA=0/1 forces it; unset: when torch has CUDA and a toolkit is found."""
    choice = os.environ.get("FUSED_LOSS_CUDA")
    if choice is None and os.environ.get("FUSED_LOSS_NO_CUDA", "0") == "1":
        choice = "0"
    if choice == "0":
        return False
    import torch

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if choice == "1" and not available:
        raise RuntimeError("fused_loss: FUSED_LOSS_CUDA=1 but the CUDA kernels cannot be built: "
                           + ("this torch has no CUDA (torch.version.cuda is None)" if torch.version.cuda is None
                              else "no CUDA toolkit found (set CUDA_HOME)"))
    if choice not in (None, "0", "1"):
        raise ValueError(f"FUSED_LOSS_CUDA must be 0 or 1, got {choice!r}")
    return available


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/**/*.cpp", recursive=True))
    if os.environ.get("FUSED_LOSS_CUDA_ONLY", "0") == "1":  # scripts/cuda_check.sh: the schemas and CUDA kernels
        sources = ["csrc/fused_loss.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = cpu_flags() + sanitize_flags()
    link = ["-fopenmp"] + sanitize_flags()
    if use_cuda() and glob.glob("csrc/cuda/**/*.cu", recursive=True):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)  # read by torch's nvcc flags
        sources += sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
        return cpp_extension.CUDAExtension(
            "fused_loss._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DFUSED_LOSS_WITH_CUDA"], "nvcc": NVCC_FLAGS},
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "fused_loss._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
