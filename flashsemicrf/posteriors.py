"""Segment posteriors on demand: P(segment (s, d, c)) for a window of starts,
or every segment above a threshold, without a (T, K, C) tensor for the whole
sequence.

For a segment [s, s + d) of label c ending at boundary t = s + d,

    P(s, d, c) = P(a label-c segment ends at t) · exp(ψ_in(s, d, c) − log α(t, c))

where ψ_in is the score of reaching the end of that segment through it (its
start term from the forward messages at s, its emissions, duration, start
and end scores), and α(t, c) the sum of ψ_in over the K segments that end at t
with label c: the forward message at t. The end masses are the backward op's
end-score gradient (one forward and one backward pass on the chosen backend);
the forward messages at the boundaries the window touches come from the filter
op run on the prefix that reaches them. Working memory: O(T·C) for those
(the size of the scores) plus O(window·K·C) for the answer.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from . import api
from ._contract import History, Problem

Tensor = torch.Tensor
Lengths = Union[Tensor, Sequence[int], None]
NEG_INF = float("-inf")


def _end_mass(p: Problem, ops) -> Tensor:
    """(B, T, C): P(a label-c segment's last position is t)."""
    with torch.no_grad():
        log_z, ckpt = ops.forward(p)
        g = ops.backward(p, torch.ones_like(log_z), log_z, ckpt, boundary_mass=True)
    return g.end_scores


def _prefix_history(p: Problem, ops, reach: int) -> History:
    """The filter op's messages at boundaries 0 … reach, from the problem cut
    to its first ``reach`` positions (the forward messages there depend on
    nothing later)."""
    cut = lambda t: None if t is None else t[:, :reach]
    q = p._replace(scores=p.scores[:, :reach], lengths=p.lengths.clamp(max=reach),
                   start_scores=cut(p.start_scores), end_scores=cut(p.end_scores))
    with torch.no_grad():
        return ops.filter_messages(q)


def _window(p: Problem, h: History, end_mass: Tensor, t0: int, t1: int) -> Tensor:
    """(B, t1 − t0, K, C) posteriors of the segments starting in [t0, t1), in
    the compute dtype; ``h`` must reach boundary min(T, t1 + K − 1)."""
    B, T, C = p.scores.shape
    K = p.duration.shape[0]
    f64 = torch.float64
    dev = p.scores.device
    n = t1 - t0
    starts = torch.arange(t0, t1, device=dev)  # (n,)
    d = torch.arange(1, K + 1, device=dev)  # (K,)
    ends = starts[:, None] + d  # (n, K) boundary t = s + d
    inside = ends <= T
    ends_c = ends.clamp(max=T)

    # The start term of a segment at s (absolute, float64): (B, n, K, C).
    offset = h.offset.to(f64)
    if p.duration_dependent:
        alpha_abs = h.alpha[:, starts].to(f64) + offset[:, starts, None]  # (B, n, C')
        trans = p.transition.to(f64)  # (K, C', C)
        enter = torch.logsumexp(alpha_abs[:, :, None, :, None] + trans[None, None], dim=3)
        first = starts == 0
        if p.start_transition is not None:
            st = p.start_transition.to(f64).expand(B, K, C)
        else:
            st = torch.zeros(B, K, C, dtype=f64, device=dev)
        enter = torch.where(first[None, :, None, None], st[:, None], enter)
        if p.start_scores is not None:
            enter = enter + p.start_scores[:, starts, None, :].to(f64)
    else:
        sigma_abs = h.sigma[:, starts].to(f64) + offset[:, starts, None]  # (B, n, C)
        enter = sigma_abs[:, :, None, :].expand(B, n, K, C)

    # Emission sums over [s, s + d): a cumulative sum local to the window, in
    # float64 (a global one would lose digits on long sequences).
    reach = min(T, t1 + K - 1)
    local = p.scores[:, t0:reach].to(f64)
    cum = torch.cat([local.new_zeros(B, 1, C), local.cumsum(1)], dim=1)  # (B, reach-t0+1, C)
    rel_end = (ends_c - t0).clamp(max=reach - t0)
    emissions = cum[:, rel_end] - cum[:, (starts - t0)][:, :, None]  # (B, n, K, C)
    psi = enter + emissions + p.duration.to(f64)[None, None]
    if p.end_scores is not None:
        psi = psi + p.end_scores[:, ends_c - 1].to(f64)
    log_alpha = h.alpha[:, ends_c].to(f64) + offset[:, ends_c, None]  # (B, n, K, C)
    mass = end_mass[:, ends_c - 1].to(f64)  # (B, n, K, C)
    live = (mass > 0) & inside[None, :, :, None] & torch.isfinite(log_alpha) & (psi > NEG_INF)
    ratio = torch.where(live, psi - torch.where(live, log_alpha, 0.0), NEG_INF)
    post = torch.where(live, mass * torch.exp(ratio), torch.zeros_like(mass))
    return post.to(p.scores.dtype)


def _check_window(fn: str, window, T: int) -> tuple[int, int]:
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in window)):
        raise TypeError(f"{fn}: window must be a pair of ints (t0, t1), got {window!r}")
    t0, t1 = window
    if not 0 <= t0 < t1 <= T:
        raise ValueError(f"{fn}: window must satisfy 0 ≤ t0 < t1 ≤ T = {T}, got {window!r}")
    return t0, t1


