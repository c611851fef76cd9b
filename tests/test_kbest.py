"""kbest against brute-force enumeration: scores, segmentations, ranks, ties."""

from __future__ import annotations

import math

import pytest
import torch

import flashsemicrf as F
from conftest import assert_close, make_case
from oracles import brute_force, count_segmentations

TOL = 1e-9

CASES = [
    make_case(51, 3, 6, 3, 2),
    make_case(52, 3, 6, 3, 2, duration_dependent=True),
    make_case(53, 2, 5, 2, 3, optional=(), ragged=False),
    make_case(54, 3, 6, 2, 2, neg_inf=True),
    make_case(55, 3, 6, 3, 2, duration_dependent=True, neg_inf=True),
    make_case(56, 2, 7, 3, 2, optional=("end_scores", "start_transition")),
    make_case(50, 2, 6, 3, 2, duration_dependent=True, optional=(), ragged=False),
]


def by_rank(segments: torch.Tensor, B: int, k: int) -> dict:
    """{(b, rank): ((s, d, c), ...)} from rows (rank, batch, start, duration, label)."""
    out = {}
    for rank, b, s, d, c in segments.tolist():
        out.setdefault((b, rank), []).append((s, d, c))
    return {key: tuple(v) for key, v in out.items()}


def check_against_enumeration(kw: dict, k: int, interval: int = 0):
    B = kw["scores"].shape[0]
    bf = brute_force(**kw)
    best, segments = F.kbest(**kw, k=k, interval=interval)
    assert best.shape == (B, k)
    found = by_rank(segments, B, k)
    key = segments[:, 0] * B * 100 + segments[:, 1] * 100 + segments[:, 2]
    assert bool((key[1:] > key[:-1]).all()), "rows must be sorted by rank, batch, start"
    for b in range(B):
        ranked = sorted((v for v in bf.scores[b].values() if v > -math.inf), reverse=True)
        expected = ranked[:k] + [-math.inf] * (k - min(k, len(ranked)))
        assert_close(f"scores[{b}]", best[b], torch.tensor(expected, dtype=torch.float64), TOL)
        seen = set()
        for rank in range(k):
            seg = found.get((b, rank))
            if rank >= len(ranked):
                assert seg is None, f"sequence {b} rank {rank}: rows for a missing rank"
                continue
            assert seg is not None and seg not in seen, f"sequence {b} rank {rank}"
            seen.add(seg)
            assert abs(bf.scores[b][seg] - float(best[b, rank])) <= TOL


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("k", [1, 4, 11])
def test_matches_enumeration(case, k):
    check_against_enumeration(case.kwargs, k)


@pytest.mark.parametrize("interval", [1, 2, 5])
def test_checkpoint_interval_does_not_change_the_result(interval):
    kw = make_case(57, 3, 8, 3, 2, duration_dependent=True).kwargs
    check_against_enumeration(kw, 6, interval)
    assert torch.equal(F.kbest(**kw, k=6, interval=interval)[1], F.kbest(**kw, k=6)[1])


def test_k_larger_than_the_number_of_segmentations():
    kw = make_case(58, 2, 3, 2, 2, ragged=False).kwargs
    n = count_segmentations(3, 2, 2)  # 12
    best, segments = F.kbest(**kw, k=n + 5)
    assert bool(torch.isfinite(best[:, :n]).all()) and bool((best[:, n:] == -math.inf).all())
    assert int(segments[:, 0].max()) == n - 1
    check_against_enumeration(kw, n + 5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rank_zero_is_viterbi(case):
    best, segments = F.kbest(**case.kwargs, k=3)
    v_best, v_seg = F.viterbi(**case.kwargs)
    assert_close("rank 0 score", best[:, 0], v_best, TOL)
    rank0 = segments[segments[:, 0] == 0, 1:]
    if not torch.equal(rank0, v_seg):
        # Segmentations whose scores are equal in exact arithmetic differ by
        # rounding that depends on the order of summation: either may win.
        live = torch.isfinite(v_best)
        assert_close("score of rank 0", F.score(rank0, **case.kwargs)[live], v_best[live], TOL)


@pytest.mark.parametrize("duration_dependent", [False, True])
def test_ties_are_broken_as_viterbi_breaks_them(duration_dependent):
    # Small integer potentials: many exactly equal scores, summed exactly.
    g = torch.Generator().manual_seed(3)
    B, T, K, C = 4, 7, 3, 2
    ints = lambda *shape: torch.randint(-1, 2, shape, generator=g).double()
    kw = dict(scores=ints(B, T, C), transition=ints(K, C, C) if duration_dependent else ints(C, C),
              duration=ints(K, C), lengths=torch.tensor([7, 5, 3, 7]), end_transition=ints(C))
    best, segments = F.kbest(**kw, k=5)
    for backend in ("torch", "cpu"):
        v_best, v_seg = F.viterbi(**kw, backend=backend)
        assert_close("rank 0 score", best[:, 0], v_best, 0.0)
        assert torch.equal(segments[segments[:, 0] == 0, 1:], v_seg)
    bf = brute_force(**kw)
    tied = 0
    for b in range(B):
        ranked = sorted(bf.scores[b].values(), reverse=True)[:5]
        assert best[b].tolist() == ranked
        tied += sum(a == b for a, b in zip(ranked, ranked[1:]))
    assert tied >= 4, "the case must have tied scores to test anything"



def test_float32_long_sequence_and_validation():
    case = make_case(59, 2, 400, 5, 3, dtype=torch.float32)
    best, segments = F.kbest(**case.kwargs, k=3)
    assert best.dtype == torch.float32
    assert bool((best[:, :-1] >= best[:, 1:]).all())
    for rank in range(3):
        rows = segments[segments[:, 0] == rank, 1:]
        assert_close(f"score of rank {rank}", F.score(rows, **case.kwargs), best[:, rank], 1e-3)
    with pytest.raises(ValueError, match="k must be"):
        F.kbest(**case.kwargs, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        F.kbest(**case.kwargs, k=2.0)
