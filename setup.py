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
    FLASHSEMICRF_CUDA_ARCH_LIST     GPU architectures, e.g. "8.0;9.0+PTX"; overrides
                                    TORCH_CUDA_ARCH_LIST. "all": every architecture
                                    from 8.0 up that the installed torch was built
                                    for, plus PTX for the newest (release wheels).
                                    Without either: the visible GPUs, or "9.0" when
                                    none can be queried
    CUDA_HOME / CUDA_PATH           toolkit root; else /usr/local/cuda; else the
                                    toolkit around an `nvcc` on PATH
    MAX_JOBS                        parallel compile jobs (read by torch)

Build in place for development:  pip install --no-build-isolation -e .
                             or  python setup.py build_ext --inplace
"""

import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
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



def _release_arch_list() -> str:
    """SASS for every architecture from 8.0 up that torch itself was built for
    (torch runs nowhere else; later minors of a major run its SASS), and PTX of
    the newest, which the driver compiles for GPUs newer than all of them."""
    built_for = torch.cuda.get_arch_list()
    if not built_for and hasattr(torch._C, "_cuda_getArchFlags"):
        # Older torch answers get_arch_list() only when a GPU is visible; the
        # flags it reads are there regardless.
        built_for = (torch._C._cuda_getArchFlags() or "").split()
    archs = sorted(
        (int(m[1]), int(m[2]))
        for m in (re.fullmatch(r"sm_(\d+)(\d)", a) for a in built_for)
        if m and int(m[1]) >= 8
    )
    if not archs:
        sys.exit(
            f"setup.py: torch {torch.__version__} reports no CUDA architecture from 8.0 up "
            "(torch.cuda.get_arch_list()); set FLASHSEMICRF_CUDA_ARCH_LIST, e.g. \"9.0\""
        )
    names = [f"{major}.{minor}" for major, minor in archs]
    return ";".join(names) + "+PTX"


def _cuda_arch_list() -> str:
    """The architectures to build, always explicit so that the build records them."""
    if CUDA_ARCH_LIST.lower() == "all":
        return _release_arch_list()
    if CUDA_ARCH_LIST:
        return CUDA_ARCH_LIST
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    # Without a GPU to query torch would otherwise target every arch it knows.
    return DEFAULT_CUDA_ARCH_LIST


def _arch_targets(arch_list: str) -> tuple[list[str], list[str]]:
    """("9.0;12.0+PTX") -> (["sm_90", "sm_120"], ["compute_120"])."""
    sass, ptx = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        arch, _, suffix = entry.partition("+")
        name = arch.replace(".", "")
        sass.append(f"sm_{name}")
        if suffix.upper() == "PTX":
            ptx.append(f"compute_{name}")
    return sass, ptx


if WITH_CUDA:
    os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()


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


def _nvcc_version() -> str | None:
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _version() -> str:
    """The package version with a local tag naming the torch and CUDA it is built
    against (e.g. 0.1.0+torch2.14cu130), so that a wheel says which torch it needs."""
    text = (ROOT / "flashsemicrf" / "__init__.py").read_text()
    base = re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    cuda = (torch.version.cuda or NVCC_VERSION) if WITH_CUDA else None
    return f"{base}+torch{major}.{minor}" + (f"cu{cuda.replace('.', '')}" if cuda else "cpu")


NVCC_VERSION = _nvcc_version() if WITH_CUDA else None
VERSION = _version()
SASS, PTX = _arch_targets(os.environ["TORCH_CUDA_ARCH_LIST"]) if WITH_CUDA else ([], [])
# What flashsemicrf.build_info() reports, and what the package checks against
# the running torch before it loads the extension.
BUILD_INFO = {
    "version": VERSION,
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "python": platform.python_version(),
    "cpu_kernels": True,
    "cpu_arch": CPU_ARCH or "none",
    "cuda_kernels": WITH_CUDA,
    "nvcc": NVCC_VERSION,
    "cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if WITH_CUDA else None,
    "cuda_archs": SASS,
    "cuda_ptx": PTX,
}

print(
    f"flashsemicrf setup: {VERSION}, torch {torch.__version__}, -march={CPU_ARCH or 'none'}, "
    + (
        f"CUDA kernels with {CUDA_HOME}/bin/nvcc {NVCC_VERSION}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        if WITH_CUDA
        else "CPU kernel only" + (" (FLASHSEMICRF_SKIP_CUDA)" if SKIP_CUDA else " (no nvcc)")
    ),
    file=sys.stderr,
)


def _source_hashes() -> dict[str, str]:
    files = [p for p in ROOT.glob("csrc/**/*") if p.is_file()]
    files += [p for p in ROOT.glob("flashsemicrf/**/*.py") if p.name != "_build_info.py"]
    return {
        p.relative_to(ROOT).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(files)
    }


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def finalize_options(self):
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            # pip's editable build would compile in a fresh temporary folder every
            # time; the usual build/temp.* lets ninja rebuild only what changed.
            plat = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = str(ROOT / "build" / f"temp.{plat}")

    def run(self):
        super().run()
        # Next to the library, wherever this build put it (the source tree when
        # in place, build/lib for a wheel), so the two always travel together.
        target = Path(self.get_ext_fullpath("flashsemicrf._C")).with_name("_build_info.py")
        target.write_text(
            "# Generated by setup.py when flashsemicrf._C was built; see build_info().\n"
            f"BUILD = {BUILD_INFO!r}\n"
            "# sha256 of each source file, so that a carried wheel can be told stale.\n"
            f"SOURCES = {_source_hashes()!r}\n"
        )


setup(version=VERSION, ext_modules=[_extension()], cmdclass={"build_ext": BuildExt})
