"""Cross-entropy and KL divergence between two semi-CRFs on the same lengths.

The score of a segmentation y is linear in the potentials θ: s_θ(y) = ⟨θ, φ(y)⟩,
with φ(y) the counts of the parts y uses (a label at a position, a duration,
a transition, a first or last label, a segment starting or ending at a
position). Hence, for p = p_θ and q = p_η,

    E_p[s_η] = ⟨η, μ_p⟩,   μ_p = E_p[φ] = ∇ log Z(θ)  (the backward op's output),
    cross_entropy(p, q) = −E_p[log q] = log Z(η) − ⟨η, μ_p⟩,
    kl(p ‖ q) = E_p[log p − log q] = log Z(η) − log Z(θ) + ⟨θ, μ_p⟩ − ⟨η, μ_p⟩.

So both take one forward and one backward pass of p (on any backend) and one
forward pass of q; nothing of size (T, K, C) or (T, K, C, C) is formed.

Gradients. ∂/∂η of ⟨η, μ_p⟩ is μ_p. ∂/∂θ of ⟨v, μ_p⟩ is the Hessian of log Z
times v, ∇²log Z(θ)·v: the derivative of μ_p along v. It is computed exactly by
running the plain-PyTorch reference's forward and backward in forward-mode
automatic differentiation with tangent v (backends/reference_ops.py): memory stays that of the streaming backward (twice), but the
reference is a Python loop over positions, so this gradient (and only this
one) is slow on long sequences. Stop it with ``p.detach``-ed potentials
when only q is trained (distillation).
"""

from __future__ import annotations

import torch

from . import backends
from ._contract import Problem
from .backends.reference_ops import hessian_vector_product

Tensor = torch.Tensor
NEG_INF = float("-inf")

# The parameters in Problem order, lengths left out: (B, T, C), (C, C) or
# (K, C, C), (K, C), (C,), (C,), (B, T, C) or None, (B, T, C) or None.
_BATCHED = (True, False, False, False, False, True, True)


def _lift(p: Problem, duration_dependent: bool) -> Problem:
    """p with a (K, C, C) transition when ``duration_dependent``: the static
    transition repeated over durations (the same model; the expand is
    differentiable, so its gradient sums back over K)."""
    if duration_dependent and not p.duration_dependent:
        K = p.duration.shape[0]
        return p._replace(transition=p.transition.expand(K, *p.transition.shape))
    return p


def _params(p: Problem) -> list[Tensor | None]:
    return [p.scores, p.transition, p.duration, p.start_transition, p.end_transition,
            p.start_scores, p.end_scores]


def _dot(direction: list[Tensor | None], mu: list[Tensor]) -> Tensor:
    """⟨v, μ⟩ per sequence (B,) in float64. An entry with μ = 0 adds 0 even
    where v is −inf (a part p never uses); one with μ > 0 and v = −inf makes
    the total −inf."""
    B = mu[0].shape[0]
    total = torch.zeros(B, dtype=torch.float64, device=mu[0].device)
    for v, m, batched in zip(direction, mu, _BATCHED):
        if v is None:
            continue
        v = v.to(torch.float64)
        if not batched:
            v = v.unsqueeze(0)
        prod = v * m.to(torch.float64)
        prod = torch.where(m == 0, torch.zeros_like(prod), prod)
        total = total + prod.flatten(1).sum(1)
    return total


def _expected_statistics(p: Problem, ops) -> tuple[Tensor, list[Tensor]]:
    """log Z (B,) and μ_p, the posterior expectation of every part, per sequence
    (the backward op with upstream 1 and the boundary masses)."""
    with torch.no_grad():
        log_z, ckpt = ops.forward(p)
        g = ops.backward(p, torch.ones_like(log_z), log_z, ckpt, boundary_mass=True)
    return log_z, list(g)


