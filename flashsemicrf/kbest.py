"""Exact k-best segmentations, streaming: memory O(k·K·C·(checkpoints) + k·C·interval).

The k-best semiring forward keeps, at every boundary t and label c, the k best
scores A[t, c, 0..k) of segmentations of [0, t) whose last segment has label c,
each with a back-pointer (d, c', r'): the segment [t − d, t) follows the
r'-th best prefix ending at t − d with label c'. Candidates are ordered by
score, then by (d, c', r') — the shortest duration, then the smallest previous
label, then the better-ranked prefix — so rank 0 is the Viterbi path with
Viterbi's tie-breaking, and rank r a well-defined r-th best.

Storing every back-pointer would take O(T·C·k). Instead the forward saves its
state (the last K boundaries' k-best lists and the open segments' emission
sums) every ``interval`` steps; the traceback walks the spans from the last to
the first, recomputing each span's back-pointers from its checkpoint and
advancing every (sequence, rank) cursor that lies in it. Two forward passes in
all, with Δ = ⌊√(T·K)⌋ by default.

This is vectorised plain PyTorch (a Python loop over positions, in float64),
the same on every device and backend; it is not one of the compiled kernels.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch

from . import api
from ._contract import Problem, default_checkpoint_interval
from ._validation import check_positive_int

Tensor = torch.Tensor
Lengths = Union[Tensor, Sequence[int], None]
NEG_INF = float("-inf")


class _State(NamedTuple):
    """What step t needs: the k-best lists of the K previous boundaries and
    the open segments' gains."""

    prefix: Tensor  # (B, K, C, k): prefix[:, d-1] = A[t - d] (−inf for t − d ≤ 0)
    gain: Tensor  # (B, K, C): Σ scores[t-d : t] + start_scores[t-d] (−inf for t − d < 0)


class _Inputs(NamedTuple):
    """The problem in float64, absent inputs as zeros, laid out for the step."""

    scores: Tensor  # (B, T, C)
    transition: Tensor  # (1, C', 1, C) static or (K, C', 1, C): [d-1, c', ·, c]
    duration: Tensor  # (K, C)
    start_transition: Tensor  # (C,)
    end_transition: Tensor  # (C,)
    start_scores: Tensor  # (B, T, C)
    end_scores: Tensor  # (B, T, C)


def _inputs(p: Problem) -> _Inputs:
    f = p.filled()
    f64 = lambda x: x.to(torch.float64)
    tr = f64(f.transition)
    tr = tr[None] if tr.dim() == 2 else tr
    return _Inputs(f64(f.scores), tr[:, :, None, :], f64(f.duration), f64(f.start_transition),
                   f64(f.end_transition), f64(f.start_scores), f64(f.end_scores))


def _initial(x: _Inputs, k: int) -> _State:
    B, _, C = x.scores.shape
    K = x.duration.shape[0]
    prefix = x.scores.new_full((B, K, C, k), NEG_INF)
    gain = x.scores.new_full((B, K, C), NEG_INF)
    return _advance(x, 0, _State(prefix, gain), None)


def _advance(x: _Inputs, u: int, state: _State, best: Tensor | None) -> _State:
    """Take in position u: boundary u's k-best list (None for u = 0) enters the
    prefix ring, and position u's emissions every open segment."""
    prefix, gain = state
    if best is not None:
        prefix = torch.cat([best[:, None], prefix[:, :-1]], dim=1)
    fresh = x.start_scores[:, u]  # a segment starting at u
    gain = torch.cat([fresh[:, None], gain[:, :-1]], dim=1) + x.scores[:, u, None, :]
    return _State(prefix, gain)


