"""Builds the compiled extension ``flashsemicrf._C``.

The CPU kernel (csrc/semicrf.cpp + csrc/cpu/*.cpp) is always built. The CUDA
kernels (csrc/cuda/*.cu) are added whenever nvcc is found, with or without a
GPU on the build machine. Metadata lives in pyproject.toml.

Environment variables (read here and nowhere else in this file):

    FLASHSEMICRF_FORCE_CUDA=1       fail if nvcc cannot be found
    FLASHSEMICRF_SKIP_CUDA=1        build the CPU kernel only, even if nvcc is there
    FLASHSEMICRF_CPU_ARCH           -march for the C++ kernel (default "native": the
                                    build machine's vector units; "none" omits the
                                    flag, for a binary that must run elsewhere)
    FLASHSEMICRF_CUDA_ARCH_LIST     GPU architectures, e.g. "8.0;9.0"; overrides
                                    TORCH_CUDA_ARCH_LIST. Without either, torch
                                    targets the visible GPUs, or "9.0" when none
                                    can be queried
    CUDA_HOME / CUDA_PATH           toolkit root; else /usr/local/cuda; else the
                                    toolkit around an `nvcc` on PATH
    MAX_JOBS                        parallel compile jobs (read by torch)

Build in place for development:  pip install --no-build-isolation -e .
                             or  python setup.py build_ext --inplace
"""

import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH_LIST = "9.0"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


FORCE_CUDA = _env_flag("FLASHSEMICRF_FORCE_CUDA")
SKIP_CUDA = _env_flag("FLASHSEMICRF_SKIP_CUDA")
CUDA_ARCH_LIST = os.environ.get("FLASHSEMICRF_CUDA_ARCH_LIST", "").strip()
CPU_ARCH = os.environ.get("FLASHSEMICRF_CPU_ARCH", "native").strip()

if FORCE_CUDA and SKIP_CUDA:
    sys.exit("setup.py: FLASHSEMICRF_FORCE_CUDA and FLASHSEMICRF_SKIP_CUDA are both set")


def _has_nvcc(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "bin", "nvcc"))


def _find_cuda_home() -> str | None:
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        # An explicit choice is never second-guessed: a wrong one should be visible.
        return explicit if _has_nvcc(explicit) else None
    if _has_nvcc("/usr/local/cuda"):
        return "/usr/local/cuda"
    # `nvcc` on PATH may be a wrapper script, so only trust it when a toolkit
    # (headers next to bin/) sits around the resolved file.
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


CUDA_HOME = None if SKIP_CUDA else _find_cuda_home()
if FORCE_CUDA and CUDA_HOME is None:
    sys.exit(
        "setup.py: FLASHSEMICRF_FORCE_CUDA=1 but nvcc was not found; set CUDA_HOME to the "
        "CUDA toolkit root (the folder holding bin/nvcc)"
    )
WITH_CUDA = CUDA_HOME is not None
if WITH_CUDA:
    # torch.utils.cpp_extension fixes its CUDA_HOME at import time, and its own
    # guess (dirname of dirname of `which nvcc`) is wrong for wrapper scripts.
    os.environ["CUDA_HOME"] = CUDA_HOME

# Imported only now that CUDA_HOME is settled.
import torch
from torch.utils import cpp_extension

if WITH_CUDA:
    if CUDA_ARCH_LIST:
        os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCH_LIST
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a GPU to query torch would otherwise target every arch it knows.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST


# ATen/cuda/CUDAContext.h includes the cuBLAS/cuSPARSE/cuSOLVER headers, which a
# minimal toolkit lacks; torch's pip wheels bring them in nvidia/*/include.
_LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h", "cusolverDn.h")


def _library_include_dirs() -> list[str]:
    toolkit = Path(CUDA_HOME, "include")
    missing = [h for h in _LIBRARY_HEADERS if not (toolkit / h).is_file()]
    if not missing:
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec else []
    found = []
    for root in roots:
        for inc in sorted(Path(root).glob("*/include")):
            if any((inc / h).is_file() for h in missing) and str(inc) not in found:
                found.append(str(inc))
    return found


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _extension():
    sources = ["csrc/semicrf.cpp", *_sources("csrc/cpu/*.cpp")]
    # at::parallel_for is a header template: without -fopenmp it runs serially.
    # The link picks up libgomp.so.1, the same soname torch already loaded.
    openmp = [] if platform.system() == "Darwin" else ["-fopenmp"]
    # The CPU kernel's exp and log-sum-exp loops are written to auto-vectorise;
    # -march lets them use the machine's widest vectors (3x on AVX-512).
    march = [] if CPU_ARCH.lower() in ("", "none") else [f"-march={CPU_ARCH}"]
    cxx_flags = ["-O3", *march, *openmp]
    kwargs = {
        "name": "flashsemicrf._C",
        "include_dirs": [str(ROOT / "csrc")],
        "extra_link_args": openmp,
    }
    if not WITH_CUDA:
        return cpp_extension.CppExtension(
            sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs
        )
    # No --use_fast_math: the kernels are checked for exactness against float64.
    # No -std: torch passes the standard its own headers need (C++17 or C++20).
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    ext = cpp_extension.CUDAExtension(
        sources=sources + _sources("csrc/cuda/*.cu"),
        define_macros=[("FLASHSEMICRF_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        **kwargs,
    )
    # After the toolkit's own include dir, so its runtime headers keep precedence.
    ext.include_dirs.extend(_library_include_dirs())
    return ext


print(
    f"flashsemicrf setup: torch {torch.__version__}, "
    + (
        f"CUDA kernels with {CUDA_HOME}/bin/nvcc, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<from visible GPUs>')}"
        if WITH_CUDA
        else "CPU kernel only" + (" (FLASHSEMICRF_SKIP_CUDA)" if SKIP_CUDA else " (no nvcc)")
    ),
    file=sys.stderr,
)


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def finalize_options(self):
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            # pip's editable build would compile in a fresh temporary folder every
            # time; the usual build/temp.* lets ninja rebuild only what changed.
            plat = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = str(ROOT / "build" / f"temp.{plat}")


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExt})
