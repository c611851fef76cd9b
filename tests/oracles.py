"""Independent test oracles for the semi-Markov CRF of the README, "The model".

Nothing here imports ``flashsemicrf``: these are the yardsticks the library is
measured against.  Everything is float64 and written for clarity, not speed.

The model
---------
Sizes: batch B, padded length T, labels C, maximum duration K.  A segmentation
of a length-L sequence is a tuple of segments ``(s, d, c)`` (start, duration
1..K, label) that tile ``[0, L)`` in order.  The score of segment ``(s, d, c)``
preceded by label ``c'`` (or by nothing when it is the first one) is::

    psi = sum(scores[s:s+d, c]) + duration[d-1, c]
          + (transition[c', c]  (3-D: transition[d-1, c', c])  or  start_transition[c] if first)
          + start_scores[s, c] + end_scores[s+d-1, c]
          + (end_transition[c] if s + d == L)

A segmentation scores the sum of its psi; log Z is the log-sum-exp over all
segmentations of [0, L) and the Viterbi score is the max.  Any input may hold
-inf (a forbidden label/duration/transition).  A sequence with no segmentation
of finite score has log Z = -inf; its marginals and entropy are defined as 0.

Contents
--------
* :func:`enumerate_segmentations`, :func:`segmentation_score`, :func:`brute_force`
  -- exhaustive enumeration (use for T <= 8, K <= 4, C <= 3).
* :func:`dense_log_partition`, :func:`dense_viterbi_score` -- O(T*K*C^2)
  semi-Markov forward over segment ends in plain differentiable torch ops, so
  ``torch.autograd`` gives every gradient (and d logZ / d scores = label
  marginals).
* :func:`flash_semicrf_log_partition` and friends -- the mapping of our inputs
  onto flash-semicrf 0.2.0 ``semi_crf_streaming_forward``.
* :func:`torch_struct_log_partition` and friends -- the mapping onto
  torch-struct 0.5 ``SemiMarkovCRF``.
* :func:`random_problem` -- a random instance generator for tests.

The two external packages are optional: they are imported lazily, inside the
functions that need them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch

NEG_INF = float("-inf")

Segment = Tuple[int, int, int]  # (start, duration, label)
Segmentation = Tuple[Segment, ...]


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _lse(values: Sequence[float]) -> float:
    """log(sum(exp(v))) of Python floats; -inf for an empty or all -inf list."""
    finite = [v for v in values if v != NEG_INF]
    if not finite:
        return NEG_INF
    m = max(finite)
    return m + math.log(sum(math.exp(v - m) for v in finite))


def _as_lists(t: Optional[torch.Tensor]):
    """A tensor as nested Python float lists (float64), or None."""
    if t is None:
        return None
    return t.detach().to(torch.float64).cpu().tolist()


def _lengths_list(lengths: Optional[torch.Tensor], B: int, T: int) -> List[int]:
    if lengths is None:
        return [T] * B
    out = [int(x) for x in torch.as_tensor(lengths).reshape(-1).tolist()]
    if len(out) != B:
        raise ValueError(f"lengths has {len(out)} entries, expected {B}")
    for L in out:
        if not 1 <= L <= T:
            raise ValueError(f"length {L} outside [1, {T}]")
    return out


# ---------------------------------------------------------------------------
# 1. Enumeration
# ---------------------------------------------------------------------------


@lru_cache(maxsize=None)
def enumerate_segmentations(L: int, K: int, C: int) -> Tuple[Segmentation, ...]:
    """Every segmentation of positions [0, L) into segments (s, d, c).

    d ranges over 1..K and c over 0..C-1; adjacent segments may share a label.
    The result is a tuple of tuples of (s, d, c) tuples, in a fixed order
    (lexicographic on the segment list).  L = 0 gives the single empty
    segmentation.
    """
    if L < 0 or K < 1 or C < 1:
        raise ValueError("need L >= 0, K >= 1, C >= 1")
    out: List[Segmentation] = []

    def extend(pos: int, prefix: List[Segment]) -> None:
        if pos == L:
            out.append(tuple(prefix))
            return
        for d in range(1, min(K, L - pos) + 1):
            for c in range(C):
                prefix.append((pos, d, c))
                extend(pos + d, prefix)
                prefix.pop()

    extend(0, [])
    return tuple(out)


def count_segmentations(L: int, K: int, C: int) -> int:
    """Number of segmentations, by the recursion n(L) = C * sum_d n(L - d)."""
    n = [1] + [0] * L
    for t in range(1, L + 1):
        n[t] = C * sum(n[t - d] for d in range(1, min(K, t) + 1))
    return n[L]


# ---------------------------------------------------------------------------
# 2. Score of one segmentation
# ---------------------------------------------------------------------------


def segmentation_score(
    seg: Sequence[Segment],
    scores_b,
    transition,
    duration,
    L: int,
    start_transition=None,
    end_transition=None,
    start_scores_b=None,
    end_scores_b=None,
) -> float:
    """Score (Python float) of segmentation ``seg`` of ONE sequence of length L.

    ``scores_b``: (T, C); ``transition``: (C, C) or (K, C, C); ``duration``:
    (K, C); optional ``start_transition``/``end_transition``: (C,);
    ``start_scores_b``/``end_scores_b``: (T, C).  Tensors or nested lists.
    The segmentation must tile [0, L) (checked).
    """
    scores_b = _as_lists(scores_b) if torch.is_tensor(scores_b) else scores_b
    transition = _as_lists(transition) if torch.is_tensor(transition) else transition
    duration = _as_lists(duration) if torch.is_tensor(duration) else duration
    start_transition = _as_lists(start_transition) if torch.is_tensor(start_transition) else start_transition
    end_transition = _as_lists(end_transition) if torch.is_tensor(end_transition) else end_transition
    start_scores_b = _as_lists(start_scores_b) if torch.is_tensor(start_scores_b) else start_scores_b
    end_scores_b = _as_lists(end_scores_b) if torch.is_tensor(end_scores_b) else end_scores_b

    K = len(duration)
    trans_3d = isinstance(transition[0][0], list)
    pos = 0
    total = 0.0
    prev_label = None
    for s, d, c in seg:
        if s != pos or not 1 <= d <= K or s + d > L:
            raise ValueError(f"segmentation {seg} does not tile [0, {L}) with durations 1..{K}")
        psi = sum(scores_b[u][c] for u in range(s, s + d))
        psi += duration[d - 1][c]
        if prev_label is None:
            if start_transition is not None:
                psi += start_transition[c]
        elif trans_3d:
            psi += transition[d - 1][prev_label][c]
        else:
            psi += transition[prev_label][c]
        if start_scores_b is not None:
            psi += start_scores_b[s][c]
        if end_scores_b is not None:
            psi += end_scores_b[s + d - 1][c]
        if s + d == L and end_transition is not None:
            psi += end_transition[c]
        total += psi
        pos = s + d
        prev_label = c
    if pos != L:
        raise ValueError(f"segmentation {seg} does not reach L={L}")
    return total


# ---------------------------------------------------------------------------
# 3. Brute force over a batch
# ---------------------------------------------------------------------------


@dataclass
class BruteForceResult:
    """Exhaustive-enumeration results for a batch (all tensors float64, CPU).

    log_partition:     (B,) log Z (-inf when no segmentation has finite score).
    best:              (B,) Viterbi score (-inf likewise).
    best_segmentation: per b, a tuple of (s, d, c) achieving ``best`` (ties
                       broken arbitrarily: the first in enumeration order), or
                       None when the sequence is infeasible.
    label_marginals:   (B, T, C) P(position t lies in a label-c segment); 0 on
                       padding and for infeasible sequences.
    start_marginals:   (B, T) P(a segment starts at t); same conventions.
    segment_marginals: (B, T, K, C) P(segment (s, d, c) is used), indexed
                       [b, s, d-1, c].
    entropy:           (B,) entropy in nats, computed as logZ - E_p[score]
                       (0 for infeasible sequences).
    distribution:      per b, {segmentation: probability} over segmentations
                       of finite score (empty dict when infeasible).
    scores:            per b, {segmentation: score} over ALL segmentations.
    """

    log_partition: torch.Tensor
    best: torch.Tensor
    best_segmentation: List[Optional[Segmentation]]
    label_marginals: torch.Tensor
    start_marginals: torch.Tensor
    segment_marginals: torch.Tensor
    entropy: torch.Tensor
    distribution: List[Dict[Segmentation, float]]
    scores: List[Dict[Segmentation, float]]

    def __getitem__(self, key):  # dict-style access, e.g. result["log_partition"]
        return getattr(self, key)


def brute_force(
    scores: torch.Tensor,
    transition: torch.Tensor,
    duration: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    *,
    start_transition: Optional[torch.Tensor] = None,
    end_transition: Optional[torch.Tensor] = None,
    start_scores: Optional[torch.Tensor] = None,
    end_scores: Optional[torch.Tensor] = None,
) -> BruteForceResult:
    """Enumerate every segmentation of every sequence in the batch.

    Shapes as in the README, "The model": scores (B, T, C); transition (C, C) or
    (K, C, C); duration (K, C); lengths (B,) or None (= all T); start/end
    transitions (C,); start/end scores (B, T, C).  Only for tiny problems.
    """
    B, T, C = scores.shape
    K = duration.shape[0]
    Ls = _lengths_list(lengths, B, T)

    sc = _as_lists(scores)
    tr = _as_lists(transition)
    du = _as_lists(duration)
    st = _as_lists(start_transition)
    en = _as_lists(end_transition)
    ss = _as_lists(start_scores)
    es = _as_lists(end_scores)

    log_z = []
    best = []
    best_seg: List[Optional[Segmentation]] = []
    entropy = []
    dists: List[Dict[Segmentation, float]] = []
    all_scores: List[Dict[Segmentation, float]] = []
    labels = torch.zeros(B, T, C, dtype=torch.float64)
    starts = torch.zeros(B, T, dtype=torch.float64)
    segm = torch.zeros(B, T, K, C, dtype=torch.float64)

    for b in range(B):
        L = Ls[b]
        segs = enumerate_segmentations(L, K, C)
        score_of = {
            seg: segmentation_score(
                seg,
                sc[b],
                tr,
                du,
                L,
                start_transition=st,
                end_transition=en,
                start_scores_b=None if ss is None else ss[b],
                end_scores_b=None if es is None else es[b],
            )
            for seg in segs
        }
        all_scores.append(score_of)
        lz = _lse(list(score_of.values()))
        log_z.append(lz)

        if lz == NEG_INF:
            best.append(NEG_INF)
            best_seg.append(None)
            entropy.append(0.0)
            dists.append({})
            continue

        top_seg, top = None, NEG_INF
        for seg, v in score_of.items():
            if v > top:
                top_seg, top = seg, v
        best.append(top)
        best_seg.append(top_seg)

        dist = {}
        expected_score = 0.0
        for seg, v in score_of.items():
            if v == NEG_INF:
                continue
            p = math.exp(v - lz)
            dist[seg] = p
            expected_score += p * v
            for s, d, c in seg:
                starts[b, s] += p
                segm[b, s, d - 1, c] += p
                for u in range(s, s + d):
                    labels[b, u, c] += p
        dists.append(dist)
        entropy.append(lz - expected_score)

    f64 = dict(dtype=torch.float64)
    return BruteForceResult(
        log_partition=torch.tensor(log_z, **f64),
        best=torch.tensor(best, **f64),
        best_segmentation=best_seg,
        label_marginals=labels,
        start_marginals=starts,
        segment_marginals=segm,
        entropy=torch.tensor(entropy, **f64),
        distribution=dists,
        scores=all_scores,
    )


# ---------------------------------------------------------------------------
# 4. Dense dynamic program (differentiable)
# ---------------------------------------------------------------------------


def _safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp whose gradient is 0 (not NaN) where every entry is -inf.

    torch.logsumexp returns -inf there but back-propagates NaN.  No in-place
    ops, so it is safe inside autograd graphs.
    """
    m = x.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.exp(x - m).sum(dim=dim)
    ok = total > 0
    safe_total = torch.where(ok, total, torch.ones_like(total))
    out = torch.log(safe_total) + m.squeeze(dim)
    return torch.where(ok, out, torch.full_like(out, NEG_INF))


