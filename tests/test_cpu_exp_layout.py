"""The C++ CPU kernel's exp-domain forward on the shapes its vector layout
has edges at.

The forward pads labels to chunks of 8 (ring pass, mat-vecs), runs its bound
arithmetic four labels at a time (the (K, C, C) form with a scalar tail for
the last C mod 4), moves the ring lazily (a checkpoint settles the pending
move) and drops the liveness masks for the ages where every label of a chunk
is alive. None of that may change what it computes: log Z and the
checkpoints must agree with the log-domain scan for label counts on both
sides of every chunk edge, for duration limits that differ inside a chunk,
for scores that are not contiguous along labels, and at every checkpoint
interval, without a fallback.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashsemicrf  # noqa: F401  (loads the compiled ops when they are built)
from conftest import assert_close
from test_cpu_exp_domain import ENV, _has_cpu_op

F32, F64 = torch.float32, torch.float64
NEG_INF = -math.inf

pytestmark = pytest.mark.skipif(not _has_cpu_op(), reason="needs the C++ CPU kernel")


def problem(C: int, *, dd: bool, seed: int, B: int = 2, T: int = 60, K: int = 9,
            limits: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    duration = torch.randn(K, C, generator=g, dtype=F64)
    if limits:  # label c allows durations 1 .. 1 + (c mod K): the chunk's labels die at different ages
        for c in range(C):
            duration[1 + c % K:, c] = NEG_INF
    shape = (K, C, C) if dd else (C, C)
    return dict(scores=2.0 * torch.randn(B, T, C, generator=g, dtype=F64),
                transition=torch.randn(*shape, generator=g, dtype=F64), duration=duration,
                lengths=torch.tensor([T] + [T - 11] * (B - 1)),
                start_transition=torch.randn(C, generator=g, dtype=F64),
                end_transition=torch.randn(C, generator=g, dtype=F64))


def run(monkeypatch, algorithm: str, kw: dict, dtype, interval: int, scores=None):
    """(log Z, checkpoint ring, checkpoint offsets, fallbacks taken)."""
    monkeypatch.setenv(ENV, algorithm)
    before = int(torch.ops.flashsemicrf_testing.cpu_exp_fallbacks())
    s = kw["scores"].to(dtype) if scores is None else scores
    out = torch.ops.flashsemicrf.forward(
        s, kw["transition"].to(dtype), kw["duration"].to(dtype), kw["lengths"],
        kw["start_transition"].to(dtype), kw["end_transition"].to(dtype), None, None, interval)
    return (*out, int(torch.ops.flashsemicrf_testing.cpu_exp_fallbacks()) - before)


def backward_log(monkeypatch, kw: dict, fwd, interval: int):
    """The log-domain backward's gradients from a forward's checkpoints."""
    monkeypatch.setenv(ENV, "log")
    B = kw["scores"].shape[0]
    upstream = torch.linspace(1.0, -0.5, B, dtype=F64)
    return torch.ops.flashsemicrf.backward(
        upstream, kw["scores"], kw["transition"], kw["duration"], kw["lengths"],
        kw["start_transition"], kw["end_transition"], None, None, *fwd[:3], interval, True)


@pytest.mark.parametrize("dd", [False, True], ids=["static", "KCC"])
@pytest.mark.parametrize("C", [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33])
def test_chunk_edges_match_log(monkeypatch, C, dd):
    """float64 log Z to 1e-12 of the log scan; the log backward reads the
    exp forward's checkpoints (including one written while the ring's move
    is pending) and gives its own gradients to 1e-10."""
    kw = problem(C, dd=dd, seed=C)
    for interval in (1, 4, 0):
        fwd_log = run(monkeypatch, "log", kw, F64, interval)
        fwd_exp = run(monkeypatch, "exp", kw, F64, interval)
        assert fwd_exp[3] == 0
        assert_close("log Z", fwd_exp[0], fwd_log[0], 1e-12 * fwd_log[0].abs().max().item())
        expected = backward_log(monkeypatch, kw, fwd_log, interval)
        got = backward_log(monkeypatch, kw, fwd_exp, interval)
        for a, b in zip(got, expected):
            assert_close("gradient", a, b, 1e-10 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("dd", [False, True], ids=["static", "KCC"])
@pytest.mark.parametrize("C", [6, 12, 20])
def test_duration_limits_inside_a_chunk(monkeypatch, C, dd, dtype):
    """Labels of one chunk whose longest durations differ (so the ring pass
    switches from its all-alive rows to the masked ones at different ages):
    log Z as close to the float64 log scan as the log scan in the dtype."""
    kw = problem(C, dd=dd, seed=100 + C, T=80, K=12, limits=True)
    fwd_exp = run(monkeypatch, "exp", kw, dtype, 0)
    assert fwd_exp[3] == 0
    z64 = run(monkeypatch, "log", kw, F64, 0)[0]
    own = (run(monkeypatch, "log", kw, dtype, 0)[0].double() - z64).abs().max().item()
    tol = 1e-12 * z64.abs().max().item() if dtype == F64 else max(2 * own, 1e-6 * z64.abs().max().item())
    assert_close("log Z", fwd_exp[0], z64, tol)


@pytest.mark.parametrize("dd", [False, True], ids=["static", "KCC"])
def test_scores_strided_along_labels(monkeypatch, dd):
    """Scores laid out (B, C, T) and viewed as (B, T, C): the same bits as
    the contiguous copy."""
    kw = problem(11, dd=dd, seed=7)
    strided = kw["scores"].transpose(1, 2).contiguous().transpose(1, 2)
    assert strided.stride(2) != 1
    for dtype in (F32, F64):
        a = run(monkeypatch, "exp", kw, dtype, 5, scores=strided.to(dtype))
        b = run(monkeypatch, "exp", kw, dtype, 5)
        assert a[3] == 0 and b[3] == 0
        for x, y in zip(a[:3], b[:3]):
            assert torch.equal(x, y)
