"""Guarded import of the compiled extension ``flashsemicrf._C``.

Importing ``_C`` registers the C++/CUDA ops under ``torch.ops.flashsemicrf``.
When it is missing (a source checkout that was never built, or a build against
another torch) the package still works through the plain-PyTorch reference.

``FLASHSEMICRF_DISABLE_EXTENSION=1`` skips the import, silently, so the fallback
can be tested on a machine that has the extension built.
"""

import functools
import importlib
import os
import warnings

import torch

DISABLE_ENV = "FLASHSEMICRF_DISABLE_EXTENSION"


@functools.cache
def load():
    """The ``flashsemicrf._C`` module, or None when it is disabled or cannot be imported.

    Warns once per process when the import fails. ``load.cache_clear()`` forgets
    the outcome (for tests).
    """
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return None
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
