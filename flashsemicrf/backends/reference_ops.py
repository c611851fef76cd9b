"""The "torch" backend: flashsemicrf.reference behind the ops' contract.

The reference is defined as the ops ``flashsemicrf_torch::{forward, backward,
viterbi, filter}`` with the schemas of the C++ ops, so the same fakes and the
same autograd formula serve it, a checkpoint of its forward feeds any other
backend's backward, and torch.compile sees it as one opaque op. (The module
is not called ``torch.py``: importing a submodule binds its name in the
package, where it would hide the torch package from ``backends/__init__.py``.)
"""

from __future__ import annotations

import torch

from .. import _contract, reference
from .._contract import Problem, returns_boundary_gradient

Tensor = torch.Tensor
NAMESPACE = "flashsemicrf_torch"


@torch.library.custom_op(f"{NAMESPACE}::forward", mutates_args=())
def forward(scores: Tensor, transition: Tensor, duration: Tensor, lengths: Tensor,
            start_transition: Tensor, end_transition: Tensor, start_scores: Tensor | None,
            end_scores: Tensor | None, interval: int) -> tuple[Tensor, Tensor, Tensor]:
    p = Problem(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores)
    log_z, ckpt = reference.forward(p, interval)
    return log_z, ckpt.ring, ckpt.offset


@torch.library.custom_op(f"{NAMESPACE}::backward", mutates_args=())
def backward(grad_log_z: Tensor, scores: Tensor, transition: Tensor, duration: Tensor,
             lengths: Tensor, start_transition: Tensor, end_transition: Tensor,
             start_scores: Tensor | None, end_scores: Tensor | None, log_z: Tensor,
             checkpoint_ring: Tensor, checkpoint_offset: Tensor, interval: int,
             boundary_mass: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    p = Problem(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores)
    g = reference.backward(
        p, grad_log_z, log_z, _contract.Checkpoints(checkpoint_ring, checkpoint_offset), interval,
        returns_boundary_gradient(start_scores is not None, boundary_mass),
        returns_boundary_gradient(end_scores is not None, boundary_mass),
    )
    absent = scores.new_empty(0)
    return (*g[:5], absent if g.start_scores is None else g.start_scores,
            absent.clone() if g.end_scores is None else g.end_scores)


@torch.library.custom_op(f"{NAMESPACE}::viterbi", mutates_args=())
def viterbi(scores: Tensor, transition: Tensor, duration: Tensor, lengths: Tensor,
            start_transition: Tensor, end_transition: Tensor, start_scores: Tensor | None,
            end_scores: Tensor | None) -> tuple[Tensor, Tensor]:
    p = Problem(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores)
    best, segments = reference.viterbi(p)
    B, T, _ = scores.shape
    segment_label = torch.full((B, T), -1, dtype=torch.long, device=scores.device)
    batch, start, _, label = segments.unbind(1)
    segment_label[batch, start] = label
    return best, segment_label


@torch.library.custom_op(f"{NAMESPACE}::filter", mutates_args=())
def filter_messages(scores: Tensor, transition: Tensor, duration: Tensor, lengths: Tensor,
                    start_transition: Tensor, end_transition: Tensor, start_scores: Tensor | None,
                    end_scores: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    p = Problem(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores)
    return tuple(reference.filter_messages(p))


_contract.register(NAMESPACE)
