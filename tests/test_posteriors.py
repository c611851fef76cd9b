"""Segment posteriors on a window, the sparse set above a threshold, and the
boundary posteriors of marginals, against brute-force enumeration."""

from __future__ import annotations

import pytest
import torch

import flashsemicrf as F
from conftest import assert_close, backend_param, make_case
from oracles import brute_force

TOL = 1e-9

CASES = [
    make_case(31, 3, 7, 3, 2),
    make_case(32, 3, 7, 3, 2, duration_dependent=True),
    make_case(33, 2, 6, 4, 2, optional=(), ragged=False),
    make_case(34, 3, 7, 2, 3, neg_inf=True),
    make_case(35, 3, 6, 3, 2, duration_dependent=True, neg_inf=True),
    make_case(36, 2, 8, 3, 2, optional=("end_scores", "start_transition")),
    make_case(37, 2, 7, 3, 2, duration_dependent=True, optional=()),
]

BACKENDS = [backend_param("cpu"), backend_param("torch")]


def ends_of(segment_marginals: torch.Tensor) -> torch.Tensor:
    """(B, T): P(a segment's last position is t), summed from the (B, T, K, C) oracle."""
    B, T, K, _ = segment_marginals.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for s in range(T):
        for d in range(1, K + 1):
            if s + d <= T:
                out[:, s + d - 1] += segment_marginals[:, s, d - 1].sum(-1)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_windows_match_brute_force(case, backend):
    oracle = brute_force(**case.kwargs).segment_marginals  # (B, T, K, C)
    T = case.T
    for t0, t1 in [(0, T), (0, 1), (2, 5), (T - 1, T), (1, T - 2)]:
        got = F.segment_posteriors(**case.kwargs, window=(t0, t1), backend=backend)
        assert got.shape == (case.B, t1 - t0, case.K, case.C)
        assert_close(f"window {t0}:{t1}", got, oracle[:, t0:t1], TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_boundary_posteriors_match_brute_force(case, backend):
    bf = brute_force(**case.kwargs)
    m = F.marginals(**case.kwargs, backend=backend)
    assert_close("starts", m.starts, bf.start_marginals, TOL)
    assert_close("ends", m.ends, ends_of(bf.segment_marginals), TOL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_above_threshold_is_the_sparse_set(case):
    oracle = brute_force(**case.kwargs).segment_marginals
    for threshold, chunk in [(0.0, 1), (0.05, 3), (0.3, 1024)]:
        segs, probs = F.segment_posteriors_above(**case.kwargs, threshold=threshold, chunk=chunk)
        idx = (oracle > threshold).nonzero()
        expected = torch.stack([idx[:, 0], idx[:, 1], idx[:, 2] + 1, idx[:, 3]], 1)
        # entries within rounding of the threshold may fall either way
        near = ((oracle - threshold).abs() < 1e-12).any()
        if not near:
            assert torch.equal(segs, expected), (segs, expected)
            assert_close("probabilities", probs, oracle[idx.unbind(1)], TOL)


def test_long_sequence_window_equals_marginals_starts():
    # T = 3000, a window in the middle: the window's posteriors summed over
    # (d, c) are the start marginals of the full forward-backward.
    case = make_case(41, 2, 3000, 6, 3, duration_dependent=True, dtype=torch.float32)
    got = F.segment_posteriors(**case.kwargs, window=(1500, 1700))
    m = F.marginals(**case.kwargs)
    assert got.dtype == torch.float32
    assert_close("sum over d, c", got.sum((2, 3)), m.starts[:, 1500:1700], 2e-5)
    # Σ over the segments covering t of their label-c posteriors is the
    # label marginal labels[t, c] (positions 1500 … 1699, segments from 1495 on).
    wide = F.segment_posteriors(**case.kwargs, window=(1495, 1700)).double()
    covered = torch.zeros(2, 205, 3, dtype=torch.float64)
    for d in range(1, 7):
        for s in range(205):
            covered[:, s:s + d] += wide[:, s, d - 1, None, :]
    inside = case.kwargs["lengths"] >= 1706
    assert bool(inside.any())
    assert_close("coverage = label marginals", covered[inside, 5:],
                 m.labels[inside, 1500:1700], 2e-5)


def test_bad_window_and_threshold():
    case = CASES[0]
    with pytest.raises(ValueError, match="window"):
        F.segment_posteriors(**case.kwargs, window=(3, 3))
    with pytest.raises(TypeError, match="window"):
        F.segment_posteriors(**case.kwargs, window=3)
    with pytest.raises(ValueError, match="threshold"):
        F.segment_posteriors_above(**case.kwargs, threshold=1.5)
    with pytest.raises(ValueError, match="chunk"):
        F.segment_posteriors_above(**case.kwargs, threshold=0.1, chunk=0)


@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_window_and_ends_on_triton(backend):
    case = CASES[4]  # duration-dependent, every optional input, −inf entries
    bf = brute_force(**case.kwargs)
    got = F.segment_posteriors(**case.kwargs, window=(1, 5), backend=backend)
    assert_close("window 1:5", got, bf.segment_marginals[:, 1:5], 1e-9)
    m = F.marginals(**case.kwargs, backend=backend)
    assert_close("ends", m.ends, ends_of(bf.segment_marginals), 1e-9)
