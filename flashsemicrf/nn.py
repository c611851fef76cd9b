"""The SemiCRF head: an ``nn.Module`` that puts a semi-Markov CRF on an encoder.

::

    head = SemiCRF(num_labels=C, max_duration=K, hidden_dim=H)
    loss = head(hidden, lengths, segments)        # scalar: mean NLL over the batch
    segments = head.decode(hidden, lengths)       # (N, 4) rows (batch, start, duration, label)

The head owns every parameter of the model (README) except the emissions,
which it computes from the encoder states with a linear layer (or takes as
given when ``hidden_dim`` is None), and calls the public functions of
:mod:`flashsemicrf.api` with them. ``head.potentials(hidden, lengths)`` returns
exactly the keyword arguments it passes, so every method equals the functional
call ``flashsemicrf.<function>(**head.potentials(hidden, lengths))``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import api
from ._validation import BACKENDS, FLOAT_DTYPES, check_lengths, check_positive_int
from .distribution import SemiCRFDistribution
from .priors import (
    geometric_log_pmf,
    negative_binomial_log_pmf,
    poisson_log_pmf,
    soft_uniform_log_pmf,
)

Tensor = torch.Tensor

DURATION_PRIORS = ("learned", "geometric", "poisson", "negative_binomial", "uniform")
CENTERINGS = (None, "mean")
REDUCTIONS = ("mean", "sum", "none")


def _per_label(name: str, value, C: int, low: float, strict: bool = True) -> Tensor:
    """A float or C floats as a float64 tensor (C,), every value > low (≥ if not strict)."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() == 0:
        t = t.expand(C).clone()
    if t.shape != (C,):
        raise ValueError(f"SemiCRF: {name} must be a float or a sequence of num_labels = {C} "
                         f"floats, got shape {tuple(t.shape)}")
    bad = ~(t > low) if strict else ~(t >= low)
    if bool(bad.any()) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"SemiCRF: {name} must be finite and {'>' if strict else '≥'} {low}, "
                         f"got {t.tolist()}")
    return t


def _label_means(scores: Tensor, lengths: Tensor) -> Tensor:
    """(B, C) mean of scores[b, :L_b, c] (padding left out)."""
    T = scores.shape[1]
    valid = torch.arange(T, device=scores.device)[None, :] < lengths[:, None]  # (B, T)
    total = scores.masked_fill(~valid[:, :, None], 0).sum(1)
    return total / lengths[:, None].to(total.dtype)


