"""Viterbi's traceback span by span, on the GPU backends (Triton, and CUDA on a
GPU; the C++ CPU kernel's is held to the reference bit for bit in
test_viterbi_streaming.py, and the CUDA kernel's under the emulator in
test_cuda_emulated.py).

The kernels keep O(√(T·K)·C) memory per sequence: the max-semiring scan saves
its state every checkpoint interval (≈ √(T·K)), and the traceback recomputes
one span at a time, with that span's backpointers only. These problems cross
many spans (the interval is 5–14 here) with paths whose lookups straddle span
boundaries, and are checked against the reference's uninterrupted scan with
full backpointers: the best score, and the segmentation itself, ties included.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashsemicrf as F
from conftest import DEVICE, backend_param, check_viterbi, make_case, on
from flashsemicrf._contract import checkpoint_interval
from test_viterbi_streaming import problem

BACKENDS = [backend_param(name) for name in ("cuda", "triton")]

# (seed, B, T, K, C, duration-dependent transition)
SHAPES = [
    (1, 3, 60, 3, 3, False),   # interval 13: five spans, ragged lengths
    (2, 2, 50, 4, 2, True),    # interval 14
    (3, 2, 30, 9, 3, False),   # K > interval / 2: segments span whole spans
    (4, 2, 25, 1, 3, False),   # K = 1: interval 5, every position a segment
    (5, 2, 3, 8, 3, True),     # K > T
    (6, 2, 1, 4, 2, False),    # T = 1
]


def _case(seed, B, T, K, C, dd, kind="rand"):
    """The CPU kernel's test problems (test_viterbi_streaming.problem: kinds
    "rand", "long" — the longest durations only, so segments straddle span
    boundaries —, "ties" — small integers, exact ties — and "forbidden" — -inf
    entries), with boundary scores."""
    return problem(B, T, K, C, dd, torch.float64, seed, kind, boundary=True)


def _check(kw, backend, dtype=torch.float64):
    check_viterbi(on(kw, DEVICE[backend], dtype), kw, backend, dtype, kw["scores"].shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{1}-T{2}-K{3}-C{4}-{dd}".format(
    *s, dd="kcc" if s[5] else "cc"))
@pytest.mark.parametrize("kind", ["rand", "long", "ties", "forbidden"])
def test_viterbi_across_spans_matches_the_reference(backend, shape, kind):
    kw = _case(*shape, kind)
    T, K = shape[2], shape[3]
    if T > K:
        assert checkpoint_interval(T, K, 0) < T, "the problem must cross spans"
    _check(kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_viterbi_across_spans_in_float32(backend):
    kw = _case(7, 3, 64, 4, 5, False)
    _check(kw, backend, torch.float32)
    kw = _case(8, 2, 40, 5, 3, True)
    _check(kw, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_path_through_one_segment_per_span(backend):
    """Every segment exactly K long, half the interval (24): segments start at
    span boundaries and in their middles, so the static transition's previous
    label is read at a start row in the span before the segment's end."""
    T, K, C = 48, 12, 2
    kw = make_case(9, 2, T, K, C, ragged=False).kwargs
    dur = torch.full((K, C), -math.inf, dtype=torch.float64)
    dur[K - 1] = 0.0
    kw["duration"] = dur
    best, segments = F.viterbi(**on(kw, DEVICE[backend]), backend=backend)
    best_ref, segments_ref = F.viterbi(**kw, backend="torch")
    torch.testing.assert_close(best.cpu(), best_ref, rtol=0, atol=1e-9)
    assert torch.equal(segments.cpu(), segments_ref)
    # rows (batch, start, duration, label): four segments of K per sequence
    assert segments_ref[:, 1].tolist() == list(range(0, T, K)) * 2
    assert set(segments_ref[:, 2].tolist()) == {K}
