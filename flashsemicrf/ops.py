"""torch.library glue for the compiled ops: fake kernels and the autograd formula.

The C++ ops (csrc/semicrf.cpp) are one contract for the CPU and CUDA kernels
(and the Triton ones, which register under the same schema shapes):

    forward(scores, transition, duration, lengths, start_transition,
            end_transition, start_scores?, end_scores?, interval)
        -> (log_z (B,), checkpoint_ring (B, N, S, C), checkpoint_offset (B, N) f64)
    backward(grad_log_z, <the same inputs>, log_z, checkpoint_ring,
             checkpoint_offset, interval, boundary_mass)
        -> per-sequence gradients (B, ...) of every input
    viterbi(<the same inputs>) -> (best (B,), segment_label (B, T) int64)
    filter(<the same inputs>) -> (alpha_hat, sigma_hat (B, T+1, C), offset (B, T+1) f64)

N = ceil(T / interval), S = K (static transition) or 2K (duration-dependent).
One fake per op and one autograd formula serve every device, so
``torch.compile(fullgraph=True)`` can trace the public functions.
"""

from __future__ import annotations

import torch

from . import _extension

Tensor = torch.Tensor

_C = _extension.load()
AVAILABLE = _C is not None


def checkpoint_shape(scores: Tensor, transition: Tensor, duration: Tensor, interval) -> tuple:
    """(B, N, S, C). With interval 0 (the default √(T·K)) N is left to the
    kernel: a fresh symbolic size, so torch.compile keeps T dynamic."""
    B, T, C = scores.shape
    K = duration.shape[0]
    width = 2 * K if transition.dim() == 3 else K
    if isinstance(interval, int) and interval == 0:
        n_ckpt = torch.library.get_ctx().new_dynamic_size()
    else:
        n_ckpt = (T + interval - 1) // interval
    return (B, n_ckpt, width, C)


def _forward_fake(scores, transition, duration, lengths, start_transition, end_transition,
                  start_scores, end_scores, interval):
    shape = checkpoint_shape(scores, transition, duration, interval)
    return (
        scores.new_empty(scores.shape[0]),
        scores.new_empty(shape),
        scores.new_empty(shape[:2], dtype=torch.float64),
    )


def _backward_fake(grad_log_z, scores, transition, duration, lengths, start_transition,
                   end_transition, start_scores, end_scores, log_z, checkpoint_ring,
                   checkpoint_offset, interval, boundary_mass):
    B, T, C = scores.shape
    K = duration.shape[0]

    def boundary(present):
        return scores.new_empty(B, T, C) if (boundary_mass or present) else scores.new_empty(0)

    return (
        scores.new_empty(B, T, C),
        scores.new_empty((B,) + tuple(transition.shape)),
        scores.new_empty(B, K, C),
        scores.new_empty(B, C),
        scores.new_empty(B, C),
        boundary(start_scores is not None),
        boundary(end_scores is not None),
    )


def _viterbi_fake(scores, transition, duration, lengths, start_transition, end_transition,
                  start_scores, end_scores):
    B, T, _ = scores.shape
    return scores.new_empty(B), scores.new_empty(B, T, dtype=torch.long)


def _filter_fake(scores, transition, duration, lengths, start_transition, end_transition,
                 start_scores, end_scores):
    B, T, C = scores.shape
    return (
        scores.new_empty(B, T + 1, C),
        scores.new_empty(B, T + 1, C),
        scores.new_empty(B, T + 1, dtype=torch.float64),
    )


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


def backward_formula(namespace: str):
    """The autograd formula of ``<namespace>::forward``: its backward op, with
    the per-sequence gradients of the shared parameters summed over the batch."""

    def formula(ctx, grad_log_z, _grad_ring, _grad_offset):
        saved = ctx.saved_tensors
        inputs, (log_z, ring, offset) = saved[:8], saved[8:]
        g = getattr(torch.ops, namespace).backward(
            grad_log_z, *inputs, log_z, ring, offset, ctx.interval, False
        )
        return (
            g[0],
            g[1].sum(0),
            g[2].sum(0),
            None,
            g[3].sum(0),
            g[4].sum(0),
            g[5] if ctx.has_start_scores else None,
            g[6] if ctx.has_end_scores else None,
            None,
        )

    return formula


if AVAILABLE:
    torch.library.register_fake("flashsemicrf::forward")(_forward_fake)
    torch.library.register_fake("flashsemicrf::backward")(_backward_fake)
    torch.library.register_fake("flashsemicrf::viterbi")(_viterbi_fake)
    torch.library.register_fake("flashsemicrf::filter")(_filter_fake)
    torch.library.register_autograd(
        "flashsemicrf::forward", backward_formula("flashsemicrf"), setup_context=_setup_context
    )