def _dense_forward(
    reduce,
    scores,
    transition,
    duration,
    lengths,
    start_transition,
    end_transition,
    start_scores,
    end_scores,
):
    """Semi-Markov forward over segment ends in the semiring given by ``reduce``.

    alpha[t][b, c] = reduce over (d, c') of the best/total score of a prefix
    [0, t) whose last segment is (t-d, d, c) preceded by c' (or by nothing).
    End transitions are added only at t = L_b, when reading off the result.
    """
    B, T, C = scores.shape
    K = duration.shape[0]
    if transition.dim() not in (2, 3):
        raise ValueError("transition must be (C, C) or (K, C, C)")
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = torch.as_tensor(lengths).to(device=scores.device, dtype=torch.long).reshape(B)

    alpha: List[Optional[torch.Tensor]] = [None] * (T + 1)
    for t in range(1, T + 1):
        terms = []
        for d in range(1, min(K, t) + 1):
            s = t - d
            seg = scores[:, s:t, :].sum(dim=1) + duration[d - 1]  # (B, C)
            if start_scores is not None:
                seg = seg + start_scores[:, s, :]
            if end_scores is not None:
                seg = seg + end_scores[:, t - 1, :]
            if s == 0:
                if start_transition is not None:
                    seg = seg + start_transition
                terms.append(seg)
            else:
                tr = transition if transition.dim() == 2 else transition[d - 1]
                # prev[b, c] = reduce_{c'} alpha[s][b, c'] + tr[c', c]
                prev = reduce(alpha[s].unsqueeze(2) + tr.unsqueeze(0), 1)
                terms.append(seg + prev)
        alpha[t] = reduce(torch.stack(terms, dim=-1), -1)

    ends = torch.stack(alpha[1:], dim=1)  # (B, T, C): ends[:, t-1] = alpha[t]
    final = ends[torch.arange(B, device=scores.device), lengths - 1]  # (B, C)
    if end_transition is not None:
        final = final + end_transition
    return reduce(final, -1)


