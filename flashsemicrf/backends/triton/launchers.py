"""Launchers of the Triton kernels, defined as the ops ``flashsemicrf_triton::*``.

Same schemas, outputs, fakes and autograd formula as the C++ ops
(flashsemicrf/_contract.py). Each launcher checks its arguments (for direct
calls: the public functions validate first), makes every input contiguous
(the kernels take no strides), allocates the outputs and the workspace, and
launches one program per sequence (per chunk or span where a switch asks).

Compiled kernels are defined with ``torch.library.triton_op``, so
torch.compile sees the kernels; interpreted ones (TRITON_INTERPRET=1) with
``torch.library.custom_op``, opaque to torch.compile, because an interpreted
kernel cannot run on the fake tensors a decomposition traces with.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from ... import _contract
from . import INTERPRET, NAMESPACE, kernels

Tensor = torch.Tensor

# Elements of one (BLOCK_D, C_PAD) (or (BLOCK_D, C_PAD, C_PAD)) tile: bounds
# the durations swept at once. 2048 keeps the backward free of register
# spills for sm_90 at C = 24, K = 1000 and C = 9, K = 16 (ptxas -v); not tuned
# on a GPU yet. Tests lower it to exercise the chunked sweep.
TILE_ELEMENTS = 2048
NUM_WARPS = 4
# Past 4 warps only to keep big label tiles out of local memory: a static
# (C_PAD, C_PAD) tile (every kernel holds one, the backward two) or the
# (K, C, C) form's (BLOCK_D, C_PAD, C_PAD) tiles (the backward holds several)
# is spread so that each thread keeps at most TILE_REGISTERS_PER_THREAD
# 32-bit registers of one (a float64 takes two).
# ptxas -v for sm_90 (python -m bench.triton_registers), spill stores of the
# backward before -> after: float32 C = 24 (K, C, C) 16 B -> 0 (8 warps),
# float64 C = 24 232 B -> 16 B (8 warps), float32 C = 128 5.9 KB -> 1.2 KB
# (16 warps; the forward 284 B -> 0), float32 C = 64 (K, C, C) 2.4 KB ->
# 0.6 KB (16 warps). Not yet timed on a GPU.
MAX_WARPS = 16
TILE_REGISTERS_PER_THREAD = 16
# Positions whose static-transition gradient terms the backward sums in a
# register tile, in the compute dtype, before adding them to the float64 sum:
# 32 terms round to < 32·eps relative, and a float64 tile spills at C = 24
# (ptxas -v). Tests lower it to exercise the flushes.
FLUSH_POSITIONS = 32
# The chunked forward (FLASHSEMICRF_TRITON_FORWARD=chunks; docs/design.md,
# "The forward in chunks"): the CUDA kernels' warm-ups and acceptance
# (csrc/cuda/forward_kernel.cuh), None for chunk_warmup's 3K + 128 (float64
# 6K + 256) positions; tests lower it to start chunks from guesses on short
# sequences.
CHUNK_WARMUP: int | None = None
CHUNK_RETRY_WARMUP = 4
CHUNK_SLACK = {torch.float32: 2.0**-18, torch.float64: 2.0**-36}
CHUNK_ULPS = 8.0
UNIT_ROUNDING = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _check(scores, transition, duration, lengths, start_transition, end_transition,
           start_scores, end_scores):
    """The C++ ops' checks, for direct calls."""
    if scores.dim() != 3 or scores.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{NAMESPACE}: scores must be a float32 or float64 (B, T, C) "
                         f"tensor, got {scores.dtype} of shape {tuple(scores.shape)}")
    B, T, C = scores.shape
    K = duration.shape[0] if duration.dim() == 2 else -1
    expected = {
        "transition": (K, C, C) if transition.dim() == 3 else (C, C),
        "duration": (K, C),
        "lengths": (B,),
        "start_transition": (C,),
        "end_transition": (C,),
        "start_scores": (B, T, C),
        "end_scores": (B, T, C),
    }
    given = dict(transition=transition, duration=duration, lengths=lengths,
                 start_transition=start_transition, end_transition=end_transition,
                 start_scores=start_scores, end_scores=end_scores)
    for name, x in given.items():
        if x is None:
            continue
        if tuple(x.shape) != expected[name]:
            raise ValueError(f"{NAMESPACE}: {name} must have shape {expected[name]}, "
                             f"got {tuple(x.shape)}")
        want = torch.int64 if name == "lengths" else scores.dtype
        if x.dtype != want or x.device != scores.device:
            raise ValueError(f"{NAMESPACE}: {name} must be {want} on {scores.device}, "
                             f"got {x.dtype} on {x.device}")


