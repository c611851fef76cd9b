"""The public functions: validate once, pick a backend, call it.

Every function takes ``(scores, transition, duration, lengths=None, *,
start_transition=None, end_transition=None, start_scores=None,
end_scores=None, backend="auto")``; shapes as in SPEC §1:

    scores (B, T, C), transition (C, C) or (K, C, C), duration (K, C),
    lengths (B,) integers in [1, T], start/end_transition (C,),
    start/end_scores (B, T, C).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backends
from ._validation import (
    Inputs,
    check_backend,
    check_positive_int,
    check_problem,
    check_segments,
)
from .segments import segment_scores

Tensor = torch.Tensor


def _prepare(fn, scores, transition, duration, lengths, opt, backend):
    check_backend(fn, backend)
    x = check_problem(fn, scores, transition, duration, lengths, *opt)
    return x, _backends.resolve(fn, backend, scores.device)


def _interval(x: Inputs) -> int:
    """Checkpoint interval: 0 lets each backend use the default ⌊√(T·K)⌋
    (a Python int computed from symbolic T would fix T under torch.compile)."""
    return 0


def log_partition(
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Tensor | None = None,
    *,
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """log Z (B,): log-sum-exp of the score over all segmentations.

    Differentiable with respect to every float input; d log Z / d scores is
    the label marginal. Returned in float32 (float64 if any input is float64).
    A sequence with no valid segmentation gets -inf and zero gradients; NaN in
    an input gives NaN for the sequences it touches.
    """
    opt = (start_transition, end_transition, start_scores, end_scores)
    x, impl = _prepare("log_partition", scores, transition, duration, lengths, opt, backend)
    xc = _backends.to_compute(x)  # differentiable casts
    if scores.shape[0] == 0:
        return xc.scores.sum(dim=(1, 2))
    return impl.log_partition(xc, _interval(xc))


class Marginals(NamedTuple):
    log_partition: Tensor  # (B,)
    labels: Tensor  # (B, T, C): P(position t lies in a label-c segment)
    starts: Tensor  # (B, T): P(a segment starts at t)


def _posteriors(fn, x: Inputs, impl):
    """(log Z, per-sequence gradients with upstream 1, compute-dtype inputs)."""
    xc = _backends.to_compute(x)
    interval = _interval(xc)
    with torch.no_grad():
        log_z, ring, off = impl.forward(xc, interval)
        ones = torch.ones_like(log_z)
        g = impl.backward(xc, ones, log_z, ring, off, interval, True)
    return log_z, g, xc


def marginals(
    scores, transition, duration, lengths=None, *, start_transition=None,
    end_transition=None, start_scores=None, end_scores=None, backend="auto",
) -> Marginals:
    """Posterior marginals: ``(log_partition (B,), labels (B, T, C), starts (B, T))``.

    labels[b, t, c] = P(position t lies in a label-c segment) (= d log Z /
    d scores); starts[b, t] = P(a segment starts at t). Padding positions are
    0. Not differentiable (computed without autograd).
    """
    opt = (start_transition, end_transition, start_scores, end_scores)
    x, impl = _prepare("marginals", scores, transition, duration, lengths, opt, backend)
    B, T, C = scores.shape
    dt = _backends.compute_dtype(x)
    if B == 0:
        return Marginals(scores.new_zeros(0, dtype=dt), scores.new_zeros(0, T, C, dtype=dt),
                         scores.new_zeros(0, T, dtype=dt))
    log_z, g, _ = _posteriors("marginals", x, impl)
    return Marginals(log_z, g.scores, g.start_scores.sum(-1))


def entropy(
    scores, transition, duration, lengths=None, *, start_transition=None,
    end_transition=None, start_scores=None, end_scores=None, backend="auto",
) -> Tensor:
    """Exact entropy (B,) of the distribution over segmentations.

    The score is linear in the inputs θ, so H = log Z − ⟨θ, ∇θ log Z⟩: one
    forward and one backward pass. Summed in float64. A sequence with no
    valid segmentation gets 0. Not differentiable.
    """
    opt = (start_transition, end_transition, start_scores, end_scores)
    x, impl = _prepare("entropy", scores, transition, duration, lengths, opt, backend)
    dt = _backends.compute_dtype(x)
    if scores.shape[0] == 0:
        return scores.new_zeros(0, dtype=dt)
    with torch.no_grad():
        return _entropy_from_posteriors(*_posteriors("entropy", x, impl))


def _entropy_from_posteriors(log_z: Tensor, g, xc: Inputs) -> Tensor:
    f64 = torch.float64

    def dot(theta: Tensor | None, grad: Tensor | None, batched: bool) -> Tensor:
        if theta is None:
            return torch.zeros((), dtype=f64, device=log_z.device)
        if not batched:
            theta = theta.unsqueeze(0)
        # -inf parameters carry zero posterior mass: they add nothing.
        prod = theta.to(f64) * grad.to(f64)
        prod = torch.where(grad == 0, torch.zeros_like(prod), prod)
        return prod.flatten(1).sum(1)

    expected = (
        dot(xc.scores, g.scores, True)
        + dot(xc.transition, g.transition, False)
        + dot(xc.duration, g.duration, False)
        + dot(xc.start_transition, g.start_transition, False)
        + dot(xc.end_transition, g.end_transition, False)
        + dot(xc.start_scores, g.start_scores, True)
        + dot(xc.end_scores, g.end_scores, True)
    )
    h = log_z.to(f64) - expected
    h = torch.where(log_z == float("-inf"), torch.zeros_like(h), h)
    return h.to(log_z.dtype)


def viterbi(
    scores, transition, duration, lengths=None, *, start_transition=None,
    end_transition=None, start_scores=None, end_scores=None, backend="auto",
) -> tuple[Tensor, Tensor]:
    """The best segmentation: ``(best (B,), segments (N, 4))``.

    segments rows are (batch, start, duration, label), sorted by batch then
    start. Ties go to the shortest duration, then the smallest previous
    label. A sequence with no valid segmentation gets best = -inf and no rows.
    """
    opt = (start_transition, end_transition, start_scores, end_scores)
    x, impl = _prepare("viterbi", scores, transition, duration, lengths, opt, backend)
    dt = _backends.compute_dtype(x)
    if scores.shape[0] == 0:
        return scores.new_zeros(0, dtype=dt), torch.zeros(0, 4, dtype=torch.long,
                                                          device=scores.device)
    with torch.no_grad():
        return impl.viterbi(_backends.to_compute(x))


def sample(
    scores, transition, duration, lengths=None, *, start_transition=None,
    end_transition=None, start_scores=None, end_scores=None, backend="auto",
    num_samples: int = 1, generator: torch.Generator | None = None,
) -> Tensor:
    """Exact samples from the segmentation distribution: segments (N, 5).

    Rows are (sample, batch, start, duration, label), sorted by sample, batch,
    start. ``generator`` must live on the scores' device. Sequences with no
    valid segmentation get no rows.
    """
    opt = (start_transition, end_transition, start_scores, end_scores)
    x, impl = _prepare("sample", scores, transition, duration, lengths, opt, backend)
    check_positive_int("sample", "num_samples", num_samples)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"sample: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != scores.device.type:
        raise ValueError(
            f"sample: generator is on {generator.device} but scores is on {scores.device}"
        )
    if scores.shape[0] == 0:
        return torch.zeros(0, 5, dtype=torch.long, device=scores.device)
    xc = _backends.to_compute(x)
    with torch.no_grad():
        log_z, _, _ = impl.forward(xc, _interval(xc))
        return impl.sample(xc, log_z, num_samples, generator)


def score(
    segments, scores, transition, duration, lengths=None, *, start_transition=None,
    end_transition=None, start_scores=None, end_scores=None, backend="auto",
) -> Tensor:
    """The score (B,) of the given segmentations; differentiable.

    segments (N, 4) rows (batch, start, duration, label) must tile [0, L_b)
    for every sequence b, sorted by batch then start. Computed with plain
    PyTorch on every backend (it is O(T) work).
    """
    opt = (start_transition, end_transition, start_scores, end_scores)
    x, _ = _prepare("score", scores, transition, duration, lengths, opt, backend)
    segments = check_segments("score", segments, x)
    return segment_scores(segments, x, _backends.compute_dtype(x))


def nll(
    segments, scores, transition, duration, lengths=None, *, start_transition=None,
    end_transition=None, start_scores=None, end_scores=None, backend="auto",
) -> Tensor:
    """Negative log-likelihood (B,) = log_partition − score; ≥ 0 up to rounding."""
    opt = (start_transition, end_transition, start_scores, end_scores)
    x, _ = _prepare("nll", scores, transition, duration, lengths, opt, backend)
    segments = check_segments("nll", segments, x)
    kw = dict(zip(("start_transition", "end_transition", "start_scores", "end_scores"), opt))
    log_z = log_partition(scores, transition, duration, x.lengths, backend=backend, **kw)
    return log_z - segment_scores(segments, x, log_z.dtype)
