"""Exact sampling: forward filtering (any backend's filter op), backward sampling (here).

The filter op gives the forward messages at every boundary (a
:class:`~flashsemicrf._contract.History`, O(T·C) memory); the walk back from
each sequence's end draws one segment at a time from the exact conditional
distributions, in float64, vectorised over the S·B samplers. It is plain
PyTorch on the messages' device, the same for every backend.
"""

from __future__ import annotations

import torch

from ._contract import History, Problem

Tensor = torch.Tensor
NEG_INF = float("-inf")


def _gumbel_argmax(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """An exact sample from softmax(logits) along the last dim (Gumbel-max)."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    u = u.clamp_min(torch.finfo(logits.dtype).tiny)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def sample(
    p: Problem,
    history: History,
    log_z: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Backward sampling from the filter's messages.

    Args:
        p: the problem, in the dtype the messages were computed in.
        history: the filter op's output for ``p``.
        log_z: (B,) log Z of ``p``; sequences at -inf (no valid segmentation)
            get no rows.
        num_samples: S, samples per sequence.
        generator: a torch.Generator on the messages' device, or None.

    Returns:
        (N, 5) int64 rows (sample, batch, start, duration, label), sorted by
        sample, batch, start.

    Each sampler walks back from its sequence's end L: the label c of the last
    segment ∝ exp(alpha[L, c] + end_transition[c]); then its duration d given
    its end e and label ∝ exp(sigma[e-d, c] + emissions of [e-d, e) +
    duration[d-1, c]) (duration-dependent transition: the label step enters
    through transition[d-1]); then the previous label c' ∝ exp(alpha[e-d, c'] +
    transition[c', c]); until it reaches position 0.
    """
    p = p.filled()
    B, T, C = p.scores.shape
    K = p.duration.shape[0]
    dev = p.scores.device
    f64 = torch.float64
    h = history
    alpha = h.alpha.to(f64) + h.offset[..., None]  # (B, T+1, C) absolute
    sigma = h.sigma.to(f64) + h.offset[..., None]
    scores = p.scores.to(f64)
    transition, duration = p.transition.to(f64), p.duration.to(f64)
    start_scores = p.start_scores.to(f64)

    S = num_samples
    batch = torch.arange(B, device=dev).repeat(S)  # sampler m -> its sequence
    sample_id = torch.arange(S, device=dev).repeat_interleave(B)
    end = p.lengths.to(dev).repeat(S)
    alive = (log_z > NEG_INF).repeat(S)
    last = alpha[batch, end] + p.end_transition.to(f64)
    label = _gumbel_argmax(last, generator)
    d_range = torch.arange(1, K + 1, device=dev)
    found: list[Tensor] = []
    while bool(alive.any()):
        m = alive.nonzero().squeeze(1)
        b, e, c = batch[m], end[m], label[m]
        starts = e[:, None] - d_range  # (M, K) start of a duration-d segment
        valid = starts >= 0
        s_idx = starts.clamp_min(0)
        # Emissions of [e-d, e): a cumulative sum over the last K positions.
        emit = scores[b[:, None], s_idx, c[:, None]]
        emit = torch.where(valid, emit, torch.zeros_like(emit)).cumsum(1)
        if p.duration_dependent:
            prev = alpha[b[:, None], s_idx]  # (M, K, C')
            into = transition[:, :, c].permute(2, 0, 1)  # (M, K, C')
            enter = torch.logsumexp(prev + into, -1) + start_scores[b[:, None], s_idx, c[:, None]]
            enter = torch.where(starts == 0, sigma[b, 0, c][:, None], enter)
        else:
            enter = sigma[b[:, None], s_idx, c[:, None]]
        logits = enter + emit + duration[:, c].T
        logits = torch.where(valid, logits, torch.full_like(logits, NEG_INF))
        d = _gumbel_argmax(logits, generator) + 1
        s = e - d
        found.append(torch.stack([sample_id[m], b, s, d, c], 1))
        # The label of the segment before, for samplers not yet at position 0.
        into = transition[d - 1, :, c] if p.duration_dependent else transition[:, c].T
        prev_label = _gumbel_argmax(alpha[b, s] + into, generator)
        end[m] = s
        label[m] = prev_label
        alive[m] = s > 0
    rows = torch.cat(found) if found else torch.zeros(0, 5, dtype=torch.long, device=dev)
    key = (rows[:, 0] * B + rows[:, 1]) * (T + 1) + rows[:, 2]
    return rows[key.argsort()]
