"""The "triton" backend: Triton kernels with the contract of the C++ ops.

``flashsemicrf_triton::{forward, backward, viterbi, filter}`` take the inputs
and return the outputs of ``flashsemicrf::{...}`` (flashsemicrf/_contract.py),
so the same fakes and the same autograd formula serve them, and a checkpoint
written by one backend's forward feeds another's backward.

Files, top-down: ``kernels.py`` (the Triton kernels), ``launchers.py`` (the
ops: checks, allocation, launch, registration). Importing this package does
not import Triton; ``AVAILABLE`` says whether it can be; importing
``launchers`` does, and defines the ops. The kernels run on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (Triton's interpreter, which is how CI tests them).
Triton decides between compiling and interpreting when the kernels are
decorated, so the variable is read once, here, before they are.
"""

from __future__ import annotations

import importlib.util
import os

import torch

NAMESPACE = "flashsemicrf_triton"

AVAILABLE = importlib.util.find_spec("triton") is not None

# Triton's own switch, read once: the kernels are interpreted iff it was on
# when this package was imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

INSTALL_HINT = (
    "install Triton (`pip install triton`, Linux with an NVIDIA GPU; set "
    "TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
)


def supports(device: torch.device) -> bool:
    """CUDA tensors, or CPU tensors when the kernels are interpreted."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def check_device(fn: str, device: torch.device) -> None:
    """Raise a ValueError naming ``fn`` unless the kernels can run on ``device``."""
    if supports(device):
        return
    hint = ""
    if device.type == "cpu":
        hint = (" (or set TRITON_INTERPRET=1 before flashsemicrf is imported, to run the "
                "kernels on the CPU with Triton's interpreter)")
    raise ValueError(f"{fn}: backend 'triton' needs CUDA tensors, got tensors on {device}{hint}")
