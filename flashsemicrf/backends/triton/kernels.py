"""Triton kernels of the streaming semi-CRF: forward (log and exp domain), backward,
Viterbi, filter.

The scan is the one of flashsemicrf/reference.py and csrc/cpu/semicrf_cpu.cpp
(docs/design.md). Mapping:

* One program per sequence (grid (B,)); the length L is read from memory, so
  the loops over positions have runtime bounds and T and the checkpoint
  interval and count are ``do_not_specialize``: a new length never recompiles.
* Every tensor is contiguous (the launchers make it so), so a kernel takes
  pointers and sizes, no strides. The inputs travel between the helpers as
  one tuple, ``inputs`` = (scores, transition, duration, start_transition,
  end_transition, start_scores, end_scores), the per-position ones already
  advanced to the program's sequence (:func:`_sequence_inputs`).
* Labels live on a power-of-two lane axis C_PAD >= C; padded lanes hold -inf
  and every access to an input or output is masked on them, through indices
  that stay in range even on masked lanes (``cl``, the label index clamped to
  C - 1; rows clamped likewise), so no lane ever forms an out-of-range address.
* The forward state, a ring of the K open segments, lives in a global-memory
  workspace (B, S, C_PAD) (Triton has no addressable shared memory), slot
  s % K for the segment that started at s, so nothing is shifted. Durations
  are swept in chunks of BLOCK_D rows with an online log-sum-exp, so any K
  fits. The static (C, C) transition is one register tile and the label step
  costs O(C² + K·C) per position; the (K, C, C) transition uses
  (BLOCK_D, C_PAD, C_PAD) tiles.
* Normalisation (docs/design.md, "Numerics"): the running maximum is
  subtracted each step, each position's largest emission moves from the ring
  into the offset (as in the reference), and the offsets are carried in
  float64.
* One step of the scan and the move of the ring, :func:`_step_and_advance`,
  serve all four kernels (the backward's span recompute included).
* The backward recomputes one checkpoint span at a time into span buffers of
  the workspace (interval + 1 rows of C_PAD) and sweeps a mirror ring through
  them. Every gradient element belongs to one program, which accumulates it in
  a fixed order: no atomics, bit-identical reruns.
* Viterbi does the same with the max semiring: it saves checkpoints as it
  scans, then recomputes the spans last first, each one's backpointers into
  interval + 1 rows, and follows the path through them (O(√(T·K)·C) memory
  per sequence, not O(T·C) backpointers).
* The exp-domain forward (FLASHSEMICRF_TRITON_ALGORITHM=exp, static
  transition), :func:`_exp_forward_kernel`, keeps the ring as probabilities
  relative to a float64 offset (a term is a multiply-add, not an exp) with
  the CUDA and CPU kernels' bounds on what underflow loses; a sequence they
  cannot certify is redone by the log-domain forward (its section below).
* Ring slots are t ± d wrapped into [0, K) by a compare and an add
  (:func:`_ring_slot`): one integer division per step, none per element.

Threads of a program share the workspace through global memory, so every
phase that writes it is fenced by ``tl.debug_barrier()`` (a CTA barrier, which
also orders global memory within the CTA) on both sides: before, so that no
thread overwrites what another is still to read; after, so that the writes
are visible to the next phase. The interpreter runs programs sequentially and
cannot catch a missing barrier; keep them when editing.

Kernels compute in the dtype of the scores pointer (float32 or float64).
"""

from __future__ import annotations

import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))
_NO_INDEX = tl.constexpr(2**30)  # larger than any duration or label index


# --------------------------------------------------------------------------
# Per-element helpers and loads
# --------------------------------------------------------------------------


@triton.jit
def _finite_or_zero(m):
    """What a renormalisation subtracts: m, or 0 when m is ±inf or NaN."""
    return tl.where(m - m == 0, m, 0.0)


@triton.jit
def _lse(x, AXIS: tl.constexpr):
    """log-sum-exp along AXIS; -inf when every term is -inf."""
    top = tl.max(x, AXIS)
    base = tl.where(top == _NEG_INF, 0.0, top)
    return base + tl.log(tl.sum(tl.exp(x - tl.expand_dims(base, AXIS)), AXIS))


@triton.jit
def _lse_update(run_max, run_sum, x, AXIS: tl.constexpr):
    """Online log-sum-exp: fold the terms of x along AXIS into (run_max, run_sum)."""
    new_max = tl.maximum(run_max, tl.max(x, AXIS))
    base = tl.where(new_max == _NEG_INF, 0.0, new_max)
    run_sum = run_sum * tl.exp(run_max - base) + tl.sum(
        tl.exp(x - tl.expand_dims(base, AXIS)), AXIS
    )
    return new_max, run_sum


@triton.jit
def _lse_finish(run_max, run_sum):
    return tl.where(run_max == _NEG_INF, 0.0, run_max) + tl.log(run_sum)


@triton.jit
def _first_argmax(x, index, AXIS: tl.constexpr):
    """(max, smallest index attaining it) along AXIS; ``index`` broadcasts to x."""
    top = tl.max(x, AXIS)
    hit = x == tl.expand_dims(top, AXIS)
    return top, tl.min(tl.where(hit, index, _NO_INDEX), AXIS)


@triton.jit
def _sequence_inputs(b, T, C, scores_ptr, trans_ptr, dur_ptr, start_tr_ptr, end_tr_ptr,
                     start_sc_ptr, end_sc_ptr):
    """The ``inputs`` tuple of sequence b: the (B, T, C) inputs advanced to it.
    An absent start/end scores pointer is any valid one (never read)."""
    row0 = b * T * C
    return (scores_ptr + row0, trans_ptr, dur_ptr, start_tr_ptr, end_tr_ptr,
            start_sc_ptr + row0, end_sc_ptr + row0)


@triton.jit
def _labels(ptr, C, C_PAD: tl.constexpr, OTHER: tl.constexpr):
    """A (C,) vector as (C_PAD,), OTHER on the padding."""
    cs = tl.arange(0, C_PAD)
    return tl.load(ptr + tl.minimum(cs, C - 1), mask=cs < C, other=OTHER)


@triton.jit
def _row(ptr, t, C, C_PAD: tl.constexpr, PRESENT: tl.constexpr):
    """Row t (C_PAD,) of an optional (T, C) input of one sequence: 0 where absent or padded."""
    if PRESENT:
        return _labels(ptr + t * C, C, C_PAD, 0.0)
    else:
        return tl.zeros([C_PAD], ptr.dtype.element_ty)


@triton.jit
def _emissions(scores_ptr, t, C, C_PAD: tl.constexpr):
    """(scores[t] - e, e) with e = max_c scores[t, c] (0 if not finite): the
    ring takes the first, the offset the second, so entries stay O(1) between
    steps however large the emissions."""
    score = _labels(scores_ptr + t * C, C, C_PAD, float("-inf"))
    top = _finite_or_zero(tl.max(score, 0))
    return score - top, top


@triton.jit
def _durations(dur_ptr, d_row, ok, C, C_PAD: tl.constexpr):
    """duration[d_row, c] (BLOCK_D, C_PAD), -inf where not ``ok``."""
    cl = tl.minimum(tl.arange(0, C_PAD), C - 1)
    return tl.load(dur_ptr + d_row[:, None] * C + cl[None, :], mask=ok, other=float("-inf"))


@triton.jit
def _transitions(trans_ptr, d_row, dok, C, C_PAD: tl.constexpr):
    """transition[d_row, c', c] (BLOCK_D, C_PAD, C_PAD) of the (K, C, C) form, and
    its mask (rows in ``dok``, labels < C); -inf where masked."""
    cs = tl.arange(0, C_PAD)
    cl = tl.minimum(cs, C - 1)
    cm = cs < C
    ok3 = dok[:, None, None] & cm[None, :, None] & cm[None, None, :]
    tr = tl.load(trans_ptr + d_row[:, None, None] * C * C + cl[None, :, None] * C
                 + cl[None, None, :], mask=ok3, other=float("-inf"))
    return tr, ok3


@triton.jit
def _transition_tile(trans_ptr, C, C_PAD: tl.constexpr, DD: tl.constexpr):
    """The static transition as a (C_PAD, C_PAD) register tile, -inf on padding
    (a placeholder for the duration-dependent one, which is read per chunk)."""
    cs = tl.arange(0, C_PAD)
    cl = tl.minimum(cs, C - 1)
    if DD:
        return tl.zeros([C_PAD, C_PAD], trans_ptr.dtype.element_ty)
    else:
        ok = (cs[:, None] < C) & (cs[None, :] < C)
        return tl.load(trans_ptr + cl[:, None] * C + cl[None, :], mask=ok, other=float("-inf"))


@triton.jit
def _ring_slot(base, delta, K):
    """(base + delta) mod K for base in [0, K) (int32) and delta in [-K, K):
    a compare and an add per element instead of an integer division (the
    slots of the ring are t ± d with d <= K, so one wrap is all it takes)."""
    x = base + delta
    x = tl.where(x < 0, x + K, x)
    return tl.where(x >= K, x - K, x)


@triton.jit
def _step_slot(t, K):
    """t mod K as int32: one scalar division per step, for _ring_slot."""
    return (t % K).to(tl.int32)


# --------------------------------------------------------------------------
# The forward step (every kernel) and the ring
# --------------------------------------------------------------------------