@api._documented
def segment_posteriors(
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Lengths = None,
    *,
    window: tuple[int, int],
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """P(segment (s, d, c)) for every start s in a window, exact; not differentiable.

    One forward and one backward pass on the chosen backend, and the filter op
    on the first t1 + K − 1 positions; memory O(T·C + (t1 − t0)·K·C): no
    (T, K, C) tensor for the whole sequence.

    Args:
        {problem}
        window: (t0, t1) with 0 ≤ t0 < t1 ≤ T: the starts asked for.

    Returns:
        (B, t1 − t0, K, C) tensor in the compute dtype: out[b, s − t0, d − 1, c]
        = P(a label-c segment occupies exactly [s, s + d)). 0 for segments
        running past lengths[b] and for sequences with no valid segmentation.
        Summed over d and c it is ``marginals(...).starts[:, t0:t1]``.

    Raises:
        {raises}
    """
    p, ops = api._prepare("segment_posteriors", scores, transition, duration, lengths,
                          start_transition, end_transition, start_scores, end_scores, backend)
    T, K = p.scores.shape[1], p.duration.shape[0]
    t0, t1 = _check_window("segment_posteriors", window, T)
    with torch.no_grad():
        mass = _end_mass(p, ops)
        h = _prefix_history(p, ops, min(T, t1 + K - 1))
        return _window(p, h, mass, t0, t1)


@api._documented
def segment_posteriors_above(
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Lengths = None,
    *,
    threshold: float,
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
    chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Every segment whose posterior exceeds ``threshold``, exact; not differentiable.

    The whole sequence is scanned ``chunk`` starts at a time, so memory is
    O(T·C + chunk·K·C) however many segments there are.

    Args:
        {problem}
        threshold: a float in [0, 1); segments with P > threshold are returned.
        chunk: starts per step (≥ 1): trades memory for fewer steps.

    Returns:
        ``(segments, probabilities)``: segments (N, 4) int64 rows (batch,
        start, duration, label), sorted by batch, start, duration, label;
        probabilities (N,) in the compute dtype.

    Raises:
        {raises}
    """
    fn = "segment_posteriors_above"
    p, ops = api._prepare(fn, scores, transition, duration, lengths, start_transition,
                          end_transition, start_scores, end_scores, backend)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{fn}: threshold must be a float, got {type(threshold).__name__}")
    if not 0 <= threshold < 1:
        raise ValueError(f"{fn}: threshold must lie in [0, 1), got {threshold}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"{fn}: chunk must be an int ≥ 1, got {chunk!r}")
    B, T, _ = p.scores.shape
    rows, probs = [], []
    with torch.no_grad():
        mass = _end_mass(p, ops)
        h = _prefix_history(p, ops, T)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            post = _window(p, h, mass, t0, t1)
            idx = (post > threshold).nonzero()  # (n, 4): b, s - t0, d - 1, c
            probs.append(post[idx.unbind(1)])
            idx[:, 1] += t0
            idx[:, 2] += 1
            rows.append(idx)
    segments = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.long, device=p.scores.device)
    probabilities = torch.cat(probs) if probs else p.scores.new_zeros(0)
    key = ((segments[:, 0] * T + segments[:, 1]) * (p.duration.shape[0] + 1)
           + segments[:, 2]) * p.scores.shape[2] + segments[:, 3]
    order = torch.argsort(key)
    return segments[order], probabilities[order]


__all__ = ["segment_posteriors", "segment_posteriors_above"]
