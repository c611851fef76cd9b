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
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode

from .. import _contract, reference
from .._contract import Problem, returns_boundary_gradient

Tensor = torch.Tensor
NEG_INF = float("-inf")
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
    ckpt = _contract.Checkpoints(*_contract.sequence_checkpoints(
        transition, checkpoint_ring, checkpoint_offset, scores.shape[0]))
    g = reference.backward(
        p, grad_log_z, log_z, ckpt, interval,
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


# --------------------------------------------------------------------------
# Second order, which no op offers: the reference in forward-mode AD
# --------------------------------------------------------------------------


class _SafeLogsumexp(TorchFunctionMode):
    """torch.logsumexp whose forward-mode derivative is 0, not NaN, over an
    all −inf slice (torch's formula subtracts −inf from −inf there). The
    reference reduces such slices wherever a segment or label is impossible."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.logsumexp or func is Tensor.logsumexp:
            return _logsumexp(*args, **kwargs)
        return func(*args, **kwargs)


def _logsumexp(x: Tensor, dim, keepdim: bool = False) -> Tensor:
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=dim, keepdim=True)
    positive = s > 0
    out = torch.where(positive, torch.log(torch.where(positive, s, torch.ones_like(s))) + m,
                      torch.full_like(s, NEG_INF))
    if not keepdim:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        out = out.squeeze(dims)
    return out


def hessian_vector_product(p: Problem, direction: list) -> list[Tensor]:
    """∇²log Z_b(θ)·v per sequence b (θ = p's inputs, v = ``direction``, the
    same seven float inputs, None for zeros), in the Gradients layout (batch first for
    the shared parameters): the derivative of the posterior expectations μ
    along v, by forward-mode differentiation of the reference's forward and
    backward. −inf entries of v (parts that p may use but the direction's
    model forbids) are taken as 0: the quantity they would differentiate is
    infinite."""
    filled = p.filled()
    primal = [filled.scores, filled.transition, filled.duration, *filled[4:]]
    tangent = []
    for x, v in zip(primal, direction):
        if v is None:
            tangent.append(torch.zeros_like(x))
        else:
            v = v.to(x.dtype).expand_as(x)
            tangent.append(torch.where(torch.isfinite(v), v, torch.zeros_like(v)))
    with torch.no_grad(), fwAD.dual_level(), _SafeLogsumexp():
        duals = [fwAD.make_dual(x.detach().contiguous(), t.detach().contiguous())
                 for x, t in zip(primal, tangent)]
        q = Problem(duals[0], duals[1], duals[2], p.lengths, *duals[3:])
        log_z, ckpt = reference.forward(q)
        g = reference.backward(q, torch.ones_like(fwAD.unpack_dual(log_z).primal), log_z, ckpt,
                               start_mass=True, end_mass=True)
        out = []
        for x in g:
            t = fwAD.unpack_dual(x).tangent
            out.append(torch.zeros_like(fwAD.unpack_dual(x).primal) if t is None else t.clone())
    return out