class _ExpectedScore(torch.autograd.Function):
    """E_p[s_v] = ⟨v, μ_p⟩ (B,) float64, for the model p and the directions v
    (each a full parameter list); differentiable in both."""

    @staticmethod
    def forward(ctx, backend, lengths, n_dirs, *tensors):
        model = Problem(tensors[0], tensors[1], tensors[2], lengths, *tensors[3:7])
        dirs = [list(tensors[7 + 7 * i: 14 + 7 * i]) for i in range(n_dirs)]
        ops = backends.resolve("kl", backend, model.scores.device)
        if model.scores.shape[0] == 0:
            ops = backends.resolve("kl", "torch", model.scores.device)
        _, mu = _expected_statistics(model, ops)
        ctx.n_dirs = n_dirs
        ctx.lengths = lengths
        ctx.present = [t is not None for t in tensors]
        ctx.save_for_backward(*[t for t in tensors if t is not None], *mu)
        return tuple(_dot(d, mu) for d in dirs)

    @staticmethod
    def backward(ctx, *grad_out):
        saved = list(ctx.saved_tensors)
        tensors, k = [], 0
        for present in ctx.present:
            tensors.append(saved[k] if present else None)
            k += present
        mu = saved[k:]
        n = ctx.n_dirs
        model = Problem(tensors[0], tensors[1], tensors[2], ctx.lengths, *tensors[3:7])
        grads: list[Tensor | None] = [None] * len(tensors)

        def weighted(per_sequence: Tensor, batched: bool, w: Tensor, like: Tensor) -> Tensor:
            w = w.to(per_sequence.dtype).view((-1,) + (1,) * (per_sequence.dim() - 1))
            g = per_sequence * w
            if not batched:
                g = g.sum(0, dtype=torch.float64)
            return g.to(like.dtype).reshape(like.shape)

        def add(i: int, g: Tensor) -> None:
            grads[i] = g if grads[i] is None else grads[i] + g

        for d in range(n):
            w = grad_out[d]
            if w is None:
                continue
            # ∂⟨v, μ⟩/∂v = μ
            for j in range(7):
                i = 7 + 7 * d + j
                if tensors[i] is not None and ctx.needs_input_grad[3 + i]:
                    add(i, weighted(mu[j], _BATCHED[j], w, tensors[i]))
            # ∂⟨v, μ_θ⟩/∂θ = ∇²log Z(θ)·v
            if any(ctx.needs_input_grad[3 + j] for j in range(7) if tensors[j] is not None):
                if bool((w != 0).any()):
                    hv = hessian_vector_product(model, tensors[7 + 7 * d: 14 + 7 * d])
                    for j in range(7):
                        if tensors[j] is not None and ctx.needs_input_grad[3 + j]:
                            add(j, weighted(hv[j], _BATCHED[j], w, tensors[j]))
        return (None, None, None, *grads)


def _common(fn: str, p: Problem, q: Problem) -> tuple[Problem, Problem]:
    """p and q in one compute dtype and one transition form, after checking
    that they describe the same sequences."""
    if p.scores.shape != q.scores.shape:
        raise ValueError(
            f"{fn}: other must have scores of the same shape (B, T, C) = "
            f"{tuple(p.scores.shape)}, got {tuple(q.scores.shape)}"
        )
    if p.duration.shape != q.duration.shape:
        raise ValueError(
            f"{fn}: other must have the same longest duration K (duration shape "
            f"{tuple(p.duration.shape)}), got {tuple(q.duration.shape)}; pad the shorter "
            "duration with -inf rows"
        )
    if p.scores.device != q.scores.device:
        raise ValueError(f"{fn}: other is on {q.scores.device} but self is on {p.scores.device}")
    if not torch.equal(p.lengths, q.lengths):
        raise ValueError(f"{fn}: other must have the same lengths as self")
    floats = [t for t in p.floats + q.floats if t is not None]
    dt = torch.float64 if any(t.dtype == torch.float64 for t in floats) else torch.float32
    dd = p.duration_dependent or q.duration_dependent
    cast = lambda x: Problem(*[None if t is None else t.to(dt) for t in x.floats[:3]],
                             x.lengths, *[None if t is None else t.to(dt) for t in x.floats[3:]])
    return _lift(cast(p), dd), _lift(cast(q), dd)


def divergences(fn: str, p: Problem, q: Problem, backend: str,
                want_kl: bool) -> Tensor:
    """cross_entropy(p, q) or kl(p ‖ q), (B,) in the compute dtype.

    A sequence that p gives no valid segmentation (log Z_p = −inf) gets 0; one
    where q forbids a part that p uses gets +inf.
    """
    p, q = _common(fn, p, q)
    ops = backends.resolve(fn, backend, p.scores.device)
    if p.scores.shape[0] == 0:
        ops = backends.resolve(fn, "torch", p.scores.device)
    log_z_q = ops.log_partition(q).to(torch.float64)
    dirs = [q] + ([p] if want_kl else [])
    tensors = _params(p) + [t for d in dirs for t in _params(d)]
    e = _ExpectedScore.apply(backend, p.lengths, len(dirs), *tensors)
    value = log_z_q - e[0]
    if want_kl:
        log_z_p = ops.log_partition(p).to(torch.float64)
        value = value - log_z_p + e[1]
    else:
        with torch.no_grad():
            log_z_p = ops.log_partition(p)
    value = torch.where(e[0] == NEG_INF, torch.full_like(value, float("inf")), value)
    value = torch.where(log_z_p == NEG_INF, torch.zeros_like(value), value)
    return value.to(p.scores.dtype)


__all__ = ["divergences"]
