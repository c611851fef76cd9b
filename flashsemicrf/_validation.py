"""Input checks at the public entry points (docs/design.md, "Bad input").

Every message names the function, the argument, what was expected and what
was received. Nothing here copies or modifies the caller's tensors, except
that ``lengths`` given as a list or on the CPU is turned into an int64 tensor
on the scores' device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._contract import Problem

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dim()}-D {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__}"


def _float_tensor(fn: str, name: str, x, shape_text: str, dims: Sequence[int]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a floating tensor {shape_text}, got {_describe(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}"
        )
    if x.dim() not in dims:
        raise ValueError(f"{fn}: {name} must be {shape_text}, got {_describe(x)}")


def _same_shape(fn: str, name: str, x: Tensor, expected: tuple, shape_text: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{fn}: {name} must have shape {shape_text} = {tuple(expected)}, "
            f"got {tuple(x.shape)}"
        )


def check_backend(fn: str, backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_lengths(fn: str, lengths, batch: int, length: int, device, name: str = "lengths"
                  ) -> Tensor:
    """lengths as an int64 tensor (B,) on ``device``, every value in [1, T].

    ``lengths`` may also be a bool mask (B, T) that is True on a prefix of
    every row (pytorch-crf's ``mask``); it becomes ``mask.sum(1)``.
    """
    if lengths is None:
        return torch.full((batch,), length, dtype=torch.long, device=device)
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
            raise TypeError(f"{fn}: {name} must be integers, got {lengths!r}")
        lengths = torch.tensor(lengths, dtype=torch.long).reshape(-1)
    if not isinstance(lengths, Tensor):
        raise TypeError(
            f"{fn}: {name} must be an integer tensor (B,), a bool mask (B, T) or None, "
            f"got {_describe(lengths)}"
        )
    if lengths.device != torch.device(device) and lengths.device.type != "cpu":
        raise ValueError(
            f"{fn}: {name} must be on the scores' device ({device}) or on the CPU, "
            f"got {lengths.device}"
        )
    if lengths.dtype == torch.bool:
        return _lengths_from_mask(fn, lengths, batch, length, device, name)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex:
        raise TypeError(f"{fn}: {name} must have an integer dtype, got {lengths.dtype}")
    if lengths.dim() == 2 and lengths.shape[1] == 4 and lengths.shape[0] != batch:
        raise ValueError(f"{fn}: {name} must have shape (B,) = ({batch},), got "
                         f"{_describe(lengths)}, which looks like segments (N, 4): "
                         f"{SEGMENTS_ORDER}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{fn}: {name} must have shape (B,) = ({batch},), got {_describe(lengths)}")
    # Reading the values would break a torch.compile graph: traced calls check
    # shapes, dtypes and devices only.
    if batch > 0 and not torch.compiler.is_compiling():
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > length:
            raise ValueError(
                f"{fn}: {name} must lie in [1, T] = [1, {length}], got values in [{low}, {high}]"
            )
    return lengths.to(device=device, dtype=torch.long)


SEGMENTS_ORDER = ("segments always come before lengths: nll(segments, scores, transition, "
                  "duration, lengths), head(hidden, segments, lengths), "
                  "head.loss(hidden, segments, lengths); or pass them as segments=")


def _lengths_from_mask(fn: str, mask: Tensor, batch: int, length: int, device, name: str
                       ) -> Tensor:
    """A prefix mask (B, T) as lengths (B,)."""
    if mask.dim() != 2:
        raise TypeError(f"{fn}: {name} must be integer lengths (B,) or a bool mask (B, T), "
                        f"got {_describe(mask)}")
    if mask.shape[0] != batch or mask.shape[1] != length:
        raise ValueError(
            f"{fn}: {name} is a bool tensor, taken as a mask, which must have shape (B, T) = "
            f"({batch}, {length}), got {_describe(mask)}; pass integer lengths (B,) otherwise"
        )
    lengths = mask.sum(1)
    if batch > 0 and not torch.compiler.is_compiling():
        prefix = torch.arange(length, device=mask.device)[None, :] < lengths[:, None]
        bad = prefix != mask
        if bool(bad.any()):
            b, t = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"{fn}: {name} is a bool mask (B, T) but row {b} is not a prefix (True up to "
                f"its length, then False): position {t} is {bool(mask[b, t])}. A semi-CRF "
                "needs each sequence contiguous from position 0; pass lengths (B,) instead"
            )
        if int(lengths.min()) < 1:
            b = int((lengths < 1).nonzero()[0, 0])
            raise ValueError(f"{fn}: {name} (a bool mask) is all False in row {b}: every "
                             "sequence needs length ≥ 1")
    return lengths.to(device=device, dtype=torch.long)


def check_problem(
    fn: str,
    scores,
    transition,
    duration,
    lengths,
    start_transition,
    end_transition,
    start_scores,
    end_scores,
) -> Problem:
    """The validated problem in the caller's tensors (no copies); absent
    optional inputs stay None and lengths becomes int64 on the scores' device."""
    _float_tensor(fn, "scores", scores, "(B, T, C)", (3,))
    B, T, C = scores.shape
    if T < 1 or C < 1:
        raise ValueError(f"{fn}: scores must have T ≥ 1 and C ≥ 1, got shape {tuple(scores.shape)}")
    _float_tensor(fn, "duration", duration, "(K, C)", (2,))
    K = duration.shape[0]
    if K < 1:
        raise ValueError(f"{fn}: duration must have K ≥ 1 rows, got shape {tuple(duration.shape)}")
    if duration.shape[1] != C and duration.shape[1] == T:
        raise ValueError(
            f"{fn}: scores must be (B, T, C) with C = duration.shape[1] = {duration.shape[1]} "
            f"labels, got shape {tuple(scores.shape)}, which looks like (B, C, T): transpose "
            "it with scores.transpose(1, 2)"
        )
    _same_shape(fn, "duration", duration, (K, C), "(K, C)")
    _float_tensor(fn, "transition", transition, "(C, C) or (K, C, C)", (2, 3))
    if transition.dim() == 2:
        _same_shape(fn, "transition", transition, (C, C), "(C, C)")
    else:
        _same_shape(fn, "transition", transition, (K, C, C), "(K, C, C)")
    optional = {
        "start_transition": (start_transition, (C,), "(C,)"),
        "end_transition": (end_transition, (C,), "(C,)"),
        "start_scores": (start_scores, (B, T, C), "(B, T, C)"),
        "end_scores": (end_scores, (B, T, C), "(B, T, C)"),
    }
    for name, (x, shape, text) in optional.items():
        if x is not None:
            _float_tensor(fn, name, x, text, (len(shape),))
            _same_shape(fn, name, x, shape, text)
    named = {"transition": transition, "duration": duration}
    named.update({k: v[0] for k, v in optional.items() if v[0] is not None})
    for name, x in named.items():
        if x.device != scores.device:
            raise ValueError(
                f"{fn}: {name} is on {x.device} but scores is on {scores.device}; "
                "all tensors must be on one device"
            )
    lengths = check_lengths(fn, lengths, B, T, scores.device)
    check_finite_above(fn, {"scores": scores, **named})
    return Problem(
        scores, transition, duration, lengths, start_transition, end_transition,
        start_scores, end_scores,
    )


def check_segments(fn: str, segments, inputs: Problem, lengths_defaulted: bool = False
                   ) -> Tensor:
    """segments (N, 4) rows (batch, start, duration, label) that tile every sequence.

    Rows must be sorted by batch then start, and for every sequence b tile
    [0, L_b) exactly with durations in [1, K] and labels in [0, C). Under
    torch.compile only the shape, dtype and device are checked (reading the
    values would break the graph). ``lengths_defaulted``: the caller gave no
    lengths, so the messages say that lengths defaulted to T.
    """
    B, T, C = inputs.scores.shape
    K = inputs.duration.shape[0]
    segments = check_segment_tensor(fn, segments, inputs.scores.device, batch=B, length=T)
    if torch.compiler.is_compiling():
        return segments
    batch, start, dur, label = segments.unbind(1)
    n = segments.shape[0]
    defaulted = (f" (no lengths were given, so lengths defaulted to T = {T}: pass "
                 "lengths or mask= for padded sequences)") if lengths_defaulted else ""

    def first_bad(mask: Tensor, what: str) -> None:
        if bool(mask.any()):
            i = int(mask.nonzero()[0, 0])
            row = tuple(segments[i].tolist())
            raise ValueError(f"{fn}: segments row {i} (batch, start, duration, label) = {row} {what}")

    first_bad((batch < 0) | (batch >= B), f"has a batch index outside [0, {B})")
    first_bad((dur < 1) | (dur > K), f"has a duration outside [1, K] = [1, {K}]")
    first_bad((label < 0) | (label >= C), f"has a label outside [0, C) = [0, {C})")
    first_bad(start < 0, "has a negative start")
    L = inputs.lengths
    first_bad(start + dur > L[batch.clamp(0, B - 1)],
              "runs past the end of its sequence (lengths)" + defaulted)
    if n > 1:
        same = batch[1:] == batch[:-1]
        order = (batch[1:] < batch[:-1]) | (same & (start[1:] <= start[:-1]))
        first_bad(torch.cat([order.new_zeros(1), order]), "is out of order: sort by batch, then start")
        expected = start[:-1] + dur[:-1]
        overlap = same & (start[1:] < expected)
        gap = same & (start[1:] > expected)
        first_bad(torch.cat([overlap.new_zeros(1), overlap]), "overlaps the segment before it")
        first_bad(torch.cat([gap.new_zeros(1), gap]), "leaves a gap after the segment before it")
    is_first = torch.ones(n, dtype=torch.bool, device=segments.device)
    is_last = torch.ones(n, dtype=torch.bool, device=segments.device)
    if n > 1:
        is_first[1:] = batch[1:] != batch[:-1]
        is_last[:-1] = batch[1:] != batch[:-1]
    first_bad(is_first & (start != 0), "starts its sequence at a position other than 0 (a gap)")
    first_bad(is_last & (start + dur != L[batch.clamp(0, B - 1)]), "ends its sequence before lengths" + defaulted)
    covered = torch.zeros(B, dtype=torch.bool, device=segments.device)
    covered[batch] = True
    if not bool(covered.all()):
        b = int((~covered).nonzero()[0, 0])
        raise ValueError(f"{fn}: segments has no segment for sequence {b}: every sequence must be tiled")
    return segments


def check_segment_tensor(fn: str, segments, device, batch: int | None = None,
                         length: int | None = None) -> Tensor:
    """segments as int64 (N, 4) on ``device``: type, dtype, shape and device only.

    With the batch size B and length T, a (B,) or (B, T) tensor gets a hint:
    it looks like lengths, a mask or per-position tags.
    """
    if segments is None:
        raise TypeError(f"{fn}: segments is missing: pass the gold segmentation (N, 4), or "
                        "labels= (B, T) for a per-position label map")
    if not isinstance(segments, Tensor):
        raise TypeError(f"{fn}: segments must be an integer tensor (N, 4), got {_describe(segments)}")
    looks_like = ""
    if batch is not None and tuple(segments.shape) == (batch, length) and length != 4:
        looks_like = (" This looks like a per-position mask or tags (B, T): pass a mask as "
                      "mask= (or mask.sum(1) as lengths), and tags as labels= or convert them "
                      "with flashsemicrf.labels_to_segments(tags, lengths, max_duration)")
    elif batch is not None and segments.dim() == 1 and segments.shape[0] == batch:
        looks_like = f" This looks like lengths (B,): {SEGMENTS_ORDER}"
    if segments.dtype.is_floating_point or segments.dtype.is_complex or segments.dtype == torch.bool:
        raise TypeError(f"{fn}: segments must have an integer dtype, got {segments.dtype}."
                        + looks_like)
    if segments.dim() != 2 or segments.shape[1] != 4 or looks_like:
        raise ValueError(
            f"{fn}: segments must have shape (N, 4) with rows (batch, start, duration, label), "
            f"got {_describe(segments)}." + looks_like
        )
    if segments.device != torch.device(device):
        raise ValueError(f"{fn}: segments is on {segments.device} but scores is on {device}")
    return segments.long()


def check_gold_feasible(fn: str, segments: Tensor, terms: dict, hint: str = "") -> None:
    """Raise when a gold row scores −inf: its negative log-likelihood would be +inf.

    ``terms``: the per-row score terms of :func:`~flashsemicrf.segments.segment_terms`.
    Skipped under torch.compile (the loss is then +inf for such a sequence).
    """
    if torch.compiler.is_compiling() or segments.shape[0] == 0:
        return
    terms = {name: v.detach() for name, v in terms.items()}
    total = sum(terms.values())
    bad = total == float("-inf")
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    b, s, d, c = segments[i].tolist()
    culprits = [name for name, v in terms.items() if float(v[i]) == float("-inf")]
    raise ValueError(
        f"{fn}: gold segments row {i} (batch {b}, start {s}, duration {d}, label {c}) has "
        f"score −inf under {' and '.join(culprits)}: the model forbids this segmentation, so "
        "its loss would be +inf. Fix the gold (or the −inf entries that forbid it)" + hint
    )


def check_finite_above(fn: str, named: dict) -> None:
    """Reject +inf in the float inputs (−inf forbids, NaN propagates; +inf has no meaning).

    Reads every value, so it is skipped under torch.compile.
    """
    if torch.compiler.is_compiling():
        return
    for name, x in named.items():
        if x is not None and x.numel() and bool(torch.isposinf(x).any()):
            where = tuple(int(v) for v in torch.isposinf(x).nonzero()[0])
            raise ValueError(
                f"{fn}: {name} contains +inf (first at index {where}); scores must be finite "
                "or −inf (−inf forbids what it scores): clamp it, e.g. "
                f"{name}.clamp(max=1e4)"
            )


def check_positive_int(fn: str, name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be ≥ {minimum}, got {value}")
    return value