class SemiCRF(nn.Module):
    """A semi-Markov CRF decoder head.

    Args:
        num_labels: C, the number of segment labels.
        max_duration: K, the longest segment. Longer runs of one label are
            modelled as chains of same-label segments (see docs/guide.md).
        hidden_dim: H, the encoder's width: scores = Linear(H, C)(hidden).
            None: the head takes scores (B, T, C) directly and has no projection.
        duration_prior: the duration scores (K, C). ``"learned"`` (default): a free
            table, initialised to 0. Or a log-pmf over d = 1 … K with learnable
            per-label parameters: ``"geometric"`` (mean), ``"poisson"`` (d − 1 ~
            Poisson, mean), ``"negative_binomial"`` (mean and dispersion) or
            ``"uniform"`` (a soft-edged uniform over a range). See
            :meth:`duration_scores`.
        duration_mean: initial mean duration of the geometric, Poisson and
            negative binomial priors: a float or C floats (> 1; default K / 2).
        duration_dispersion: initial dispersion r of the negative binomial (> 0):
            variance of d − 1 is μ + μ²/r. A float or C floats; default 1.
        duration_range: initial (low, high) of the uniform prior, 1 ≤ low ≤ high;
            a pair of floats or of C floats; default (1, K).
        duration_softness: edge width of the uniform prior in positions (default 1).
        duration_dependent_transition: transition (K, C, C), indexed by the
            duration of the incoming segment, instead of (C, C).
        allowed_transitions: optional bool (C, C); ``allowed_transitions[i, j] =
            False`` forbids a label-j segment after a label-i one (score −inf).
            Keep the diagonal True for labels whose runs can exceed K.
        start_end_transitions: learn start_transition and end_transition (C,)
            (default True).
        boundary_projections: learn Linear(H, C) layers giving start_scores and
            end_scores (B, T, C) from hidden; needs hidden_dim.
        centering: None (default) or ``"mean"`` (``True`` means ``"mean"``): subtract from scores[b, :, c] its
            mean over the valid positions of sequence b. This changes the model:
            it is exactly the uncentred model with −mean[b, c]·d added to
            duration[d − 1, c] of sequence b. The kernels never need it.
        backend: passed to every call of the functional API ("auto", "cuda",
            "triton", "cpu", "torch"); may be changed later through ``.backend``.

    Shapes: hidden (B, T, H) — or scores (B, T, C) when hidden_dim is None —
    lengths (B,) integers in [1, T] (default all T), segments (N, 4) LongTensor
    rows (batch, start, duration, label) tiling [0, L_b) for every b.

    Parameters (those that exist for the options chosen): ``projection``
    (Linear(H, C)), ``transition`` (C, C) or (K, C, C), ``duration`` (K, C)
    (learned), ``duration_logit`` (C,) (geometric), ``duration_log_rate`` (C,)
    (poisson), ``duration_log_mean`` and ``duration_log_dispersion`` (C,)
    (negative binomial), ``duration_low`` and ``duration_high`` (C,) (uniform),
    ``start_transition`` and ``end_transition`` (C,), ``start_projection`` and
    ``end_projection`` (Linear(H, C)).
    """

    def __init__(
        self,
        num_labels: int,
        max_duration: int,
        hidden_dim: int | None = None,
        *,
        duration_prior: str = "learned",
        duration_mean: float | Sequence[float] | None = None,
        duration_dispersion: float | Sequence[float] = 1.0,
        duration_range: tuple | None = None,
        duration_softness: float = 1.0,
        duration_dependent_transition: bool = False,
        allowed_transitions: Tensor | None = None,
        start_end_transitions: bool = True,
        boundary_projections: bool = False,
        centering: str | bool | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        check_positive_int("SemiCRF", "num_labels", num_labels)
        check_positive_int("SemiCRF", "max_duration", max_duration)
        if hidden_dim is not None:
            check_positive_int("SemiCRF", "hidden_dim", hidden_dim)
        if duration_prior not in DURATION_PRIORS:
            raise ValueError(f"SemiCRF: duration_prior must be one of {DURATION_PRIORS}, "
                             f"got {duration_prior!r}")
        if isinstance(centering, bool):
            centering = "mean" if centering else None
        if centering not in CENTERINGS:
            raise ValueError(f"SemiCRF: centering must be None, False, True or 'mean', "
                             f"got {centering!r}")
        if backend not in BACKENDS:
            raise ValueError(f"SemiCRF: backend must be one of {BACKENDS}, got {backend!r}")
        if boundary_projections and hidden_dim is None:
            raise ValueError("SemiCRF: boundary_projections=True needs hidden_dim (the "
                             "projections read the encoder states), got hidden_dim=None")
        C, K = num_labels, max_duration
        self.num_labels, self.max_duration, self.hidden_dim = C, K, hidden_dim
        self.duration_prior, self.centering, self.backend = duration_prior, centering, backend
        self.duration_softness = float(duration_softness)
        if not self.duration_softness > 0:
            raise ValueError(f"SemiCRF: duration_softness must be > 0, got {duration_softness}")

        self.projection = nn.Linear(hidden_dim, C) if hidden_dim is not None else None
        shape = (K, C, C) if duration_dependent_transition else (C, C)
        self.transition = nn.Parameter(torch.zeros(shape))
        if allowed_transitions is not None:
            if not isinstance(allowed_transitions, Tensor) or allowed_transitions.shape != (C, C):
                raise ValueError(f"SemiCRF: allowed_transitions must be a bool tensor (C, C) = "
                                 f"({C}, {C}), got {allowed_transitions!r:.80}")
            self.register_buffer("allowed_transitions", allowed_transitions.to(torch.bool).clone())
        else:
            self.allowed_transitions = None
        if start_end_transitions:
            self.start_transition = nn.Parameter(torch.zeros(C))
            self.end_transition = nn.Parameter(torch.zeros(C))
        else:
            self.start_transition = self.end_transition = None
        if boundary_projections:
            self.start_projection = nn.Linear(hidden_dim, C)
            self.end_projection = nn.Linear(hidden_dim, C)
        else:
            self.start_projection = self.end_projection = None
        self._init_duration(duration_mean, duration_dispersion, duration_range)

    def _init_duration(self, mean, dispersion, range_) -> None:
        C, K, prior = self.num_labels, self.max_duration, self.duration_prior
        if prior == "learned":
            self.duration = nn.Parameter(torch.zeros(K, C))
            return
        if prior == "uniform":
            low, high = (1.0, float(K)) if range_ is None else range_
            low = _per_label("duration_range low", low, C, 1.0, strict=False)
            high = _per_label("duration_range high", high, C, 1.0, strict=False)
            if bool((high < low).any()):
                raise ValueError(f"SemiCRF: duration_range must have low ≤ high, got "
                                 f"{low.tolist()} and {high.tolist()}")
            self.duration_low = nn.Parameter(low.float())
            self.duration_high = nn.Parameter(high.float())
            return
        mean = _per_label("duration_mean", K / 2 if mean is None else mean, C, 1.0)
        if prior == "geometric":
            p = 1.0 / mean
            self.duration_logit = nn.Parameter((p.log() - (-p).log1p()).float())
        elif prior == "poisson":
            self.duration_log_rate = nn.Parameter((mean - 1).log().float())
        else:
            r = _per_label("duration_dispersion", dispersion, C, 0.0)
            self.duration_log_mean = nn.Parameter((mean - 1).log().float())
            self.duration_log_dispersion = nn.Parameter(r.log().float())

    def extra_repr(self) -> str:
        transition = "(K, C, C)" if self.transition.dim() == 3 else "(C, C)"
        return (f"num_labels={self.num_labels}, max_duration={self.max_duration}, "
                f"hidden_dim={self.hidden_dim}, duration_prior={self.duration_prior!r}, "
                f"transition={transition}, centering={self.centering!r}, "
                f"backend={self.backend!r}")

    def duration_scores(self) -> Tensor:
        """duration (K, C): the learned table, or the prior's log-pmf at d = 1 … K.

        The geometric, Poisson and negative binomial are the untruncated
        log-pmfs (their mass beyond K is dropped, so each column sums to ≤ 1);
        the soft uniform is normalised over 1 … K.
        """
        K, prior = self.max_duration, self.duration_prior
        if prior == "learned":
            return self.duration
        if prior == "geometric":
            return geometric_log_pmf(self.duration_logit, K)
        if prior == "poisson":
            return poisson_log_pmf(self.duration_log_rate, K)
        if prior == "negative_binomial":
            return negative_binomial_log_pmf(self.duration_log_mean,
                                             self.duration_log_dispersion, K)
        return soft_uniform_log_pmf(self.duration_low, self.duration_high, K,
                                    self.duration_softness)

    def transition_scores(self) -> Tensor:
        """transition (C, C) or (K, C, C), −inf where ``allowed_transitions`` is False."""
        if self.allowed_transitions is None:
            return self.transition
        return self.transition.masked_fill(~self.allowed_transitions, float("-inf"))

    def _check_hidden(self, fn: str, hidden) -> None:
        width, what = ((self.hidden_dim, "hidden_dim") if self.hidden_dim is not None
                       else (self.num_labels, "num_labels (scores, since hidden_dim is None)"))
        if not isinstance(hidden, Tensor) or hidden.dtype not in FLOAT_DTYPES:
            raise TypeError(f"SemiCRF.{fn}: hidden must be a floating tensor (B, T, {width}), "
                            f"got {hidden!r:.80}")
        if hidden.dim() != 3 or hidden.shape[-1] != width or hidden.shape[1] < 1:
            raise ValueError(f"SemiCRF.{fn}: hidden must have shape (B, T ≥ 1, {width}) "
                             f"(last dim = {what}), got {tuple(hidden.shape)}")

    def potentials(self, hidden: Tensor, lengths: Tensor | None = None) -> dict:
        """The keyword arguments of the functional API for this batch.

        Args:
            hidden: (B, T, H) encoder states, or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T]; None means all T.

        Returns:
            dict with ``scores`` (B, T, C) (centred if asked), ``transition`` (C, C)
            or (K, C, C), ``duration`` (K, C), ``lengths`` (B,) int64,
            ``start_transition`` / ``end_transition`` (C,) or None,
            ``start_scores`` / ``end_scores`` (B, T, C) or None, ``backend``:
            so ``flashsemicrf.log_partition(**head.potentials(hidden, lengths))``
            equals ``head(hidden, lengths)``.
        """
        return self._potentials("potentials", hidden, lengths)

    def _potentials(self, fn: str, hidden: Tensor, lengths: Tensor | None) -> dict:
        self._check_hidden(fn, hidden)
        B, T, _ = hidden.shape
        lengths = check_lengths(f"SemiCRF.{fn}", lengths, B, T, hidden.device)
        scores = self.projection(hidden) if self.projection is not None else hidden
        if self.centering == "mean":
            scores = scores - _label_means(scores, lengths)[:, None, :]
        return dict(
            scores=scores,
            transition=self.transition_scores(),
            duration=self.duration_scores(),
            lengths=lengths,
            start_transition=self.start_transition,
            end_transition=self.end_transition,
            start_scores=None if self.start_projection is None else self.start_projection(hidden),
            end_scores=None if self.end_projection is None else self.end_projection(hidden),
            backend=self.backend,
        )

    def centering_shift(self, hidden: Tensor, lengths: Tensor | None = None) -> Tensor | None:
        """(B, K, C): what centring adds to the duration scores of each sequence.

        ``−mean[b, c]·d`` at [b, d − 1, c], mean[b, c] being the mean of
        scores[b, :L_b, c]; the centred model of sequence b equals the uncentred
        one with duration + shift[b].

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T]; None means all T.

        Returns:
            (B, K, C) tensor, or None when centering is off.
        """
        if self.centering is None:
            return None
        self._check_hidden("centering_shift", hidden)
        B, T, _ = hidden.shape
        lengths = check_lengths("SemiCRF.centering_shift", lengths, B, T, hidden.device)
        scores = self.projection(hidden) if self.projection is not None else hidden
        mean = _label_means(scores, lengths)  # (B, C)
        d = torch.arange(1, self.max_duration + 1, dtype=scores.dtype, device=scores.device)
        return -mean[:, None, :] * d[None, :, None]

    def forward(self, hidden: Tensor, lengths: Tensor | None = None,
                segments: Tensor | None = None) -> Tensor:
        """log Z (B,) without ``segments``; with them the mean NLL over the batch (scalar).

        Returning the loss from ``forward`` is what lets the head train under
        DistributedDataParallel, which only hooks ``forward``.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T]; None means all T.
            segments: (N, 4) gold segmentation, rows (batch, start, duration, label).

        Returns:
            (B,) log Z, or a scalar loss (:meth:`loss` with reduction "mean").
        """
        if segments is not None:
            return self.loss(hidden, segments, lengths)
        return api.log_partition(**self._potentials("forward", hidden, lengths))

    def loss(self, hidden: Tensor, segments: Tensor, lengths: Tensor | None = None,
             reduction: str = "mean") -> Tensor:
        """Negative log-likelihood of the gold ``segments``: log Z − score, ≥ 0.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            segments: (N, 4) LongTensor rows (batch, start, duration, label) tiling
                [0, L_b) for every b, durations ≤ max_duration (make them from a
                label map with ``flashsemicrf.labels_to_segments(labels, lengths, K)``).
            lengths: (B,) integers in [1, T]; None means all T.
            reduction: ``"mean"`` (scalar, default), ``"sum"`` (scalar) or ``"none"`` (B,).

        Returns:
            The reduced loss; differentiable with respect to every parameter and hidden.
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"SemiCRF.loss: reduction must be one of {REDUCTIONS}, "
                             f"got {reduction!r}")
        out = api.nll(segments, **self._potentials("loss", hidden, lengths))
        if reduction == "mean":
            return out.mean()
        return out.sum() if reduction == "sum" else out

    def score(self, hidden: Tensor, segments: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The score of given segmentations; differentiable.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            segments: (N, 4) rows (batch, start, duration, label) tiling [0, L_b).
            lengths: (B,) integers in [1, T]; None means all T.

        Returns:
            (B,) unnormalised scores.
        """
        return api.score(segments, **self._potentials("score", hidden, lengths))

    @torch.no_grad()
    def decode(self, hidden: Tensor, lengths: Tensor | None = None,
               return_scores: bool = False):
        """The Viterbi segmentation.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T]; None means all T.
            return_scores: also return the best scores.

        Returns:
            segments (N, 4) int64 rows (batch, start, duration, label), or
            ``(best (B,), segments)`` with ``return_scores``. Turn the segments
            into a (B, T) label map with ``flashsemicrf.segments_to_labels``.
        """
        best, segments = api.viterbi(**self._potentials("decode", hidden, lengths))
        return (best, segments) if return_scores else segments

    @torch.no_grad()
    def marginals(self, hidden: Tensor, lengths: Tensor | None = None) -> api.Marginals:
        """Posterior marginals ``(log_partition (B,), labels (B, T, C), starts (B, T))``.

        labels[b, t, c] = P(position t lies in a label-c segment); starts[b, t] =
        P(a segment starts at t); 0 at padding positions.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T]; None means all T.

        Returns:
            :class:`~flashsemicrf.Marginals`.
        """
        return api.marginals(**self._potentials("marginals", hidden, lengths))

    @torch.no_grad()
    def entropy(self, hidden: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Exact entropy of the distribution over segmentations, in nats.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T]; None means all T.

        Returns:
            (B,) entropies.
        """
        return api.entropy(**self._potentials("entropy", hidden, lengths))

    @torch.no_grad()
    def sample(self, hidden: Tensor, lengths: Tensor | None = None, num_samples: int = 1,
               generator: torch.Generator | None = None) -> Tensor:
        """Exact samples from the distribution over segmentations.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T]; None means all T.
            num_samples: samples per sequence (≥ 1).
            generator: a torch.Generator on hidden's device, or None.

        Returns:
            (N, 5) int64 rows (sample, batch, start, duration, label).
        """
        return api.sample(**self._potentials("sample", hidden, lengths),
                          num_samples=num_samples, generator=generator)

    def distribution(self, hidden: Tensor, lengths: Tensor | None = None) -> SemiCRFDistribution:
        """The distribution over segmentations of this batch (differentiable).

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T]; None means all T.

        Returns:
            :class:`~flashsemicrf.SemiCRFDistribution` on this head's potentials.
        """
        return SemiCRFDistribution(**self._potentials("distribution", hidden, lengths))


__all__ = [
    "SemiCRF",
    "geometric_log_pmf",
    "negative_binomial_log_pmf",
    "poisson_log_pmf",
    "soft_uniform_log_pmf",
]
