"""Segmentations as tensors: rows (batch, start, duration, label).

Conversions to and from per-position label maps, and the score of a given
segmentation (plain differentiable PyTorch on every backend: it is O(T)).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._contract import Problem
from ._validation import check_lengths, check_positive_int, check_segment_tensor

Tensor = torch.Tensor


def _positions(segments: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(batch, position, label) of every position covered by a segment."""
    batch, start, dur, label = segments.unbind(1)
    n = int(dur.sum()) if segments.shape[0] else 0
    row = torch.repeat_interleave(torch.arange(segments.shape[0], device=segments.device), dur,
                                  output_size=n)
    first = torch.cumsum(dur, 0) - dur  # index of each row's first position
    pos = start[row] + torch.arange(n, device=segments.device) - first[row]
    return batch[row], pos, label[row]


def segment_terms(segments: Tensor, x: Problem) -> dict[str, Tensor]:
    """The score of every row of validated segmentations, term by term.

    Every term has shape (N,) and the scores' dtype: ``scores`` (the sum of
    the row's emissions), ``duration``, ``transition`` (0 for a first row),
    ``start_transition`` / ``end_transition`` (0 except on first / last rows),
    ``start_scores`` and ``end_scores`` (absent inputs are left out). Written
    without data-dependent shapes or branches, so that it traces under
    ``torch.compile(fullgraph=True)``: each position finds the row covering it
    through a running maximum over a (B, T) map of row starts.
    """
    B, T, _ = x.scores.shape
    dtype, device = x.scores.dtype, x.scores.device
    batch, start, dur, label = segments.unbind(1)
    n = segments.shape[0]
    # Rows are sorted by batch then start, so the row covering (b, t) is the
    # largest row index starting at or before t in sequence b.
    row_plus_one = torch.zeros(B, T, dtype=torch.long, device=device)
    row_plus_one = row_plus_one.index_put((batch, start), torch.arange(1, n + 1, device=device))
    row_at = row_plus_one.cummax(1).values - 1  # (B, T); -1 before a sequence's first row
    inside = (torch.arange(T, device=device)[None, :] < x.lengths[:, None]) & (row_at >= 0)
    row_at = row_at.clamp(min=0)
    emission = x.scores.gather(2, label[row_at].unsqueeze(2)).squeeze(2)
    emission = emission.masked_fill(~inside, 0)
    terms = {
        "scores": emission.new_zeros(n).scatter_add(0, row_at.flatten(), emission.flatten()),
        "duration": x.duration[dur - 1, label].to(dtype),
    }
    first = torch.ones(n, dtype=torch.bool, device=device)
    first[1:] = batch[1:] != batch[:-1]
    last = torch.ones(n, dtype=torch.bool, device=device)
    last[:-1] = batch[1:] != batch[:-1]
    prev_label = torch.cat([label[:1], label[:-1]])  # row 0's entry is unused (a first row)
    if x.transition.dim() == 3:
        into = x.transition[dur - 1, prev_label, label].to(dtype)
    else:
        into = x.transition[prev_label, label].to(dtype)
    zero = torch.zeros_like(into)
    terms["transition"] = torch.where(first, zero, into)
    if x.start_transition is not None:
        terms["start_transition"] = torch.where(first, x.start_transition[label].to(dtype), zero)
    if x.end_transition is not None:
        terms["end_transition"] = torch.where(last, x.end_transition[label].to(dtype), zero)
    if x.start_scores is not None:
        terms["start_scores"] = x.start_scores[batch, start, label].to(dtype)
    if x.end_scores is not None:
        terms["end_scores"] = x.end_scores[batch, start + dur - 1, label].to(dtype)
    return terms


def segment_scores(segments: Tensor, x: Problem) -> Tensor:
    """Score (B,) of validated segmentations that tile every sequence, in the scores' dtype."""
    return rows_to_sequences(sum(segment_terms(segments, x).values()), segments, x)


def rows_to_sequences(per_row: Tensor, segments: Tensor, x: Problem) -> Tensor:
    """Sum (B,) over each sequence's rows of a per-row quantity (N,)."""
    B = x.scores.shape[0]
    return per_row.new_zeros(B).index_add(0, segments[:, 0], per_row)


