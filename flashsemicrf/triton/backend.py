"""``backend="triton"``: the Triton ops behind the same adapter as the C++ ops."""

from __future__ import annotations

from .._backends import CompiledBackend
from . import ops  # noqa: F401  (registers torch.ops.flashsemicrf_triton)

BACKEND = CompiledBackend("triton", namespace="flashsemicrf_triton")
