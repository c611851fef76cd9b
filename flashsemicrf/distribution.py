"""A distribution object over segmentations, for users coming from torch-struct.

``SemiCRFDistribution(scores, transition, duration, lengths)`` holds one batch
of potentials and answers the usual questions about the distribution they
define; every answer is the corresponding public function of
:mod:`flashsemicrf.api` on those potentials, computed once and cached.

torch-struct ``SemiMarkovCRF(edge, lengths=L + 1)`` → this class with the
potentials whose ψ equals ``edge[b, s, d, c, c']`` (docs/guide.md); its
``partition`` is our ``log_partition`` (also available as ``partition``),
``argmax`` gives segments (N, 4) instead of a one-hot edge tensor, and
``marginals`` gives per-position label and start marginals instead of edge
marginals.
"""

from __future__ import annotations

from functools import cached_property

import torch

from . import api
from ._contract import Problem
from ._validation import check_backend, check_problem
from .divergence import divergences

Tensor = torch.Tensor


class SemiCRFDistribution:
    """The distribution over segmentations defined by one batch of potentials.

    The model is the README's ("The model"); every float tensor may require grad.

    Args:
        scores: (B, T, C) emissions.
        transition: (C, C), or (K, C, C) indexed by the incoming segment's duration.
        duration: (K, C); K = duration.shape[0] is the longest segment.
        lengths: (B,) integers in [1, T]; None means all T.
        start_transition, end_transition: (C,) or None.
        start_scores, end_scores: (B, T, C) or None.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Properties are computed on first use and cached: ``log_partition`` (B,)
    (differentiable; ``log_prob`` reuses it, so call ``backward`` through
    several ``log_prob`` results with ``retain_graph=True`` or sum them first),
    ``marginals``, ``argmax``, ``max``, ``entropy``. ``kl(other)`` and
    ``cross_entropy(other)`` compare it with another distribution on the same
    sequences.
    """

    def __init__(
        self,
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
    ):
        fn = "SemiCRFDistribution"
        check_backend(fn, backend)
        x = check_problem(fn, scores, transition, duration, lengths, start_transition,
                          end_transition, start_scores, end_scores)
        self.scores, self.transition, self.duration = scores, transition, duration
        self.lengths = x.lengths
        self.start_transition, self.end_transition = start_transition, end_transition
        self.start_scores, self.end_scores = start_scores, end_scores
        self.backend = backend

    @property
    def batch_size(self) -> int:
        """B."""
        return self.scores.shape[0]

    @property
    def num_labels(self) -> int:
        """C."""
        return self.scores.shape[2]

    @property
    def max_duration(self) -> int:
        """K."""
        return self.duration.shape[0]

    def _kwargs(self) -> dict:
        return dict(
            lengths=self.lengths,
            start_transition=self.start_transition,
            end_transition=self.end_transition,
            start_scores=self.start_scores,
            end_scores=self.end_scores,
            backend=self.backend,
        )

    def _args(self) -> tuple:
        return self.scores, self.transition, self.duration

    @cached_property
    def log_partition(self) -> Tensor:
        """log Z (B,); differentiable with respect to every float input."""
        return api.log_partition(*self._args(), **self._kwargs())

    @property
    def partition(self) -> Tensor:
        """log Z (B,): torch-struct's name for :attr:`log_partition`."""
        return self.log_partition

    @cached_property
    def marginals(self) -> api.Marginals:
        """``(log_partition (B,), labels (B, T, C), starts (B, T))``; not differentiable.

        labels[b, t, c] = P(position t lies in a label-c segment), starts[b, t] =
        P(a segment starts at t); 0 at padding positions.
        """
        return api.marginals(*self._args(), **self._kwargs())

    @cached_property
    def _viterbi(self) -> tuple[Tensor, Tensor]:
        return api.viterbi(*self._args(), **self._kwargs())

    @property
    def argmax(self) -> Tensor:
        """The most likely segmentation: segments (N, 4) rows (batch, start, duration, label)."""
        return self._viterbi[1]

    @property
    def max(self) -> Tensor:
        """The score (B,) of :attr:`argmax`, unnormalised (its log-probability is max − log Z)."""
        return self._viterbi[0]

    @cached_property
    def entropy(self) -> Tensor:
        """Exact entropy (B,) in nats; not differentiable."""
        return api.entropy(*self._args(), **self._kwargs())

    def sample(self, sample_shape: int | tuple | torch.Size = 1,
               generator: torch.Generator | None = None) -> Tensor:
        """Exact samples; not cached: every call draws afresh.

        Args:
            sample_shape: how many samples per sequence: an int S ≥ 1, or as in
                torch.distributions a shape: ``()`` (one sample) or ``(S,)``.
            generator: a torch.Generator on the scores' device, or None.

        Returns:
            (N, 5) int64 rows (sample, batch, start, duration, label), sample in
            [0, S); segmentations are variable-length, so the samples come as
            rows rather than a tensor of shape ``sample_shape + batch_shape``.

        Raises:
            TypeError, ValueError: a malformed sample_shape (more than one
                dimension: flatten it to (S,)) or generator.
        """
        num_samples = sample_shape
        if isinstance(sample_shape, (tuple, list, torch.Size)):
            if len(sample_shape) > 1:
                raise ValueError(f"SemiCRFDistribution.sample: sample_shape must be () or (S,), "
                                 f"got {tuple(sample_shape)}; flatten it to (S,)")
            num_samples = int(sample_shape[0]) if len(sample_shape) else 1
        return api.sample(*self._args(), **self._kwargs(), num_samples=num_samples,
                          generator=generator)

    def score(self, segments: Tensor) -> Tensor:
        """The unnormalised score of segmentations; differentiable.

        Args:
            segments: (N, 4) rows (batch, start, duration, label) tiling [0, L_b)
                for every sequence b.

        Returns:
            (B,) scores.
        """
        return api.score(segments, *self._args(), **self._kwargs())

    def log_prob(self, segments: Tensor) -> Tensor:
        """log P(segments) = score − log Z ≤ 0; differentiable (log Z is cached).

        Args:
            segments: (N, 4) rows (batch, start, duration, label) tiling [0, L_b)
                for every sequence b.

        Returns:
            (B,) log-probabilities.
        """
        return self.score(segments) - self.log_partition

    def _problem(self) -> Problem:
        return Problem(self.scores, self.transition, self.duration, self.lengths,
                       self.start_transition, self.end_transition, self.start_scores,
                       self.end_scores)

    def _check_other(self, fn: str, other) -> Problem:
        if not isinstance(other, SemiCRFDistribution):
            raise TypeError(f"{fn}: other must be a SemiCRFDistribution, got {type(other).__name__}")
        return other._problem()

    def cross_entropy(self, other: "SemiCRFDistribution") -> Tensor:
        """Cross-entropy −E_self[log other(y)] (B,) in nats, exact.

        ``other`` must describe the same sequences: the same (B, T, C), K and
        lengths (either transition form; the optional inputs may differ).
        Computed as log Z_other − ⟨θ_other, μ_self⟩ with μ_self the posterior
        expectations of self's parts (one forward and one backward pass of
        self on its backend, one forward pass of other); nothing of size
        (T, K, C) is formed. Differentiable with respect to both; the gradient
        with respect to self's potentials runs the plain-PyTorch reference in
        forward mode (exact, but a Python loop over positions: detach self
        when only other is trained).

        Returns:
            (B,) tensor in the compute dtype; +inf where other forbids a
            segmentation that self allows, 0 where self has no valid
            segmentation.
        """
        q = self._check_other("cross_entropy", other)
        return divergences("cross_entropy", self._problem(), q, self.backend, want_kl=False)

    def kl(self, other: "SemiCRFDistribution") -> Tensor:
        """KL divergence KL(self ‖ other) = E_self[log self(y) − log other(y)] (B,) in nats.

        Computed as log Z_other − log Z_self + ⟨θ_self − θ_other, μ_self⟩ from the
        same passes as :meth:`cross_entropy`, with the same requirements,
        gradients and conventions (+inf where other forbids what self allows,
        0 where self has no valid segmentation); ≥ 0 up to rounding.
        """
        q = self._check_other("kl", other)
        return divergences("kl", self._problem(), q, self.backend, want_kl=True)

    def __repr__(self) -> str:
        B, T, C = self.scores.shape
        transition = "(K, C, C)" if self.transition.dim() == 3 else "(C, C)"
        return (f"SemiCRFDistribution(B={B}, T={T}, C={C}, K={self.max_duration}, "
                f"transition={transition}, backend={self.backend!r})")


__all__ = ["SemiCRFDistribution"]
