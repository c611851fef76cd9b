"""The plain-PyTorch streaming semi-CRF: the executable specification.

Every backend implements exactly the scan written here (docs/design.md), and
the tests check them against it; the "torch" backend registers it as ops
(flashsemicrf/backends/reference_ops.py). Nothing else in the package imports
it. It is dtype-generic (it computes in the dtype it is given), vectorised over
the batch, and slow: a Python loop over positions. Clarity wins over speed
everywhere in this file.

Conventions used throughout (the model: README, "The model"):

* Positions t = 0 … L. "Step t" computes the forward messages at boundary t:
  alpha[t, c], the score of all segmentations of [0, t) whose last segment has
  label c, and sigma[t, c], the score of "a label-c segment may start at t".
* Every message is stored relative to a per-sequence running offset O_t
  (float64, the sum of the maxima subtracted so far), so float32 values stay
  small however long the sequence is. ``hat`` values are relative ones.
* The forward state is a ring of the K open segments that end at the current
  boundary: entry d-1 holds a label-c segment [t-d, t) whose emission sum has
  been accumulated one position at a time (no global prefix sums, which lose
  precision on long sequences).
  - static (C, C) transition: the entry is sigma_hat[t-d] + gain, one (K, C)
    array;
  - duration-dependent (K, C, C) transition: the label-to-label step depends on
    d, so the ring keeps alpha_hat[t-d] and the gain separately, a (2K, C)
    array. The entry for start 0 holds start_transition - O_0 in the alpha slot
    (there is no previous label to transition from).
  "gain" of the segment starting at s is start_scores[s] + Σ_{u=s}^{t-1}
  scores[u] + O_s - (current offset): its emission sum re-expressed against
  the current offset. Between steps the current offset is O_t plus the
  largest emission of position t, so entries stay O(1).
* Checkpoints: the state (ring and offset) at the beginning of every
  ``interval``-th step. The backward recomputes one span of the forward at a
  time from its checkpoint and sweeps the backward messages through it with a
  mirror-image ring, so working memory is O((T/interval)·K·C + interval·C).
* Every function takes a :class:`~flashsemicrf._contract.Problem` in one
  float dtype; absent optional inputs are read as zeros (``Problem.filled``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._contract import Checkpoints, Gradients, History, Problem, default_checkpoint_interval

Tensor = torch.Tensor
NEG_INF = float("-inf")


def _finite_max(x: Tensor, dim) -> Tensor:
    """Max over ``dim`` that is 0 where the max is ±inf or NaN, so that
    subtracting it never creates NaN (an all -inf row stays -inf)."""
    m = x.amax(dim=dim)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _reduce(x: Tensor, dim, semiring: str) -> Tensor:
    if semiring == "log":
        return torch.logsumexp(x, dim=dim)
    return x.amax(dim=dim)


def _shift_in(ring: Tensor, new: Tensor) -> Tensor:
    """Ring (B, K, C) with ``new`` (B, C) in slot 0 and the oldest slot dropped."""
    return torch.cat([new.unsqueeze(1), ring[:, :-1]], dim=1)


# --------------------------------------------------------------------------
# The forward scan
# --------------------------------------------------------------------------


class ScanState(NamedTuple):
    """What the scan carries from step to step (and a checkpoint stores)."""

    ring: Tensor  # (B, K, C) static, (B, 2K, C) duration-dependent
    offset: Tensor  # (B,) float64: O_{t-1} plus position t-1's largest emission


class StepResult(NamedTuple):
    """The messages of one step."""

    alpha: Tensor | None  # (B, C) alpha_hat[t] relative to O_t (None at t = 0)
    sigma: Tensor | None  # (B, C) sigma_hat[t] relative to O_t (None at t = T)
    offset: Tensor  # (B,) float64 O_t
    best_duration: Tensor | None  # max semiring: (B, C) argmax d of alpha[t]
    best_previous: Tensor | None  # max semiring: (B, C) argmax c' (see viterbi)


def initial_state(p: Problem) -> ScanState:
    B, _, C = p.scores.shape
    K = p.duration.shape[0]
    width = 2 * K if p.duration_dependent else K
    ring = p.scores.new_full((B, width, C), NEG_INF)
    return ScanState(ring, torch.zeros(B, dtype=torch.float64, device=p.scores.device))


def _segment_terms(p: Problem, t: int, ring: Tensor, semiring: str):
    """Scores of the open segments [t-d, t), d = 1…K, before end_scores: (B, K, C).

    Duration-dependent transitions also return the (B, K, C', C) terms per
    previous label (for backpointers). Ring entries of segments that would
    start before 0 are -inf from the initial state on.
    """
    K = p.duration.shape[0]
    if not p.duration_dependent:
        return ring + p.duration, None
    alpha_hist, gain = ring[:, :K], ring[:, K:]
    # (B, K, C', C): alpha_hat[t-d, c'] + transition[d-1, c', c]
    per_prev = alpha_hist.unsqueeze(-1) + p.transition
    entry = _reduce(per_prev, 2, semiring)
    if 1 <= t <= K:
        # The segment starting at 0 has no previous label: its alpha slot
        # holds start_transition - O_0, per new label.
        entry[:, t - 1] = alpha_hist[:, t - 1]
    return entry + gain + p.duration, per_prev


def scan_step(p: Problem, t: int, state: ScanState, semiring: str = "log"):
    """Step t of the scan; returns (StepResult, the ScanState of step t+1).

    Rows whose sequence has ended (t > L) compute values nobody reads.
    """
    B, T, C = p.scores.shape
    K = p.duration.shape[0]
    ring, offset = state
    best_duration = best_previous = None
    alpha = None
    if t == 0:
        sigma = p.start_transition + p.start_scores[:, 0]  # (B, C)
        m = _finite_max(sigma, -1)
        sigma = sigma - m[:, None]
    else:
        terms, per_prev = _segment_terms(p, t, ring, semiring)  # (B, K, C)
        alpha = p.end_scores[:, t - 1] + _reduce(terms, 1, semiring)
        if semiring == "max":
            best_duration = terms.argmax(dim=1) + 1  # first max: shortest d
            if per_prev is not None:
                d_idx = (best_duration - 1)[:, None, None, :].expand(B, 1, C, C)
                chosen = per_prev.gather(1, d_idx).squeeze(1)  # (B, C', C)
                best_previous = chosen.argmax(dim=1)
                best_previous = torch.where(best_duration == t, -1, best_previous)
        m = _finite_max(alpha, -1)
        alpha = alpha - m[:, None]
        sigma = None
        if t < T and not p.duration_dependent:
            per_prev_sigma = alpha[:, :, None] + p.transition  # (B, C', C)
            sigma = _reduce(per_prev_sigma, 1, semiring) + p.start_scores[:, t]
            if semiring == "max":
                best_previous = per_prev_sigma.argmax(dim=1)
    new_offset = offset + m.to(torch.float64)
    state_offset = new_offset
    if t < T:
        # Position t's emissions enter every open segment. Their largest value
        # moves into the offset, so that ring entries stay O(1) between steps
        # (float32 would otherwise carry ~|scores| of rounding from step to step).
        emit_max = _finite_max(p.scores[:, t], -1)  # (B,)
        emit = (p.scores[:, t] - emit_max[:, None])[:, None, :]  # (B, 1, C)
        state_offset = new_offset + emit_max.to(torch.float64)
        if p.duration_dependent:
            alpha_hist, gain = ring[:, :K], ring[:, K:]
            slot = p.start_transition.expand(B, C) - m[:, None] if t == 0 else alpha
            alpha_hist = _shift_in(alpha_hist, slot)
            gain = _shift_in(gain - m[:, None, None], p.start_scores[:, t]) + emit
            ring = torch.cat([alpha_hist, gain], dim=1)
        else:
            ring = _shift_in(ring - m[:, None, None], sigma) + emit
    step = StepResult(alpha, sigma, new_offset, best_duration, best_previous)
    return step, ScanState(ring, state_offset)


def _end_value(p: Problem, alpha: Tensor, semiring: str) -> Tensor:
    return _reduce(alpha + p.end_transition, -1, semiring)


def forward(p: Problem, interval: int = 0) -> tuple[Tensor, Checkpoints]:
    """log Z (B,) and the checkpoints the backward needs (interval 0: the default)."""
    p = p.filled()
    B, T, C = p.scores.shape
    K = p.duration.shape[0]
    interval = interval or default_checkpoint_interval(T, K)
    n_ckpt = -(-T // interval)
    state = initial_state(p)
    ck_ring = p.scores.new_full((B, n_ckpt) + state.ring.shape[1:], NEG_INF)
    ck_off = torch.zeros(B, n_ckpt, dtype=torch.float64, device=p.scores.device)
    log_z = p.scores.new_full((B,), NEG_INF)
    for t in range(T + 1):
        if t < T and t % interval == 0:
            # Past a sequence's end the state is never read: store the empty one.
            done = p.lengths < t
            ck_ring[:, t // interval] = torch.where(done[:, None, None], NEG_INF, state.ring)
            ck_off[:, t // interval] = torch.where(done, 0.0, state.offset)
        step, state = scan_step(p, t, state)
        ends = p.lengths == t
        if t > 0 and bool(ends.any()):
            value = step.offset + _end_value(p, step.alpha, "log").to(torch.float64)
            log_z = torch.where(ends, value.to(log_z.dtype), log_z)
    return log_z, Checkpoints(ck_ring, ck_off)


class _Backpointers(NamedTuple):
    """The max semiring's choices at every boundary t = 0 … T (for the traceback)."""

    duration: Tensor  # (B, T+1, C): the best duration of the segment ending at t
    previous: Tensor  # (B, T+1, C): the best previous label (see viterbi)


def _scan_all(p: Problem, semiring: str) -> tuple[Tensor, History, _Backpointers | None]:
    """The scan keeping every boundary's messages: O(T·C) memory.

    Returns log Z (or, in the max semiring, the Viterbi score) (B,), the
    messages in the filter op's layout (past a sequence's end: -inf messages
    and offset 0), and in the max semiring the backpointers.
    """
    B, T, C = p.scores.shape
    alpha = p.scores.new_full((B, T + 1, C), NEG_INF)
    sigma = p.scores.new_full((B, T + 1, C), NEG_INF)
    offset = torch.zeros(B, T + 1, dtype=torch.float64, device=p.scores.device)
    long = dict(dtype=torch.long, device=p.scores.device)
    best_d = torch.zeros(B, T + 1, C, **long) if semiring == "max" else None
    best_c = torch.full((B, T + 1, C), -1, **long) if semiring == "max" else None
    value = p.scores.new_full((B,), NEG_INF)
    state = initial_state(p)
    for t in range(T + 1):
        step, state = scan_step(p, t, state, semiring)
        inside = (t <= p.lengths)[:, None]  # boundary t belongs to the sequence
        offset[:, t] = torch.where(inside[:, 0], step.offset, 0.0)
        if step.sigma is not None:
            sigma[:, t] = torch.where((t < p.lengths)[:, None], step.sigma, NEG_INF)
        if step.alpha is not None:
            alpha[:, t] = torch.where(inside, step.alpha, NEG_INF)
            ends = p.lengths == t
            end = step.offset + _end_value(p, step.alpha, semiring).to(torch.float64)
            value = torch.where(ends, end.to(value.dtype), value)
        if semiring == "max":
            if step.best_duration is not None:
                best_d[:, t] = step.best_duration
            if step.best_previous is not None:
                best_c[:, t] = step.best_previous
    pointers = _Backpointers(best_d, best_c) if semiring == "max" else None
    return value, History(alpha, sigma, offset), pointers


def filter_messages(p: Problem) -> History:
    """The forward messages at every boundary: the filter op (for sampling)."""
    return _scan_all(p.filled(), "log")[1]


# --------------------------------------------------------------------------
# The backward sweep
# --------------------------------------------------------------------------


def _crossing_mass(p: Problem, t: int, fwd: Tensor, bwd: Tensor, shift: Tensor) -> Tensor:
    """(B,) probability that one segment [t-d1, t+d2) covers both t-1 and t.

    fwd: the forward ring at the beginning of step t (a checkpoint: open
    segments [t-d1, t)); bwd: the backward ring at step t (segments [t, t+d2));
    shift (B,) float64: both rings' offsets minus log Z.
    """
    B, _, C = p.scores.shape
    K = p.duration.shape[0]
    total = torch.zeros(B, dtype=p.scores.dtype, device=p.scores.device)
    for d1 in range(1, min(K - 1, t) + 1):
        d2 = torch.arange(1, K - d1 + 1, device=p.scores.device)
        d = d1 + d2  # (n,) total durations
        if p.duration_dependent:
            if d1 == t:  # the segment starts at 0: start_transition, no previous label
                enter = fwd[:, d1 - 1, None, :]
            else:
                prev = fwd[:, d1 - 1, None, :, None]  # (B, 1, C', 1)
                enter = torch.logsumexp(prev + p.transition[d - 1], dim=2)  # (B, n, C)
            opened = enter + fwd[:, K + d1 - 1, None, :]
        else:
            opened = fwd[:, d1 - 1, None, :]
        terms = opened + bwd[:, d2 - 1] + p.duration[d - 1]  # (B, n, C)
        total = total + torch.exp(terms + shift.to(terms.dtype)[:, None, None]).sum((1, 2))
    return total


def _recompute_span(p: Problem, ckpt: Checkpoints, j: int, first: int, last: int, interval):
    """Forward messages alpha_hat, sigma_hat, O at boundaries first … last."""
    B, T, C = p.scores.shape
    n = last - first + 1
    alpha = p.scores.new_full((B, n, C), NEG_INF)
    sigma = p.scores.new_full((B, n, C), NEG_INF)
    offset = torch.zeros(B, n, dtype=torch.float64, device=p.scores.device)
    state = ScanState(ckpt.ring[:, j], ckpt.offset[:, j])
    for t in range(first, last + 1):
        step, state = scan_step(p, t, state)
        offset[:, t - first] = step.offset
        if step.alpha is not None:
            alpha[:, t - first] = step.alpha
        if step.sigma is not None:
            sigma[:, t - first] = step.sigma
    return alpha, sigma, offset


def backward(
    p: Problem,
    grad_log_z: Tensor,
    log_z: Tensor,
    ckpt: Checkpoints,
    interval: int = 0,
    start_mass: bool = False,
    end_mass: bool = False,
) -> Gradients:
    """Gradients of log Z, walking the checkpoints in reverse.

    The backward ring mirrors the forward one: entry d-1 at step t holds a
    label-c segment [t, t+d) with its emissions, end score and the backward
    message beta_hat[t+d] (relative to the backward offset Q).
    ``start_mass`` / ``end_mass``: return the start/end-score gradients (the
    posterior masses of segments starting / ending at each position), else
    None for them.
    """
    p = p.filled()
    B, T, C = p.scores.shape
    K = p.duration.shape[0]
    dev, dt = p.scores.device, p.scores.dtype
    interval = interval or default_checkpoint_interval(T, K)
    n_ckpt = ckpt.ring.shape[1]
    dd = p.duration_dependent
    L = p.lengths

    # Sequences with no valid segmentation (log Z = -inf) get zero gradients.
    dead = log_z == NEG_INF
    upstream = torch.where(dead, torch.zeros_like(grad_log_z), grad_log_z).to(dt)
    log_z64 = torch.where(dead, torch.zeros_like(log_z), log_z).to(torch.float64)

    g_scores = torch.zeros(B, T, C, dtype=dt, device=dev)
    # transition and duration gradients sum over T positions: float64 until returned.
    g_trans = torch.zeros((B,) + p.transition.shape, dtype=torch.float64, device=dev)
    g_dur = torch.zeros(B, K, C, dtype=torch.float64, device=dev)
    g_start_t = torch.zeros(B, C, dtype=dt, device=dev)
    g_end_t = torch.zeros(B, C, dtype=dt, device=dev)
    g_start_s = torch.zeros(B, T, C, dtype=dt, device=dev)
    g_end_s = torch.zeros(B, T, C, dtype=dt, device=dev)

    ring = p.scores.new_full((B, K, C), NEG_INF)
    back_off = torch.zeros(B, dtype=torch.float64, device=dev)  # Q

    def mass(log_rel: Tensor, shift: Tensor) -> Tensor:
        """exp(log_rel + shift) times the upstream gradient, 0 when dead."""
        extra = (None,) * (log_rel.dim() - 1)
        value = torch.exp(log_rel + shift.to(dt)[(...,) + extra]) * upstream[(...,) + extra]
        return torch.where(dead[(...,) + extra], torch.zeros_like(value), value)

    for j in range(n_ckpt - 1, -1, -1):
        first = j * interval
        last = T if j == n_ckpt - 1 else (j + 1) * interval - 1
        alpha_s, sigma_s, off_s = _recompute_span(p, ckpt, j, first, last, interval)
        for t in range(last, first - 1, -1):
            alpha, sigma, off = alpha_s[:, t - first], sigma_s[:, t - first], off_s[:, t - first]
            active = t < L  # a regular step: segments starting at t
            ending = t == L  # initialise the backward messages
            if t > 0 and bool(ending.any()):
                # log Z again, in float64: the forward's value carries the
                # compute dtype's rounding (|log Z|·6e-8 in float32), too coarse
                # to normalise the posteriors of a long sequence.
                exact = off + _end_value(p, alpha, "log").to(torch.float64)
                log_z64 = torch.where(ending & ~dead, exact, log_z64)
            shift = off + back_off - log_z64  # (B,) float64

            if t < T:
                # Segments [t, t+d): posteriors, and tau = their backward score.
                x = ring + p.duration  # (B, K, C)
                if dd and t > 0:
                    # (B, K, C): the start term depends on d through transition.
                    start = torch.logsumexp(alpha[:, None, :, None] + p.transition, dim=2)
                    start = start + p.start_scores[:, t, None, :]
                else:
                    start = sigma[:, None, :]
                post = mass(start + x, shift)  # (B, K, C)
                post = torch.where(active[:, None, None], post, torch.zeros_like(post))
                g_dur += post.to(torch.float64)
                starts = post.sum(1)  # (B, C)
                g_start_s[:, t] = starts
                if t == 0:
                    g_start_t += starts
                # Position t+k lies in every segment [t, t+d) with d > k.
                covers = post.flip(1).cumsum(1).flip(1)  # (B, K, C)
                span = min(K, T - t)
                g_scores[:, t : t + span] += covers[:, :span]

            if t > 0:
                # beta[t, c']: the backward score of "a segment ended at t".
                beta_reg = torch.full_like(alpha, NEG_INF)
                if t < T:
                    x = ring + p.duration  # (B, K, C)
                    if dd:
                        inner = p.start_scores[:, t, None, None, :] + x[:, :, None, :]
                        joint = p.transition + inner  # (B, K, C', C)
                        beta_reg = torch.logsumexp(joint, dim=(1, 3))
                        tr = mass(alpha[:, None, :, None] + joint, shift)
                    else:
                        tau = torch.logsumexp(x, dim=1)  # (B, C)
                        joint = p.transition + (p.start_scores[:, t] + tau)[:, None, :]
                        beta_reg = torch.logsumexp(joint, dim=2)  # (B, C')
                        tr = mass(alpha[:, :, None] + joint, shift)  # (B, C', C)
                    keep = active.view((B,) + (1,) * (tr.dim() - 1))
                    g_trans += torch.where(keep, tr, torch.zeros_like(tr)).to(torch.float64)
                beta = torch.where(ending[:, None], p.end_transition.expand(B, C), beta_reg)
                q = _finite_max(beta, -1)
                beta = beta - q[:, None]
                back_off_t = torch.where(ending, q.to(torch.float64), back_off + q)
                shift_t = off + back_off_t - log_z64
                ends_here = mass(alpha + beta, shift_t)  # mass of segments ending at t
                use = (active | ending)[:, None]
                g_end_s[:, t - 1] = torch.where(use, ends_here, g_end_s[:, t - 1])
                g_end_t = torch.where(ending[:, None], ends_here, g_end_t)
                if t == first:
                    # Re-anchor the backward offset at every checkpoint: a
                    # segment boundary at t or one segment across t has
                    # probability 1, so the rounding that forward and backward
                    # gather over (t, L] cannot pile up over the whole sequence.
                    boundary = torch.exp(alpha + beta + shift_t.to(dt)[:, None]).sum(-1)
                    total = boundary + _crossing_mass(
                        p, t, ckpt.ring[:, j], ring, ckpt.offset[:, j] + back_off - log_z64
                    )
                    fix = active & ~dead & (total > 0)
                    safe = torch.where(fix, total, torch.ones_like(total))
                    back_off_t = back_off_t - torch.where(fix, torch.log(safe), 0.0).to(torch.float64)

                # Move the ring from step t to step t-1; as in the forward, the
                # largest emission of position t-1 moves into the offset.
                fresh = beta + p.end_scores[:, t - 1]
                emit_max = _finite_max(p.scores[:, t - 1], -1)
                emit = (p.scores[:, t - 1] - emit_max[:, None])[:, None, :]
                moved = _shift_in(ring - q[:, None, None], fresh) + emit
                started = _shift_in(torch.full_like(ring, NEG_INF), fresh) + emit
                ring = torch.where(
                    ending[:, None, None], started, torch.where(active[:, None, None], moved, ring)
                )
                back_off_t = back_off_t + emit_max.to(torch.float64)
                back_off = torch.where(active | ending, back_off_t, back_off)

    if not start_mass:
        g_start_s = None
    if not end_mass:
        g_end_s = None
    return Gradients(
        g_scores, g_trans.to(dt), g_dur.to(dt), g_start_t, g_end_t, g_start_s, g_end_s
    )


# --------------------------------------------------------------------------
# Decoding (from every boundary's messages: O(T·C) memory)
# --------------------------------------------------------------------------


def viterbi(p: Problem) -> tuple[Tensor, Tensor]:
    """The max semiring scan and its traceback: (best (B,), segments (N, 4)).

    Ties go to the shortest duration, then the smallest previous label, then
    (for the last segment) the smallest label. A sequence with no valid
    segmentation has best = -inf and no segments.
    """
    p = p.filled()
    best, h, pointers = _scan_all(p, "max")
    alpha, best_d, best_c = h.alpha.cpu(), pointers.duration.cpu(), pointers.previous.cpu()
    end_transition = p.end_transition.cpu()
    rows: list[tuple[int, int, int, int]] = []
    for b in range(p.scores.shape[0]):
        if not best[b] > NEG_INF:  # -inf or NaN: nothing to trace
            continue
        t = int(p.lengths[b])
        c = int((alpha[b, t] + end_transition).argmax())
        trace = []
        while t > 0:
            d = int(best_d[b, t, c])
            s = t - d
            trace.append((b, s, d, c))
            if s > 0:
                # Static: the previous label was chosen when sigma[s] was
                # formed; duration-dependent: together with d at alpha[t].
                c = int(best_c[b, t, c] if p.duration_dependent else best_c[b, s, c])
            t = s
        rows.extend(reversed(trace))
    segments = torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
    return best, segments.to(p.scores.device)