def segments_to_labels(segments: Tensor, batch_size: int, length: int) -> Tensor:
    """The label map of segments: each position gets the label of the segment covering it.

    Args:
        segments: (N, 4) integer rows (batch, start, duration, label), e.g. from
            :func:`~flashsemicrf.viterbi`; they may leave gaps but must not
            overlap or run outside the map.
        batch_size: B ≥ 0, rows of the map.
        length: T ≥ 1, columns of the map.

    Returns:
        (batch_size, length) int64 labels, −1 where no segment covers a position.

    Raises:
        TypeError, ValueError: a bad argument, a row outside the map, a duration
            < 1, a negative label, or overlapping rows (the message says which).
    """
    fn = "segments_to_labels"
    check_positive_int(fn, "batch_size", batch_size, minimum=0)
    check_positive_int(fn, "length", length)
    segments = check_segment_tensor(fn, segments, segments.device if hasattr(segments, "device") else "cpu")
    batch, start, dur, label = segments.unbind(1)
    bad = (batch < 0) | (batch >= batch_size) | (start < 0) | (dur < 1) | (start + dur > length)
    bad |= label < 0
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{fn}: segments row {i} = {tuple(segments[i].tolist())} lies outside a "
            f"({batch_size}, {length}) map or has a duration < 1 or a negative label"
        )
    out = torch.full((batch_size, length), -1, dtype=torch.long, device=segments.device)
    b_pos, t_pos, c_pos = _positions(segments)
    hits = torch.zeros((batch_size, length), dtype=torch.long, device=segments.device)
    hits.index_put_((b_pos, t_pos), torch.ones_like(t_pos), accumulate=True)
    if bool((hits > 1).any()):
        b, t = (hits > 1).nonzero()[0].tolist()
        raise ValueError(f"{fn}: segments overlap at batch {b}, position {t}")
    out[b_pos, t_pos] = c_pos
    return out


def labels_to_segments(labels: Tensor, lengths: Tensor | Sequence[int] | None,
                       max_duration: int) -> Tensor:
    """Segments from a label map: every maximal run of one label, split into
    pieces of at most ``max_duration`` from its start.

    A label map cannot tell two adjacent segments of the same label apart, so
    such segments come back merged (then split only by ``max_duration``).

    Args:
        labels: (B, T) integer label map, values ≥ 0 within the lengths.
        lengths: (B,) integers in [1, T] (or a list), or a bool prefix mask
            (B, T); None means all T. Positions at or beyond lengths[b] are
            ignored.
        max_duration: K ≥ 1, the longest piece (the model's ``duration.shape[0]``).

    Returns:
        (N, 4) int64 rows (batch, start, duration, label), sorted by batch then
        start, tiling [0, lengths[b]) for every b: the ``segments`` argument of
        :func:`~flashsemicrf.score`, :func:`~flashsemicrf.nll` and the head's loss.

    Raises:
        TypeError, ValueError: a bad argument (the message names it).
    """
    fn = "labels_to_segments"
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.dim() != 2:
        raise TypeError(f"{fn}: labels must be an integer tensor (B, T), got {labels!r:.80}")
    check_positive_int(fn, "max_duration", max_duration)
    B, T = labels.shape
    if T < 1:
        raise ValueError(f"{fn}: labels must have T ≥ 1, got shape {tuple(labels.shape)}")
    lengths = check_lengths(fn, lengths, B, T, labels.device)
    inside = torch.arange(T, device=labels.device)[None, :] < lengths[:, None]
    if not torch.compiler.is_compiling() and bool(((labels < 0) & inside).any()):
        raise ValueError(f"{fn}: labels must be ≥ 0 within lengths")
    labels = labels.long()
    # A run starts at 0 or where the label changes; a piece every max_duration into a run.
    change = torch.ones_like(inside)
    change[:, 1:] = labels[:, 1:] != labels[:, :-1]
    pos = torch.arange(T, device=labels.device).expand(B, T)
    run_start = torch.where(change, pos, torch.zeros_like(pos)).cummax(1).values
    boundary = inside & ((pos - run_start) % max_duration == 0)
    return _tile(boundary, torch.where(boundary, labels, -1), lengths)


def segments_from_start_labels(start_labels: Tensor, lengths: Tensor) -> Tensor:
    """Segments (N, 4) from a (B, T) map holding each segment's label at its start, −1 elsewhere."""
    return _tile(start_labels >= 0, start_labels, lengths)


def _tile(starts: Tensor, labels: Tensor, lengths: Tensor) -> Tensor:
    """Segments whose starts are the True entries of ``starts`` (B, T): each ends
    where the next one of its sequence starts, or at lengths[b].

    The next start is a suffix minimum over the dense map, so the only
    data-dependent shape is that of ``nonzero`` (this traces under
    ``torch.compile(fullgraph=True)``).
    """
    B, T = starts.shape
    pos = torch.arange(T, device=starts.device).expand(B, T)
    start_or_end = torch.where(starts, pos, lengths[:, None].expand(B, T))
    # next_start[b, t]: the first start after t in sequence b, or lengths[b].
    after = torch.cat([start_or_end[:, 1:], lengths[:, None]], 1)
    next_start = after.flip(1).cummin(1).values.flip(1).minimum(lengths[:, None])
    b_idx, s_idx = starts.nonzero(as_tuple=True)
    end = next_start[b_idx, s_idx]
    return torch.stack([b_idx, s_idx, end - s_idx, labels[b_idx, s_idx]], 1)
