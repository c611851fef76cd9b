"""The C++ CPU kernel's streaming Viterbi.

The kernel runs the max-semiring scan once, keeping the ring at the start of
every span of ``floor(sqrt(T*K))`` positions, then follows the best path back
a span at a time, recomputing each span's backpointers from its checkpoint.
A recompute that differed from the first pass in one bit, or a lookup at the
wrong row, would change the segmentation: these cases make the path cross
many span boundaries (T = 200, K = 6: spans of 34 positions), force segments
to straddle them (only the longest durations allowed), and hold the kernel
to the reference's full-table Viterbi (``flashsemicrf.reference``) bit for
bit: the best score and the segmentation, tie rule included (integer inputs,
where every sum is exact and ties are real). The CUDA kernel's traceback is
checked under the emulator (test_cuda_emulated.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import flashsemicrf as F
from flashsemicrf import backends as _backends
from oracles import brute_force

pytestmark = pytest.mark.skipif(not _backends.HAS_CPU_KERNELS, reason="needs the C++ CPU kernel")

NEG_INF = float("-inf")


def span_length(T: int, K: int) -> int:
    return math.isqrt(T * K)


def problem(B, T, K, C, dd, dtype, seed, kind, *, boundary=False):
    """kind: "rand"; "long" (only durations K-1 and K, so that segments
    straddle span boundaries); "ties" (small integers: exact sums, many exact
    ties); "forbidden" (a third of transitions, durations and boundary
    transitions -inf)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        x = torch.randn(*s, generator=g, dtype=torch.float64)
        return (x * 2).round() if kind == "ties" else x

    kw = dict(scores=r(B, T, C), transition=r(K, C, C) if dd else r(C, C), duration=r(K, C),
              start_transition=r(C), end_transition=r(C))
    if boundary:
        kw.update(start_scores=r(B, T, C), end_scores=r(B, T, C))
    if kind == "long" and K > 2:
        kw["duration"][: K - 2] = NEG_INF
    if kind == "forbidden":
        for name in ("transition", "duration", "start_transition", "end_transition"):
            x = kw[name]
            kw[name] = x.masked_fill(torch.rand(x.shape, generator=g) < 0.3, NEG_INF)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    kw["lengths"] = lengths
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()}


# (B, T, K, C): many spans; ragged; K > T (one span); T = 1; K = 1 (spans of
# sqrt(T) positions, every segment of length 1); C > 32.
SHAPES = [(3, 200, 6, 4), (3, 50, 4, 3), (2, 300, 2, 3), (3, 5, 9, 3), (2, 1, 3, 2),
          (2, 90, 1, 2), (2, 97, 13, 5), (2, 120, 30, 33)]
KINDS = ["rand", "long", "ties", "forbidden"]


def bits(x):
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-K{}-C{}".format(*s))
def test_streaming_viterbi_is_the_full_table_viterbi(shape, kind, dd, dtype):
    B, T, K, C = shape
    kw = problem(B, T, K, C, dd, dtype, seed=T * 7 + K + C, kind=kind, boundary=T % 2 == 0)
    best, segs = F.viterbi(**kw, backend="cpu")
    best_ref, segs_ref = F.viterbi(**kw, backend="torch")
    assert torch.equal(bits(best), bits(best_ref)), (best, best_ref)
    assert torch.equal(segs, segs_ref), (segs, segs_ref)


def crossings(segs, interval):
    """Segments that straddle a span boundary j·interval (s < j·interval < s + d)."""
    s, d = segs[:, 1], segs[:, 2]
    return int(((s // interval) != ((s + d - 1) // interval)).sum())


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_forced_long_segments_straddle_span_boundaries(dd):
    """With only durations K-1 and K allowed the path's segments straddle most
    span boundaries, and the traceback still finds the reference's path."""
    T, K, C = 200, 6, 3
    kw = problem(2, T, K, C, dd, torch.float64, seed=5, kind="long")
    kw["lengths"] = torch.tensor([T, 171])
    best, segs = F.viterbi(**kw, backend="cpu")
    assert torch.isfinite(best).all()
    assert torch.equal(segs, F.viterbi(**kw, backend="torch")[1])
    assert set(segs[:, 2].tolist()) <= {K - 1, K}
    n_spans = -(-T // span_length(T, K))
    assert crossings(segs[segs[:, 0] == 0], span_length(T, K)) >= n_spans // 2


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_streaming_viterbi_against_brute_force(dd):
    """Short sequences of two or three spans (T = 8, K = 3: spans of 4)
    against exhaustive enumeration: the best score, and the path scores it."""
    for seed in range(6):
        kw = problem(3, 8, 3, 2, dd, torch.float64, seed=seed, kind="forbidden" if seed % 2 else "rand",
                     boundary=seed % 3 == 0)
        best, segs = F.viterbi(**kw, backend="cpu")
        bf = brute_force(**kw)
        torch.testing.assert_close(best, bf.best, rtol=0, atol=1e-12)
        for b in range(3):
            if bf.best[b] > NEG_INF:
                mine = tuple((s, d, c) for bb, s, d, c in segs.tolist() if bb == b)
                assert abs(bf.scores[b][mine] - float(bf.best[b])) < 1e-12
            else:
                assert not (segs[:, 0] == b).any()


def test_no_path_and_nan():
    """A NaN score gives its sequence a NaN best and no segments, the others
    their own results; without any valid segmentation, best is -inf and
    there are no segments."""
    ops = torch.ops.flashsemicrf
    kw = problem(3, 60, 5, 3, False, torch.float64, seed=9, kind="rand")
    kw["lengths"][1] = 60
    args = [kw["scores"].clone(), kw["transition"], kw["duration"], kw["lengths"],
            kw["start_transition"], kw["end_transition"], None, None]
    clean_best, clean_label = ops.viterbi(*args)
    args[0][1, 3, 0] = float("nan")
    best, label = ops.viterbi(*args)
    assert math.isnan(best[1]) and (label[1] == -1).all()
    others = [0, 2]
    assert torch.equal(bits(best[others]), bits(clean_best[others]))
    assert torch.equal(label[others], clean_label[others])
    args[2] = torch.full_like(kw["duration"], NEG_INF)
    best, label = ops.viterbi(*args)
    assert (best[others] == NEG_INF).all() and (label == -1).all()


def workspace_bytes(T, K, C, dd, dtype):
    """The working memory one sequence of a CPU Viterbi call held (bytes)."""
    testing = torch.ops.flashsemicrf_testing
    testing.cpu_viterbi_workspace_bytes()  # reset
    kw = problem(1, T, K, C, dd, dtype, seed=1, kind="rand")
    F.viterbi(**kw, backend="cpu")
    return int(testing.cpu_viterbi_workspace_bytes())


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_working_memory_grows_as_sqrt_T(dd):
    """16 times the length takes about 4 times the working memory (the
    checkpoints and one span's backpointers, O(sqrt(T·K)·C)), a small
    fraction of the (T+1, C) backpointer tables a full traceback needs."""
    K, C = 4, 3
    small, large = (workspace_bytes(T, K, C, dd, torch.float32) for T in (1000, 16000))
    assert 3.5 <= large / small <= 4.5, (small, large)
    full_tables = 2 * (16000 + 1) * C * 4
    assert large * 20 < full_tables, (large, full_tables)