def dense_log_partition(
    scores: torch.Tensor,
    transition: torch.Tensor,
    duration: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    *,
    start_transition: Optional[torch.Tensor] = None,
    end_transition: Optional[torch.Tensor] = None,
    start_scores: Optional[torch.Tensor] = None,
    end_scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B,) log Z by the O(T*K*C^2) forward over segment ends.

    Plain differentiable torch ops (no in-place updates), in the dtype of the
    inputs (pass float64 for an oracle).  Ragged ``lengths`` are read off at
    alpha[L_b].  Infeasible sequences give -inf with zero gradients.
    """
    return _dense_forward(
        _safe_logsumexp,
        scores,
        transition,
        duration,
        lengths,
        start_transition,
        end_transition,
        start_scores,
        end_scores,
    )


def _amax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.amax(dim=dim)


def dense_viterbi_score(
    scores: torch.Tensor,
    transition: torch.Tensor,
    duration: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    *,
    start_transition: Optional[torch.Tensor] = None,
    end_transition: Optional[torch.Tensor] = None,
    start_scores: Optional[torch.Tensor] = None,
    end_scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B,) Viterbi (max) score by the same forward in the max semiring."""
    return _dense_forward(
        _amax,
        scores,
        transition,
        duration,
        lengths,
        start_transition,
        end_transition,
        start_scores,
        end_scores,
    )