@triton.jit
def _segment_ends(
    t, tK, ring, inputs, K, C,
    MAX: tl.constexpr, DD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Reduce the open segments [t-d, t), d = 1 … min(K, t), per label (t >= 1).

    Returns (value (C_PAD,), best_d, best_prev): log-sum-exp (or max) over d
    of the ring entries plus duration scores; in the max semiring also the
    first maximising duration and (duration-dependent transition) the previous
    label chosen with it, -1 for a segment starting at 0.
    """
    trans_ptr, dur_ptr = inputs[1], inputs[2]
    DT = dur_ptr.dtype.element_ty
    cs = tl.arange(0, C_PAD)
    cm = cs < C
    ds = tl.arange(0, BLOCK_D)
    dmax = tl.minimum(t, K)
    run_max = tl.full([C_PAD], float("-inf"), DT)
    run_sum = tl.zeros([C_PAD], DT)
    best_d = tl.full([C_PAD], 1, tl.int32)
    best_prev = tl.full([C_PAD], -1, tl.int32)
    GAIN = K if DD else 0
    for d0 in range(0, dmax, BLOCK_D):
        d = d0 + 1 + ds  # (BLOCK_D,) durations
        dok = d <= dmax
        d_row = tl.where(dok, d - 1, 0)  # in-range row for every lane
        slot = _ring_slot(tK, -tl.where(dok, d, 0), K)
        ok = dok[:, None] & cm[None, :]
        dur = _durations(dur_ptr, d_row, ok, C, C_PAD)
        gain = tl.load(ring + (GAIN + slot)[:, None] * C_PAD + cs[None, :])
        if DD:
            # alpha_hat[t-d, c'] + transition[d-1, c', c], reduced over c'.
            hist = tl.load(ring + slot[:, None] * C_PAD + cs[None, :])  # (BLOCK_D, C_PAD)
            tr, _ok3 = _transitions(trans_ptr, d_row, dok, C, C_PAD)
            inner = hist[:, :, None] + tr
            if MAX:
                enter, prev = _first_argmax(inner, cs[None, :, None], 1)
            else:
                enter = _lse(inner, 1)
                prev = tl.zeros([BLOCK_D, C_PAD], tl.int32)
            # The segment starting at 0 has no previous label: its alpha slot
            # holds start_transition - O_0 per new label.
            first = (d == t)[:, None]
            enter = tl.where(first, hist, enter)
            prev = tl.where(first, -1, prev)
            x = enter + gain + dur
        else:
            x = gain + dur
        x = tl.where(ok, x, float("-inf"))
        if MAX:
            chunk_max, chunk_d = _first_argmax(x, d[:, None], 0)
            better = chunk_max > run_max  # strict: ties keep the shorter duration
            run_max = tl.where(better, chunk_max, run_max)
            best_d = tl.where(better, chunk_d.to(tl.int32), best_d)
            if DD:
                chunk_prev = tl.sum(tl.where(d[:, None] == chunk_d[None, :], prev, 0), 0)
                best_prev = tl.where(better, chunk_prev, best_prev)
        else:
            run_max, run_sum = _lse_update(run_max, run_sum, x, 0)
    if MAX:
        value = run_max
    else:
        value = _lse_finish(run_max, run_sum)
    return value, best_d, best_prev


@triton.jit
def _scan_step(
    t, tK, T, ring, trans_tile, inputs, K, C,
    MAX: tl.constexpr, DD: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The messages of step t (reference.scan_step).

    Returns (alpha_hat[t], sigma_hat[t], m, best_d, best_prev), the messages
    relative to O_t = O_{t-1} + m. alpha is -inf at t = 0; sigma is computed
    for every t (static transition) but only meaningful for t < L; best_d and
    best_prev are the max semiring's backpointers of this step.
    """
    scores_ptr, trans_ptr, dur_ptr, start_tr_ptr, end_tr_ptr, start_sc_ptr, end_sc_ptr = inputs
    DT = dur_ptr.dtype.element_ty
    cs = tl.arange(0, C_PAD)
    cm = cs < C
    if t == 0:
        sigma = _labels(start_tr_ptr, C, C_PAD, float("-inf"))
        sigma += _row(start_sc_ptr, 0, C, C_PAD, HAS_START)
        m = _finite_or_zero(tl.max(sigma, 0))
        sigma = sigma - m
        alpha = tl.full([C_PAD], float("-inf"), DT)
        best_d = tl.full([C_PAD], 1, tl.int32)
        best_prev = tl.full([C_PAD], -1, tl.int32)
    else:
        alpha, best_d, best_prev = _segment_ends(t, tK, ring, inputs, K, C, MAX, DD, C_PAD,
                                                    BLOCK_D)
        alpha += _row(end_sc_ptr, t - 1, C, C_PAD, HAS_END)
        alpha = tl.where(cm, alpha, float("-inf"))
        m = _finite_or_zero(tl.max(alpha, 0))
        alpha = alpha - m
        sigma = tl.full([C_PAD], float("-inf"), DT)
        if not DD:
            # sigma[t, c] = reduce_c' (alpha[t, c'] + transition[c', c]) + start_scores[t, c]
            inner = alpha[:, None] + trans_tile
            if MAX:
                sigma, best_prev = _first_argmax(inner, cs[:, None], 0)
            else:
                sigma = _lse(inner, 0)
            sigma += _row(start_sc_ptr, tl.minimum(t, T - 1), C, C_PAD, HAS_START)
            sigma = tl.where(cm, sigma, float("-inf"))
    return alpha, sigma, m, best_d, best_prev


@triton.jit
def _advance(
    t, tK, ring, sigma, alpha, m, inputs, K, C,
    DD: tl.constexpr, HAS_START: tl.constexpr, C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Move the ring from step t to step t+1 (t < L): re-base every entry by m,
    open the segments starting at t (slot t % K), add position t's emissions
    less their maximum, which is returned: the caller adds it to the offset."""
    scores_ptr, start_tr_ptr, start_sc_ptr = inputs[0], inputs[3], inputs[5]
    cs = tl.arange(0, C_PAD)
    cm = cs < C
    rs = tl.arange(0, BLOCK_D)
    emit, emit_max = _emissions(scores_ptr, t, C, C_PAD)
    if DD:
        fresh = _row(start_sc_ptr, t, C, C_PAD, HAS_START)
        GAIN = K
    else:
        fresh = sigma
        GAIN = 0
    fresh_slot = tK
    tl.debug_barrier()
    for r0 in range(0, K, BLOCK_D):
        rows = r0 + rs
        rok = rows < K
        rows = tl.where(rok, rows, 0)
        ptrs = ring + (GAIN + rows)[:, None] * C_PAD + cs[None, :]
        old = tl.load(ptrs)
        new = tl.where((rows == fresh_slot)[:, None], fresh[None, :], old - m) + emit[None, :]
        tl.store(ptrs, tl.where(cm[None, :], new, float("-inf")), mask=rok[:, None])
    if DD:
        start_tr = _labels(start_tr_ptr, C, C_PAD, float("-inf"))
        slot_alpha = tl.where(t == 0, start_tr - m, alpha)
        tl.store(ring + fresh_slot * C_PAD + cs, tl.where(cm, slot_alpha, float("-inf")))
    tl.debug_barrier()
    return emit_max


@triton.jit
def _step_and_advance(
    t, advance, offset, ring, trans_tile, inputs, T, K, C,
    MAX: tl.constexpr, DD: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Step t of the scan, then, when ``advance``, the ring's move to step t+1.

    ``offset`` is the ring's offset before the step. Returns (alpha_hat[t],
    sigma_hat[t], O_t, the ring's offset after the step, best_d, best_prev).
    """
    tK = _step_slot(t, K)  # the step's one division, for both halves
    alpha, sigma, m, best_d, best_prev = _scan_step(
        t, tK, T, ring, trans_tile, inputs, K, C, MAX, DD, HAS_START, HAS_END, C_PAD, BLOCK_D)
    o_t = offset + m.to(tl.float64)
    next_offset = o_t
    if advance:
        next_offset += _advance(t, tK, ring, sigma, alpha, m, inputs, K, C, DD, HAS_START,
                                C_PAD, BLOCK_D).to(tl.float64)
    return alpha, sigma, o_t, next_offset, best_d, best_prev


@triton.jit
def _fill(ptr, rows, width, VALUE: tl.constexpr, C_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """VALUE in ``rows`` rows of ``width`` <= C_PAD elements from ``ptr``."""
    cs = tl.arange(0, C_PAD)
    rs = tl.arange(0, BLOCK_D)
    tl.debug_barrier()
    for r0 in range(0, rows, BLOCK_D):
        r = r0 + rs
        rok = r < rows
        r = tl.where(rok, r, 0)
        tl.store(ptr + r[:, None] * width + cs[None, :],
                 tl.full([BLOCK_D, C_PAD], VALUE, ptr.dtype.element_ty),
                 mask=rok[:, None] & (cs < width)[None, :])
    tl.debug_barrier()


@triton.jit
def _copy_checkpoint_part(
    t, ring, ckpt, K, C, PART: tl.constexpr,
    SAVE: tl.constexpr, C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cs = tl.arange(0, C_PAD)
    cl = tl.minimum(cs, C - 1)
    cm = cs < C
    rs = tl.arange(0, BLOCK_D)
    tK = _step_slot(t, K)
    for r0 in range(0, K, BLOCK_D):
        rows = r0 + rs
        rok = rows < K
        rows = tl.where(rok, rows, 0)
        slot = _ring_slot(tK, -rows - 1, K)
        ring_ptrs = ring + (PART * K + slot)[:, None] * C_PAD + cs[None, :]
        ck_ptrs = ckpt + (PART * K + rows)[:, None] * C + cl[None, :]
        ok = rok[:, None] & cm[None, :]
        if SAVE:
            tl.store(ck_ptrs, tl.load(ring_ptrs), mask=ok)
        else:
            v = tl.load(ck_ptrs, mask=ok, other=float("-inf"))
            tl.store(ring_ptrs, v, mask=rok[:, None])


@triton.jit
def _copy_checkpoint(
    t, ring, ckpt, K, C,
    SAVE: tl.constexpr, DD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Ring (slot (t-d) % K) <-> checkpoint (S, C) (row d-1, the layout every
    backend shares; duration-dependent: K alpha rows then K gain rows)."""
    tl.debug_barrier()
    _copy_checkpoint_part(t, ring, ckpt, K, C, 0, SAVE, C_PAD, BLOCK_D)
    if DD:
        _copy_checkpoint_part(t, ring, ckpt, K, C, 1, SAVE, C_PAD, BLOCK_D)
    tl.debug_barrier()


# --------------------------------------------------------------------------
# Forward: log Z and the checkpoints
# --------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "interval", "n_ckpt", "chunks", "chunk_spans", "warmup"])
def _forward_kernel(
    # inputs
    scores_ptr, trans_ptr, dur_ptr, lengths_ptr, start_tr_ptr, end_tr_ptr, start_sc_ptr,
    end_sc_ptr,
    # outputs and workspace
    log_z_ptr, log_z64_ptr, ckpt_ptr, ckpt_off_ptr, junction_ptr, junction_off_ptr, ring_ws_ptr,
    redo_ptr,
    # sizes
    T, K, C, interval, n_ckpt, chunks, chunk_spans, warmup,
    # meta-parameters
    DD: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr, REDO: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """log Z and the checkpoints. One program a sequence (chunks = 1,
    chunk_spans >= n_ckpt, warmup 0: the junction and log_z64 pointers are
    not written), or the chunked forward (static transition; docs/design.md,
    "The forward in chunks"): program b·chunks + j scans checkpoints
    j·chunk_spans … of sequence b, starting `warmup` positions before the
    first of them from the state a sequence has at its start, and saves its
    checkpoints and, unless it reaches L, the ring it ends with (junction
    (B·chunks, K, C) and its offset); the last chunk also writes log Z in
    float64 (log_z64), and the launcher joins the chunks. REDO: only the
    sequences redo_ptr marks."""
    cta = tl.program_id(0).to(tl.int64)
    b = cta // chunks
    chunk = cta - b * chunks
    L = tl.load(lengths_ptr + b)
    saved = tl.minimum(L // interval + 1, n_ckpt)  # checkpoints of this sequence
    j0 = chunk * chunk_spans
    active = j0 < saved
    if REDO:
        active = active & (tl.load(redo_ptr + b) != 0)
    if active:
        S = 2 * K if DD else K
        tau = j0 * interval
        last = j0 + chunk_spans >= saved
        end = tl.where(last, L, (j0 + chunk_spans) * interval)
        first = tl.maximum(tau - warmup, 0)
        # The chunk's position t is the sequence's first + t.
        inputs = _sequence_inputs(b, T, C, scores_ptr + first * C, trans_ptr, dur_ptr,
                                  start_tr_ptr, end_tr_ptr, start_sc_ptr + first * C,
                                  end_sc_ptr + first * C)
        T_chunk = T - first
        ckpt_ptr += b * n_ckpt * S * C  # (N, S, C) of this sequence
        ckpt_off_ptr += b * n_ckpt
        ring = ring_ws_ptr + cta * S * C_PAD
        trans_tile = _transition_tile(trans_ptr, C, C_PAD, DD)
        _fill(ring, S, C_PAD, float("-inf"), C_PAD, BLOCK_D)
        offset = tl.full([], 0.0, tl.float64)  # the ring's offset
        steps = end - first + tl.where(last, 1, 0)
        for t in range(0, steps):
            g = first + t
            if (g % interval == 0) & (g >= tau) & (g < T):
                j = g // interval
                _copy_checkpoint(t, ring, ckpt_ptr + j * S * C, K, C, True, DD, C_PAD, BLOCK_D)
                tl.store(ckpt_off_ptr + j, offset)
            alpha, _sigma, o_t, offset, _bd, _bp = _step_and_advance(
                t, g < L, offset, ring, trans_tile, inputs, T_chunk, K, C, False, DD,
                HAS_START, HAS_END, C_PAD, BLOCK_D)
            if g == L:
                value = _lse(alpha + _labels(end_tr_ptr, C, C_PAD, float("-inf")), 0)
                log_z = o_t + value.to(tl.float64)
                tl.store(log_z_ptr + b, log_z.to(value.dtype))
                if chunks > 1:
                    tl.store(log_z64_ptr + b, log_z)
        if last:
            # Checkpoints past the end of a short sequence are never read: the
            # empty state.
            _fill(ckpt_ptr + saved * S * C, (n_ckpt - saved) * S, C, float("-inf"), C_PAD,
                  BLOCK_D)
            for j in range(saved, n_ckpt):
                tl.store(ckpt_off_ptr + j, 0.0)
        else:
            _copy_checkpoint(steps, ring, junction_ptr + cta * S * C, K, C, True, DD, C_PAD,
                             BLOCK_D)
            tl.store(junction_off_ptr + cta, offset)


# --------------------------------------------------------------------------
# The exp-domain forward (static transition)
# --------------------------------------------------------------------------
#
# FLASHSEMICRF_TRITON_ALGORITHM=exp: the CUDA kernels' exp_forward_kernel
# (csrc/cuda/exp_forward_kernel.cuh; docs/design.md, "The CPU kernel's
# exp-domain forward and backward") as tile operations, one program a
# sequence. The ring holds probabilities relative to one float64 offset O,
# so that a term is a multiply-add where the log scan spends an exp; ghosts
# (float64 bounds, in units of the dtype's smallest normal, on what
# underflow lost) certify log Z, and a sequence they cannot certify is marked
# in `redo` for _forward_kernel, which rewrites its outputs. The charges,
# absorption and final check are exp_domain.h's, and values below the
# dtype's smallest normal are flushed to 0 (_flushed), as in the CPU kernel
# (tests/test_triton.py compares the fallbacks with its own); sums run in
# tile order, so results agree with it to rounding. The per-call tables (W, A,
# their bounds, the labels that can reach an end) are the launcher's, in
# tensor ops: they depend on the parameters only.

_LN2 = tl.constexpr(0.6931471805599453)
_UP = tl.constexpr(1.0 + 1e-6)  # exp_domain.h's kUp: a dtype factor is within this of exact
_SLACK = tl.constexpr(1.01)  # kSlack: what every accepting comparison keeps in reserve
_FLOOR = tl.constexpr(2.2250738585072014e-308)  # float64's smallest normal
_HUGE = tl.constexpr(1e300)  # a ghost past any use: fall back


@triton.jit
def _exp(x):
    """exp in x's dtype, correctly rounded but for float64's own error: the
    bounds take the dtype's factors as exact to 1e-6 (_UP), which tl.exp's
    fast float32 path (ex2.approx of x·log2 e) misses by 5e-6 near -87.
    These exps are O(C) a position, so float64's costs little."""
    return tl.exp(x.to(tl.float64)).to(x.dtype)


@triton.jit
def _exponent_of(v, F64: tl.constexpr):
    """floor(log2(v)) for v > 0, from the bits (a lower bound for subnormals)."""
    if F64:
        e = ((v.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32)
        return tl.where(e == 0, -1075, e - 1023)
    else:
        e = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
        return tl.where(e == 0, -150, e - 127)


@triton.jit
def _scale_of(top, y_max):
    """The largest candidate, else the largest score of a label that can
    reach an end, else 0 (float64 scalars)."""
    return tl.where(top > _NEG_INF, top, tl.where(y_max > _NEG_INF, y_max, 0.0))


@triton.jit
def _ghost_through_factor(g, x, f, log_f, TINY: tl.constexpr):
    """exp_domain.h's ghost_through_factor: the ghost of x · f (f = exp(log_f)
    in the dtype) from x's ghost g: carried through the factor, or, where f
    flushed, everything x and g stood for; 0 for exact zeros."""
    fd = f.to(tl.float64)
    carried = tl.where(g > 0, tl.maximum(g * fd * _UP, _FLOOR), 0.0)
    exact = (log_f == _NEG_INF) | ((g == 0.0) & (x == 0))
    flushed = tl.where(exact, 0.0, tl.maximum((g * TINY + x.to(tl.float64)) * _SLACK, _FLOOR))
    return tl.where(fd >= TINY, carried, flushed)


@triton.jit
def _scaled_ghost(g, f, exact_zero):
    """exp_domain.h's scaled_ghost: g through a float64 factor f, an upper
    bound even where f or the product underflowed."""
    scaled = g * tl.where(f < _FLOOR, _FLOOR, f) * _UP
    return tl.where((g == 0.0) | exact_zero, 0.0, tl.where(scaled < _FLOOR, _FLOOR, scaled))


@triton.jit
def _two_sum_add(hi, lo, m):
    """hi + lo += m, the rounding of hi kept in lo (float64 scalars)."""
    s = hi + m
    bb = s - hi
    return s, lo + ((hi - (s - bb)) + (m - bb))


@triton.jit
def _flushed(x, TINY: tl.constexpr):
    """x, or 0 below the dtype's smallest normal, as the CPU kernel's flush-to-
    zero mode computes it. Every way a value falls below tiny is charged to
    a ghost where it happens, so the flush loses nothing unbounded; a kept
    subnormal, though, is a positive value that later charges and factors
    carry as mass at risk, and a label that grows by e^700 afterwards turns
    that into a bound no log Z can pass (an outshone problem of the tests
    was handed to the log scan here, and certified on the CPU, until the
    values were flushed)."""
    return tl.where(x < TINY, 0.0, x)


@triton.jit
def _pay_owed(r, fo, owed, BIG: tl.constexpr):
    """Ring entries r with the previous advance's factor fo applied where
    ``owed`` (capped at the dtype's largest value, so that an entry that can
    no longer matter meets its zero weight as 0, never as inf · 0)."""
    scaled = r * fo[None, :]
    return tl.where(owed, tl.where(scaled < BIG, scaled, BIG), r)


@triton.jit
def _exp_ring_pass(ring, weight_ptr, tK, n, fo, last, K, TINY: tl.constexpr,
                   BIG: tl.constexpr, C_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pass over the n = min(t, K) ages of the ring at step t: the
    previous advance's factor fo applied to ages >= 2 (written back), and per
    label the weighted sum, the largest entry that can still grow (age <
    its label's last duration) and the smallest positive entry that can
    still matter (one that grows, or meets a positive weight)."""
    cs = tl.arange(0, C_PAD)
    ds = tl.arange(0, BLOCK_D)
    alive = tl.where(last - 1 < n, tl.maximum(last - 1, 0), n)  # ages d - 1 < alive grow
    acc = tl.zeros([C_PAD], fo.dtype)
    livemax = tl.zeros([C_PAD], fo.dtype)
    rmin = tl.full([C_PAD], float("inf"), fo.dtype)
    for a0 in range(0, n, BLOCK_D):
        age = a0 + ds  # d - 1
        ok = age < n
        slot = _ring_slot(tK, -tl.where(ok, age + 1, 0), K)
        ptrs = ring + slot[:, None] * C_PAD + cs[None, :]
        r = tl.load(ptrs)
        owed = (ok & (age >= 1))[:, None]
        x = _flushed(_pay_owed(r, fo, owed, BIG), TINY)
        tl.store(ptrs, x, mask=owed)
        w = tl.load(weight_ptr + tl.where(ok, age, 0)[:, None] * C_PAD + cs[None, :])
        x = tl.where(ok[:, None], x, 0.0)
        acc += tl.sum(x * w, 0)
        grows = age[:, None] < alive[None, :]
        livemax = tl.maximum(livemax, tl.max(tl.where(grows, x, 0.0), 0))
        matters = (x > 0) & (grows | (w > 0))
        rmin = tl.minimum(rmin, tl.min(tl.where(matters, x, float("inf")), 0))
    return _flushed(acc, TINY), livemax, rmin


@triton.jit
def _exp_save(ring, ckpt, tK, n, fo, shift, K, C, BIG: tl.constexpr, C_PAD: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Checkpoint at step t as the log scan writes it: the owed factor applied
    (and written back), row d - 1 = log r + shift (the ring's offset less the
    log scan's), -inf for 0."""
    cs = tl.arange(0, C_PAD)
    cl = tl.minimum(cs, C - 1)
    cm = cs < C
    rs = tl.arange(0, BLOCK_D)
    tl.debug_barrier()
    for r0 in range(0, K, BLOCK_D):
        rows = r0 + rs
        rok = rows < K
        rows = tl.where(rok, rows, 0)
        ptrs = ring + _ring_slot(tK, -rows - 1, K)[:, None] * C_PAD + cs[None, :]
        r = tl.load(ptrs)
        owed = (rok & (rows >= 1) & (rows < n))[:, None]
        r = _pay_owed(r, fo, owed, BIG)
        tl.store(ptrs, r, mask=owed)
        logs = tl.where(r > 0, (tl.log(r.to(tl.float64)) + shift).to(r.dtype), float("-inf"))
        tl.store(ckpt + rows[:, None] * C + cl[None, :], logs, mask=rok[:, None] & cm[None, :])
    tl.debug_barrier()


@triton.jit(do_not_specialize=["T", "interval", "n_ckpt"])
def _exp_forward_kernel(
    # inputs
    scores_ptr, trans_ptr, dur_ptr, lengths_ptr, start_tr_ptr, end_tr_ptr, start_sc_ptr,
    end_sc_ptr,
    # the per-call tables (launchers._exp_tables)
    weight_ptr, a_ptr, a_bound_ptr, label64_ptr, label_s_ptr, last_ptr, unboundable_ptr,
    # outputs and workspace
    log_z_ptr, ckpt_ptr, ckpt_off_ptr, ring_ws_ptr, redo_ptr,
    # sizes
    T, K, C, interval, n_ckpt,
    # meta-parameters
    DD: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr, F64: tl.constexpr, TINY: tl.constexpr, BIG: tl.constexpr,
    RHO: tl.constexpr,
):
    """log Z and the checkpoints of sequence b where the ghosts certify log Z;
    redo[b] = 1 for the others (outputs left to _forward_kernel's REDO)."""
    b = tl.program_id(0).to(tl.int64)
    L = tl.load(lengths_ptr + b)
    inputs = _sequence_inputs(b, T, C, scores_ptr, trans_ptr, dur_ptr, start_tr_ptr, end_tr_ptr,
                              start_sc_ptr, end_sc_ptr)
    scores_b, start_b, end_b = inputs[0], inputs[5], inputs[6]
    DT = scores_ptr.dtype.element_ty
    f64 = tl.float64
    cs = tl.arange(0, C_PAD)
    cm = cs < C
    ckpt_ptr += b * n_ckpt * K * C
    ckpt_off_ptr += b * n_ckpt
    ring = ring_ws_ptr + b * K * C_PAD
    # The per-label tables (launchers._exp_tables) are read where used, as A
    # and its bounds are: held in registers across the scan they spill
    # (ptxas -v). Rows of label64: the duration and column maxima, the
    # flushed weights' and transitions' bounds; of label_s: the smallest
    # positive weight and transition.
    last = tl.load(last_ptr + cs)  # the last duration of a label that can reach an end, else 0
    reach = last > 0
    tile = cs[:, None] * C_PAD + cs[None, :]
    # NaN or +inf parameters leave nothing to bound: the log scan gives the NaN.
    rejected = tl.load(unboundable_ptr)
    # A ghost below value / (4 rho L) is absorbed into relative error.
    absorb = TINY * 4.0 * RHO * tl.maximum(L, 1).to(f64) * _SLACK
    _fill(ring, K, C_PAD, 0.0, C_PAD, BLOCK_D)
    zero64 = tl.zeros([C_PAD], f64)
    one = tl.full([C_PAD], 1.0, DT)
    O = tl.full([], 0.0, f64)  # the ring's offset
    mes = tl.full([], 0.0, f64)  # alpha_hat's scale past O
    sigma_rel = tl.full([], 0.0, f64)  # sigma_hat's scale past O
    ref_hi = tl.full([], 0.0, f64)  # the log scan's offset, hi + lo
    ref_lo = tl.full([], 0.0, f64)
    log_z = tl.full([], 0.0, f64)
    tK = tl.full([], 0, tl.int32)  # t % K
    fo = one  # the factor the ring owes its entries of age >= 2 (1: none)
    alpha = tl.zeros([C_PAD], DT)
    sigma = tl.zeros([C_PAD], DT)
    livemax = tl.zeros([C_PAD], DT)
    rmin = tl.full([C_PAD], float("inf"), DT)
    ga = zero64  # ghosts of alpha_hat, sigma_hat, and the ring's two generations
    gs = zero64
    ghost_old = zero64
    ghost_new = zero64
    for t in range(0, L + 1):
        n = tl.minimum(t, K)
        if (t % interval == 0) & (t < T):
            _exp_save(ring, ckpt_ptr + (t // interval) * K * C, tK, n, fo, (O - ref_hi) - ref_lo,
                      K, C, BIG, C_PAD, BLOCK_D)
            tl.store(ckpt_off_ptr + t // interval, ref_hi)
            fo = one
        if t == 0:
            # sigma_hat[0] relative to O = its finite maximum.
            first = (_labels(start_tr_ptr, C, C_PAD, float("-inf"))
                     + _row(start_b, 0, C, C_PAD, HAS_START)).to(f64)
            top = tl.max(first, 0)
            O = tl.where(top == _NEG_INF, 0.0, top)
            ref_hi = O
            x0 = first - O
            sigma = _exp(x0.to(DT))
            gs = tl.where((sigma < TINY) & (x0 != _NEG_INF), _SLACK, zero64)
        else:
            # alpha_hat[t] = end factor · sum_d ring · W, and its ghost ga.
            expire = tK == 0  # generation 0's entries have all left the ring
            ghost_old = tl.where(expire, ghost_new, ghost_old)
            ghost_new = tl.where(expire, 0.0, ghost_new)
            acc, livemax, rmin = _exp_ring_pass(ring, weight_ptr, tK, n, fo, last, K, TINY, BIG,
                                                C_PAD, BLOCK_D)
            fo = one
            tl.debug_barrier()
            ya = _row(end_b, t - 1, C, C_PAD, HAS_END).to(f64) + tl.load(label64_ptr + cs)
            # The end factor is normalised against the mass it multiplies.
            cand = tl.where(reach & (acc > 0),
                            ya + _exponent_of(acc, F64).to(f64) * _LN2, _NEG_INF)
            mes = _scale_of(tl.max(cand, 0), tl.max(tl.where(reach, ya, _NEG_INF), 0))
            endf = _exp((ya - mes).to(DT))
            xa = tl.where(BIG < acc, BIG, acc)
            prod = xa * endf
            alpha = _flushed(tl.where(xa > 0, tl.where(BIG < prod, BIG, prod), 0.0), TINY)
            has = rmin < float("inf")
            g = ghost_old + ghost_new
            w_minpos = tl.load(label_s_ptr + cs)
            g += tl.where(has & ((rmin * w_minpos).to(f64) < TINY), n.to(f64) * _SLACK, 0.0)
            g += tl.where(has, tl.load(label64_ptr + 2 * C_PAD + cs), 0.0)
            g = _ghost_through_factor(g, xa, endf, ya - mes, TINY)
            g += tl.where((xa > 0) & (endf >= TINY) & (alpha < TINY), _SLACK, zero64)
            g = tl.where((g > 0) & (alpha > 0) & (g * absorb <= alpha.to(f64)), 0.0, g)
            # A label that cannot reach an end feeds only its like.
            rejected |= tl.max(tl.where(reach & ~(g < _HUGE), 1, 0), 0)
            ga = tl.where(reach, g, 0.0)
            # The offset the log scan would have: its step subtracts its max alpha.
            amax = tl.max(tl.where(cm, alpha, 0.0), 0)
            step = tl.where(amax > 0, (tl.log(amax.to(f64)) + ((O - ref_hi) - ref_lo) + mes)
                            .to(DT).to(f64), 0.0)
            ref_hi, ref_lo = _two_sum_add(ref_hi, ref_lo, step)
        if t == L:
            # log Z, accepted iff Z >= rho · ghost(Z).
            end_tr = _labels(end_tr_ptr, C, C_PAD, float("-inf")).to(f64)
            top = tl.max(tl.where(alpha > 0, end_tr + _exponent_of(alpha, F64).to(f64) * _LN2,
                                  _NEG_INF), 0)
            mz = _scale_of(top, tl.max(end_tr, 0))
            lz = end_tr - mz
            zf = _exp(lz.to(DT))
            term = tl.where(alpha > 0, alpha * zf, 0.0)
            z = tl.sum(term.to(f64), 0)
            gz = _ghost_through_factor(ga, alpha, zf, lz, TINY)
            gz += tl.where((alpha > 0) & (zf >= TINY) & (term < TINY), _SLACK, zero64)
            gz = tl.sum(tl.where(cm, gz, 0.0), 0)
            certified = tl.where(z == 0.0, gz == 0.0, z >= RHO * gz * TINY * _SLACK)
            certified = certified & (gz < float("inf")) & (z == z)
            rejected |= tl.where(certified, 0, 1)
            log_z = tl.where(z == 0.0, _NEG_INF, O + (mes + mz + tl.log(z)))
        else:
            if t > 0:
                # sigma_hat[t] = (alpha_hat A) · start factor, and its ghost gs;
                # the ghost mat-vec is exact (a column-sum bound would spread
                # one label's ghost into every column).
                reach_alpha = tl.where(reach, alpha, 0.0)
                amax = tl.max(reach_alpha, 0)
                amin = tl.min(tl.where(reach & (alpha > 0), alpha, float("inf")), 0)
                u = _flushed(tl.sum(alpha[:, None] * tl.load(a_ptr + tile), 0), TINY)
                work = zero64
                if tl.max(tl.where(ga != 0.0, 1, 0), 0) != 0:  # else it adds nothing
                    bound = tl.load(a_bound_ptr + tile)
                    work = tl.sum(tl.where((ga[:, None] != 0.0) & (bound > 0),
                                           tl.maximum(ga[:, None] * bound, _FLOOR), 0.0), 0)
                ys = _row(start_b, t, C, C_PAD, HAS_START).to(f64) + tl.load(label64_ptr + C_PAD + cs)
                xs = tl.where(BIG < u, BIG, u)
                cand = tl.where(reach & (xs > 0), ys + _exponent_of(xs, F64).to(f64) * _LN2,
                                _NEG_INF)
                mss = _scale_of(tl.max(cand, 0), tl.max(tl.where(reach, ys, _NEG_INF), 0))
                sigma_rel = mes + mss
                h = _exp((ys - mss).to(DT))
                prod = xs * h
                sigma = _flushed(tl.where(xs > 0, tl.where(BIG < prod, BIG, prod), 0.0), TINY)
                g = work
                if amax > 0:
                    a_lost = tl.load(label64_ptr + 3 * C_PAD + cs)
                    g += tl.where(a_lost > 0, tl.maximum(amax.to(f64) * a_lost, _FLOOR), 0.0)
                    a_minpos = tl.load(label_s_ptr + C_PAD + cs)
                    g += tl.where((amin * a_minpos).to(f64) < TINY, C.to(f64) * _SLACK, zero64)
                g = _ghost_through_factor(g, xs, h, ys - mss, TINY)
                g += tl.where((xs > 0) & (h >= TINY) & (sigma < TINY), _SLACK, zero64)
                g = tl.where((g > 0) & (sigma > 0) & (g * absorb <= sigma.to(f64)), 0.0, g)
                rejected |= tl.max(tl.where(reach & ~(g < _HUGE), 1, 0), 0)
                gs = tl.where(reach, g, 0.0)
            # The advance to step t + 1: position t's emissions relative to
            # their finite maximum m, the normaliser (the largest entry that
            # can still matter becomes 1), the ghosts, the new entries.
            score = _labels(scores_b + t * C, C, C_PAD, float("-inf"))
            s64 = score.to(f64)
            m = tl.max(tl.where(s64 == s64, s64, _NEG_INF), 0)
            m = tl.where(m == _NEG_INF, 0.0, m)
            ref_hi, ref_lo = _two_sum_add(ref_hi, ref_lo, m)
            lemit = s64 - m
            emit = _exp(lemit.to(DT))
            # A label whose emission factor flushed takes its factors from
            # float64, so that a flush never loses more than the final
            # factor's underflow.
            flushed = (emit < TINY) & (lemit > _NEG_INF)
            e = tl.where(flushed, _exp(lemit), emit.to(f64))
            old_mass = tl.max(tl.where(cm, livemax.to(f64) * e, 0.0), 0)
            fresh_mass = tl.max(tl.where(reach, sigma.to(f64) * e, 0.0), 0)
            top = tl.maximum(tl.where(old_mass > 0, tl.log(old_mass), _NEG_INF),
                             tl.where(fresh_mass > 0, sigma_rel + tl.log(fresh_mass), _NEG_INF))
            top = tl.where(top == _NEG_INF, 0.0, top)
            new_offset = O + (top + m)
            base = (O - new_offset) + m
            old_f = tl.where(flushed, _exp(lemit + base), tl.where(e == 0.0, 0.0, e * _exp(base)))
            new_f = tl.where(flushed, _exp(lemit + base + sigma_rel),
                             tl.where(e == 0.0, 0.0, e * _exp(base + sigma_rel)))
            # A factor past the dtype's range has no bound where it multiplies
            # something.
            has = rmin < float("inf")
            rejected |= tl.max(tl.where(reach & ((has & (old_f > BIG)) | ((sigma > 0) & (new_f > BIG))),
                                        1, 0), 0)
            fo = tl.where(BIG < old_f, BIG, old_f).to(DT)
            fn = tl.where(BIG < new_f, BIG, new_f).to(DT)
            # Ghosts: every generation follows its entries, the new entries
            # bring sigma's ghost, entries this step takes below tiny are
            # charged in full; a -inf score's exact zeros are not.
            exact_zero = lemit == _NEG_INF
            entry = sigma * fn
            fresh_lost = ~exact_zero & (sigma > 0) & (entry.to(f64) < TINY)
            old_lost = ~exact_zero & has & ((fo < TINY) | (rmin * fo < TINY))
            go = _scaled_ghost(ghost_old, old_f, exact_zero)
            gn = _scaled_ghost(ghost_new, old_f, exact_zero) + _scaled_ghost(gs, new_f, exact_zero)
            gn += tl.where(fresh_lost, (sigma.to(f64) * new_f * (1.0 / TINY) + 2.0) * _SLACK, 0.0)
            gn += tl.where(old_lost, 2.0 * tl.minimum(t, K - 1).to(f64) * _SLACK, 0.0)
            rejected |= tl.max(tl.where(reach & ~(go + gn < _HUGE), 1, 0), 0)
            ghost_old = tl.where(reach, go, 0.0)
            ghost_new = tl.where(reach, gn, 0.0)
            bad = ~(score < float("inf"))
            if HAS_START:
                bad |= ~(_row(start_b, t, C, C_PAD, True) < float("inf"))
            if HAS_END:
                bad |= ~(_row(end_b, t, C, C_PAD, True) < float("inf"))
            rejected |= tl.max(tl.where(cm & bad, 1, 0), 0)
            # The segments starting at t enter the ring (slot t % K).
            tl.debug_barrier()
            entry = _flushed(tl.where(BIG < entry, BIG, entry), TINY)
            tl.store(ring + tK * C_PAD + cs, tl.where(cm, entry, 0.0))
            tl.debug_barrier()
            O = new_offset
            tK = tl.where(tK + 1 == K, 0, tK + 1)
    tl.store(redo_ptr + b, rejected)
    if rejected == 0:
        tl.store(log_z_ptr + b, log_z.to(DT))
        # Checkpoints past the end of a short sequence are never read: the
        # empty state.
        saved = tl.minimum(L // interval + 1, n_ckpt)
        _fill(ckpt_ptr + saved * K * C, (n_ckpt - saved) * K, C, float("-inf"), C_PAD, BLOCK_D)
        for j in range(saved, n_ckpt):
            tl.store(ckpt_off_ptr + j, 0.0)


# --------------------------------------------------------------------------
# Backward: span recompute + mirror ring
# --------------------------------------------------------------------------


@triton.jit
def _reanchor(
    t, tK, Q, Q_ring, alpha, beta, shift_beta, back, ckpt, ckpt_off, log_z64, inputs, K, C,
    DD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Q less the log of the total probability at checkpoint t (1 up to
    rounding): a boundary at t, sum_c exp(alpha + beta + shift_beta), plus a
    segment [t-d1, t+d2) across t, d1 >= 1, d2 >= 1, d1 + d2 <= K. Its open
    part [t-d1, t) is checkpoint row d1-1 (duration-dependent: entered through
    transition[d1+d2-1] unless it starts at 0, plus gain row K+d1-1), its
    closing part [t, t+d2) the backward ring at step t (slot (t+d2) % K,
    relative to Q_ring, the offset before this step's q). Only reads: the
    ring move that follows fences the workspace. Q is kept when the total is
    0 or not finite; the second result says whether it was neither."""
    trans_ptr, dur_ptr = inputs[1], inputs[2]
    DT = dur_ptr.dtype.element_ty
    cs = tl.arange(0, C_PAD)
    cm = cs < C
    ds = tl.arange(0, BLOCK_D)
    total = tl.sum(tl.where(cm, tl.exp(alpha + beta + shift_beta), 0.0), 0).to(tl.float64)
    shift_x = (ckpt_off + Q_ring - log_z64).to(DT)
    for d1 in range(1, tl.minimum(K - 1, t) + 1):
        opened = _labels(ckpt + (d1 - 1) * C, C, C_PAD, float("-inf"))
        if DD:
            gain = _labels(ckpt + (K + d1 - 1) * C, C, C_PAD, float("-inf"))
        n2 = K - d1  # d2 = 1 … K - d1
        for d0 in range(0, n2, BLOCK_D):
            d2 = d0 + 1 + ds  # (BLOCK_D,)
            dok = d2 <= n2
            d_row = tl.where(dok, d1 + d2 - 1, 0)  # total duration - 1, in range
            ok = dok[:, None] & cm[None, :]
            slot = _ring_slot(tK, tl.where(dok, d2, 0), K)
            closing = tl.load(back + slot[:, None] * C_PAD + cs[None, :])  # (BLOCK_D, C_PAD)
            dur = _durations(dur_ptr, d_row, ok, C, C_PAD)
            if DD:
                # LSE_c' (alpha_hat[t-d1, c'] + transition[d1+d2-1, c', c]); the
                # segment starting at 0 holds start_transition instead.
                tr, _ok3 = _transitions(trans_ptr, d_row, dok, C, C_PAD)
                enter = _lse(opened[None, :, None] + tr, 1)  # (BLOCK_D, C_PAD)
                enter = tl.where(d1 == t, opened[None, :], enter) + gain[None, :]
            else:
                enter = opened[None, :]
            terms = tl.exp(enter + closing + dur + shift_x)
            total += tl.sum(tl.sum(tl.where(ok, terms, 0.0), 1), 0).to(tl.float64)
    good = (total > 0) & (total - total == 0)
    return tl.where(good, Q - tl.log(tl.where(good, total, 1.0)), Q), good


@triton.jit
def _open_back(back, tK, q, fresh, emit, K, C, EMPTY: tl.constexpr, C_PAD: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Move the backward ring to step t-1: every entry re-based by q (or, when
    EMPTY, cleared), ``fresh`` (the segments ending at t) into slot tK = t % K,
    position t-1's emissions ``emit`` added to all."""
    cs = tl.arange(0, C_PAD)
    cm = cs < C
    ds = tl.arange(0, BLOCK_D)
    tl.debug_barrier()
    for r0 in range(0, K, BLOCK_D):
        rows = r0 + ds
        rok = rows < K
        rows = tl.where(rok, rows, 0)
        ptrs = back + rows[:, None] * C_PAD + cs[None, :]
        if EMPTY:
            old = tl.full([BLOCK_D, C_PAD], float("-inf"), fresh.dtype)
        else:
            old = tl.load(ptrs) - q
        new = tl.where((rows == tK)[:, None], fresh[None, :], old)
        new = tl.where(cm[None, :], new + emit[None, :], float("-inf"))
        tl.store(ptrs, new, mask=rok[:, None])
    tl.debug_barrier()


@triton.jit
def _recompute_span(
    j, L, last_span, ring, ckpt, ckpt_off, alpha_buf, sigma_buf, off_buf, trans_tile, inputs, T,
    K, C, interval, DD: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Span j's forward messages from its checkpoint (ckpt, ckpt_off: the
    sequence's) into the span buffers, row t - first: alpha_hat, sigma_hat
    and the offset O_t. The one code both the backward kernel and
    _recompute_kernel run, so the rows are the same bits either way."""
    cs = tl.arange(0, C_PAD)
    S = 2 * K if DD else K
    first = j * interval
    last = tl.where(j == last_span, L, first + interval - 1)
    _copy_checkpoint(first, ring, ckpt + j * S * C, K, C, False, DD, C_PAD, BLOCK_D)
    offset = tl.load(ckpt_off + j)
    for t in range(first, last + 1):
        alpha, sigma, o_t, offset, _bd, _bp = _step_and_advance(
            t, t < last, offset, ring, trans_tile, inputs, T, K, C, False, DD, HAS_START,
            HAS_END, C_PAD, BLOCK_D)
        tl.store(alpha_buf + (t - first) * C_PAD + cs, alpha)
        tl.store(sigma_buf + (t - first) * C_PAD + cs, sigma)
        tl.store(off_buf + (t - first), o_t)
    tl.debug_barrier()


@triton.jit(do_not_specialize=["T", "interval", "n_ckpt"])
def _recompute_kernel(
    # inputs
    scores_ptr, trans_ptr, dur_ptr, lengths_ptr, start_tr_ptr, end_tr_ptr,
    start_sc_ptr, end_sc_ptr, log_z_ptr, ckpt_ptr, ckpt_off_ptr,
    # outputs: the span buffers of every span, (B, n_ckpt, interval + 1, ...)
    alpha_ws_ptr, sigma_ws_ptr, off_ws_ptr,
    # workspace: a ring a program
    ring_ws_ptr,
    # sizes
    T, K, C, interval, n_ckpt,
    # meta-parameters
    DD: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """FLASHSEMICRF_TRITON_RECOMPUTE=spans: program b * n_ckpt + j recomputes
    span j of sequence b, all spans at once; _backward_kernel with RECOMPUTED
    then only sweeps. Spans past a sequence's end, and the spans of a
    sequence with no valid segmentation (the sweep skips them), do nothing."""
    span = tl.program_id(0).to(tl.int64)
    b = span // n_ckpt
    j = span - b * n_ckpt
    inputs = _sequence_inputs(b, T, C, scores_ptr, trans_ptr, dur_ptr, start_tr_ptr, end_tr_ptr,
                              start_sc_ptr, end_sc_ptr)
    L = tl.load(lengths_ptr + b)
    S = 2 * K if DD else K
    last_span = tl.minimum(L // interval, n_ckpt - 1)
    if (j <= last_span) & (tl.load(log_z_ptr + b) != float("-inf")):
        rows = span * (interval + 1)
        _recompute_span(
            j, L, last_span, ring_ws_ptr + span * S * C_PAD, ckpt_ptr + b * n_ckpt * S * C,
            ckpt_off_ptr + b * n_ckpt, alpha_ws_ptr + rows * C_PAD, sigma_ws_ptr + rows * C_PAD,
            off_ws_ptr + rows, _transition_tile(trans_ptr, C, C_PAD, DD), inputs, T, K, C,
            interval, DD, HAS_START, HAS_END, C_PAD, BLOCK_D)


@triton.jit
def _copy_rows(src, dst, rows, C_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """``rows`` rows of C_PAD elements from src to dst."""
    cs = tl.arange(0, C_PAD)
    rs = tl.arange(0, BLOCK_D)
    tl.debug_barrier()
    for r0 in range(0, rows, BLOCK_D):
        r = r0 + rs
        rok = r < rows
        r = tl.where(rok, r, 0)
        ptrs = r[:, None] * C_PAD + cs[None, :]
        tl.store(dst + ptrs, tl.load(src + ptrs), mask=rok[:, None])
    tl.debug_barrier()


@triton.jit
def _tau(back, tK, dur_ptr, dmax, K, C, C_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """tau[t, c] = LSE_d (ring entry of [t, t+d) + duration), d <= dmax: the
    backward score of "a label-c segment starts at t", from the backward
    ring at step t (slot tK = t % K)."""
    cs = tl.arange(0, C_PAD)
    cm = cs < C
    ds = tl.arange(0, BLOCK_D)
    tau_max = tl.full([C_PAD], float("-inf"), back.dtype.element_ty)
    tau_sum = tl.zeros([C_PAD], back.dtype.element_ty)
    tl.debug_barrier()
    for k in range(0, tl.cdiv(dmax, BLOCK_D)):
        d = k * BLOCK_D + 1 + ds
        dok = d <= dmax
        d_row = tl.where(dok, d - 1, 0)
        ok = dok[:, None] & cm[None, :]
        slot = _ring_slot(tK, tl.where(dok, d, 0), K)
        x = tl.load(back + slot[:, None] * C_PAD + cs[None, :])
        x = tl.where(ok, x + _durations(dur_ptr, d_row, ok, C, C_PAD), float("-inf"))
        tau_max, tau_sum = _lse_update(tau_max, tau_sum, x, 0)
    return _lse_finish(tau_max, tau_sum)


@triton.jit
def _warm_up_back(
    e0, last, L, Q, back, trans_tile, end_tr, alpha_next, off_next, ckpt_next, ckpt_off_next,
    log_z64, inputs, K, C, HAS_START: tl.constexpr, HAS_END: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The parallel sweeps' start (static transition): the backward ring from
    position e0 down to step ``last``, without posteriors. At e0 = L it
    starts as the serial sweep does; below L from a guess, a sequence that
    ends at e0 with every label alike, which the ring forgets as the chunked
    forward's chunks forget theirs (its junction checks that it has). At
    last + 1, the next span's first position (its checkpoint, its alpha_hat
    row alpha_next at offset off_next), Q is anchored as the serial sweep
    re-anchors it at a checkpoint, so that the guess's scale never reaches a
    posterior. Returns (Q, anchored)."""
    scores_ptr, start_sc_ptr, end_sc_ptr, dur_ptr = inputs[0], inputs[5], inputs[6], inputs[2]
    DT = scores_ptr.dtype.element_ty
    cs = tl.arange(0, C_PAD)
    cm = cs < C
    anchored = tl.full([], 0, tl.int1)
    for i in range(0, e0 - last):
        t = e0 - i
        tK = _step_slot(t, K)
        if t == e0:
            beta = tl.where(t == L, end_tr, tl.where(cm, 0.0, float("-inf")).to(DT))
            Q_ring = tl.full([], 0.0, tl.float64)  # the ring is empty
        else:
            start_t = _row(start_sc_ptr, t, C, C_PAD, HAS_START)
            tau = _tau(back, tK, dur_ptr, tl.minimum(K, L - t), K, C, C_PAD, BLOCK_D)
            beta = _lse(trans_tile + (start_t + tau)[None, :], 1)
            Q_ring = Q
        beta = tl.where(cm, beta, float("-inf"))
        q = _finite_or_zero(tl.max(beta, 0))
        beta = beta - q
        Q = Q_ring + q.to(tl.float64)
        if t == last + 1:
            shift_beta = (off_next + Q - log_z64).to(DT)
            Q, anchored = _reanchor(t, tK, Q, Q_ring, alpha_next, beta, shift_beta, back,
                                    ckpt_next, ckpt_off_next, log_z64, inputs, K, C, False,
                                    C_PAD, BLOCK_D)
        emit, emit_max = _emissions(scores_ptr, t - 1, C, C_PAD)
        Q += emit_max.to(tl.float64)
        fresh = beta + _row(end_sc_ptr, t - 1, C, C_PAD, HAS_END)
        if t == e0:
            _open_back(back, tK, q, fresh, emit, K, C, True, C_PAD, BLOCK_D)
        else:
            _open_back(back, tK, q, fresh, emit, K, C, False, C_PAD, BLOCK_D)
    return Q, anchored


@triton.jit(do_not_specialize=["T", "interval", "n_ckpt", "warmup"])
def _backward_kernel(
    # inputs
    grad_ptr, scores_ptr, trans_ptr, dur_ptr, lengths_ptr, start_tr_ptr, end_tr_ptr,
    start_sc_ptr, end_sc_ptr, log_z_ptr, ckpt_ptr, ckpt_off_ptr,
    # outputs
    g_scores_ptr, g_trans_ptr, g_dur_ptr, g_start_tr_ptr, g_end_tr_ptr, g_start_sc_ptr,
    g_end_sc_ptr,
    # workspace
    ring_ws_ptr, back_ws_ptr, alpha_ws_ptr, sigma_ws_ptr, off_ws_ptr,
    # the parallel sweeps' (any pointer otherwise): coverage past a span's
    # end, the rings at the junctions, spans that could not anchor; the
    # sequences a REDO launch takes
    spill_ptr, junction_ptr, unanchored_ptr, redo_ptr,
    # sizes
    T, K, C, interval, n_ckpt, warmup,
    # meta-parameters
    DD: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
    WANT_START: tl.constexpr, WANT_END: tl.constexpr, FLUSH: tl.constexpr,
    RECOMPUTED: tl.constexpr, PARALLEL: tl.constexpr, REDO: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The gradients of sequence b: span after span, last first, the span's
    forward messages recomputed into the span buffers (or, with RECOMPUTED,
    read from _recompute_kernel's, one set a span), then the backward
    messages swept through them. REDO: only the sequences redo marks.

    PARALLEL (static transition, RECOMPUTED): program b * n_ckpt + j sweeps
    span j of sequence b alone, starting from _warm_up_back's ring; its
    transition and duration sums go to rows of their own (the launcher adds
    them up), the coverage of positions past its span to its spill rows,
    and it saves the ring it warmed up with (junction row 0) and the ring it
    ends with (row 1) for the launcher to compare."""
    pid = tl.program_id(0).to(tl.int64)
    if PARALLEL:
        b = pid // n_ckpt
        jp = pid - b * n_ckpt  # the span this program sweeps
    else:
        b = pid
        jp = pid * 0
    DT = scores_ptr.dtype.element_ty
    cs = tl.arange(0, C_PAD)
    cl = tl.minimum(cs, C - 1)
    cm = cs < C
    ds = tl.arange(0, BLOCK_D)
    inputs = _sequence_inputs(b, T, C, scores_ptr, trans_ptr, dur_ptr, start_tr_ptr, end_tr_ptr,
                              start_sc_ptr, end_sc_ptr)
    scores_ptr, start_sc_ptr, end_sc_ptr = inputs[0], inputs[5], inputs[6]
    L = tl.load(lengths_ptr + b)
    S = 2 * K if DD else K
    ckpt_ptr += b * n_ckpt * S * C
    ckpt_off_ptr += b * n_ckpt
    g_scores_ptr += b * T * C  # (T, C) of this sequence, like the boundary gradients
    g_start_sc_ptr += b * T * C
    g_end_sc_ptr += b * T * C
    g_trans_ptr += pid * (K * C * C if DD else C * C)  # PARALLEL: a span's own rows
    g_dur_ptr += pid * K * C
    g_start_tr_ptr += b * C
    g_end_tr_ptr += b * C
    ring = ring_ws_ptr + b * S * C_PAD
    back = back_ws_ptr + pid * K * C_PAD  # slot e % K: the segment [t, e)
    spill_ptr += pid * K * C  # row u - last - 1: position u past the span
    junction_ptr += pid * 2 * K * C_PAD

    log_z = tl.load(log_z_ptr + b)
    g = tl.load(grad_ptr + b)
    log_z64 = log_z.to(tl.float64)
    trans_tile = _transition_tile(trans_ptr, C, C_PAD, DD)
    end_tr = _labels(end_tr_ptr, C, C_PAD, float("-inf"))
    # Shared parameters sum over T positions: accumulated in float64 in the
    # gradient buffers (the launcher returns them in DT); the static
    # transition's terms pass through a register tile in DT, flushed every
    # FLUSH positions.
    g_trans_acc = tl.zeros([C_PAD, C_PAD], DT)
    ok2 = (cs[:, None] < C) & (cs[None, :] < C)
    g_trans_2d = g_trans_ptr + cl[:, None] * C + cl[None, :]
    Q = tl.full([], 0.0, tl.float64)  # backward offset
    last_span = tl.minimum(L // interval, n_ckpt - 1)
    # A sequence with no valid segmentation keeps its zero gradients.
    if PARALLEL:
        top = jp
        n_spans = tl.where((log_z == float("-inf")) | (jp > last_span), 0, 1)
    else:
        top = last_span
        n_spans = tl.where(log_z == float("-inf"), 0, last_span + 1)
    if REDO:
        n_spans = tl.where(tl.load(redo_ptr + b) != 0, n_spans, 0)
    for jj in range(0, n_spans):
        j = top - jj
        first = j * interval
        last = tl.where(j == last_span, L, first + interval - 1)

        # The span's forward messages, in the span buffers.
        if RECOMPUTED:
            rows = (b * n_ckpt + j) * (interval + 1)
        else:
            rows = b * (interval + 1)
        alpha_buf = alpha_ws_ptr + rows * C_PAD
        sigma_buf = sigma_ws_ptr + rows * C_PAD
        off_buf = off_ws_ptr + rows
        if not RECOMPUTED:
            _recompute_span(j, L, last_span, ring, ckpt_ptr, ckpt_off_ptr, alpha_buf, sigma_buf,
                            off_buf, trans_tile, inputs, T, K, C, interval, DD, HAS_START,
                            HAS_END, C_PAD, BLOCK_D)
        if PARALLEL:
            if j < last_span:
                # The next span's first row: position last + 1.
                nxt = rows + interval + 1
                _fill(back, K, C_PAD, float("-inf"), C_PAD, BLOCK_D)
                Q, anchored = _warm_up_back(
                    tl.minimum(L, last + 1 + warmup), last, L, Q, back, trans_tile, end_tr,
                    tl.load(alpha_ws_ptr + nxt * C_PAD + cs), tl.load(off_ws_ptr + nxt),
                    ckpt_ptr + (j + 1) * S * C, tl.load(ckpt_off_ptr + j + 1), log_z64, inputs,
                    K, C, HAS_START, HAS_END, C_PAD, BLOCK_D)
                tl.store(unanchored_ptr + pid, tl.where(anchored, 0, 1))
                _copy_rows(back, junction_ptr, K, C_PAD, BLOCK_D)

        # Sweep the backward messages through the span, last position first.
        for i in range(0, last - first + 1):
            t = last - i
            alpha = tl.load(alpha_buf + (t - first) * C_PAD + cs)
            sigma = tl.load(sigma_buf + (t - first) * C_PAD + cs)
            off = tl.load(off_buf + (t - first))
            if t == L:
                # log Z again, in float64: the forward's value carries the
                # compute dtype's rounding, too coarse to normalise the
                # posteriors of a long sequence.
                log_z64 = off + _lse(alpha + end_tr, 0).to(tl.float64)
                # Initialise: beta[L] = end_transition; the last segment ends at L.
                q = _finite_or_zero(tl.max(end_tr, 0))
                beta = end_tr - q
                Q = q.to(tl.float64)
                shift = (off + Q - log_z64).to(DT)
                mass = tl.where(cm, tl.exp(alpha + beta + shift) * g, 0.0)
                tl.store(g_end_tr_ptr + cl, mass, mask=cm)
                if WANT_END:
                    tl.store(g_end_sc_ptr + (L - 1) * C + cl, mass, mask=cm)
                # As in the forward, the emissions' maximum moves into the offset.
                emit, emit_max = _emissions(scores_ptr, L - 1, C, C_PAD)
                Q += emit_max.to(tl.float64)
                fresh = beta + _row(end_sc_ptr, L - 1, C, C_PAD, HAS_END)
                _open_back(back, _step_slot(L, K), q, fresh, emit, K, C, True, C_PAD, BLOCK_D)
            else:
                shift = (off + Q - log_z64).to(DT)
                start_t = _row(start_sc_ptr, t, C, C_PAD, HAS_START)
                dmax = tl.minimum(K, L - t)
                n_chunks = tl.cdiv(dmax, BLOCK_D)
                covered = tl.zeros([C_PAD], DT)  # posterior mass of the longer segments
                tau_max = tl.full([C_PAD], float("-inf"), DT)
                tau_sum = tl.zeros([C_PAD], DT)
                beta_max = tl.full([C_PAD], float("-inf"), DT)
                beta_sum = tl.zeros([C_PAD], DT)
                tK = _step_slot(t, K)
                tl.debug_barrier()
                # Segments [t, t+d), longest first so coverage accumulates.
                for k in range(0, n_chunks):
                    d = (n_chunks - 1 - k) * BLOCK_D + 1 + ds
                    dok = d <= dmax
                    d_row = tl.where(dok, d - 1, 0)
                    ok = dok[:, None] & cm[None, :]
                    slot = _ring_slot(tK, tl.where(dok, d, 0), K)
                    dur = _durations(dur_ptr, d_row, ok, C, C_PAD)
                    x = tl.load(back + slot[:, None] * C_PAD + cs[None, :]) + dur
                    x = tl.where(ok, x, float("-inf"))  # (BLOCK_D, C_PAD)
                    if DD:
                        tr, ok3 = _transitions(trans_ptr, d_row, dok, C, C_PAD)  # (BLOCK_D, C', C)
                        enter = _lse(alpha[None, :, None] + tr, 1) + start_t[None, :]
                        enter = tl.where(t > 0, enter, sigma[None, :])
                        # Label-to-label terms (t = 0 has alpha = -inf: they vanish).
                        joint = tr + (start_t[None, :] + x)[:, None, :]
                        g_tr = tl.exp(alpha[None, :, None] + joint + shift) * g
                        g_tr = tl.where(ok3, g_tr, 0.0)
                        gt_ptrs = (g_trans_ptr + d_row[:, None, None] * C * C
                                   + cl[None, :, None] * C + cl[None, None, :])
                        tl.store(gt_ptrs, tl.load(gt_ptrs, mask=ok3, other=0.0)
                                 + g_tr.to(tl.float64), mask=ok3)
                        chunk_max = tl.max(tl.max(joint, 2), 0)  # (C',)
                        new_max = tl.maximum(beta_max, chunk_max)
                        base = tl.where(new_max == float("-inf"), 0.0, new_max)
                        beta_sum = beta_sum * tl.exp(beta_max - base) + tl.sum(
                            tl.sum(tl.exp(joint - base[None, :, None]), 2), 0)
                        beta_max = new_max
                    else:
                        enter = sigma[None, :]
                        tau_max, tau_sum = _lse_update(tau_max, tau_sum, x, 0)
                    post = tl.where(ok, tl.exp(enter + x + shift) * g, 0.0)
                    gd_ptrs = g_dur_ptr + d_row[:, None] * C + cl[None, :]
                    tl.store(gd_ptrs, tl.load(gd_ptrs, mask=ok, other=0.0) + post.to(tl.float64),
                             mask=ok)
                    # Position t+d-1 lies in every segment [t, t+d') with d' >= d.
                    cover = covered[None, :] + tl.cumsum(post, 0, reverse=True)
                    covered += tl.sum(post, 0)
                    pos = tl.where(dok, t + d - 1, t)
                    if PARALLEL:
                        # Positions past the span: its spill rows.
                        past = (pos > last)[:, None]
                        own = ok & ~past
                        gs_ptrs = g_scores_ptr + pos[:, None] * C + cl[None, :]
                        tl.store(gs_ptrs, tl.load(gs_ptrs, mask=own, other=0.0) + cover,
                                 mask=own)
                        row = tl.where(pos > last, pos - last - 1, 0)
                        sp_ptrs = spill_ptr + row[:, None] * C + cl[None, :]
                        tl.store(sp_ptrs, tl.load(sp_ptrs, mask=ok & past, other=0.0) + cover,
                                 mask=ok & past)
                    else:
                        gs_ptrs = g_scores_ptr + pos[:, None] * C + cl[None, :]
                        tl.store(gs_ptrs, tl.load(gs_ptrs, mask=ok, other=0.0) + cover,
                                 mask=ok)
                if WANT_START:
                    tl.store(g_start_sc_ptr + t * C + cl, covered, mask=cm)
                if t == 0:
                    tl.store(g_start_tr_ptr + cl, covered, mask=cm)
                else:
                    # beta[t, c']: the backward score of "a segment ended at t".
                    if DD:
                        beta = _lse_finish(beta_max, beta_sum)
                    else:
                        into = start_t + _lse_finish(tau_max, tau_sum)  # start score + tau
                        joint2 = trans_tile + into[None, :]  # (C', C)
                        g_tr2 = tl.exp(alpha[:, None] + joint2 + shift) * g
                        g_trans_acc += tl.where(ok2, g_tr2, 0.0)
                        beta = _lse(joint2, 1)
                    beta = tl.where(cm, beta, float("-inf"))
                    q = _finite_or_zero(tl.max(beta, 0))
                    beta = beta - q
                    Q_ring = Q  # the backward ring is still relative to this offset
                    Q += q.to(tl.float64)
                    shift_beta = (off + Q - log_z64).to(DT)
                    if WANT_END:
                        tl.store(g_end_sc_ptr + (t - 1) * C + cl,
                                 tl.exp(alpha + beta + shift_beta) * g, mask=cm)
                    if t == first:
                        # Re-anchor Q at every checkpoint: a segment boundary
                        # at t, or one segment across t, has probability 1, so
                        # the rounding that forward and backward gather over
                        # (t, L] cannot pile up over the whole sequence.
                        Q, _anchored = _reanchor(
                            t, tK, Q, Q_ring, alpha, beta, shift_beta, back,
                            ckpt_ptr + j * S * C, tl.load(ckpt_off_ptr + j), log_z64,
                            inputs, K, C, DD, C_PAD, BLOCK_D)
                    # Move the ring to step t-1: re-base, open the segments ending
                    # at t, add position t-1's emissions (their maximum into Q).
                    emit, emit_max = _emissions(scores_ptr, t - 1, C, C_PAD)
                    Q += emit_max.to(tl.float64)
                    fresh = beta + _row(end_sc_ptr, t - 1, C, C_PAD, HAS_END)
                    _open_back(back, tK, q, fresh, emit, K, C, False, C_PAD, BLOCK_D)
            if not DD:
                if (i % FLUSH == FLUSH - 1) | (i == last - first):
                    total = tl.load(g_trans_2d, mask=ok2, other=0.0) + g_trans_acc.to(tl.float64)
                    tl.store(g_trans_2d, total, mask=ok2)
                    g_trans_acc = tl.zeros([C_PAD, C_PAD], DT)
        tl.debug_barrier()
        if PARALLEL:
            if j > 0:  # the ring moved to step first - 1, for span j - 1's junction
                _copy_rows(back, junction_ptr + K * C_PAD, K, C_PAD, BLOCK_D)


# --------------------------------------------------------------------------
# Viterbi: the max semiring scan, checkpointed, and a span-by-span traceback
# --------------------------------------------------------------------------


@triton.jit
def _trace_span(t, c, need_previous, first, bp_d, bp_c, label_ptr, C, C_PAD: tl.constexpr,
                DD: tl.constexpr):
    """Follow the best path back while its next lookup lies in the span whose
    rows first … are in (bp_d, bp_c): from the segment ending at t with label c
    (or, when ``need_previous``, the static transition's previous label, read
    at the start row t of the segment just written), writing each segment's
    label at its start. Returns (t, c, need_previous) where the walk leaves
    the span (t < first) or reaches 0. Pointers are clamped into range, so a
    NaN score cannot send an address out of range."""
    while (t >= first) & (t > 0):
        row = (t - first) * C_PAD + c
        d = tl.load(bp_d + row).to(tl.int64)
        prev = tl.load(bp_c + row)
        prev = tl.minimum(tl.maximum(prev, 0), C - 1).to(tl.int32)
        d = tl.minimum(tl.maximum(d, 1), t)
        s = t - d
        ends_here = need_previous == 0  # (K, C, C): never a pending lookup
        tl.store(label_ptr + s, c.to(tl.int64), mask=ends_here)
        if DD:
            # The previous label was chosen with the duration, at row t.
            c = tl.where(s > 0, prev, c)
            t = s
        else:
            # Chosen when sigma[s] was formed: row s, maybe in an earlier span.
            c = tl.where(need_previous, prev, c)
            t = tl.where(need_previous, t, s)
            need_previous = ends_here & (s > 0)
    return t, c, need_previous


@triton.jit(do_not_specialize=["T", "interval", "n_ckpt"])
def _viterbi_kernel(
    # inputs
    scores_ptr, trans_ptr, dur_ptr, lengths_ptr, start_tr_ptr, end_tr_ptr, start_sc_ptr,
    end_sc_ptr,
    # outputs and workspace
    best_ptr, label_ptr, ring_ws_ptr, ckpt_ptr, ckpt_off_ptr, bp_d_ptr, bp_c_ptr,
    # sizes
    T, K, C, interval, n_ckpt,
    # meta-parameters
    DD: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Memory O(√(T·K)·C) per sequence instead of O(T·C) backpointers: the
    max-semiring scan saves the ring every ``interval`` steps (as the forward
    does for the backward), then each span, last first, is recomputed from its
    checkpoint with its backpointers into (interval + 1) rows and the path is
    followed through it. The scan state at a checkpoint is the ring and its
    offset, so the recomputed backpointers are the first pass's, bit for bit."""
    b = tl.program_id(0).to(tl.int64)
    DT = scores_ptr.dtype.element_ty
    cs = tl.arange(0, C_PAD)
    cm = cs < C
    inputs = _sequence_inputs(b, T, C, scores_ptr, trans_ptr, dur_ptr, start_tr_ptr, end_tr_ptr,
                              start_sc_ptr, end_sc_ptr)
    L = tl.load(lengths_ptr + b)
    S = 2 * K if DD else K
    ring = ring_ws_ptr + b * S * C_PAD
    ckpt_ptr += b * n_ckpt * S * C  # (N, S, C) of this sequence
    ckpt_off_ptr += b * n_ckpt
    bp_d_ptr += b * (interval + 1) * C_PAD  # (interval+1, C_PAD) int32: best duration
    bp_c_ptr += b * (interval + 1) * C_PAD  # (interval+1, C_PAD) int32: best previous label
    label_ptr += b * T
    trans_tile = _transition_tile(trans_ptr, C, C_PAD, DD)
    end_tr = _labels(end_tr_ptr, C, C_PAD, float("-inf"))
    _fill(ring, S, C_PAD, float("-inf"), C_PAD, BLOCK_D)
    offset = tl.full([], 0.0, tl.float64)
    last_span = tl.minimum(L // interval, n_ckpt - 1)
    t_path = L * 0  # where the path's next lookup is; 0 once traced (or no path)
    c = tl.full([], 0, tl.int32)
    need_previous = tl.full([], False, tl.int1)
    next_save = L * 0
    # Pass 0 scans the sequence; pass i >= 1 recomputes span last_span - i + 1
    # and walks the path through it. One loop, so that the step is inlined
    # once (twice spilled registers at C = 24).
    for i in range(0, last_span + 2):
        j = last_span + 1 - i
        lo = tl.where(i == 0, 0, j * interval)
        hi = tl.where(i == 0, L, tl.where(j == last_span, L, lo + interval - 1))
        if (i > 0) & ((t_path < lo) | (t_path == 0)):
            hi = lo - 1  # the path is traced beyond this span already
        if (i > 0) & (hi >= lo):
            _copy_checkpoint(lo, ring, ckpt_ptr + j * S * C, K, C, False, DD, C_PAD, BLOCK_D)
            offset = tl.load(ckpt_off_ptr + j)
        for t in range(lo, hi + 1):
            if (i == 0) & (t == next_save) & (t < T):
                _copy_checkpoint(t, ring, ckpt_ptr + (t // interval) * S * C, K, C, True, DD,
                                 C_PAD, BLOCK_D)
                tl.store(ckpt_off_ptr + t // interval, offset)
                next_save += interval
            alpha, _sigma, o_t, offset, best_d, best_prev = _step_and_advance(
                t, t < L, offset, ring, trans_tile, inputs, T, K, C, True, DD, HAS_START,
                HAS_END, C_PAD, BLOCK_D)
            if i > 0:
                # Static: the previous label was chosen when sigma[t] was
                # formed; duration-dependent: with the duration at alpha[t].
                tl.store(bp_d_ptr + (t - lo) * C_PAD + cs, best_d)
                tl.store(bp_c_ptr + (t - lo) * C_PAD + cs, best_prev)
            if (i == 0) & (t == L):
                top, arg = _first_argmax(tl.where(cm, alpha + end_tr, float("-inf")), cs, 0)
                best = (o_t + top.to(tl.float64)).to(DT)
                tl.store(best_ptr + b, best)
                if best > float("-inf"):  # -inf or NaN: no path to trace
                    t_path = L
                    c = tl.minimum(arg, C - 1).to(tl.int32)
        if (i > 0) & (hi >= lo):
            tl.debug_barrier()
            t_path, c, need_previous = _trace_span(t_path, c, need_previous, lo, bp_d_ptr,
                                                   bp_c_ptr, label_ptr, C, C_PAD, DD)
            tl.debug_barrier()  # the walk's reads before the next span's writes


# --------------------------------------------------------------------------
# Filter: the forward messages at every boundary (for sampling)
# --------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _filter_kernel(
    # inputs
    scores_ptr, trans_ptr, dur_ptr, lengths_ptr, start_tr_ptr, end_tr_ptr, start_sc_ptr,
    end_sc_ptr,
    # outputs and workspace
    alpha_ptr, sigma_ptr, offset_ptr, ring_ws_ptr,
    # sizes
    T, K, C,
    # meta-parameters
    DD: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, C_PAD)
    cl = tl.minimum(cs, C - 1)
    cm = cs < C
    inputs = _sequence_inputs(b, T, C, scores_ptr, trans_ptr, dur_ptr, start_tr_ptr, end_tr_ptr,
                              start_sc_ptr, end_sc_ptr)
    L = tl.load(lengths_ptr + b)
    S = 2 * K if DD else K
    alpha_ptr += b * (T + 1) * C
    sigma_ptr += b * (T + 1) * C
    offset_ptr += b * (T + 1)
    ring = ring_ws_ptr + b * S * C_PAD
    trans_tile = _transition_tile(trans_ptr, C, C_PAD, DD)
    _fill(ring, S, C_PAD, float("-inf"), C_PAD, BLOCK_D)
    offset = tl.full([], 0.0, tl.float64)
    for t in range(0, L + 1):
        alpha, sigma, o_t, offset, _bd, _bp = _step_and_advance(
            t, t < L, offset, ring, trans_tile, inputs, T, K, C, False, DD, HAS_START, HAS_END,
            C_PAD, BLOCK_D)
        tl.store(offset_ptr + t, o_t)
        if t > 0:
            tl.store(alpha_ptr + t * C + cl, alpha, mask=cm)
        if t < L:
            # Duration-dependent: sigma exists only at 0 (the label step is in alpha).
            if DD:
                if t == 0:
                    tl.store(sigma_ptr + t * C + cl, sigma, mask=cm)
            else:
                tl.store(sigma_ptr + t * C + cl, sigma, mask=cm)
