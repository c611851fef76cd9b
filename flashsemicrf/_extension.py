"""Guarded import of the compiled extension ``flashsemicrf._C``.

Importing ``_C`` registers the C++/CUDA ops under ``torch.ops.flashsemicrf``.
When it is missing (a source checkout that was never built) the package still
works through the plain-PyTorch reference, with a warning. When it was built
against another torch (a wheel for the wrong torch), importing the package is
an ImportError that names both versions: loading such a library can crash the
process, and silently running the slow reference would hide the mistake.

``FLASHSEMICRF_DISABLE_EXTENSION=1`` skips the import, silently, so the fallback
can be tested on a machine that has the extension built (and so that a
mismatched build can be bypassed).
"""

import functools
import importlib
import os
import warnings

import torch

DISABLE_ENV = "FLASHSEMICRF_DISABLE_EXTENSION"

# -march values whose code needs more than the x86-64 baseline, with the
# torch.backends.cpu.get_cpu_capability() values of CPUs that can run it.
_CPU_ARCH_NEEDS = {
    "x86-64-v3": ("AVX2", "AVX512"),
    "x86-64-v4": ("AVX512",),
}


def build_info() -> dict:
    """What the compiled extension was built with, read without loading it.

    Keys: ``version`` (with its local tag, e.g. ``0.1.0+torch2.14cu130``),
    ``torch`` and ``torch_cuda`` (the torch and its CUDA at build time),
    ``python``, ``cpu_kernels``, ``cpu_arch`` (``-march``), ``cuda_kernels``,
    ``nvcc``, ``cuda_arch_list`` (as given to the build), ``cuda_archs`` (SASS,
    e.g. ``["sm_90"]``), ``cuda_ptx`` (e.g. ``["compute_120"]``) and
    ``sources`` (path -> sha256 of each source file the build was made from,
    so a checkout can tell whether the build is current). An empty dict when
    the extension was never built here.
    """
    try:
        from . import _build_info
    except ImportError:
        return {}
    return dict(_build_info.BUILD, sources=dict(getattr(_build_info, "SOURCES", {})))


def _release(version: str | None) -> tuple:
    """"2.14.1+cu130" -> (2, 14); "13.0" -> (13, 0)."""
    if not version:
        return ()
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())


def incompatibility(info: dict) -> str:
    """Why the extension described by ``info`` cannot run here ('' when it can)."""
    if not info:
        return ""
    fix = (
        "Install the flashsemicrf wheel built for your torch (its version tag names "
        "torch and CUDA), build from source with `pip install --no-build-isolation .`, "
        f"or set {DISABLE_ENV}=1 to use the plain-PyTorch reference."
    )
    version, built_torch = info.get("version", "?"), info.get("torch", "?")
    built = f"flashsemicrf {version} was built against torch {built_torch}"
    if _release(built_torch) != _release(torch.__version__):
        # torch's C++ ABI holds within a release (x.y), not across releases.
        return f"{built}, but torch {torch.__version__} is installed. {fix}"
    if info.get("cuda_kernels"):
        have = torch.version.cuda
        if have is None:
            return (f"{built} with CUDA {info.get('torch_cuda')} kernels, but the installed torch "
                    f"{torch.__version__} has no CUDA. {fix}")
        if _release(have)[:1] != _release(info.get("torch_cuda"))[:1]:
            return (f"{built} (CUDA {info.get('torch_cuda')}), but the installed torch "
                    f"{torch.__version__} uses CUDA {have}. {fix}")
    needs = _CPU_ARCH_NEEDS.get(info.get("cpu_arch", ""))
    if needs:
        cap = torch.backends.cpu.get_cpu_capability()
        if cap not in needs:
            return (f"flashsemicrf {version} was compiled for {info['cpu_arch']} CPUs "
                    f"({' or '.join(needs)}), but this CPU offers {cap}. Build from source "
                    f"(`pip install --no-build-isolation .`), or set {DISABLE_ENV}=1 to use the "
                    "plain-PyTorch reference.")
    return ""


@functools.cache
def load():
    """The ``flashsemicrf._C`` module, or None when it is disabled or cannot be imported.

    Raises ImportError when it was built for another torch, CUDA or CPU (see
    ``incompatibility``). Warns once per process when the import fails.
    ``load.cache_clear()`` forgets the outcome (for tests).
    """
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    problem = incompatibility(build_info())
    if problem:
        raise ImportError(problem)
    try:
        return importlib.import_module("flashsemicrf._C")
    except (ImportError, OSError) as exc:
        warnings.warn(
            "flashsemicrf: the compiled extension flashsemicrf._C is missing or failed to "
            f"load ({type(exc).__name__}: {exc}). Falling back to the plain-PyTorch "
            "reference (slow); the 'cpu' and 'cuda' backends are unavailable. To build it, "
            "run `pip install --no-build-isolation -e .` in the source checkout (with nvcc "
            "found through CUDA_HOME for the CUDA kernels).",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _has_kernel(dispatch_key: str) -> bool:
    # The forward op is the one every compiled backend implements first; Python
    # registrations (register_fake, register_autograd) use other dispatch keys.
    if load() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("flashsemicrf::forward", dispatch_key)


def has_cpu_kernels() -> bool:
    """True when the extension is loaded with its C++ CPU kernels."""
    return _has_kernel("CPU")


def has_cuda_kernels() -> bool:
    """True when the extension was built with CUDA kernels (a GPU may still be absent)."""
    return _has_kernel("CUDA")
