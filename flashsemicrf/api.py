"""The public functions: validate once, pick a backend, call its ops.

Every function takes one problem as ``(scores, transition, duration,
lengths=None, *, start_transition=None, end_transition=None,
start_scores=None, end_scores=None, backend="auto")`` (documented once, in
``_PROBLEM_ARGS``, and spelled out in each signature so that it shows in
``help`` and type checkers); :func:`_prepare` turns those arguments into a
validated :class:`~flashsemicrf._contract.Problem` in the compute dtype and the
ops of the chosen backend. Nothing here computes more than a sum: the work is
in the ops (flashsemicrf/backends) and in :mod:`flashsemicrf.sampling`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence, TypeVar, Union

import torch

from . import backends, sampling
from ._contract import Gradients, OpFamily, Problem
from ._validation import (
    check_backend,
    check_gold_feasible,
    check_positive_int,
    check_problem,
    check_segments,
)
from .segments import rows_to_sequences, segment_scores, segment_terms, segments_from_start_labels

Tensor = torch.Tensor
Lengths = Union[Tensor, Sequence[int], None]

_PROBLEM_ARGS = """scores: (B, T, C) float tensor: the score of label c at position t
            (the encoder's emissions). Every float input may be float16,
            bfloat16, float32 or float64, all on one device; the computation
            is in float32, or float64 when any input is float64. −inf entries
            of any input forbid what they score.
        transition: (C, C) float tensor, ``transition[i, j]`` scoring a label-j
            segment that follows a label-i one; or (K, C, C), indexed first by
            d − 1, d the duration of the incoming (label-j) segment.
        duration: (K, C) float tensor: ``duration[d − 1, c]`` scores a label-c
            segment of duration d. K = duration.shape[0] is the longest segment.
        lengths: (B,) integers in [1, T] (a tensor on the scores' device or the
            CPU, or a list), or a bool mask (B, T) True on a prefix of every
            row (it becomes ``mask.sum(1)``); None means every sequence has
            length T. Positions t ≥ lengths[b] are padding.
        start_transition: (C,): added to the label of the first segment; None: 0.
        end_transition: (C,): added to the label of the last segment; None: 0.
        start_scores: (B, T, C): added to a label-c segment that starts at t; None: 0.
        end_scores: (B, T, C): added to a label-c segment whose last position is
            t; None: 0.
        backend: "auto" (the CUDA kernels for CUDA tensors, the C++ kernel for
            CPU tensors, the reference where the compiled extension is missing;
            the environment variable FLASHSEMICRF_BACKEND overrides it), "cuda",
            "triton", "cpu" or "torch" (the plain-PyTorch reference).
            ``flashsemicrf.backends.available()`` lists those that run here."""

_RAISES = """TypeError, ValueError: an input has the wrong type, shape, dtype or
            device (the message names it and says what was expected), holds
            +inf, or the backend does not run on the scores' device.
        RuntimeError: the backend is not available here (the message says how
            to get it)."""

_F = TypeVar("_F", bound=Callable)


def _documented(fn: _F) -> _F:
    """Fill the shared parts of a public docstring (written once above)."""
    if fn.__doc__:  # None under python -OO
        fn.__doc__ = fn.__doc__.format(problem=_PROBLEM_ARGS, raises=_RAISES)
    return fn


def _prepare(fn: str, scores, transition, duration, lengths, start_transition, end_transition,
             start_scores, end_scores, backend) -> tuple[Problem, OpFamily]:
    """The validated problem in its compute dtype (differentiable casts) and
    the ops of the backend that serves it."""
    check_backend(fn, backend)
    p = check_problem(fn, scores, transition, duration, lengths, start_transition,
                      end_transition, start_scores, end_scores)
    ops = backends.resolve(fn, backend, scores.device)
    if scores.shape[0] == 0:
        # An empty batch needs no kernel: the reference's ops answer it (the C++
        # ops take an empty boundary-score tensor for an absent one).
        ops = backends.resolve(fn, "torch", scores.device)
    return p.to_compute(), ops


def _posteriors(p: Problem, ops: OpFamily) -> tuple[Tensor, Gradients]:
    """log Z and the per-sequence gradients with upstream 1, start/end score
    masses included, without autograd."""
    with torch.no_grad():
        log_z, ckpt = ops.forward(p)
        grads = ops.backward(p, torch.ones_like(log_z), log_z, ckpt, boundary_mass=True)
    return log_z, grads


@_documented
def log_partition(
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Lengths = None,
    *,
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """log Z: the log-sum-exp of the score over all segmentations of each sequence.

    Differentiable with respect to every float input; d log Z / d scores is
    the label marginal (:func:`marginals`). The score of a segmentation is the
    sum over its segments of the terms the arguments below describe
    (README, "The model").

    Args:
        {problem}

    Returns:
        (B,) tensor in the compute dtype. A sequence with no valid segmentation
        gets −inf and zero gradients; NaN in an input gives NaN for the
        sequences it touches.

    Raises:
        {raises}
    """
    p, ops = _prepare("log_partition", scores, transition, duration, lengths, start_transition,
                      end_transition, start_scores, end_scores, backend)
    return ops.log_partition(p)


class Marginals(NamedTuple):
    """Posterior marginals of the segmentation distribution (0 at padding positions)."""

    log_partition: Tensor  # (B,)
    labels: Tensor  # (B, T, C): P(position t lies in a label-c segment)
    starts: Tensor  # (B, T): P(a segment starts at t)
    ends: Tensor  # (B, T): P(a segment's last position is t)


@_documented
def marginals(
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Lengths = None,
    *,
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
) -> Marginals:
    """Posterior marginals, from one forward and one backward pass.

    Not differentiable (computed without autograd).

    Args:
        {problem}

    Returns:
        Marginals ``(log_partition (B,), labels (B, T, C), starts (B, T),
        ends (B, T))`` in the compute dtype: labels[b, t, c] = P(position t
        lies in a label-c segment) (= d log Z / d scores), starts[b, t] = P(a
        segment starts at t), ends[b, t] = P(a segment's last position is t).
        Padding positions and sequences with no valid segmentation get 0.

    Raises:
        {raises}
    """
    p, ops = _prepare("marginals", scores, transition, duration, lengths, start_transition,
                      end_transition, start_scores, end_scores, backend)
    log_z, g = _posteriors(p, ops)
    return Marginals(log_z, g.scores, g.start_scores.sum(-1), g.end_scores.sum(-1))


@_documented
def entropy(
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Lengths = None,
    *,
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact entropy of the distribution over segmentations, in nats.

    The score is linear in the inputs θ, so H = log Z − ⟨θ, ∇θ log Z⟩: one
    forward and one backward pass, the inner product summed in float64. Not
    differentiable.

    Args:
        {problem}

    Returns:
        (B,) tensor in the compute dtype; 0 for a sequence with no valid
        segmentation.

    Raises:
        {raises}
    """
    p, ops = _prepare("entropy", scores, transition, duration, lengths, start_transition,
                      end_transition, start_scores, end_scores, backend)
    log_z, g = _posteriors(p, ops)
    with torch.no_grad():
        return _entropy_from_posteriors(p, log_z, g)


def _entropy_from_posteriors(p: Problem, log_z: Tensor, g: Gradients) -> Tensor:
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
        dot(p.scores, g.scores, True)
        + dot(p.transition, g.transition, False)
        + dot(p.duration, g.duration, False)
        + dot(p.start_transition, g.start_transition, False)
        + dot(p.end_transition, g.end_transition, False)
        + dot(p.start_scores, g.start_scores, True)
        + dot(p.end_scores, g.end_scores, True)
    )
    h = log_z.to(f64) - expected
    h = torch.where(log_z == float("-inf"), torch.zeros_like(h), h)
    return h.to(log_z.dtype)


@_documented
def viterbi(
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Lengths = None,
    *,
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The best segmentation and its score (the max semiring). Not differentiable.

    Args:
        {problem}

    Returns:
        ``(best, segments)``: best (B,) in the compute dtype, the highest score;
        segments (N, 4) int64 rows (batch, start, duration, label), sorted by
        batch then start, tiling [0, lengths[b]) for every b. Ties go to the
        shortest duration, then the smallest previous label. A sequence with
        no valid segmentation gets best = −inf and no rows.

    Raises:
        {raises}
    """
    p, ops = _prepare("viterbi", scores, transition, duration, lengths, start_transition,
                      end_transition, start_scores, end_scores, backend)
    with torch.no_grad():
        best, segment_label = ops.viterbi(p)
        return best, segments_from_start_labels(segment_label, p.lengths)


@_documented
def sample(
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Lengths = None,
    *,
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Exact samples from the segmentation distribution (forward filtering,
    backward sampling). Not differentiable.

    Args:
        {problem}
        num_samples: S ≥ 1, samples per sequence.
        generator: a torch.Generator on the scores' device, or None for the
            default one.

    Returns:
        (N, 5) int64 rows (sample, batch, start, duration, label), sorted by
        sample, batch, start; each (sample, batch) tiles [0, lengths[b]).
        Sequences with no valid segmentation get no rows.

    Raises:
        {raises}
    """
    p, ops = _prepare("sample", scores, transition, duration, lengths, start_transition,
                      end_transition, start_scores, end_scores, backend)
    check_positive_int("sample", "num_samples", num_samples)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"sample: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != scores.device.type:
        raise ValueError(
            f"sample: generator is on {generator.device} but scores is on {scores.device}"
        )
    with torch.no_grad():
        log_z, _ = ops.forward(p)
        return sampling.sample(p, ops.filter_messages(p), log_z, num_samples, generator)


@_documented
def score(
    segments: Tensor,
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Lengths = None,
    *,
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """The score of given segmentations; differentiable.

    Plain PyTorch on every backend (it is O(T) work); ``backend`` is checked
    but not used.

    Args:
        segments: (N, 4) integer rows (batch, start, duration, label), sorted by
            batch then start, tiling [0, lengths[b]) for every sequence b with
            durations in [1, K] and labels in [0, C).
        {problem}

    Returns:
        (B,) tensor in the compute dtype; −inf for a segmentation the inputs
        forbid.

    Raises:
        {raises}
        ValueError: segments do not tile the sequences (the message names the
            row; not checked under torch.compile).
    """
    p, _ = _prepare("score", scores, transition, duration, lengths, start_transition,
                    end_transition, start_scores, end_scores, backend)
    segments = check_segments("score", segments, p, lengths_defaulted=lengths is None)
    return segment_scores(segments, p)


@_documented
def nll(
    segments: Tensor,
    scores: Tensor,
    transition: Tensor,
    duration: Tensor,
    lengths: Lengths = None,
    *,
    start_transition: Tensor | None = None,
    end_transition: Tensor | None = None,
    start_scores: Tensor | None = None,
    end_scores: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Negative log-likelihood of given segmentations: log_partition − score.

    Differentiable; the training loss of a semi-CRF.

    Args:
        segments: (N, 4) integer rows (batch, start, duration, label), as for
            :func:`score` (make them from a label map with
            :func:`~flashsemicrf.labels_to_segments`).
        {problem}

    Returns:
        (B,) tensor in the compute dtype, ≥ 0 up to rounding.

    Raises:
        {raises}
        ValueError: segments do not tile the sequences (the message names the
            row), or a row scores −inf under the inputs (a forbidden
            transition, duration, first or last label): its loss would be
            +inf. Under torch.compile these value checks are skipped and such a
            sequence gets +inf.
    """
    p, ops = _prepare("nll", scores, transition, duration, lengths, start_transition,
                      end_transition, start_scores, end_scores, backend)
    return _nll("nll", segments, p, ops, lengths_defaulted=lengths is None)


def _nll(fn: str, segments, p: Problem, ops: OpFamily, lengths_defaulted: bool = False,
         hint: str = "") -> Tensor:
    """log Z − score (B,) of a prepared problem, checking the gold first."""
    segments = check_segments(fn, segments, p, lengths_defaulted=lengths_defaulted)
    terms = segment_terms(segments, p)
    check_gold_feasible(fn, segments, terms, hint)
    return ops.log_partition(p) - rows_to_sequences(sum(terms.values()), segments, p)
