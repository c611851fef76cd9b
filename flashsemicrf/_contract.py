"""The contract every backend implements: one problem, four ops, one autograd formula.

A backend is a family of four ops under its own namespace, with the schemas
of csrc/semicrf.cpp (docs/design.md, "The op contract"):

    forward(scores, transition, duration, lengths, start_transition,
            end_transition, start_scores?, end_scores?, interval)
        -> (log_z (B,), checkpoint_ring (B, N, S, C), checkpoint_offset (B, N) float64)
    backward(grad_log_z (B,), <the eight inputs>, log_z, checkpoint_ring,
             checkpoint_offset, interval, boundary_mass)
        -> per-sequence gradients of log Z times grad_log_z (see Gradients)
    viterbi(<the eight inputs>) -> (best (B,), segment_label (B, T) int64)
    filter(<the eight inputs>) -> (alpha_hat, sigma_hat (B, T+1, C), offset (B, T+1) float64)

with N = ceil(T / interval) checkpoints and S = K (static transition) or 2K
(duration-dependent). One exception: the CUDA forward with
FLASHSEMICRF_CUDA_SWEEP=parallel and the static transition also saves the
problem's mirror image's checkpoints for its span-parallel backward, as rows
B … 2B-1 of checkpoint_ring and checkpoint_offset (rows 0 … B-1 as above);
every backward takes the checkpoints with B or, for the static transition,
2B rows. The namespaces: ``flashsemicrf`` (the C++ and CUDA
kernels), ``flashsemicrf_triton`` and ``flashsemicrf_torch`` (the reference).

This module holds what they share, so that the backends import it and never
each other: the Problem, the checkpoint interval, the outputs as named tuples,
the fake kernels, the autograd formula, and :class:`OpFamily`, which calls a
namespace's ops with a Problem. It imports no backend.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

Tensor = torch.Tensor

# An op's interval 0 means default_checkpoint_interval(T, K). The public
# functions always pass 0: a Python int computed from a symbolic T would fix T
# under torch.compile.
DEFAULT_INTERVAL = 0


class Problem(NamedTuple):
    """One batch of semi-CRF inputs, in the order of the ops' arguments.

    Built by ``_validation.check_problem`` (the caller's tensors, no copies);
    absent optional inputs are None until :meth:`filled` replaces them.
    """

    scores: Tensor  # (B, T, C)
    transition: Tensor  # (C, C), or (K, C, C) indexed by the incoming duration d - 1
    duration: Tensor  # (K, C)
    lengths: Tensor  # (B,) int64 on the scores' device, values in [1, T]
    start_transition: Tensor | None  # (C,)
    end_transition: Tensor | None  # (C,)
    start_scores: Tensor | None  # (B, T, C)
    end_scores: Tensor | None  # (B, T, C)

    @property
    def duration_dependent(self) -> bool:
        """True for the (K, C, C) transition."""
        return self.transition.dim() == 3

    @property
    def floats(self) -> tuple[Tensor | None, ...]:
        """The float inputs in argument order (lengths left out)."""
        return (self.scores, self.transition, self.duration) + tuple(self[4:])

    def compute_dtype(self) -> torch.dtype:
        """float64 when any input is float64, else float32 (also for bf16/fp16 inputs)."""
        floats = [t for t in self.floats if t is not None]
        return torch.float64 if any(t.dtype == torch.float64 for t in floats) else torch.float32

    def to_compute(self) -> Problem:
        """Every float input in the compute dtype: differentiable casts, no-ops when already so."""
        dt = self.compute_dtype()
        cast = [None if t is None else t.to(dt) for t in self.floats]
        return Problem(cast[0], cast[1], cast[2], self.lengths, *cast[3:])

    def filled(self, boundary_scores: bool = True) -> Problem:
        """Absent optional inputs as zeros, which is what absence means.

        start/end_transition are always filled (the ops' schema requires them);
        start/end_scores too when ``boundary_scores`` (the ops take them as
        optional, so that the kernels skip what is absent; the reference reads
        every input).
        """
        B, T, C = self.scores.shape
        zeros_c = self.scores.new_zeros(C)

        def scores_or_zeros(t):
            if t is not None or not boundary_scores:
                return t
            return self.scores.new_zeros(B, T, C)

        return self._replace(
            start_transition=zeros_c if self.start_transition is None else self.start_transition,
            end_transition=zeros_c if self.end_transition is None else self.end_transition,
            start_scores=scores_or_zeros(self.start_scores),
            end_scores=scores_or_zeros(self.end_scores),
        )

    def op_args(self) -> tuple:
        """The eight input arguments of every op."""
        return tuple(self.filled(boundary_scores=False))


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def default_checkpoint_interval(T, K):
    """Δ = ⌊√(T·K)⌋: balances the checkpoints, (T/Δ)·K·C numbers, against
    the backward's span buffer, Δ·C. The C++ ops use the same formula.

    T and K may be symbolic (torch.compile tracing a launcher): the interval is
    then symbolic too, so the length stays dynamic; ⌊√⌋ in floating point
    equals the integer square root below 2^52.
    """
    if isinstance(T, int) and isinstance(K, int):
        return max(1, math.isqrt(max(1, T * K)))
    return torch.sym_max(1, torch.sym_int(torch.sym_sqrt(T * K)))


def checkpoint_interval(T, K, interval):
    """The interval an op uses when given ``interval`` (0: the default)."""
    if isinstance(interval, int) and interval == DEFAULT_INTERVAL:
        return default_checkpoint_interval(T, K)
    return interval


def checkpoint_count(T, interval):
    """N = ⌈T / interval⌉ checkpoints: the state at the start of steps 0, Δ, 2Δ, …"""
    return (T + interval - 1) // interval


class Checkpoints(NamedTuple):
    """What the forward op saves for the backward, in the layout every backend shares."""

    ring: Tensor  # (B, N, S, C): the ring at the beginning of step j·interval
    offset: Tensor  # (B, N) float64: its offset


class Gradients(NamedTuple):
    """d log Z_b / d input per sequence b, times the upstream gradient.

    The shared parameters keep a leading batch dimension (the autograd
    formula sums it). start_scores / end_scores are the posterior masses of
    the segments starting / ending at each position, None when the backward
    op did not return them (see :func:`returns_boundary_gradient`).
    """

    scores: Tensor  # (B, T, C)
    transition: Tensor  # (B, C, C) or (B, K, C, C)
    duration: Tensor  # (B, K, C)
    start_transition: Tensor  # (B, C)
    end_transition: Tensor  # (B, C)
    start_scores: Tensor | None  # (B, T, C)
    end_scores: Tensor | None  # (B, T, C)

    @classmethod
    def from_op(cls, outputs) -> Gradients:
        """From the backward op's seven outputs, whose absent boundary gradients are (0,)."""
        boundary = [t if t.dim() == 3 else None for t in outputs[5:]]
        return cls(*outputs[:5], *boundary)


def returns_boundary_gradient(present: bool, boundary_mass: bool) -> bool:
    """Whether the backward op returns a start (end) score gradient (B, T, C)
    rather than an empty (0,) tensor: when that input is present, or when
    ``boundary_mass`` asks for the masses anyway (marginals and entropy do)."""
    return boundary_mass or present


class History(NamedTuple):
    """The filter op's output: forward messages at every boundary t = 0 … T."""

    alpha: Tensor  # (B, T+1, C): alpha_hat[t] relative to offset[t], rows 1 … L; -inf elsewhere
    sigma: Tensor  # (B, T+1, C): sigma_hat[t], rows 0 … L-1 (duration-dependent: row 0); -inf elsewhere
    offset: Tensor  # (B, T+1) float64: O_t, rows 0 … L; 0 elsewhere


# --------------------------------------------------------------------------
# Fake kernels: shapes and dtypes of every op's outputs, for torch.compile
# --------------------------------------------------------------------------


def _checkpoint_shape(scores: Tensor, transition: Tensor, duration: Tensor, interval) -> tuple:
    """(B, N, S, C). With interval 0 N is left to the kernel: a fresh symbolic
    size, so that torch.compile keeps T dynamic."""
    B, T, C = scores.shape
    K = duration.shape[0]
    width = 2 * K if transition.dim() == 3 else K
    if isinstance(interval, int) and interval == DEFAULT_INTERVAL:
        n_ckpt = torch.library.get_ctx().new_dynamic_size()
    else:
        n_ckpt = checkpoint_count(T, interval)
    return (B, n_ckpt, width, C)


def saves_mirror(namespace: str, scores: Tensor, transition: Tensor) -> bool:
    """Whether ``<namespace>::forward`` also saves the mirror image's
    checkpoints (2B rows): the CUDA kernels' span-parallel backward
    (FLASHSEMICRF_CUDA_SWEEP=parallel, read at each call as the C++ op reads
    it), static transition. The C++ op's Cuda::saves_mirror decides the same."""
    return (namespace == "flashsemicrf" and scores.device.type == "cuda"
            and transition.dim() == 2
            and os.environ.get("FLASHSEMICRF_CUDA_SWEEP", "serial") == "parallel")


def sequence_checkpoints(transition: Tensor, ring: Tensor, offset: Tensor, B: int):
    """The checkpoints of the B sequences, as a backward reads them: rows
    0 … B-1 where the forward also saved the mirror image's (2B rows, static
    transition: saves_mirror), else the checkpoints as given."""
    if transition.dim() == 2 and B > 0 and ring.dim() == 4 and ring.shape[0] == 2 * B:
        return ring[:B], offset[:B]
    return ring, offset


def forward_fake(scores, transition, duration, lengths, start_transition, end_transition,
                 start_scores, end_scores, interval, *, namespace: str = ""):
    B, n_ckpt, width, C = _checkpoint_shape(scores, transition, duration, interval)
    rows = 2 * B if saves_mirror(namespace, scores, transition) else B
    return (
        scores.new_empty(B),
        scores.new_empty((rows, n_ckpt, width, C)),
        scores.new_empty((rows, n_ckpt), dtype=torch.float64),
    )


def backward_fake(grad_log_z, scores, transition, duration, lengths, start_transition,
                  end_transition, start_scores, end_scores, log_z, checkpoint_ring,
                  checkpoint_offset, interval, boundary_mass):
    B, T, C = scores.shape
    K = duration.shape[0]

    def boundary(present):
        if returns_boundary_gradient(present, boundary_mass):
            return scores.new_empty(B, T, C)
        return scores.new_empty(0)

    return (
        scores.new_empty(B, T, C),
        scores.new_empty((B,) + tuple(transition.shape)),
        scores.new_empty(B, K, C),
        scores.new_empty(B, C),
        scores.new_empty(B, C),
        boundary(start_scores is not None),
        boundary(end_scores is not None),
    )


def viterbi_fake(scores, transition, duration, lengths, start_transition, end_transition,
                 start_scores, end_scores):
    B, T, _ = scores.shape
    return scores.new_empty(B), scores.new_empty(B, T, dtype=torch.long)


def filter_fake(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores):
    B, T, C = scores.shape
    return (
        scores.new_empty(B, T + 1, C),
        scores.new_empty(B, T + 1, C),
        scores.new_empty(B, T + 1, dtype=torch.float64),
    )


FAKES = {"forward": forward_fake, "backward": backward_fake, "viterbi": viterbi_fake,
         "filter": filter_fake}


# --------------------------------------------------------------------------
# The autograd formula of every namespace's forward op
# --------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    (scores, transition, duration, lengths, start_transition, end_transition, start_scores,
     end_scores, interval) = inputs
    log_z, checkpoint_ring, checkpoint_offset = output
    ctx.interval = interval
    ctx.has_start_scores = start_scores is not None
    ctx.has_end_scores = end_scores is not None
    ctx.save_for_backward(
        scores, transition, duration, lengths, start_transition, end_transition,
        start_scores, end_scores, log_z, checkpoint_ring, checkpoint_offset,
    )


def _sum_over_batch(per_sequence: Tensor) -> Tensor:
    """A shared parameter's gradient: the per-sequence ones (each a sum over T
    positions) summed in float64, returned in their dtype."""
    return per_sequence.sum(0, dtype=torch.float64).to(per_sequence.dtype)


def _autograd_formula(namespace: str):
    """The backward of ``<namespace>::forward``: its backward op, with the
    shared parameters' per-sequence gradients summed over the batch."""

    def formula(ctx, grad_log_z, _grad_ring, _grad_offset):
        saved = ctx.saved_tensors
        inputs, (log_z, ring, offset) = saved[:8], saved[8:]
        g = getattr(torch.ops, namespace).backward(
            grad_log_z, *inputs, log_z, ring, offset, ctx.interval, False
        )
        return (
            g[0],
            _sum_over_batch(g[1]),
            _sum_over_batch(g[2]),
            None,
            _sum_over_batch(g[3]),
            _sum_over_batch(g[4]),
            g[5] if ctx.has_start_scores else None,
            g[6] if ctx.has_end_scores else None,
            None,
        )

    return formula


def register(namespace: str) -> None:
    """Give ``<namespace>::{forward, backward, viterbi, filter}`` the shared
    fakes and ``forward`` the autograd formula. The ops must be defined."""
    for name, fake in FAKES.items():
        if name == "forward":
            fake = functools.partial(forward_fake, namespace=namespace)
        torch.library.register_fake(f"{namespace}::{name}", fake)
    torch.library.register_autograd(
        f"{namespace}::forward", _autograd_formula(namespace), setup_context=_setup_context
    )


# --------------------------------------------------------------------------
# Calling one namespace's ops with a Problem
# --------------------------------------------------------------------------


class OpFamily:
    """The four ops of one namespace, called with a :class:`Problem` in its
    compute dtype (float32 or float64): what the public functions use, the
    same for every backend."""

    def __init__(self, name: str, namespace: str):
        self.name = name  # the backend's public name: "cpu", "cuda", "triton", "torch"
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"OpFamily({self.name!r}, namespace={self.namespace!r})"

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def log_partition(self, p: Problem) -> Tensor:
        """log Z (B,), differentiable through the autograd formula."""
        return self.ops.forward(*p.op_args(), DEFAULT_INTERVAL)[0]

    def forward(self, p: Problem, interval: int = DEFAULT_INTERVAL) -> tuple[Tensor, Checkpoints]:
        log_z, ring, offset = self.ops.forward(*p.op_args(), interval)
        return log_z, Checkpoints(ring, offset)

    def backward(self, p: Problem, grad_log_z: Tensor, log_z: Tensor, ckpt: Checkpoints,
                 interval: int = DEFAULT_INTERVAL, boundary_mass: bool = False) -> Gradients:
        g = self.ops.backward(grad_log_z, *p.op_args(), log_z, ckpt.ring, ckpt.offset, interval,
                              boundary_mass)
        return Gradients.from_op(g)

    def viterbi(self, p: Problem) -> tuple[Tensor, Tensor]:
        """(best (B,), segment_label (B, T)): each segment's label at its start, -1 elsewhere."""
        return self.ops.viterbi(*p.op_args())

    def filter_messages(self, p: Problem) -> History:
        """The filter op: the forward messages at every boundary (for sampling)."""
        return History(*self.ops.filter(*p.op_args()))