class _Launch:
    """Sizes, tiles, the contiguous inputs and the meta-parameters of one call."""

    def __init__(self, scores, transition, duration, lengths, start_transition, end_transition,
                 start_scores, end_scores):
        _check(scores, transition, duration, lengths, start_transition, end_transition,
               start_scores, end_scores)
        self.B, self.T, self.C = scores.shape
        self.K = duration.shape[0]
        self.dd = transition.dim() == 3
        self.S = 2 * self.K if self.dd else self.K
        self.C_PAD = triton.next_power_of_2(self.C)
        per_row = self.C_PAD * self.C_PAD if self.dd else self.C_PAD
        self.BLOCK_D = max(1, min(triton.next_power_of_2(self.K), TILE_ELEMENTS // per_row))
        tile = self.BLOCK_D * per_row if self.dd else max(self.BLOCK_D * per_row,
                                                          self.C_PAD * self.C_PAD)
        words = scores.element_size() // 4
        spread = tile * words // (32 * TILE_REGISTERS_PER_THREAD) * (2 if self.dd else 1)
        self.num_warps = min(MAX_WARPS, max(1, min(NUM_WARPS, self.BLOCK_D * per_row // 256),
                                            triton.next_power_of_2(spread)))
        self.scores = scores = scores.contiguous()
        self.has_start = start_scores is not None
        self.has_end = end_scores is not None
        # Absent boundary scores: any valid pointer (never read).
        self.inputs = (
            scores, transition.contiguous(), duration.contiguous(), lengths.contiguous(),
            start_transition.contiguous(), end_transition.contiguous(),
            start_scores.contiguous() if self.has_start else scores,
            end_scores.contiguous() if self.has_end else scores,
        )
        self.meta = dict(DD=self.dd, HAS_START=self.has_start, HAS_END=self.has_end,
                         C_PAD=self.C_PAD, BLOCK_D=self.BLOCK_D, num_warps=self.num_warps)

    def empty(self, *shape, dtype=None):
        return torch.empty(shape, dtype=dtype or self.scores.dtype, device=self.scores.device)

    def zeros(self, *shape, dtype=None):
        return torch.zeros(shape, dtype=dtype or self.scores.dtype, device=self.scores.device)

    def ring_workspace(self):
        return self.empty(self.B, self.S, self.C_PAD)


def _chunk_plan(p: _Launch, interval: int, n_ckpt: int) -> tuple[int, int, int]:
    """(warm-up, checkpoint spans a chunk, chunks a sequence), as the CUDA
    kernels' chunked(): enough spans a chunk that its warm-up is no longer
    than its own positions."""
    warmup = CHUNK_WARMUP
    if warmup is None:
        warmup = 6 * p.K + 256 if p.scores.dtype == torch.float64 else 3 * p.K + 128
    spans = 1 if warmup <= interval else -(-warmup // interval)
    return warmup, spans, -(-n_ckpt // spans)


def _join_chunks(p: _Launch, ring, offset, junction, junction_offset, log_z64, interval,
                 n_ckpt, chunks, spans):
    """The junctions of every sequence at once (junction_kernel of the CUDA
    kernels, in tensor ops): chunk j's ring at its first checkpoint against
    the ring chunk j - 1 ended with, in float64 logs, one shift fitting every
    entry's allowance. Returns (accepted (B,), the float64 shift of every
    checkpoint (B, n_ckpt), log Z's (B,))."""
    B = p.B
    saved = torch.clamp(p.inputs[3] // interval + 1, max=n_ckpt)
    count = (saved + spans - 1) // spans  # chunks that start at or before L
    firsts = torch.arange(1, chunks, device=ring.device) * spans  # (J,) checkpoints
    began = ring[:, firsts].reshape(B, chunks - 1, -1).double()
    ended = junction.view(B, chunks, -1)[:, :-1].double()
    base = junction_offset.view(B, chunks)[:, :-1] - offset[:, firsts]
    empty = (ended == -math.inf) & (began == -math.inf)
    r = (ended - began) + base[..., None]
    bad = (~empty & ~torch.isfinite(r)).any(-1)
    allowance = CHUNK_SLACK[p.scores.dtype] + CHUNK_ULPS * UNIT_ROUNDING[p.scores.dtype] * \
        torch.maximum(ended.abs(), began.abs())
    lo = torch.where(empty | bad[..., None], -math.inf, r - allowance).amax(-1)
    hi = torch.where(empty | bad[..., None], math.inf, r + allowance).amin(-1)
    valid = torch.arange(1, chunks, device=ring.device)[None, :] < count[:, None]  # (B, J)
    accepted = (valid.logical_not() | (~bad & (lo <= hi))).all(1)
    fits = valid & torch.isfinite(hi)
    shift = torch.cumsum(torch.where(fits, 0.5 * (lo + hi), 0.0), 1)  # chunks 1 … J
    shift = torch.cat([shift.new_zeros(B, 1), shift], 1)  # chunk 0
    per_ckpt = shift.repeat_interleave(spans, 1)[:, :n_ckpt]
    kept = torch.arange(n_ckpt, device=ring.device)[None, :] < saved[:, None]
    per_ckpt = torch.where(kept, per_ckpt, 0.0)  # past the end: offsets stay 0
    total = shift.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]
    return accepted, per_ckpt, log_z64 + total


def _chunked_forward(p: _Launch, interval, n_ckpt, log_z, ring, offset):
    """The chunked forward (static transition, two chunks or more): the chunks,
    their junctions, a second try with a longer warm-up for the sequences the
    first rejected, and the serial forward for those rejected twice. Returns
    the sequences accepted at the first try and at the last (B,)."""
    warmup, spans, chunks = _chunk_plan(p, interval, n_ckpt)
    junction = p.empty(p.B * chunks, p.K, p.C)
    junction_offset = p.empty(p.B * chunks, dtype=torch.float64)
    log_z64 = p.empty(p.B, dtype=torch.float64)
    workspace = p.empty(p.B * chunks, p.K, p.C_PAD)
    redo = p.inputs[3]  # any pointer: not read without REDO
    for retry in (False, True):
        if retry:
            redo = accepted.logical_not().to(torch.int32)
        _launch_forward(p, (p.B * chunks,), log_z, log_z64, ring, offset, junction,
                        junction_offset, workspace, redo, interval, n_ckpt, chunks, spans,
                        warmup * (CHUNK_RETRY_WARMUP if retry else 1), retry)
        accepted, shift, joined = _join_chunks(p, ring, offset, junction, junction_offset,
                                               log_z64, interval, n_ckpt, chunks, spans)
        if not retry:
            first_try = accepted
    offset.add_(torch.where(accepted[:, None], shift, 0.0))
    log_z.copy_(joined.to(log_z.dtype))
    _serial_forward(p, log_z, ring, offset, interval, n_ckpt,
                    redo=accepted.logical_not().to(torch.int32))
    return first_try, accepted


def _launch_forward(p: _Launch, grid, log_z, log_z64, ring, offset, junction, junction_offset,
                    workspace, redo, interval, n_ckpt, chunks, spans, warmup, REDO):
    torch.library.wrap_triton(kernels._forward_kernel)[grid](
        *p.inputs, log_z, log_z64, ring, offset, junction, junction_offset, workspace, redo,
        p.T, p.K, p.C, interval, n_ckpt, chunks, spans, warmup, REDO=REDO, **p.meta)


def _serial_forward(p: _Launch, log_z, ring, offset, interval, n_ckpt, redo=None):
    """One program a sequence (only the sequences `redo` marks, if given): the
    one-chunk case of the kernel, whose junction and float64 log Z pointers
    are then never written (any valid ones are passed)."""
    _launch_forward(p, (p.B,), log_z, offset, ring, offset, ring, offset, p.ring_workspace(),
                    p.inputs[3] if redo is None else redo, interval, n_ckpt, 1, n_ckpt, 0,
                    redo is not None)


# The exp-domain forward (FLASHSEMICRF_TRITON_ALGORITHM=exp): exp_domain.h's
# constants, which its tables share with the kernel.
EXP_UP = 1.0 + 1e-6
CERTIFY_RATIO = {torch.float32: 2.0**24, torch.float64: 2.0**53}


def _exp_tables(p: _Launch):
    """The exp-domain forward's per-call tables, padded to C_PAD labels:
    exp_domain.h's weight_column and transition_column (W = exp(duration -
    its column maximum), A = exp(transition - its column maximum) in the
    dtype, 0 below the smallest normal, with bounds on what that flushed),
    and the labels that can reach an end, a least fixed point over the
    finite transitions taken as a transitive closure (ceil(log2 C) boolean
    products: no data-dependent loop on the host). Returns (W (K, C_PAD),
    A (C_PAD, C_PAD), A's float64 bounds, float64 rows (duration maxima,
    column maxima, flushed weights' and transitions' bounds in units of the
    smallest normal), dtype rows (smallest positive weight and transition),
    each label's last finite duration where it can reach an end, else 0
    (int32), and 1 where a parameter is NaN or +inf (int32 (1,)))."""
    dt, dev = p.scores.dtype, p.scores.device
    tiny = torch.finfo(dt).tiny
    floor = torch.finfo(torch.float64).tiny
    K, C, C_PAD = p.K, p.C, p.C_PAD
    transition, duration, start_tr, end_tr = (p.inputs[i] for i in (1, 2, 4, 5))
    neg, inf = -math.inf, math.inf

    def column_tables(scores):
        """(N, C) scores exp'd per column against its maximum (0 for none):
        (the table, what flushed in units of tiny per column, the maxima,
        each entry's float64 bound, rounded up, never to 0 but for -inf)."""
        x = scores.double()
        top = x.amax(0)
        top = torch.where(top == neg, 0.0, top)
        x = x - top
        bound = torch.where(x > neg, torch.clamp(torch.exp(x) * EXP_UP, min=floor), 0.0)
        table = torch.exp(x.to(dt))
        flushed = table < tiny
        return (torch.where(flushed, 0.0, table), torch.where(flushed, bound, 0.0).sum(0) / tiny,
                top, bound)

    weight, weight_lost, dur_max, _ = column_tables(duration)
    weight_lost = 2.0 * weight_lost  # entries are at most 1 when they meet a weight
    a, a_lost, col_max, a_bound = column_tables(transition)
    minpos = [torch.where(x > 0, x, inf).amin(0) for x in (weight, a)]
    raw_last = torch.where(duration > neg, torch.arange(1, K + 1, device=dev)[:, None], 0).amax(0)
    # c reaches an end if it has a duration and ends, or transitions into a
    # label that reaches one: closure of "one step" (rows of labels with a
    # duration) and "stay" by repeated squaring.
    step = ((transition > neg) & (raw_last > 0)[:, None]) | torch.eye(C, dtype=torch.bool,
                                                                         device=dev)
    for _ in range(max(1, (C - 1).bit_length())):
        step = (step.double() @ step.double()) > 0
    reach = (step.double() @ ((raw_last > 0) & (end_tr > neg)).double()) > 0
    last = torch.where(reach, raw_last, 0)
    unbound = torch.stack([~(x < inf).all() for x in (transition, duration, start_tr, end_tr)])

    def padded(x, value, dtype, square=False):  # labels (the last axis, and the first) to C_PAD
        pad = [0, C_PAD - C] + ([0, C_PAD - C] if square else [])
        return torch.nn.functional.pad(x.to(dtype), pad, value=value).contiguous()

    return (padded(weight, 0.0, dt), padded(a, 0.0, dt, True),
            padded(a_bound, 0.0, torch.float64, True),
            padded(torch.stack([dur_max, col_max, weight_lost, a_lost]), 0.0, torch.float64),
            padded(torch.stack(minpos), inf, dt), padded(last, 0, torch.int32),
            unbound.any().to(torch.int32).reshape(1))


def _exp_forward(p: _Launch, log_z, ring, offset, interval, n_ckpt):
    """The exp-domain forward (static transition), then the log-domain forward
    for the sequences whose log Z it could not certify. Returns the
    certified sequences (B,)."""
    dt = p.scores.dtype
    redo = p.empty(p.B, dtype=torch.int32)
    torch.library.wrap_triton(kernels._exp_forward_kernel)[(p.B,)](
        *p.inputs, *_exp_tables(p), log_z, ring, offset, p.empty(p.B, p.K, p.C_PAD), redo,
        p.T, p.K, p.C, interval, n_ckpt, F64=dt == torch.float64, TINY=torch.finfo(dt).tiny,
        BIG=torch.finfo(dt).max, RHO=CERTIFY_RATIO[dt], **p.meta)
    _serial_forward(p, log_z, ring, offset, interval, n_ckpt, redo=redo)
    return redo == 0


def _switch(name: str, on: str, off: str) -> bool:
    """The environment switch ``name``: ``on``, or ``off`` (the default, also
    when unset or empty). Read at each call (a torch.compile graph keeps
    what it read when traced)."""
    value = os.environ.get(name, "") or off
    if value not in (on, off):
        raise ValueError(f"{name} must be '{on}' or '{off}' (or unset), got {value!r}")
    return value == on


def uses_exp_forward() -> bool:
    """FLASHSEMICRF_TRITON_ALGORITHM: ``exp``, or ``log`` (the default)."""
    return _switch("FLASHSEMICRF_TRITON_ALGORITHM", "exp", "log")


def uses_chunked_forward() -> bool:
    """FLASHSEMICRF_TRITON_FORWARD: ``chunks``, or ``serial`` (the default)."""
    return _switch("FLASHSEMICRF_TRITON_FORWARD", "chunks", "serial")


def uses_span_recompute() -> bool:
    """FLASHSEMICRF_TRITON_RECOMPUTE: ``spans``, or ``sweep`` (the default)."""
    return _switch("FLASHSEMICRF_TRITON_RECOMPUTE", "spans", "sweep")


def uses_parallel_sweeps() -> bool:
    """FLASHSEMICRF_TRITON_SWEEP: ``parallel``, or ``serial`` (the default)."""
    return _switch("FLASHSEMICRF_TRITON_SWEEP", "parallel", "serial")


def forward(scores: Tensor, transition: Tensor, duration: Tensor, lengths: Tensor,
            start_transition: Tensor, end_transition: Tensor, start_scores: Tensor | None,
            end_scores: Tensor | None, interval: int) -> tuple[Tensor, Tensor, Tensor]:
    return forward_with_verdicts(scores, transition, duration, lengths, start_transition,
                                 end_transition, start_scores, end_scores, interval)[:3]


def forward_with_verdicts(scores, transition, duration, lengths, start_transition,
                          end_transition, start_scores, end_scores, interval):
    """forward's outputs and the sequences the forward's fast path took: the
    chunked forward's junctions accepted at the first try and at the last, or
    (twice) those the exp-domain forward certified; None, None where the
    serial log-domain forward ran alone. The chunked forward comes first
    where both are asked for (static transition, two chunks or more); its
    sequences rejected twice go to the log-domain forward, as in CUDA."""
    p = _Launch(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores)
    interval = _contract.checkpoint_interval(p.T, p.K, interval)
    n_ckpt = _contract.checkpoint_count(p.T, interval)
    log_z = p.empty(p.B)
    ring = p.empty(p.B, n_ckpt, p.S, p.C)
    offset = p.empty(p.B, n_ckpt, dtype=torch.float64)
    verdicts = None, None
    if p.B:
        if not p.dd and _chunk_plan(p, interval, n_ckpt)[2] >= 2 and uses_chunked_forward():
            verdicts = _chunked_forward(p, interval, n_ckpt, log_z, ring, offset)
        elif not p.dd and uses_exp_forward():
            certified = _exp_forward(p, log_z, ring, offset, interval, n_ckpt)
            verdicts = certified, certified
        else:
            _serial_forward(p, log_z, ring, offset, interval, n_ckpt)
    return (log_z, ring, offset, *verdicts)


def backward(grad_log_z: Tensor, scores: Tensor, transition: Tensor, duration: Tensor,
             lengths: Tensor, start_transition: Tensor, end_transition: Tensor,
             start_scores: Tensor | None, end_scores: Tensor | None, log_z: Tensor,
             checkpoint_ring: Tensor, checkpoint_offset: Tensor, interval: int,
             boundary_mass: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward_with_verdicts(grad_log_z, scores, transition, duration, lengths,
                                  start_transition, end_transition, start_scores, end_scores,
                                  log_z, checkpoint_ring, checkpoint_offset, interval,
                                  boundary_mass)[0]


def backward_with_verdicts(grad_log_z, scores, transition, duration, lengths, start_transition,
                           end_transition, start_scores, end_scores, log_z, checkpoint_ring,
                           checkpoint_offset, interval, boundary_mass):
    """backward's gradients and the sequences whose parallel sweeps were
    accepted (B,), or None where the serial sweep ran alone."""
    p = _Launch(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores)
    B, T, K, C = p.B, p.T, p.K, p.C
    interval = _contract.checkpoint_interval(T, K, interval)
    n_ckpt = _contract.checkpoint_count(T, interval)
    checkpoint_ring, checkpoint_offset = _contract.sequence_checkpoints(
        transition, checkpoint_ring, checkpoint_offset, B)
    if tuple(checkpoint_ring.shape) != (B, n_ckpt, p.S, C) or \
            tuple(checkpoint_offset.shape) != (B, n_ckpt):
        raise ValueError(
            f"{NAMESPACE}: checkpoints must be ({B}, {n_ckpt}, {p.S}, {C}) and "
            f"({B}, {n_ckpt}) for interval {interval}, got {tuple(checkpoint_ring.shape)} and "
            f"{tuple(checkpoint_offset.shape)}")
    if checkpoint_offset.dtype != torch.float64:
        raise ValueError(f"{NAMESPACE}: checkpoint_offset must be float64")
    g_scores = p.zeros(B, T, C)
    # transition and duration gradients sum over T positions: float64 until returned.
    g_trans = p.zeros(B, *transition.shape, dtype=torch.float64)
    g_dur = p.zeros(B, K, C, dtype=torch.float64)
    g_start_tr = p.zeros(B, C)
    g_end_tr = p.zeros(B, C)
    want_start = _contract.returns_boundary_gradient(p.has_start, boundary_mass)
    want_end = _contract.returns_boundary_gradient(p.has_end, boundary_mass)
    g_start_sc = p.zeros(B, T, C) if want_start else p.empty(0)
    g_end_sc = p.zeros(B, T, C) if want_end else p.empty(0)
    grads = (g_scores, g_trans, g_dur, g_start_tr, g_end_tr, g_start_sc, g_end_sc)
    accepted = None
    if B:
        log_z = log_z.contiguous()
        checkpoint_ring = checkpoint_ring.contiguous()
        checkpoint_offset = checkpoint_offset.contiguous()
        rows = interval + 1  # rows of a span buffer: boundaries first … last
        parallel = uses_parallel_sweeps() and not p.dd and n_ckpt >= 2
        recomputed = uses_span_recompute() or parallel
        if recomputed:
            # Every span of every sequence at once, one program a span, into
            # span buffers that hold all of a sequence's spans (n_ckpt ·
            # (interval + 1) >= T rows: working memory linear in T); the
            # sweep below then only reads them.
            alpha_buf = p.empty(B, n_ckpt, rows, p.C_PAD)
            sigma_buf = p.empty(B, n_ckpt, rows, p.C_PAD)
            off_buf = p.empty(B, n_ckpt, rows, dtype=torch.float64)
            torch.library.wrap_triton(kernels._recompute_kernel)[(B * n_ckpt,)](
                *p.inputs, log_z, checkpoint_ring, checkpoint_offset, alpha_buf, sigma_buf,
                off_buf, p.empty(B * n_ckpt, p.S, p.C_PAD), T, K, C, interval, n_ckpt,
                **p.meta)
            ring = p.empty(1)  # the sweep recomputes nothing
        else:
            alpha_buf = p.empty(B, rows, p.C_PAD)
            sigma_buf = p.empty(B, rows, p.C_PAD)
            off_buf = p.empty(B, rows, dtype=torch.float64)
            ring = p.ring_workspace()
        args = (grad_log_z.contiguous(), *p.inputs, log_z, checkpoint_ring, checkpoint_offset)
        boundary = (g_start_sc if want_start else g_scores, g_end_sc if want_end else g_scores)
        meta = dict(WANT_START=want_start, WANT_END=want_end, FLUSH=FLUSH_POSITIONS,
                    RECOMPUTED=recomputed, **p.meta)
        spans = B * n_ckpt
        back = p.empty(spans if parallel else B, K, p.C_PAD)
        redo = p.inputs[3]  # any pointer: not read without REDO
        if parallel:
            accepted = _parallel_sweeps(p, args, grads, boundary, ring, back, alpha_buf,
                                        sigma_buf, off_buf, interval, n_ckpt, meta)
            redo = accepted.logical_not().to(torch.int32)
        # The serial sweep: every sequence, or (REDO) those the parallel
        # sweeps could not join, whose programs alone do anything.
        torch.library.wrap_triton(kernels._backward_kernel)[(B,)](
            *args, g_scores, g_trans, g_dur, g_start_tr, g_end_tr, *boundary,
            ring, back, alpha_buf, sigma_buf, off_buf, ring, ring, redo, redo,
            T, K, C, interval, n_ckpt, 0, PARALLEL=False, REDO=parallel, **meta)
    dt = p.scores.dtype
    return (g_scores, g_trans.to(dt), g_dur.to(dt), g_start_tr, g_end_tr, g_start_sc,
            g_end_sc), accepted


def _parallel_sweeps(p: _Launch, args, grads, boundary, ring, back, alpha_buf, sigma_buf,
                     off_buf, interval, n_ckpt, meta):
    """FLASHSEMICRF_TRITON_SWEEP=parallel (static transition, two spans or
    more; docs/design.md, "The Triton sweeps in parallel"): one program a
    span, each but the last starting a warm-up after its span from a guess;
    then, in tensor ops, every junction (a span's warmed-up ring against the
    ring the next span ended with, entry by entry in float64, one log ratio
    within the chunked forward's allowance), the spans' float64 sums added
    up in span order, and each span's spill added to the positions after
    it, in span order. Returns the sequences accepted (B,); the others'
    gradients are left zero, for the serial sweep to redo."""
    B, T, K, C = p.B, p.T, p.K, p.C
    g_scores, g_trans, g_dur, g_start_tr, g_end_tr, g_start_sc, g_end_sc = grads
    spans = B * n_ckpt
    span_trans = p.zeros(spans, C, C, dtype=torch.float64)
    span_dur = p.zeros(spans, K, C, dtype=torch.float64)
    spill = p.zeros(spans, K, C)
    junction = p.empty(spans, 2, K, p.C_PAD)
    unanchored = torch.zeros(spans, dtype=torch.int32, device=p.scores.device)
    warmup = _chunk_plan(p, interval, n_ckpt)[0]
    torch.library.wrap_triton(kernels._backward_kernel)[(spans,)](
        *args, g_scores, span_trans, span_dur, g_start_tr, g_end_tr, *boundary,
        ring, back, alpha_buf, sigma_buf, off_buf, spill, junction, unanchored, unanchored,
        T, K, C, interval, n_ckpt, warmup, PARALLEL=True, REDO=False, **meta)
    lengths, log_z = p.inputs[3], args[9]
    last_span = torch.clamp(lengths // interval, max=n_ckpt - 1)
    # Junction j: span j's warmed-up ring, span j + 1's last, for j < last_span.
    junction = junction.view(B, n_ckpt, 2, K, p.C_PAD)[..., :C].double()
    warmed, ended = junction[:, :-1, 0].flatten(2), junction[:, 1:, 1].flatten(2)
    empty = (warmed == -math.inf) & (ended == -math.inf)
    r = torch.where(empty, 0.0, warmed - ended)
    bad = (~empty & ~torch.isfinite(r)).any(-1)
    allowance = CHUNK_SLACK[p.scores.dtype] + CHUNK_ULPS * UNIT_ROUNDING[p.scores.dtype] * \
        torch.maximum(warmed.abs(), ended.abs())
    lo = torch.where(empty, -math.inf, r - allowance).amax(-1)
    hi = torch.where(empty, math.inf, r + allowance).amin(-1)
    valid = torch.arange(n_ckpt - 1, device=g_scores.device)[None, :] < last_span[:, None]
    fits = ~bad & (lo <= hi) & (unanchored.view(B, n_ckpt)[:, :-1] == 0)
    accepted = (~valid | fits).all(1) | (log_z == -math.inf)
    # The spans' sums, and their coverage of the positions after them: spill
    # row r of span j is position (j + 1) · interval + r, in layers of
    # `interval` rows, within which no position takes two spans' rows (so
    # that index_add_ adds each once, in a fixed order). Positions past T
    # take only zeros (nothing covers them): clamped to T - 1.
    g_trans += span_trans.view(B, n_ckpt, C, C).sum(1)
    g_dur += span_dur.view(B, n_ckpt, K, C).sum(1)
    spill = spill.view(B, n_ckpt, K, C)[:, :-1]
    starts = torch.arange(1, n_ckpt, device=g_scores.device) * interval
    for r0 in range(0, K, interval):
        r = torch.arange(r0, min(r0 + interval, K), device=g_scores.device)
        pos = (starts[:, None] + r[None, :]).clamp(max=T - 1).flatten()
        g_scores.index_add_(1, pos, spill[:, :, r0:r0 + interval].flatten(1, 2))
    # The rejected sequences' gradients start again from zero.
    for g in grads:
        if g.numel():
            g.masked_fill_(~accepted.view(B, *[1] * (g.dim() - 1)), 0)
    return accepted


def viterbi(scores: Tensor, transition: Tensor, duration: Tensor, lengths: Tensor,
            start_transition: Tensor, end_transition: Tensor, start_scores: Tensor | None,
            end_scores: Tensor | None) -> tuple[Tensor, Tensor]:
    p = _Launch(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores)
    best = p.empty(p.B)
    label = torch.full((p.B, p.T), -1, dtype=torch.long, device=scores.device)
    if p.B:
        # Workspace O(√(T·K)·C) per sequence: the max-semiring checkpoints,
        # and the backpointers of one span at a time (interval + 1 rows).
        interval = _contract.checkpoint_interval(p.T, p.K, _contract.DEFAULT_INTERVAL)
        n_ckpt = _contract.checkpoint_count(p.T, interval)
        ckpt = p.empty(p.B, n_ckpt, p.S, p.C)
        ckpt_offset = p.empty(p.B, n_ckpt, dtype=torch.float64)
        bp_d = p.empty(p.B, interval + 1, p.C_PAD, dtype=torch.int32)
        bp_c = p.empty(p.B, interval + 1, p.C_PAD, dtype=torch.int32)
        torch.library.wrap_triton(kernels._viterbi_kernel)[(p.B,)](
            *p.inputs, best, label, p.ring_workspace(), ckpt, ckpt_offset, bp_d, bp_c,
            p.T, p.K, p.C, interval, n_ckpt, **p.meta)
    return best, label


def filter_messages(scores: Tensor, transition: Tensor, duration: Tensor, lengths: Tensor,
                    start_transition: Tensor, end_transition: Tensor, start_scores: Tensor | None,
                    end_scores: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    p = _Launch(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores)
    B, T, C = p.B, p.T, p.C
    alpha = torch.full((B, T + 1, C), float("-inf"), dtype=p.scores.dtype, device=scores.device)
    sigma = torch.full((B, T + 1, C), float("-inf"), dtype=p.scores.dtype, device=scores.device)
    offset = p.zeros(B, T + 1, dtype=torch.float64)
    if B:
        torch.library.wrap_triton(kernels._filter_kernel)[(B,)](
            *p.inputs, alpha, sigma, offset, p.ring_workspace(), T, p.K, C, **p.meta)
    return alpha, sigma, offset


def _define(name: str, fn) -> None:
    qualname = f"{NAMESPACE}::{name}"
    if INTERPRET:
        torch.library.custom_op(qualname, fn, mutates_args=())
    else:
        torch.library.triton_op(qualname, fn, mutates_args=())


for _name, _fn in (("forward", forward), ("backward", backward), ("viterbi", viterbi),
                   ("filter", filter_messages)):
    _define(_name, _fn)
# triton_op would use each launcher as its own fake; the contract's keep N symbolic.
_contract.register(NAMESPACE)