def segments_to_tensor(segmentations: Sequence[Optional[Segmentation]]) -> torch.Tensor:
    """Per-batch segmentations -> LongTensor (N, 4) of rows (batch, start, duration, label)."""
    rows = [
        (b, s, d, c)
        for b, seg in enumerate(segmentations)
        if seg is not None
        for (s, d, c) in seg
    ]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)


# ---------------------------------------------------------------------------
# 5a. flash-semicrf 0.2.0
# ---------------------------------------------------------------------------
#
# API (read from its installed source, flash_semicrf/streaming/autograd.py and
# pytorch_reference.py):
#
#   semi_crf_streaming_forward(cum_scores, transition, duration_bias, lengths, K,
#                              semiring="log", proj_start=None, proj_end=None,
#                              use_triton=True, use_compile=False, num_warps=4,
#                              checkpoint_interval=None) -> (B,)
#
#   cum_scores (B, T+1, C) with cum_scores[:, 0] = 0 and
#   cum_scores[:, t] = sum_{u<t} scores[:, u]; transition (C, C) or (K, C, C)
#   as [c_src, c_dest] (3-D indexed by d-1 of the incoming segment, like ours);
#   duration_bias (K, C), duration d at index d-1; lengths (B,) required,
#   1 <= L <= T; K = maximum duration = duration_bias.shape[0] (checked).
#   proj_start / proj_end (B, T, C) = our start_scores / end_scores.
#   It computes in the dtype of cum_scores and does NOT center anything
#   (it only warns when |cum_scores[:, -1]| averages above 1000).
#
#   Its forward starts from alpha[0, c'] = 0 for every c' and prices every
#   segment, including the first, with the transition, so the first segment
#   (0, d, c) gets LSE_{c'} transition[(d-1,) c', c] (max semiring: max_{c'}):
#   the "phantom start".  No end transition.  With a 3-D transition the
#   phantom start therefore depends on the first segment's duration, which our
#   (C,) start_transition cannot express unless it is the same for every d.


