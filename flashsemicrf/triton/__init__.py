"""The Triton backend (``backend="triton"``): kernels with the contract of the C++ ops.

``flashsemicrf_triton::{forward, backward, viterbi, filter}`` take the inputs
and return the outputs of ``flashsemicrf::{...}`` (flashsemicrf/ops.py), so
the same fakes and the same autograd formula serve them, and a checkpoint
written by one backend's forward feeds another's backward.

Importing this package does not import Triton; ``AVAILABLE`` says whether it
can be. The kernels run on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (Triton's interpreter, which is how CI tests them).
Triton decides between compiling and interpreting when the kernels are
decorated, so the variable is read once, here, before they are.
"""

from __future__ import annotations

import importlib.util
import os

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None

# Triton's own switch, read once: the kernels are interpreted iff it was on
# when flashsemicrf.triton.kernels was imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

INSTALL_HINT = (
    "install Triton (`pip install triton`, Linux with an NVIDIA GPU; set "
    "TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
)


def check_device(fn: str, device: torch.device) -> None:
    """CUDA tensors, or CPU tensors when the kernels are interpreted."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and INTERPRET:
        return
    hint = ""
    if device.type == "cpu":
        hint = (" (or set TRITON_INTERPRET=1 before flashsemicrf.triton is imported, to run the "
                "kernels on the CPU with Triton's interpreter)")
    raise ValueError(f"{fn}: backend 'triton' needs CUDA tensors, got tensors on {device}{hint}")


def backend_for(fn: str, device: torch.device):
    """The Triton backend for tensors on ``device`` (imports Triton on first use)."""
    check_device(fn, torch.device(device))
    from .backend import BACKEND

    return BACKEND
