"""float32 gradients of the C++ CPU kernel against its own float64 results at
long T: every gradient, the shared parameters (transition, duration, start
and end transition) above all. Those are sums over every position: the
kernels add them up in float64, and the float32 backward re-normalises its
offset inside each span (csrc/semicrf.h, "Float32 drift control"), which a
float32 sum or a drift over a span would miss by 3e-6 … 2e-5 at T = 2·10^4.

Errors: log Z relative, per-position gradients absolute, shared parameters
max |Δ| / (1 + |g|) per element.
"""

from __future__ import annotations

import pytest
import torch

import flashsemicrf  # noqa: F401  (loads the compiled ops when they are built)


def _has_cpu_op() -> bool:
    try:
        torch.ops.flashsemicrf.forward.default
    except (AttributeError, RuntimeError):
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_cpu_op(), reason="needs the C++ CPU kernel")

SHARED = ("transition", "duration", "start_transition", "end_transition")


def float32_errors(T: int, K: int, C: int, duration_dependent: bool, seed: int = 0) -> dict:
    """One sequence, scores N(-1.5, 1) (uncentred), parameters N(0, 1)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    scores = r(1, T, C) - 1.5
    transition = r(K, C, C) if duration_dependent else r(C, C)
    inputs = (scores, transition, r(K, C), torch.full((1,), T), r(C), r(C))
    out = {}
    for dtype in (torch.float64, torch.float32):
        x = [v.to(dtype) if v.is_floating_point() else v for v in inputs] + [None, None]
        log_z, ring, offset = torch.ops.flashsemicrf.forward(*x, 0)
        grads = torch.ops.flashsemicrf.backward(torch.ones(1, dtype=dtype), *x, log_z, ring,
                                                offset, 0, False)
        out[dtype] = (log_z.double(), [v.double() for v in grads[:5]])
    (z64, g64), (z32, g32) = out[torch.float64], out[torch.float32]
    errors = {"log_z": ((z32 - z64).abs() / z64.abs()).max().item(),
              "scores": (g32[0] - g64[0]).abs().max().item()}
    for name, a, b in zip(SHARED, g32[1:], g64[1:]):
        errors[name] = ((a - b).abs() / (1 + b.abs())).max().item()
    print(f"T={T} K={K} C={C} {'(K, C, C)' if duration_dependent else '(C, C)'}: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return errors


def check(errors: dict, shared_bound: float) -> None:
    assert errors["log_z"] < 1e-6
    assert errors["scores"] < 1e-4
    for name in SHARED:
        assert errors[name] < shared_bound, name


@pytest.mark.parametrize(("K", "duration_dependent", "bound"),
                         [(200, False, 2e-6), (50, True, 1e-5)], ids=["cc", "kcc"])
def test_shared_gradients_float32(K, duration_dependent, bound):
    check(float32_errors(20_000, K, 6, duration_dependent), bound)


@pytest.mark.slow
@pytest.mark.parametrize(("T", "bound"), [(10**6, 1e-5), (10**7, 1e-4)])
def test_shared_gradients_float32_at_scale(T, bound):
    check(float32_errors(T, 200, 6, False), bound)
