"""The backends, and the one place that chooses among them.

Every backend is a family of four ops with one contract
(flashsemicrf/_contract.py): the same inputs, outputs, fakes and autograd
formula, so a checkpoint written by one backend's forward feeds another's
backward.

    cuda    flashsemicrf::*         compiled.py (csrc/cuda, loaded through _C)
    cpu     flashsemicrf::*         compiled.py (csrc/cpu, loaded through _C)
    triton  flashsemicrf_triton::*  triton/ (Triton imported on first use)
    torch   flashsemicrf_torch::*   reference_ops.py (flashsemicrf/reference.py)

``resolve`` maps a request (``backend="auto"`` honours ``FLASHSEMICRF_BACKEND``)
to an :class:`~flashsemicrf._contract.OpFamily`; kernels never choose.
"""

from __future__ import annotations

import os

import torch

from .. import _extension
from .._contract import OpFamily
from . import compiled, reference_ops
from . import triton as _triton

ENV_BACKEND = "FLASHSEMICRF_BACKEND"
NAMES = ("cuda", "triton", "cpu", "torch")

# Decided once at import, so that torch.compile traces `resolve` as constants.
HAS_CPU_KERNELS: bool = _extension.has_cpu_kernels()
"""True when flashsemicrf._C is loaded with its C++ CPU kernels (backend "cpu")."""
HAS_CUDA_KERNELS: bool = _extension.has_cuda_kernels()
"""True when flashsemicrf._C was built with CUDA kernels (backend "cuda"; a GPU may be absent)."""
HAS_TRITON: bool = _triton.AVAILABLE
"""True when Triton can be imported (backend "triton")."""

_CPU = OpFamily("cpu", compiled.NAMESPACE)
_CUDA = OpFamily("cuda", compiled.NAMESPACE)
_TORCH = OpFamily("torch", reference_ops.NAMESPACE)
_TRITON = OpFamily("triton", _triton.NAMESPACE)


def available(device: torch.device | str | None = None) -> tuple[str, ...]:
    """The backends that can run here.

    Args:
        device: "cpu", "cuda" or a torch.device: the backends that run on tensors
            there; None: those that run on some device of this machine.

    Returns:
        Backend names, in the order "cuda", "triton", "cpu", "torch" (a subset).
        "triton" runs on CPU tensors only under ``TRITON_INTERPRET=1``; "cuda"
        and "triton" on CUDA tensors only when a GPU is visible.
    """
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if device is not None:
        devices = [torch.device(device)]
    usable = {"torch"}
    for dev in devices:
        if dev.type == "cpu" and HAS_CPU_KERNELS:
            usable.add("cpu")
        if dev.type == "cuda" and HAS_CUDA_KERNELS and torch.cuda.is_available():
            usable.add("cuda")
        if HAS_TRITON and _triton.supports(dev) and (dev.type != "cuda"
                                                     or torch.cuda.is_available()):
            usable.add("triton")
    return tuple(name for name in NAMES if name in usable)


def _unavailable(fn: str, backend: str, why: str) -> RuntimeError:
    return RuntimeError(f"{fn}: backend {backend!r} is not available: {why}")


def resolve(fn: str, backend: str, device: torch.device | str) -> OpFamily:
    """The ops serving ``backend`` for tensors on ``device``.

    Args:
        fn: the public function's name, for error messages.
        backend: "auto", "cuda", "triton", "cpu" or "torch" (checked by the
            caller). "auto" reads FLASHSEMICRF_BACKEND, then picks the CUDA
            kernels for CUDA tensors, the C++ kernel for CPU tensors, and the
            reference where the compiled extension is missing.
        device: the device of the problem's tensors.

    Raises:
        ValueError: FLASHSEMICRF_BACKEND is not a backend name, or the backend
            does not run on ``device``.
        RuntimeError: the backend is not available here (says how to get it).
    """
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
        if backend not in ("auto",) + NAMES:
            raise ValueError(
                f"{fn}: the environment variable {ENV_BACKEND} must be one of "
                f"auto, cuda, triton, cpu, torch; got {backend!r}"
            )
        if backend != "auto":
            try:
                return _resolve_named(fn, backend, torch.device(device))
            except (ValueError, RuntimeError) as err:
                # Say where the choice came from: the caller asked for "auto".
                raise type(err)(
                    f"{err} (backend {backend!r} comes from the environment variable "
                    f"{ENV_BACKEND}={backend}; unset it or pass backend= explicitly)"
                ) from None
    return _resolve_named(fn, backend, torch.device(device))


def _resolve_named(fn: str, backend: str, device: torch.device) -> OpFamily:
    """The ops of a named backend (or "auto" by device) for tensors on ``device``."""
    if backend == "auto":
        if device.type == "cpu" and HAS_CPU_KERNELS:
            return _CPU
        if device.type == "cuda" and HAS_CUDA_KERNELS:
            return _CUDA
        return _TORCH
    if backend == "torch":
        return _TORCH
    build = (
        "build the compiled extension with `pip install --no-build-isolation -e .` in the "
        "source checkout"
    )
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{fn}: backend 'cpu' needs CPU tensors, got tensors on {device}")
        if not HAS_CPU_KERNELS:
            raise _unavailable(fn, backend, f"flashsemicrf._C is not loaded; {build}")
        return _CPU
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{fn}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if not HAS_CUDA_KERNELS:
            raise _unavailable(
                fn, backend, f"flashsemicrf._C was built without CUDA kernels; {build} with "
                "nvcc found through CUDA_HOME"
            )
        return _CUDA
    if not HAS_TRITON:
        raise _unavailable(fn, backend, f"Triton is not installed; {_triton.INSTALL_HINT}")
    _triton.check_device(fn, device)
    from .triton import launchers  # noqa: F401  (defines the ops; importing Triton takes a while)

    return _TRITON


__all__ = ["HAS_CPU_KERNELS", "HAS_CUDA_KERNELS", "HAS_TRITON", "NAMES", "available", "resolve"]
