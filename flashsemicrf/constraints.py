"""Hard constraints on segmentations: allowed label pairs, first and last labels, durations.

A :class:`Constraints` bundles four boolean masks (True = allowed) over C labels::

    transitions (C, C)   transitions[i, j]: a label-j segment may follow a label-i one
    start       (C,)     a sequence may begin with a label-c segment
    end         (C,)     a sequence may end with a label-c segment
    durations   (K, C)   durations[d - 1, c]: a label-c segment may last d positions
                         (None: every duration 1 … K of the potentials is allowed)

and applies them by putting −inf where a mask is False: ``constraints.apply(kw)``
returns a copy of the keyword arguments of the functional API (or of
``SemiCRF.potentials(...)``) with ``transition``, ``duration``,
``start_transition`` and ``end_transition`` masked, so training and decoding
see the same constraints::

    c = Constraints.from_tags("BIO", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    kw = c.apply(head.potentials(hidden, lengths))
    loss = flashsemicrf.nll(gold, **kw).mean()     # gold must be feasible: c.check(gold)
    best, segments = flashsemicrf.viterbi(**kw)    # never a forbidden segmentation

A forbidden entry gets probability 0 and gradient 0; a sequence with no
allowed segmentation gets log Z = −inf (never NaN). Nothing is modified in
place: every method returns new tensors or a new ``Constraints``.

Label schemes. In a semi-CRF a segment *is* a span, so there are two ways to
use tagging schemes such as BIO:

* token tags as segment labels (:meth:`Constraints.from_tags`): the labels are
  the tag set ("O", "B-PER", "I-PER", …); with K = 1 this is exactly a
  linear-chain CRF under AllenNLP's ``allowed_transitions(constraint_type,
  labels)``; with K > 1 a label-t segment of duration d stands for d tokens
  tagged t, which is allowed only where t may follow itself.
* spans as segments (:meth:`Constraints.spans`): the labels are the entity
  types plus an outside label ("O", "PER", "LOC"), every entity is one segment.
  Every sequence of spans can be written in BIO, BIOUL, IOB1 or BMES, so the
  scheme itself forbids nothing here; what remains are choices about the data:
  whether outside runs are single segments ("O" never follows "O") and whether
  two entities of one type may touch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

import torch

Tensor = torch.Tensor
Label = Union[int, str]

#: The tagging schemes of :meth:`Constraints.from_tags` (AllenNLP's constraint
#: types, plus "BIOES", the same scheme as "BIOUL" with E for L and S for U).
TAG_SCHEMES = ("BIO", "IOB1", "BIOUL", "BIOES", "BMES")
_SCHEME_TAGS = {
    "BIO": "OBI",
    "IOB1": "OBI",
    "BIOUL": "OBILU",
    "BIOES": "OBIES",
    "BMES": "BMES",
}


def _mask_from(name: str, value, shape: tuple) -> Tensor:
    """A bool CPU tensor of ``shape`` copied from ``value`` (a tensor or nested lists)."""
    if isinstance(value, Tensor):
        if value.dtype != torch.bool:
            raise TypeError(f"Constraints: {name} must be a bool tensor {shape}, got {value.dtype}")
        t = value.detach().to("cpu").clone()
    else:
        try:
            t = torch.tensor(value, dtype=torch.bool)
        except (TypeError, ValueError) as err:
            raise TypeError(f"Constraints: {name} must be a bool tensor of shape {shape}, "
                            f"got {type(value).__name__}") from err
    if tuple(t.shape) != shape:
        raise ValueError(f"Constraints: {name} must have shape {shape}, got {tuple(t.shape)}")
    return t


@dataclass(frozen=True, eq=False)
class Constraints:
    """Which segmentations are allowed: boolean masks over C labels, True = allowed.

    Args:
        transitions: (C, C) bool; ``transitions[i, j]``: a label-j segment may
            follow a label-i one.
        start: (C,) bool or None (all True): labels a sequence may begin with.
        end: (C,) bool or None (all True): labels a sequence may end with.
        durations: (K, C) bool or None; ``durations[d - 1, c]``: a label-c
            segment may last d positions. None: no duration constraint (any K).
        labels: optional C distinct label names, used by the builders and in
            error messages; labels may then be given by name everywhere.

    The masks are copied to the CPU at construction; :meth:`apply` and
    :meth:`masks` move them to the potentials' device.

    Raises:
        TypeError: a mask is not boolean.
        ValueError: shapes disagree, a name is repeated, or C = 0.
    """

    transitions: Tensor
    start: Tensor | None = None
    end: Tensor | None = None
    durations: Tensor | None = None
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.transitions, Tensor) or self.transitions.dim() != 2:
            got = tuple(self.transitions.shape) if isinstance(self.transitions, Tensor) \
                else type(self.transitions).__name__
            raise ValueError(f"Constraints: transitions must be a bool tensor (C, C), got {got}")
        C = self.transitions.shape[0]
        if C < 1:
            raise ValueError("Constraints: need at least one label (C ≥ 1)")
        set_ = object.__setattr__  # frozen: normalise the fields once, here
        set_(self, "transitions", _mask_from("transitions", self.transitions, (C, C)))
        for name in ("start", "end"):
            value = getattr(self, name)
            set_(self, name, torch.ones(C, dtype=torch.bool) if value is None
                 else _mask_from(name, value, (C,)))
        if self.durations is not None:
            K = self.durations.shape[0] if isinstance(self.durations, Tensor) \
                else len(self.durations)
            if K < 1:
                raise ValueError("Constraints: durations must have K ≥ 1 rows")
            set_(self, "durations", _mask_from("durations", self.durations, (K, C)))
        if self.labels is not None:
            names = tuple(self.labels)
            if len(names) != C or not all(isinstance(n, str) for n in names):
                raise ValueError(f"Constraints: labels must be {C} strings (one per label), "
                                 f"got {self.labels!r}")
            if len(set(names)) != C:
                raise ValueError(f"Constraints: labels must be distinct, got {names!r}")
            set_(self, "labels", names)

    # ---------------------------------------------------------------- builders

    @classmethod
    def allow_all(cls, labels: int | Sequence[str], max_duration: int | None = None
                  ) -> "Constraints":
        """No constraint yet: every pair, first and last label allowed.

        Args:
            labels: C, or C label names.
            max_duration: K; with it the result carries a (K, C) duration mask
                (all True) that :meth:`with_durations` can narrow.

        Returns:
            Constraints over C labels.

        Raises:
            ValueError: C < 1, repeated names, or K < 1.
        """
        C, names = _count_labels("allow_all", labels)
        durations = None
        if max_duration is not None:
            _check_int("allow_all", "max_duration", max_duration, 1)
            durations = torch.ones(max_duration, C, dtype=torch.bool)
        return cls(torch.ones(C, C, dtype=torch.bool), durations=durations, labels=names)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]], labels: int | Sequence[str]
                   ) -> "Constraints":
        """Constraints from a list of allowed (from, to) label pairs.

        Follows AllenNLP's convention, so the output of its
        ``allowed_transitions(constraint_type, labels)`` can be passed as is:
        index C stands for the start (``(C, j)``: a sequence may begin with
        label j) and index C + 1 for the end (``(i, C + 1)``: it may end with
        label i). A list with no start pair leaves every first label allowed;
        likewise for the end.

        Args:
            pairs: iterable of (from, to) integer pairs, each in [0, C + 1].
            labels: C, or C label names.

        Returns:
            Constraints with exactly these pairs allowed, no duration mask.

        Raises:
            ValueError: an index outside [0, C + 1], or a pair from the end or
                into the start.
        """
        C, names = _count_labels("from_pairs", labels)
        trans = torch.zeros(C, C, dtype=torch.bool)
        start = torch.zeros(C, dtype=torch.bool)
        end = torch.zeros(C, dtype=torch.bool)
        any_start = any_end = False
        for pair in pairs:
            if len(pair) != 2 or not all(_is_int(v) for v in pair):
                raise ValueError(f"Constraints.from_pairs: pairs must be (from, to) integer "
                                 f"pairs, got {pair!r}")
            i, j = int(pair[0]), int(pair[1])
            if not (0 <= i <= C and 0 <= j <= C + 1) or (i == C and j == C + 1):
                raise ValueError(
                    f"Constraints.from_pairs: pair {pair!r} is outside the {C} labels (from "
                    f"must be in [0, {C}] with {C} = start, to in [0, {C + 1}] with {C + 1} "
                    f"= end, and start → end is not a segmentation)")
            if i == C:
                start[j], any_start = True, True
            elif j == C + 1:
                end[i], any_end = True, True
            elif j == C:
                raise ValueError(f"Constraints.from_pairs: pair {pair!r} leads into the start "
                                 f"index {C}; to must be a label or the end index {C + 1}")
            else:
                trans[i, j] = True
        return cls(trans, start if any_start else None, end if any_end else None, labels=names)

    @classmethod
    def from_tags(cls, constraint_type: str, labels: Sequence[str] | Mapping[int, str],
                  max_duration: int = 1) -> "Constraints":
        """Token-level tags as segment labels, constrained as the tagging scheme requires.

        The labels are the tags ("O", "B-PER", "I-PER", …; ``labels`` may be
        AllenNLP's index → tag dict). With ``max_duration=1`` the semi-CRF is a
        linear-chain CRF and the masks equal AllenNLP's
        ``allowed_transitions(constraint_type, labels)``:

        ======== ================= ================= ===================================
        scheme   may start with    may end with      t → u allowed when
        ======== ================= ================= ===================================
        BIO      O, B              O, B, I           u is O or B; or u = I-x after B-x, I-x
        IOB1     O, I              O, B, I           u is O or I; or u = B-x after B-x, I-x
        BIOUL    O, B, U           O, L, U           t in O, L, U and u in O, B, U; or
                                                     u in I-x, L-x after B-x, I-x
        BIOES    as BIOUL with E for L and S for U
        BMES     B, S              E, S              t in E, S and u in B, S; or
                                                     u in M-x, E-x after B-x, M-x
        ======== ================= ================= ===================================

        With K = ``max_duration`` > 1, a label-t segment of duration d stands
        for d consecutive tokens tagged t, so durations d > 1 are allowed only
        for tags that may follow themselves (O, I-x and B-x in BIO; O, I-x and
        U-x in BIOUL; M-x in BMES; …). Every allowed segmentation then spells
        a valid tag sequence.

        Args:
            constraint_type: one of ``TAG_SCHEMES``: "BIO", "IOB1", "BIOUL",
                "BIOES", "BMES".
            labels: the C tags, a sequence or a dict {index: tag} over 0 … C − 1.
                A tag is "O" or a scheme letter optionally followed by "-" and
                an entity type ("B-PER", or "B" for untyped schemes).
            max_duration: K of the potentials the constraints will be applied to.

        Returns:
            Constraints with transitions, start, end and a (K, C) duration mask.

        Raises:
            ValueError: unknown scheme, a tag the scheme does not have, a dict
                whose keys are not 0 … C − 1, or K < 1.
        """
        fn = "Constraints.from_tags"
        if constraint_type not in TAG_SCHEMES:
            raise ValueError(f"{fn}: constraint_type must be one of {TAG_SCHEMES}, "
                             f"got {constraint_type!r}")
        _check_int("from_tags", "max_duration", max_duration, 1)
        if isinstance(labels, Mapping):
            if sorted(labels) != list(range(len(labels))):
                raise ValueError(f"{fn}: a labels dict must map 0 … C − 1 to tags, got keys "
                                 f"{sorted(labels)!r}")
            labels = [labels[i] for i in range(len(labels))]
        C, names = _count_labels("from_tags", labels)
        assert names is not None
        scheme = constraint_type
        tags = [_parse_tag(fn, scheme, name) for name in names]
        if scheme == "BIOES":  # the same scheme as BIOUL under other letters
            tags = [({"E": "L", "S": "U"}.get(t, t), ent) for t, ent in tags]
            scheme = "BIOUL"
        rules = _TAG_RULES[scheme]
        trans = torch.tensor([[rules.pair(a, b) for b in tags] for a in tags], dtype=torch.bool)
        start = torch.tensor([t in rules.first for t, _ in tags], dtype=torch.bool)
        end = torch.tensor([t in rules.last for t, _ in tags], dtype=torch.bool)
        durations = torch.ones(max_duration, C, dtype=torch.bool)
        durations[1:] = trans.diagonal()  # d > 1: t repeated d times
        return cls(trans, start, end, durations, names)

    @classmethod
    def spans(cls, entity_types: Sequence[str], *, outside: str | None = "O",
              outside_follows_outside: bool = True, type_follows_itself: bool = True,
              max_duration: int | None = None) -> "Constraints":
        """Spans as segments: labels (outside, *entity_types), one segment per entity.

        This is how BIO/BIOUL/IOB1/BMES-tagged data maps onto a semi-CRF:
        B-X I-X I-X is one label-X segment of duration 3, and every tag
        sequence is a sequence of spans, so the scheme forbids nothing; the
        options encode what the data guarantee:

        * ``outside_follows_outside=False``: every outside run is one segment
          (maximal runs, so each tagging has exactly one segmentation). Only
          when K covers the longest outside run: with K smaller such runs
          must be chains of "O" segments, which this forbids.
        * ``type_follows_itself=False``: two entities of one type never touch
          (true of data tagged with the IO scheme, where they could not be
          told apart).

        Args:
            entity_types: the entity type names, e.g. ("PER", "LOC").
            outside: the outside label's name (label 0), or None for no
                outside label (every position in some entity, as in BMES).
            outside_follows_outside: allow "O" after "O" (default True).
            type_follows_itself: allow an entity right after one of its own
                type (default True).
            max_duration: K; with it the result carries an all-True (K, C)
                duration mask for :meth:`with_durations`.

        Returns:
            Constraints over C = len(entity_types) (+ 1 with ``outside``) labels.

        Raises:
            ValueError: no labels, or repeated names.
        """
        names = ([outside] if outside is not None else []) + list(entity_types)
        c = cls.allow_all(names, max_duration)
        first_type = 0 if outside is None else 1
        repeats = []
        if outside is not None and not outside_follows_outside:
            repeats.append(0)
        if not type_follows_itself:
            repeats.extend(range(first_type, len(names)))
        return c.forbid_repeats(repeats) if repeats else c

    # ------------------------------------------------------- narrowing (new objects)

    @property
    def num_labels(self) -> int:
        """C, the number of labels."""
        return self.transitions.shape[0]

    @property
    def max_duration(self) -> int | None:
        """K of the duration mask, or None when durations are unconstrained."""
        return None if self.durations is None else self.durations.shape[0]

    def _replace(self, **fields) -> "Constraints":
        current = dict(transitions=self.transitions, start=self.start, end=self.end,
                       durations=self.durations, labels=self.labels)
        current.update(fields)
        return Constraints(**current)

    def forbid_transitions(self, pairs: Iterable[tuple[Label, Label]]) -> "Constraints":
        """A copy where label ``to`` may not follow label ``from`` for each (from, to) pair.

        Args:
            pairs: (from, to) pairs of label indices or names.

        Returns:
            The narrowed Constraints.

        Raises:
            ValueError: an unknown label name or index.
        """
        trans = self.transitions.clone()
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"Constraints.forbid_transitions: pairs must be (from, to), "
                                 f"got {pair!r}")
            i = self._index("forbid_transitions", pair[0])
            j = self._index("forbid_transitions", pair[1])
            trans[i, j] = False
        return self._replace(transitions=trans)

    def forbid_repeats(self, labels: Iterable[Label] | None = None) -> "Constraints":
        """A copy where each given label never follows itself (all labels if None).

        Useful when consecutive segments always differ (speaker turns, a
        maximal outside run). A label with this constraint cannot be a chain
        of segments, so its runs must fit in K.

        Args:
            labels: label indices or names; None means every label.

        Returns:
            The narrowed Constraints.

        Raises:
            ValueError: an unknown label name or index.
        """
        idx = range(self.num_labels) if labels is None else labels
        return self.forbid_transitions((c, c) for c in idx)

    def with_start(self, labels: Iterable[Label]) -> "Constraints":
        """A copy where a sequence may begin only with one of ``labels`` (and the old rule).

        Raises:
            ValueError: an unknown label name or index.
        """
        return self._replace(start=self.start & self._subset("with_start", labels))

    def with_end(self, labels: Iterable[Label]) -> "Constraints":
        """A copy where a sequence may end only with one of ``labels`` (and the old rule).

        Raises:
            ValueError: an unknown label name or index.
        """
        return self._replace(end=self.end & self._subset("with_end", labels))

    def with_durations(self, minimum: int | Sequence[int] | Mapping[Label, int] | None = None,
                       maximum: int | Sequence[int] | Mapping[Label, int] | None = None
                       ) -> "Constraints":
        """A copy where a label-c segment lasts between minimum[c] and maximum[c] positions.

        Needs a duration mask (create the constraints with ``max_duration=K``).
        Each bound is one int for every label, C ints, or a dict {label: int}
        for some labels (the others keep 1 and K).

        Args:
            minimum: shortest allowed duration, ≥ 1.
            maximum: longest allowed duration, in [minimum, K].

        Returns:
            The narrowed Constraints (the old duration mask and the new range).

        Raises:
            ValueError: no duration mask, a bound below 1 or above K, minimum
                above maximum, a sequence not of length C, or an unknown label.
        """
        fn = "Constraints.with_durations"
        if self.durations is None:
            raise ValueError(f"{fn}: these constraints have no duration mask; create them "
                             f"with max_duration=K (the potentials' K)")
        K, C = self.durations.shape
        low = self._per_label("with_durations", "minimum", minimum, 1)
        high = self._per_label("with_durations", "maximum", maximum, K)
        for c in range(C):
            where = f"label {self._name(c)}"
            if low[c] < 1 or high[c] < 1:
                raise ValueError(f"{fn}: durations must be ≥ 1, got minimum {low[c]} and "
                                 f"maximum {high[c]} for {where}")
            if high[c] > K:
                raise ValueError(
                    f"{fn}: maximum {high[c]} for {where} exceeds K = {K}, the longest "
                    f"segment of the potentials (runs longer than K are chains of segments, "
                    f"which a per-segment limit does not bound)")
            if low[c] > high[c]:
                raise ValueError(f"{fn}: minimum {low[c]} exceeds maximum {high[c]} for {where}")
        d = torch.arange(1, K + 1)[:, None]
        window = (d >= torch.tensor(low)[None, :]) & (d <= torch.tensor(high)[None, :])
        return self._replace(durations=self.durations & window)

    def __and__(self, other: "Constraints") -> "Constraints":
        """Both constraints at once (the masks' logical and).

        Raises:
            TypeError: ``other`` is not Constraints.
            ValueError: different C, different K, or different label names.
        """
        if not isinstance(other, Constraints):
            return NotImplemented
        if other.num_labels != self.num_labels:
            raise ValueError(f"Constraints &: {self.num_labels} and {other.num_labels} labels")
        if self.labels is not None and other.labels is not None and self.labels != other.labels:
            raise ValueError(f"Constraints &: label names differ: {self.labels} and "
                             f"{other.labels}")
        durations = self.durations if other.durations is None else other.durations
        if self.durations is not None and other.durations is not None:
            if self.durations.shape != other.durations.shape:
                raise ValueError(f"Constraints &: duration masks of K = {self.max_duration} "
                                 f"and {other.max_duration}")
            durations = self.durations & other.durations
        return Constraints(self.transitions & other.transitions, self.start & other.start,
                           self.end & other.end, durations, self.labels or other.labels)

    # ---------------------------------------------------------------- applying

    def masks(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
              ) -> dict[str, Tensor | None]:
        """The constraints as additive masks: 0 where allowed, −inf where forbidden.

        Args:
            dtype: a floating dtype.
            device: where to put them (default CPU).

        Returns:
            dict with ``transition`` (C, C), ``start_transition`` (C,),
            ``end_transition`` (C,) and ``duration`` (K, C) or None; add them
            to the potentials of the same names ((C, C) broadcasts over a
            (K, C, C) transition).
        """
        def additive(mask: Tensor | None) -> Tensor | None:
            if mask is None:
                return None
            zero = torch.zeros(mask.shape, dtype=dtype, device=device)
            return zero.masked_fill(~mask.to(zero.device), -math.inf)

        return dict(transition=additive(self.transitions), start_transition=additive(self.start),
                    end_transition=additive(self.end), duration=additive(self.durations))

    def apply(self, potentials: Mapping[str, object]) -> dict:
        """The potentials with every forbidden entry set to −inf; the input is not modified.

        Works on the keyword arguments of the functional API, e.g.
        ``SemiCRF.potentials(hidden, lengths)``:
        ``flashsemicrf.log_partition(**constraints.apply(kw))``. Gradients
        reach the allowed entries only.

        Args:
            potentials: a mapping with at least ``transition`` (C, C) or (K, C, C)
                and ``duration`` (K, C); ``start_transition`` / ``end_transition``
                (C,) may be absent or None (they are created, zero where
                allowed, when the start or end mask forbids a label). Other
                keys are passed through.

        Returns:
            A new dict with ``transition``, ``duration``, ``start_transition``
            and ``end_transition`` masked.

        Raises:
            ValueError: ``transition`` or ``duration`` missing or not a tensor,
                their C is not this C, or the duration mask's K is not theirs.
        """
        fn = "Constraints.apply"
        C = self.num_labels
        for key in ("transition", "duration"):
            if not isinstance(potentials.get(key), Tensor):
                raise ValueError(f"{fn}: potentials must hold a tensor '{key}' (the keyword "
                                 f"arguments of the functional API), got keys "
                                 f"{sorted(potentials)}")
        transition, duration = potentials["transition"], potentials["duration"]
        if transition.dim() not in (2, 3) or transition.shape[-2:] != (C, C):
            raise ValueError(f"{fn}: transition must be (C, C) or (K, C, C) with C = {C} "
                             f"labels, got shape {tuple(transition.shape)}")
        if duration.dim() != 2 or duration.shape[1] != C:
            raise ValueError(f"{fn}: duration must be (K, C) with C = {C}, got shape "
                             f"{tuple(duration.shape)}")
        if self.durations is not None and duration.shape[0] != self.durations.shape[0]:
            raise ValueError(f"{fn}: the duration mask has K = {self.durations.shape[0]} but "
                             f"duration has K = {duration.shape[0]} (shape "
                             f"{tuple(duration.shape)}); build the constraints with "
                             f"max_duration={duration.shape[0]}")
        out = dict(potentials)
        dev = transition.device
        out["transition"] = transition.masked_fill(~self.transitions.to(dev), -math.inf)
        if self.durations is not None:
            out["duration"] = duration.masked_fill(~self.durations.to(duration.device), -math.inf)
        for key, mask in (("start_transition", self.start), ("end_transition", self.end)):
            given = potentials.get(key)
            if bool(mask.all()):
                continue
            base = given if given is not None else transition.new_zeros(C)
            if not isinstance(base, Tensor) or tuple(base.shape) != (C,):
                raise ValueError(f"{fn}: {key} must be None or a tensor (C,) = ({C},), got "
                                 f"{getattr(base, 'shape', type(base).__name__)}")
            out[key] = base.masked_fill(~mask.to(base.device), -math.inf)
        return out

    # ------------------------------------------------------------- feasibility

    def feasible(self, segments: Tensor, batch_size: int | None = None) -> Tensor:
        """Per sequence, whether its segments break no constraint: (B,) bool.

        Equivalent to "the score under :meth:`apply`-ed finite potentials is
        finite". Checks each row's duration, the first row's label against
        ``start``, each row's label against the previous row's, and the last
        row's label against ``end``; it does not check that the rows tile the
        sequence (``flashsemicrf.score`` and ``nll`` do).

        Args:
            segments: (N, 4) integer rows (batch, start, duration, label),
                sorted by batch then start.
            batch_size: B (default: the largest batch index + 1). Sequences
                without rows count as feasible.

        Returns:
            (B,) bool on the segments' device.

        Raises:
            TypeError / ValueError: as :meth:`check` for malformed segments.
        """
        rows = self._check_segments("feasible", segments)
        bad = self._violations(rows) > 0
        B = batch_size if batch_size is not None else (int(rows[:, 0].max()) + 1 if len(rows)
                                                       else 0)
        _check_int("feasible", "batch_size", B, 0)
        if len(rows) and int(rows[:, 0].max()) >= B:
            raise ValueError(f"Constraints.feasible: segments hold batch index "
                             f"{int(rows[:, 0].max())} but batch_size = {B}")
        hit = torch.zeros(B, dtype=torch.long, device=rows.device)
        hit.index_add_(0, rows[:, 0], bad.long())
        return hit == 0

    def check(self, segments: Tensor) -> None:
        """Raise if any segmentation breaks a constraint, naming the first offending row.

        E.g. ``segments row 7 (batch 1, start 12, duration 3, label 2): label 2
        may not follow label 2``. Use it on gold segmentations before training:
        an infeasible one has score −inf under the constraints, so an infinite
        loss.

        Args:
            segments: (N, 4) integer rows (batch, start, duration, label),
                sorted by batch then start.

        Raises:
            TypeError: segments is not an integer tensor.
            ValueError: a row breaks a constraint; or segments are not (N, 4),
                not sorted, have a duration < 1, a negative batch index or a
                label outside [0, C).
        """
        rows = self._check_segments("check", segments)
        reason = self._violations(rows)
        if not bool((reason > 0).any()):
            return
        i = int((reason > 0).nonzero()[0, 0])
        b, s, d, c = (int(v) for v in rows[i].tolist())
        code = int(reason[i])
        if code == 1:
            allowed = self.durations[:, c].nonzero().flatten().add(1).tolist()
            why = (f"duration {d} is not allowed for label {self._name(c)} (allowed: "
                   f"{_ranges(allowed) or 'none'})")
        elif code == 2:
            why = f"label {self._name(c)} may not begin a sequence"
        elif code == 3:
            why = (f"label {self._name(c)} may not follow label "
                   f"{self._name(int(rows[i - 1, 3]))}")
        else:
            why = f"label {self._name(c)} may not end a sequence"
        raise ValueError(f"segments row {i} (batch {b}, start {s}, duration {d}, label {c}): "
                         f"{why}")

    def _violations(self, rows: Tensor) -> Tensor:
        """(N,) int: 0 ok, 1 duration, 2 start, 3 transition, 4 end (the first that applies)."""
        dev = rows.device
        b, _, d, c = rows.unbind(1)
        n = rows.shape[0]
        first = torch.ones(n, dtype=torch.bool, device=dev)
        first[1:] = b[1:] != b[:-1]
        last = torch.ones(n, dtype=torch.bool, device=dev)
        last[:-1] = b[1:] != b[:-1]
        prev = torch.roll(c, 1)
        checks = []
        if self.durations is not None:
            K = self.durations.shape[0]
            in_table = self.durations.to(dev)[(d - 1).clamp(0, K - 1), c]
            checks.append((d > K) | ~in_table)
        else:
            checks.append(torch.zeros(n, dtype=torch.bool, device=dev))
        checks.append(first & ~self.start.to(dev)[c])
        checks.append(~first & ~self.transitions.to(dev)[prev, c])
        checks.append(last & ~self.end.to(dev)[c])
        reason = torch.zeros(n, dtype=torch.long, device=dev)
        for code in range(len(checks), 0, -1):  # the lowest code wins
            reason = torch.where(checks[code - 1], torch.full_like(reason, code), reason)
        return reason

    def _check_segments(self, fn: str, segments) -> Tensor:
        fn = f"Constraints.{fn}"
        if not isinstance(segments, Tensor) or segments.dtype.is_floating_point \
                or segments.dtype.is_complex or segments.dtype == torch.bool:
            raise TypeError(f"{fn}: segments must be an integer tensor (N, 4) of rows (batch, "
                            f"start, duration, label), got {type(segments).__name__}"
                            + (f" of {segments.dtype}" if isinstance(segments, Tensor) else ""))
        if segments.dim() != 2 or segments.shape[1] != 4:
            raise ValueError(f"{fn}: segments must have shape (N, 4), got "
                             f"{tuple(segments.shape)}")
        rows = segments.long()
        b, s, d, c = rows.unbind(1)
        problems = [
            ((b < 0) | (s < 0), "a negative batch index or start"),
            (d < 1, "a duration < 1"),
            ((c < 0) | (c >= self.num_labels), f"a label outside [0, {self.num_labels})"),
        ]
        for bad, what in problems:
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{fn}: segments row {i} = {tuple(rows[i].tolist())} has {what}")
        unsorted = (b[1:] < b[:-1]) | ((b[1:] == b[:-1]) & (s[1:] <= s[:-1]))
        if bool(unsorted.any()):
            i = int(unsorted.nonzero()[0, 0]) + 1
            raise ValueError(f"{fn}: segments must be sorted by batch then start; row {i} = "
                             f"{tuple(rows[i].tolist())} comes after {tuple(rows[i - 1].tolist())}")
        return rows

    # ------------------------------------------------------------------ labels

    def _index(self, fn: str, label: Label) -> int:
        C = self.num_labels
        if isinstance(label, str):
            if self.labels is None:
                raise ValueError(f"Constraints.{fn}: label {label!r} given by name, but these "
                                 f"constraints have no label names (labels=...)")
            if label not in self.labels:
                raise ValueError(f"Constraints.{fn}: unknown label {label!r}; the labels are "
                                 f"{list(self.labels)}")
            return self.labels.index(label)
        if not _is_int(label) or not 0 <= int(label) < C:
            raise ValueError(f"Constraints.{fn}: label {label!r} is not a label index in "
                             f"[0, {C}) or a label name")
        return int(label)

    def _name(self, c: int) -> str:
        return str(c) if self.labels is None else f"{self.labels[c]!r} ({c})"

    def _subset(self, fn: str, labels: Iterable[Label]) -> Tensor:
        if isinstance(labels, (str, int)):
            labels = [labels]
        out = torch.zeros(self.num_labels, dtype=torch.bool)
        for label in labels:
            out[self._index(fn, label)] = True
        return out

    def _per_label(self, fn: str, name: str, value, default: int) -> list[int]:
        C = self.num_labels
        if value is None:
            return [default] * C
        if _is_int(value):
            return [int(value)] * C
        if isinstance(value, Mapping):
            out = [default] * C
            for label, v in value.items():
                if not _is_int(v):
                    raise ValueError(f"Constraints.{fn}: {name} values must be ints, got {v!r}")
                out[self._index(fn, label)] = int(v)
            return out
        values = list(value)
        if len(values) != C or not all(_is_int(v) for v in values):
            raise ValueError(f"Constraints.{fn}: {name} must be an int, {C} ints or a dict "
                             f"{{label: int}}, got {value!r}")
        return [int(v) for v in values]


class _TagRules:
    """One tagging scheme: the tags a sequence may start and end with, and which pairs follow."""

    def __init__(self, first: str, last: str, pair):
        self.first, self.last, self.pair = first, last, pair


def _same(a, b) -> bool:
    return a[1] == b[1]


_TAG_RULES = {
    "BIO": _TagRules("OB", "OBI", lambda a, b: b[0] in "OB"
                     or (b[0] == "I" and a[0] in "BI" and _same(a, b))),
    "IOB1": _TagRules("OI", "OBI", lambda a, b: b[0] in "OI"
                      or (b[0] == "B" and a[0] in "BI" and _same(a, b))),
    "BIOUL": _TagRules("OBU", "OLU", lambda a, b: (a[0] in "OLU" and b[0] in "OBU")
                       or (b[0] in "IL" and a[0] in "BI" and _same(a, b))),
    "BMES": _TagRules("BS", "ES", lambda a, b: (a[0] in "ES" and b[0] in "BS")
                      or (b[0] in "ME" and a[0] in "BM" and _same(a, b))),
}


def _parse_tag(fn: str, scheme: str, label: str) -> tuple[str, str]:
    """(tag letter, entity type) of a label such as "B-PER", "O" or "S"."""
    letters = _SCHEME_TAGS[scheme]
    if label == "O" and "O" in letters:
        return "O", ""
    letter, rest = label[:1], label[1:]
    if letter not in letters or letter == "O" or (rest and not rest.startswith("-")) \
            or rest == "-":
        kinds = ", ".join(f"{t}-TYPE" for t in letters if t != "O")
        outside = "'O', " if "O" in letters else ""
        raise ValueError(f"{fn}: label {label!r} is not a {scheme} tag; expected {outside}"
                         f"{kinds} (or a bare letter for untyped tags)")
    return letter, rest[1:]


def _count_labels(fn: str, labels) -> tuple[int, tuple[str, ...] | None]:
    if _is_int(labels):
        _check_int(fn, "labels", labels, 1)
        return int(labels), None
    if isinstance(labels, str):
        raise ValueError(f"Constraints.{fn}: labels must be C or a sequence of C names, "
                         f"got the string {labels!r}")
    names = tuple(labels)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"Constraints.{fn}: labels must be C ≥ 1 or a non-empty sequence of "
                         f"non-empty names, got {labels!r}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"Constraints.{fn}: label names must be distinct; repeated: {dup}")
    return len(names), names


def _is_int(v) -> bool:
    """An integer: Python, NumPy (both are numbers.Integral) or a 0-d integer tensor; not a bool."""
    if isinstance(v, Tensor):
        return v.dim() == 0 and not v.dtype.is_floating_point and not v.dtype.is_complex \
            and v.dtype != torch.bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_int(fn: str, name: str, value, minimum: int) -> None:
    if not _is_int(value) or int(value) < minimum:
        raise ValueError(f"Constraints.{fn}: {name} must be an int ≥ {minimum}, got {value!r}")


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out)


__all__ = ["Constraints", "TAG_SCHEMES"]