def _step(x: _Inputs, t: int, state: _State, k: int) -> tuple[Tensor, Tensor]:
    """Boundary t's k-best lists (B, C, k) and their back-pointers (B, C, k),
    each the flat index (d − 1, c', r') into K × C × k."""
    B, _, C = x.scores.shape
    K = x.duration.shape[0]
    # (B, K, C'·k·1, C) candidates: prefix[d-1, c', r'] + transition + the segment
    base = state.gain + x.duration + x.end_scores[:, t - 1, None, :]  # (B, K, C)
    cand = state.prefix[..., None] + x.transition + base[:, :, None, None, :]  # (B, K, C', k, C)
    if t <= K:
        # The segment [0, t) has no previous label: one candidate, in slot (c' 0, r' 0).
        first = torch.full_like(cand[:, t - 1], NEG_INF)
        first[:, 0, 0] = x.start_transition + base[:, t - 1]
        cand = torch.cat([cand[:, :t - 1], first[:, None], cand[:, t:]], dim=1)
    flat = cand.permute(0, 4, 1, 2, 3).reshape(B, C, K * C * k)
    # A stable sort keeps equal scores in (d, c', r') order: Viterbi's tie-break.
    values, index = torch.sort(flat, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def _final(x: _Inputs, best: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best complete scores (B, k) at this boundary and their (c, r) flat index."""
    B, C, _ = best.shape
    total = (best + x.end_transition[None, :, None]).reshape(B, C * k)
    values, index = torch.sort(total, dim=-1, descending=True, stable=True)
    return values[:, :k], index[:, :k]


@api._documented
def kbest(
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Lengths = None,
    *,
    k: int,
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
    interval: int = 0,
) -> tuple[Tensor, Tensor]:
    """The k highest-scoring segmentations, exact; not differentiable.

    Streaming: memory O(k·K·C·T/interval + k·C·interval) per sequence
    (checkpoints of the k-best state plus one span of back-pointers), two
    forward passes. Vectorised plain PyTorch in float64 on the scores'
    device, whatever ``backend`` says (it is checked, then not used).

    Args:
        {problem}
        k: ≥ 1, segmentations per sequence.
        interval: the checkpoint interval; 0: ⌊√(T·K)⌋.

    Returns:
        ``(best, segments)``: best (B, k) in the compute dtype, the scores in
        decreasing order, −inf for ranks a sequence does not have (fewer than
        k segmentations of finite score); segments (N, 5) int64 rows (rank,
        batch, start, duration, label), sorted by rank, batch, start, each
        (rank, batch) with a finite score tiling [0, lengths[b]). Equal
        scores are ordered as Viterbi breaks ties (shortest last duration,
        then smallest previous label, recursively; smallest last label), so
        rank 0 is :func:`viterbi`'s segmentation; scores equal in exact
        arithmetic but summed to values an ulp apart may go either way.

    Raises:
        {raises}
    """
    p, _ = api._prepare("kbest", scores, transition, duration, lengths, start_transition,
                        end_transition, start_scores, end_scores, backend)
    check_positive_int("kbest", "k", k)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 0:
        raise ValueError(f"kbest: interval must be an int ≥ 0, got {interval!r}")
    with torch.no_grad():
        return _kbest(p, k, interval)


def _kbest(p: Problem, k: int, interval: int) -> tuple[Tensor, Tensor]:
    B, T, C = p.scores.shape
    K = p.duration.shape[0]
    dev = p.scores.device
    x = _inputs(p)
    interval = interval or default_checkpoint_interval(T, K)
    n_spans = -(-T // interval)
    L = p.lengths

    # Forward: checkpoints, and each sequence's k best ends at t = L_b.
    saved: list[_State] = []
    best = x.scores.new_full((B, k), NEG_INF)
    end_index = torch.zeros(B, k, dtype=torch.long, device=dev)
    state = _initial(x, k)
    for t in range(1, T + 1):
        if (t - 1) % interval == 0:
            saved.append(state)
        values, _ = _step(x, t, state, k)
        ends = L == t
        if bool(ends.any()):
            v, i = _final(x, values, k)
            best = torch.where(ends[:, None], v, best)
            end_index = torch.where(ends[:, None], i, end_index)
        if t < T:
            state = _advance(x, t, state, values)

    # Traceback, span by span from the last: cursors (t, c, r) per (b, rank).
    best_cpu, end_cpu, L_cpu = best.cpu(), end_index.cpu(), L.cpu()
    cursors = {}
    for b in range(B):
        for rank in range(k):
            if bool(torch.isfinite(best_cpu[b, rank])):
                i = int(end_cpu[b, rank])
                cursors[(b, rank)] = [int(L_cpu[b]), i // k, i % k]
    rows: list[tuple[int, int, int, int, int]] = []
    for j in range(n_spans - 1, -1, -1):
        first, last = 1 + j * interval, min(T, (j + 1) * interval)
        if not any(first <= cur[0] <= last for cur in cursors.values()):
            continue
        pointers = []
        state = saved[j]
        for t in range(first, last + 1):
            values, index = _step(x, t, state, k)
            pointers.append(index)
            if t < last:
                state = _advance(x, t, state, values)
        span = torch.stack(pointers, 1).cpu().numpy()  # (B, span, C, k)
        for (b, rank), cur in cursors.items():
            t, c, r = cur
            while first <= t <= last:
                i = int(span[b, t - first, c, r])
                d, c_prev, r_prev = i // (C * k) + 1, (i // k) % C, i % k
                rows.append((rank, b, t - d, d, c))
                t, c, r = t - d, c_prev, r_prev
            cur[:] = [t, c, r]
    rows.sort()
    segments = torch.tensor(rows, dtype=torch.long).reshape(-1, 5).to(dev)
    return best.to(p.scores.dtype), segments


__all__ = ["kbest"]