def flash_semicrf_phantom_start(transition: torch.Tensor, semiring: str = "log") -> torch.Tensor:
    """Our start_transition (C,) equivalent to flash-semicrf's phantom start.

    2-D transition: ``transition.logsumexp(0)`` ("log") / ``transition.amax(0)``
    ("max").  3-D transition: the per-duration reduction over c' must not
    depend on d (within 1e-9), else there is no equivalent and ValueError is
    raised.
    """
    red = (lambda x, dim: torch.logsumexp(x, dim)) if semiring == "log" else (lambda x, dim: x.amax(dim))
    if transition.dim() == 2:
        return red(transition, 0)
    per_d = red(transition, 1)  # (K, C)
    if not torch.allclose(per_d, per_d[:1].expand_as(per_d), rtol=0, atol=1e-9):
        raise ValueError(
            "flash-semicrf's phantom start with a 3-D transition depends on the duration of "
            "the first segment; there is no equivalent (C,) start_transition"
        )
    return per_d[0]


def scores_to_cum_scores(scores: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, T+1, C) prefix sums with a leading zero row (differentiable)."""
    zero = torch.zeros_like(scores[:, :1, :])
    return torch.cat([zero, torch.cumsum(scores, dim=1)], dim=1)


def flash_semicrf_log_partition(
    scores: torch.Tensor,
    transition: torch.Tensor,
    duration: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    semiring: str = "log",
    start_scores: Optional[torch.Tensor] = None,
    end_scores: Optional[torch.Tensor] = None,
    use_triton: bool = False,
) -> torch.Tensor:
    """flash-semicrf 0.2.0 ``semi_crf_streaming_forward`` on our inputs.

    Equals our log Z (semiring "log") or Viterbi score (semiring "max") with
    ``start_transition = flash_semicrf_phantom_start(transition, semiring)``,
    no end transition, the same start/end scores.  ``use_triton=False`` forces
    its PyTorch path (it only uses Triton for CUDA tensors anyway).  With
    semiring "max" it refuses inputs that require grad, so it runs under
    no_grad.  It raises RuntimeError ("Non-finite partition") when a sequence
    has no finite-score segmentation and gradients are required, so feed it
    feasible problems only.
    """
    from flash_semicrf.streaming import semi_crf_streaming_forward

    B, T, C = scores.shape
    K = duration.shape[0]
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=scores.device)
    lengths = torch.as_tensor(lengths).to(device=scores.device, dtype=torch.long)
    if K == 2 and transition.dim() == 3 and start_scores is None and end_scores is None:
        # Its K == 2 fast path (taken when neither proj_start nor proj_end is
        # given) ignores the duration index of a 3-D transition: it gives wrong
        # values, or a broadcast error when B is not 1 or 2.  A zero proj_start
        # routes the call to its generic path, which is correct.
        start_scores = torch.zeros_like(scores)
    args = [scores_to_cum_scores(scores), transition, duration, lengths, K]
    kwargs = dict(semiring=semiring, proj_start=start_scores, proj_end=end_scores, use_triton=use_triton)
    if semiring == "max":
        with torch.no_grad():
            return semi_crf_streaming_forward(*args, **kwargs)
    return semi_crf_streaming_forward(*args, **kwargs)


# ---------------------------------------------------------------------------
# 5b. torch-struct 0.5
# ---------------------------------------------------------------------------
#
# SemiMarkovCRF(edge, lengths=None) with edge (B, N-1, K', C, C), where
# edge[b, n, k, c_new, c_prev] scores a segment covering [n, n+k) whose label
# is c_new, following a segment labelled c_prev (torch_struct/semimarkov.py,
# to_parts: "t x z_t x z_{t-1}").  N counts boundary points, so N-1 = our L
# and torch-struct lengths = L + 1; k = 0 is never used, so K' = our K + 1.
# At n = 0 there is no previous segment: c_prev ranges freely over the C
# labels at no cost (its chart is initialised with semiring.one on the
# diagonal and the end sums over both labels), so edge[b, 0, k, c, :] is
# reduced over c_prev (logsumexp / max).  Pricing position 0 like every other
# position with transition[c', c] thus gives the same phantom start as
# flash-semicrf: start_transition = transition.logsumexp(0).
# Known bug (torch-struct issue #110): log Z is wrong for mini-batches with
# different lengths, so we always call it one sequence at a time, truncated
# to its own length, with lengths=None.


def torch_struct_edges(
    scores_b: torch.Tensor,
    transition: torch.Tensor,
    duration: torch.Tensor,
    L: int,
    *,
    start_transition: Optional[torch.Tensor] = None,
    end_transition: Optional[torch.Tensor] = None,
    start_scores_b: Optional[torch.Tensor] = None,
    end_scores_b: Optional[torch.Tensor] = None,
    semiring: str = "log",
    phantom_start: bool = False,
) -> torch.Tensor:
    """Dense torch-struct edge tensor (1, L, min(K, L)+1, C, C) for ONE sequence.

    edge[0, s, d, c, c'] = psi(s, d, c | c') for 1 <= d <= min(K, L), s+d <= L
    (other entries -inf, except index d = 0 which is unused and set to -inf).

    Position 0 (first segment): torch-struct reduces over c' there.  With
    ``phantom_start=True`` we fill it like any other position (transition
    included, start_transition ignored) -- torch-struct's native convention.
    Otherwise we make it reproduce our ``start_transition`` exactly: the
    first-segment score minus log C in every c' column ("log": the LSE over C
    equal columns adds log C back), or the plain score ("max").
    Built with differentiable ops (no in-place writes into tensors that need
    grad), so gradients flow back to the inputs.
    """
    T, C = scores_b.shape
    Kd = min(duration.shape[0], L)
    dtype, device = scores_b.dtype, scores_b.device
    neg = torch.full((C, C), NEG_INF, dtype=dtype, device=device)
    rows = []
    for s in range(L):
        blocks = [neg]  # d = 0: unused
        for d in range(1, Kd + 1):
            if s + d > L:
                blocks.append(neg)
                continue
            seg = scores_b[s : s + d].sum(0) + duration[d - 1]  # (C,) over the new label
            if start_scores_b is not None:
                seg = seg + start_scores_b[s]
            if end_scores_b is not None:
                seg = seg + end_scores_b[s + d - 1]
            if s + d == L and end_transition is not None:
                seg = seg + end_transition
            tr = transition if transition.dim() == 2 else transition[d - 1]  # [c', c]
            if s > 0 or phantom_start:
                block = seg.unsqueeze(1) + tr.transpose(0, 1)  # [c, c']
            else:
                first = seg if start_transition is None else seg + start_transition
                if semiring == "log":
                    first = first - math.log(C)
                block = first.unsqueeze(1).expand(C, C)
            blocks.append(block)
        rows.append(torch.stack(blocks, 0))  # (Kd+1, C, C)
    return torch.stack(rows, 0).unsqueeze(0)  # (1, L, Kd+1, C, C)


def _torch_struct_per_sequence(
    fn,
    scores,
    transition,
    duration,
    lengths,
    start_transition,
    end_transition,
    start_scores,
    end_scores,
    semiring,
    phantom_start,
):
    B, T, C = scores.shape
    Ls = _lengths_list(lengths, B, T)
    out = []
    for b in range(B):
        edge = torch_struct_edges(
            scores[b],
            transition,
            duration,
            Ls[b],
            start_transition=start_transition,
            end_transition=end_transition,
            start_scores_b=None if start_scores is None else start_scores[b],
            end_scores_b=None if end_scores is None else end_scores[b],
            semiring=semiring,
            phantom_start=phantom_start,
        )
        out.append(fn(edge, Ls[b]))
    return out


def torch_struct_log_partition(
    scores: torch.Tensor,
    transition: torch.Tensor,
    duration: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    *,
    start_transition: Optional[torch.Tensor] = None,
    end_transition: Optional[torch.Tensor] = None,
    start_scores: Optional[torch.Tensor] = None,
    end_scores: Optional[torch.Tensor] = None,
    phantom_start: bool = False,
) -> torch.Tensor:
    """(B,) log Z from torch-struct 0.5 ``SemiMarkovCRF(edge).partition``.

    One sequence at a time (issue #110).  ``phantom_start=False``: our model
    exactly, start_transition included.  ``phantom_start=True``: torch-struct's
    native first segment (start_transition ignored), which should equal ours
    with ``start_transition = transition.logsumexp(0)`` (2-D transition).
    Differentiable.
    """
    from torch_struct import SemiMarkovCRF

    def fn(edge, L):
        with warnings.catch_warnings():  # its distribution lacks arg_constraints
            warnings.simplefilter("ignore", UserWarning)
            return SemiMarkovCRF(edge).partition[0]

    return torch.stack(
        _torch_struct_per_sequence(
            fn, scores, transition, duration, lengths, start_transition, end_transition,
            start_scores, end_scores, "log", phantom_start,
        )
    )


def torch_struct_viterbi(
    scores: torch.Tensor,
    transition: torch.Tensor,
    duration: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    *,
    start_transition: Optional[torch.Tensor] = None,
    end_transition: Optional[torch.Tensor] = None,
    start_scores: Optional[torch.Tensor] = None,
    end_scores: Optional[torch.Tensor] = None,
    phantom_start: bool = False,
) -> Tuple[torch.Tensor, List[Segmentation]]:
    """((B,) max score, per-b argmax segmentation) from torch-struct's ``.max`` /
    ``.argmax`` (argmax parts are one-hot edges [s, d, c, c']; read (s, d, c)).
    Not differentiable (computed under no_grad)."""
    from torch_struct import SemiMarkovCRF

    def fn(edge, L):
        edge = edge.detach()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dist = SemiMarkovCRF(edge)
            best = dist.max[0].detach()
            parts = dist.argmax[0].detach()
        nz = parts.nonzero().tolist()
        seg = tuple(sorted((s, d, c) for s, d, c, _ in nz))
        return best, seg

    res = _torch_struct_per_sequence(
        fn, scores, transition, duration, lengths, start_transition, end_transition,
        start_scores, end_scores, "max", phantom_start,
    )
    return torch.stack([r[0] for r in res]), [r[1] for r in res]


# ---------------------------------------------------------------------------
# Random problems for tests
# ---------------------------------------------------------------------------


@dataclass
class Problem:
    """A random instance.  ``kwargs()`` gives the keyword arguments of the public functions."""

    scores: torch.Tensor
    transition: torch.Tensor
    duration: torch.Tensor
    lengths: Optional[torch.Tensor]
    start_transition: Optional[torch.Tensor] = None
    end_transition: Optional[torch.Tensor] = None
    start_scores: Optional[torch.Tensor] = None
    end_scores: Optional[torch.Tensor] = None

    def args(self):
        return (self.scores, self.transition, self.duration, self.lengths)

    def kwargs(self):
        return dict(
            start_transition=self.start_transition,
            end_transition=self.end_transition,
            start_scores=self.start_scores,
            end_scores=self.end_scores,
        )

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The float inputs that are present, by name."""
        names = ["scores", "transition", "duration", "start_transition", "end_transition",
                 "start_scores", "end_scores"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def with_grad(self) -> "Problem":
        """A copy whose float inputs are fresh leaves requiring grad."""
        fields = {n: getattr(self, n) for n in self.__dataclass_fields__}
        for n, t in self.tensors().items():
            fields[n] = t.detach().clone().requires_grad_(True)
        return Problem(**fields)


def random_problem(
    gen: torch.Generator,
    B: int,
    T: int,
    C: int,
    K: int,
    *,
    trans3d: bool = False,
    ragged: bool = True,
    use_lengths: bool = True,
    start_transition: bool = False,
    end_transition: bool = False,
    start_scores: bool = False,
    end_scores: bool = False,
    neg_inf_prob: float = 0.0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> Problem:
    """Random inputs; each entry of transition/duration/start/end (transitions
    and scores) is set to -inf with probability ``neg_inf_prob``.  Emission
    scores stay finite.  With ``ragged`` the lengths are uniform in [1, T]
    (at least one equal to T); without ``use_lengths`` lengths is None."""

    def rnd(*shape, inf=True):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        if inf and neg_inf_prob > 0:
            mask = torch.rand(*shape, generator=gen, dtype=torch.float64) < neg_inf_prob
            x = x.masked_fill(mask, NEG_INF)
        return x.to(dtype)

    scores = rnd(B, T, C, inf=False)
    transition = rnd(K, C, C) if trans3d else rnd(C, C)
    duration = rnd(K, C)
    if not use_lengths:
        lengths = None
    elif ragged:
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[torch.randint(0, B, (1,), generator=gen)] = T
    else:
        lengths = torch.full((B,), T, dtype=torch.long)
    return Problem(
        scores=scores,
        transition=transition,
        duration=duration,
        lengths=lengths,
        start_transition=rnd(C) if start_transition else None,
        end_transition=rnd(C) if end_transition else None,
        start_scores=rnd(B, T, C) if start_scores else None,
        end_scores=rnd(B, T, C) if end_scores else None,
    )


def sub_problem(p: Problem, b: int) -> Problem:
    """Sequence b of a batch as a batch of one, truncated to its own length."""
    T = p.scores.shape[1]
    L = T if p.lengths is None else int(p.lengths[b])
    cut = lambda t: None if t is None else t[b : b + 1, :L]
    return Problem(
        scores=cut(p.scores),
        transition=p.transition,
        duration=p.duration,
        lengths=torch.tensor([L]),
        start_transition=p.start_transition,
        end_transition=p.end_transition,
        start_scores=cut(p.start_scores),
        end_scores=cut(p.end_scores),
    )


__all__ = [
    "NEG_INF",
    "BruteForceResult",
    "Problem",
    "Segment",
    "Segmentation",
    "brute_force",
    "count_segmentations",
    "dense_log_partition",
    "dense_viterbi_score",
    "enumerate_segmentations",
    "flash_semicrf_log_partition",
    "flash_semicrf_phantom_start",
    "random_problem",
    "scores_to_cum_scores",
    "segmentation_score",
    "segments_to_tensor",
    "sub_problem",
    "torch_struct_edges",
    "torch_struct_log_partition",
    "torch_struct_viterbi",
]
