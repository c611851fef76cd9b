"""The SemiCRF head: an ``nn.Module`` that puts a semi-Markov CRF on an encoder.

::

    head = SemiCRF(num_labels=C, max_duration=K, hidden_dim=H)
    loss = head(hidden, segments, lengths)        # scalar: mean NLL over the batch
    loss = head(hidden, labels=tags, mask=mask)   # the same from a label map and a bool mask
    segments = head.decode(hidden, lengths)       # (N, 4) rows (batch, start, duration, label)
    log_z = head.log_partition(hidden, lengths)   # (B,)

``segments`` always comes before ``lengths`` (here and in the functional
API, ``flashsemicrf.nll(segments, scores, ...)``); ``labels=`` and ``mask=``
are keyword-only alternatives to them, and ``lengths`` may itself be a bool
prefix mask (B, T).

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
from ._validation import (
    BACKENDS,
    FLOAT_DTYPES,
    check_lengths,
    check_positive_int,
    check_segment_tensor,
    check_segments,
)
from .constraints import Constraints
from .distribution import SemiCRFDistribution
from .segments import (
    labels_to_segments,
    segment_scores,
    segments_from_start_labels,
    segments_to_labels,
)
from .priors import (
    geometric_log_pmf,
    negative_binomial_log_pmf,
    poisson_log_pmf,
    soft_uniform_log_pmf,
)

Tensor = torch.Tensor

DURATION_PRIORS = ("learned", "geometric", "poisson", "negative_binomial", "uniform")
CENTERINGS = (None, "mean")
REDUCTIONS = ("mean", "sum", "none", "token_mean")
DECODE_OUTPUTS = ("segments", "labels", "lists")


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
        constraints: optional :class:`~flashsemicrf.Constraints` over the C labels
            (its duration mask, if any, with K = max_duration): every forbidden
            transition, first or last label and duration scores −inf in every
            method, training and decoding alike. A gold segmentation it forbids
            makes :meth:`loss` raise, naming the row.
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
        constraints: Constraints | None = None,
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
        self._init_constraints(constraints)

    def _init_constraints(self, constraints: Constraints | None) -> None:
        """The masks of ``constraints`` as buffers (they follow the head's device)."""
        C, K = self.num_labels, self.max_duration
        self.constraints = constraints
        self._constrain_start = self._constrain_end = False
        for name in ("transitions", "start", "end", "durations"):
            self.register_buffer(f"constraint_{name}", None)
        if constraints is None:
            return
        if not isinstance(constraints, Constraints):
            raise TypeError(f"SemiCRF: constraints must be a flashsemicrf.Constraints, got "
                            f"{type(constraints).__name__}")
        if constraints.num_labels != C:
            raise ValueError(f"SemiCRF: constraints are over {constraints.num_labels} labels "
                             f"but num_labels = {C}")
        if constraints.durations is not None and constraints.durations.shape[0] != K:
            raise ValueError(
                f"SemiCRF: the constraints' duration mask has K = "
                f"{constraints.durations.shape[0]} but max_duration = {K}; build them with "
                f"max_duration={K}")
        self.register_buffer("constraint_transitions", constraints.transitions.clone())
        self.register_buffer("constraint_start", constraints.start.clone())
        self.register_buffer("constraint_end", constraints.end.clone())
        if constraints.durations is not None:
            self.register_buffer("constraint_durations", constraints.durations.clone())
        # Decided here, once: a branch on the masks' values would break torch.compile.
        self._constrain_start = not bool(constraints.start.all())
        self._constrain_end = not bool(constraints.end.all())

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

    def duration_table(self) -> Tensor:
        """duration (K, C) before constraints: the learned table, or the prior's log-pmf at d = 1 … K.

        The geometric, Poisson and negative binomial are the untruncated
        log-pmfs (their mass beyond K is dropped, so each column sums to ≤ 1);
        the soft uniform is normalised over 1 … K.

        Returns:
            (K, C) tensor, differentiable with respect to the duration parameters.
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

    def duration_scores(self) -> Tensor:
        """duration (K, C) as the kernels see it: :meth:`duration_table`, −inf
        where the head's constraints forbid a duration.

        Returns:
            (K, C) tensor, differentiable with respect to the duration parameters.
        """
        table = self.duration_table()
        if self.constraint_durations is None:
            return table
        return table.masked_fill(~self.constraint_durations, float("-inf"))

    def transition_scores(self) -> Tensor:
        """transition (C, C) or (K, C, C), −inf where ``allowed_transitions`` or the
        constraints' transition mask is False.

        Returns:
            A tensor of the shape of ``transition``, differentiable with respect to it.
        """
        out = self.transition
        for allowed in (self.allowed_transitions, self.constraint_transitions):
            if allowed is not None:
                out = out.masked_fill(~allowed, float("-inf"))
        return out

    def _check_hidden(self, fn: str, hidden) -> None:
        width, what = ((self.hidden_dim, "hidden_dim") if self.hidden_dim is not None
                       else (self.num_labels, "num_labels (scores, since hidden_dim is None)"))
        if not isinstance(hidden, Tensor) or hidden.dtype not in FLOAT_DTYPES:
            raise TypeError(f"SemiCRF.{fn}: hidden must be a floating tensor (B, T, {width}), "
                            f"got {hidden!r:.80}")
        if hidden.dim() == 3 and hidden.shape[-1] != width and hidden.shape[1] == width:
            raise ValueError(f"SemiCRF.{fn}: hidden must have shape (B, T, {width}) (last dim = "
                             f"{what}), got {tuple(hidden.shape)}, which looks like (B, {width}, "
                             "T): transpose it with hidden.transpose(1, 2)")
        if hidden.dim() != 3 or hidden.shape[-1] != width or hidden.shape[1] < 1:
            raise ValueError(f"SemiCRF.{fn}: hidden must have shape (B, T ≥ 1, {width}) "
                             f"(last dim = {what}), got {tuple(hidden.shape)}")

    def _lengths(self, fn: str, hidden: Tensor, lengths, mask) -> Tensor:
        """lengths (B,) int64 from ``lengths`` (integers or a prefix mask) or ``mask``."""
        B, T, _ = hidden.shape
        name = f"SemiCRF.{fn}"
        if mask is not None:
            if lengths is not None:
                raise ValueError(f"{name}: pass lengths or mask, not both (mask (B, T) is "
                                 "turned into lengths = mask.sum(1))")
            if isinstance(mask, Tensor) and mask.dtype == torch.uint8:
                mask = mask.bool()  # pytorch-crf's older masks
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"{name}: mask must be a bool tensor (B, T) = ({B}, {T}), "
                                f"got {mask!r:.80}")
            return check_lengths(name, mask, B, T, hidden.device, name="mask")
        return check_lengths(name, lengths, B, T, hidden.device)

    def _gold(self, fn: str, hidden: Tensor, segments, labels, lengths: Tensor):
        """The gold segments (N, 4): given, or cut from a label map (B, T)."""
        name = f"SemiCRF.{fn}"
        if labels is None:
            if segments is None:
                raise TypeError(
                    f"{name}: the gold segmentation is missing: pass segments (N, 4) "
                    f"(head(hidden, segments, lengths)) or labels= (B, T). The head's forward "
                    "is the training loss; for log Z call head.log_partition(hidden, lengths)"
                )
            return segments
        if segments is not None:
            raise ValueError(f"{name}: pass segments or labels=, not both")
        B, T, _ = hidden.shape
        if (not isinstance(labels, Tensor) or labels.dtype.is_floating_point
                or labels.dtype == torch.bool or tuple(labels.shape) != (B, T)):
            raise TypeError(f"{name}: labels must be an integer label map (B, T) = ({B}, {T}), "
                            f"got {labels!r:.80}")
        return labels_to_segments(labels.to(hidden.device), lengths, self.max_duration)

    def potentials(self, hidden: Tensor, lengths: Tensor | None = None, *,
                   mask: Tensor | None = None) -> dict:
        """The keyword arguments of the functional API for this batch.

        Args:
            hidden: (B, T, H) encoder states, or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            mask: keyword-only alternative to lengths: a bool (B, T) mask, True on
                a prefix of every row (pytorch-crf's ``mask``).

        Returns:
            dict with ``scores`` (B, T, C) (centred if asked), ``transition`` (C, C)
            or (K, C, C), ``duration`` (K, C), ``lengths`` (B,) int64,
            ``start_transition`` / ``end_transition`` (C,) or None,
            ``start_scores`` / ``end_scores`` (B, T, C) or None, ``backend``,
            with the head's constraints applied (−inf where forbidden):
            so ``flashsemicrf.log_partition(**head.potentials(hidden, lengths))``
            equals ``head.log_partition(hidden, lengths)``.

        Raises:
            TypeError, ValueError: hidden, lengths or mask has the wrong type or
                shape (the message names it and says what was expected).
        """
        return self._potentials("potentials", hidden, lengths, mask)

    def _potentials(self, fn: str, hidden: Tensor, lengths, mask=None) -> dict:
        self._check_hidden(fn, hidden)
        lengths = self._lengths(fn, hidden, lengths, mask)
        scores = self.projection(hidden) if self.projection is not None else hidden
        if self.centering == "mean":
            scores = scores - _label_means(scores, lengths)[:, None, :]
        start, end = self.start_transition, self.end_transition
        if self._constrain_start:
            start = (start if start is not None else scores.new_zeros(self.num_labels)
                     ).masked_fill(~self.constraint_start, float("-inf"))
        if self._constrain_end:
            end = (end if end is not None else scores.new_zeros(self.num_labels)
                   ).masked_fill(~self.constraint_end, float("-inf"))
        return dict(
            scores=scores,
            transition=self.transition_scores(),
            duration=self.duration_scores(),
            lengths=lengths,
            start_transition=start,
            end_transition=end,
            start_scores=None if self.start_projection is None else self.start_projection(hidden),
            end_scores=None if self.end_projection is None else self.end_projection(hidden),
            backend=self.backend,
        )

    def _prepared(self, fn: str, hidden: Tensor, lengths, mask):
        """The validated problem and ops of the functional API for this batch."""
        kw = self._potentials(fn, hidden, lengths, mask)
        return api._prepare(f"SemiCRF.{fn}", **kw)

    def centering_shift(self, hidden: Tensor, lengths: Tensor | None = None, *,
                        mask: Tensor | None = None) -> Tensor | None:
        """(B, K, C): what centring adds to the duration scores of each sequence.

        ``−mean[b, c]·d`` at [b, d − 1, c], mean[b, c] being the mean of
        scores[b, :L_b, c]; the centred model of sequence b equals the uncentred
        one with duration + shift[b].

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            mask: keyword-only alternative to lengths, a bool prefix mask (B, T).

        Returns:
            (B, K, C) tensor, or None when centering is off.

        Raises:
            TypeError, ValueError: hidden, lengths or mask is malformed.
        """
        if self.centering is None:
            return None
        self._check_hidden("centering_shift", hidden)
        lengths = self._lengths("centering_shift", hidden, lengths, mask)
        scores = self.projection(hidden) if self.projection is not None else hidden
        mean = _label_means(scores, lengths)  # (B, C)
        d = torch.arange(1, self.max_duration + 1, dtype=scores.dtype, device=scores.device)
        return -mean[:, None, :] * d[None, :, None]

    def forward(self, hidden: Tensor, segments: Tensor | None = None,
                lengths: Tensor | None = None, *, labels: Tensor | None = None,
                mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """The training loss: :meth:`loss` (by default the mean NLL over the batch).

        Returning the loss from ``forward`` is what lets the head train under
        DistributedDataParallel, which only hooks ``forward``. The gold is
        required: log Z is :meth:`log_partition`, so a training loop that forgets
        the gold gets an error rather than minimising log Z.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            segments: (N, 4) gold rows (batch, start, duration, label), sorted by
                batch then start, tiling [0, L_b) for every b with durations in
                [1, max_duration].
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            labels: keyword-only alternative to segments: a gold label map (B, T)
                (values in [0, C) within the lengths), cut into segments with
                ``labels_to_segments(labels, lengths, max_duration)``.
            mask: keyword-only alternative to lengths: a bool (B, T) mask, True
                on a prefix of every row.
            reduction: ``"mean"`` (default), ``"sum"``, ``"none"`` or
                ``"token_mean"`` (see :meth:`loss`).

        Returns:
            The reduced loss, as :meth:`loss`.

        Raises:
            TypeError: the gold is missing (neither segments nor labels).
            TypeError, ValueError: as :meth:`loss`.
        """
        return self._loss("forward", hidden, segments, lengths, labels, mask, reduction)

    def loss(self, hidden: Tensor, segments: Tensor | None = None,
             lengths: Tensor | None = None, *, labels: Tensor | None = None,
             mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """Negative log-likelihood of the gold segmentation: log Z − score, ≥ 0.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            segments: (N, 4) LongTensor rows (batch, start, duration, label)
                sorted by batch then start, tiling [0, L_b) for every b,
                durations ≤ max_duration.
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            labels: keyword-only alternative to segments: a gold label map (B, T),
                cut with ``labels_to_segments(labels, lengths, max_duration)``
                (adjacent segments of one label merge; runs longer than
                max_duration become chains).
            mask: keyword-only alternative to lengths: a bool (B, T) prefix mask.
            reduction: ``"mean"`` (scalar: the sum over sequences / B; 0 for an
                empty batch), ``"sum"`` (scalar), ``"none"`` ((B,) per sequence)
                or ``"token_mean"`` (scalar: the sum / the number of valid
                positions, pytorch-crf's name).

        Returns:
            The reduced loss; differentiable with respect to every parameter and hidden.

        Raises:
            TypeError, ValueError: a malformed argument (the message names it and
                says how to fix it: a mask passed as lengths, tags passed as
                segments, scores transposed, ...).
            ValueError: a gold row scores −inf under the model (e.g. a
                forbidden transition or duration), so its loss would be +inf;
                the message names the row and the term. Under torch.compile
                this check is skipped and the loss is +inf.
        """
        return self._loss("loss", hidden, segments, lengths, labels, mask, reduction)

    def _loss(self, fn, hidden, segments, lengths, labels, mask, reduction) -> Tensor:
        if reduction not in REDUCTIONS:
            raise ValueError(f"SemiCRF.{fn}: reduction must be one of {REDUCTIONS}, "
                             f"got {reduction!r}")
        defaulted = lengths is None and mask is None
        self._check_hidden(fn, hidden)
        if segments is not None and labels is None and isinstance(segments, Tensor):
            B, T, _ = hidden.shape
            check_segment_tensor(f"SemiCRF.{fn}", segments, segments.device, batch=B, length=T)
        p, ops = self._prepared(fn, hidden, lengths, mask)
        gold = self._gold(fn, hidden, segments, labels, p.lengths)
        hint = ""
        if self.constraints is not None or self.allowed_transitions is not None:
            hint = ("; the head's constraints forbid it: head.constraints.check(segments) "
                    "names the rule" if self.constraints is not None else
                    "; the head's allowed_transitions forbid it")
        out = api._nll(f"SemiCRF.{fn}", gold, p, ops, lengths_defaulted=defaulted, hint=hint)
        if reduction == "none":
            return out
        if reduction == "sum":
            return out.sum()
        if reduction == "token_mean":
            return out.sum() / p.lengths.sum().clamp(min=1).to(out.dtype)
        return out.sum() / torch.sym_max(out.shape[0], 1)

    def score(self, hidden: Tensor, segments: Tensor | None = None,
              lengths: Tensor | None = None, *, labels: Tensor | None = None,
              mask: Tensor | None = None) -> Tensor:
        """The unnormalised score of given segmentations; differentiable.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            segments: (N, 4) rows (batch, start, duration, label) tiling [0, L_b).
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            labels: keyword-only alternative to segments, a label map (B, T).
            mask: keyword-only alternative to lengths, a bool prefix mask (B, T).

        Returns:
            (B,) scores (−inf for a segmentation the model forbids).

        Raises:
            TypeError, ValueError: a malformed argument (the message names it).
        """
        p, _ = self._prepared("score", hidden, lengths, mask)
        gold = self._gold("score", hidden, segments, labels, p.lengths)
        gold = check_segments("SemiCRF.score", gold, p,
                              lengths_defaulted=lengths is None and mask is None)
        return segment_scores(gold, p)

    def log_partition(self, hidden: Tensor, lengths: Tensor | None = None, *,
                      mask: Tensor | None = None) -> Tensor:
        """log Z (B,): the log-sum-exp of the score over all segmentations.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            mask: keyword-only alternative to lengths, a bool prefix mask (B, T).

        Returns:
            (B,) tensor, differentiable; −inf for a sequence with no allowed
            segmentation.

        Raises:
            TypeError, ValueError: hidden, lengths or mask is malformed.
        """
        p, ops = self._prepared("log_partition", hidden, lengths, mask)
        return ops.log_partition(p)

    @torch.no_grad()
    def decode(self, hidden: Tensor, lengths: Tensor | None = None, *,
               mask: Tensor | None = None, output: str = "segments",
               return_scores: bool = False):
        """The Viterbi (highest-scoring) segmentation.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            mask: keyword-only alternative to lengths, a bool prefix mask (B, T).
            output: ``"segments"`` (default): (N, 4) int64 rows (batch, start,
                duration, label) sorted by batch then start; ``"labels"``: a
                (B, T) int64 label map, −1 past each length; ``"lists"``: B
                Python lists of L_b labels each (pytorch-crf's ``decode``; not
                traceable by torch.compile).
            return_scores: also return the best scores (B,).

        Returns:
            The decoding in the form ``output`` asks for, or ``(best (B,),
            decoding)`` with ``return_scores``. A sequence with no allowed
            segmentation gets best = −inf and no rows (labels −1, an empty list).

        Raises:
            TypeError, ValueError: a malformed argument or an unknown ``output``.
        """
        if output not in DECODE_OUTPUTS:
            raise ValueError(f"SemiCRF.decode: output must be one of {DECODE_OUTPUTS}, "
                             f"got {output!r}")
        p, ops = self._prepared("decode", hidden, lengths, mask)
        best, start_labels = ops.viterbi(p)
        segments = segments_from_start_labels(start_labels, p.lengths)
        if output == "segments":
            result = segments
        else:
            B, T, _ = hidden.shape
            result = segments_to_labels(segments, B, T)
            if output == "lists":
                result = [row[:n] for row, n in zip(result.tolist(), p.lengths.tolist())]
                result = [[] if bool(best[b] == float("-inf")) else row
                          for b, row in enumerate(result)]
        return (best, result) if return_scores else result

    @torch.no_grad()
    def marginals(self, hidden: Tensor, lengths: Tensor | None = None, *,
                  mask: Tensor | None = None) -> api.Marginals:
        """Posterior marginals ``(log_partition (B,), labels (B, T, C), starts (B, T))``.

        labels[b, t, c] = P(position t lies in a label-c segment); starts[b, t] =
        P(a segment starts at t); 0 at padding positions.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            mask: keyword-only alternative to lengths, a bool prefix mask (B, T).

        Returns:
            :class:`~flashsemicrf.Marginals`; not differentiable.

        Raises:
            TypeError, ValueError: hidden, lengths or mask is malformed.
        """
        return api.marginals(**self._potentials("marginals", hidden, lengths, mask))

    @torch.no_grad()
    def entropy(self, hidden: Tensor, lengths: Tensor | None = None, *,
                mask: Tensor | None = None) -> Tensor:
        """Exact entropy of the distribution over segmentations, in nats.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            mask: keyword-only alternative to lengths, a bool prefix mask (B, T).

        Returns:
            (B,) entropies; not differentiable.

        Raises:
            TypeError, ValueError: hidden, lengths or mask is malformed.
        """
        return api.entropy(**self._potentials("entropy", hidden, lengths, mask))

    @torch.no_grad()
    def sample(self, hidden: Tensor, lengths: Tensor | None = None, num_samples: int = 1,
               generator: torch.Generator | None = None, *,
               mask: Tensor | None = None) -> Tensor:
        """Exact samples from the distribution over segmentations.

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            num_samples: samples per sequence (≥ 1).
            generator: a torch.Generator on hidden's device, or None.
            mask: keyword-only alternative to lengths, a bool prefix mask (B, T).

        Returns:
            (N, 5) int64 rows (sample, batch, start, duration, label), sorted by
            sample, batch, start.

        Raises:
            TypeError, ValueError: a malformed argument (the message names it).
        """
        return api.sample(**self._potentials("sample", hidden, lengths, mask),
                          num_samples=num_samples, generator=generator)

    def distribution(self, hidden: Tensor, lengths: Tensor | None = None, *,
                     mask: Tensor | None = None) -> SemiCRFDistribution:
        """The distribution over segmentations of this batch (differentiable).

        Args:
            hidden: (B, T, H), or scores (B, T, C) when hidden_dim is None.
            lengths: (B,) integers in [1, T], or a bool prefix mask (B, T); None: all T.
            mask: keyword-only alternative to lengths, a bool prefix mask (B, T).

        Returns:
            :class:`~flashsemicrf.SemiCRFDistribution` on this head's potentials.

        Raises:
            TypeError, ValueError: hidden, lengths or mask is malformed.
        """
        return SemiCRFDistribution(**self._potentials("distribution", hidden, lengths, mask))


__all__ = [
    "SemiCRF",
    "geometric_log_pmf",
    "negative_binomial_log_pmf",
    "poisson_log_pmf",
    "soft_uniform_log_pmf",
]
