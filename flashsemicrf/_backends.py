"""Backends: one contract, several implementations.

Every backend takes the validated problem in its compute dtype (float32, or
float64 when any input is float64) and offers:

* ``forward(x, interval) -> (log_z (B,), ckpt_ring (B, N, S, C), ckpt_offset (B, N) float64)``
* ``backward(x, grad (B,), log_z, ckpt_ring, ckpt_offset, interval, boundary_mass)
  -> reference.Gradients`` (per-sequence gradients, times ``grad``)
* ``viterbi(x) -> (best (B,), segments (N, 4))``
* ``sample(x, log_z, num_samples, generator) -> segments (N, 5)``

so one autograd formula and one set of checks serve all of them. Choosing a
backend is this module's job alone; kernels never choose.
"""

from __future__ import annotations

import os

import torch

from . import reference
from ._validation import Inputs

Tensor = torch.Tensor

ENV_BACKEND = "FLASHSEMICRF_BACKEND"


def compute_dtype(x: Inputs) -> torch.dtype:
    floats = [t for t in x.floats if t is not None]
    return torch.float64 if any(t.dtype == torch.float64 for t in floats) else torch.float32


def to_compute(x: Inputs) -> Inputs:
    """The problem with every float input in the compute dtype (a no-op when it is)."""
    dt = compute_dtype(x)
    cast = [None if t is None else t.to(dt) for t in x.floats]
    return Inputs(cast[0], cast[1], cast[2], x.lengths, *cast[3:])


def to_problem(x: Inputs) -> reference.Problem:
    """The reference's view: optional inputs filled with zeros."""
    B, T, C = x.scores.shape
    zeros_c = x.scores.new_zeros(C)
    return reference.Problem(
        x.scores,
        x.transition,
        x.duration,
        x.lengths,
        zeros_c if x.start_transition is None else x.start_transition,
        zeros_c if x.end_transition is None else x.end_transition,
        x.scores.new_zeros(B, T, C) if x.start_scores is None else x.start_scores,
        x.scores.new_zeros(B, T, C) if x.end_scores is None else x.end_scores,
    )


class ReferenceBackend:
    """The plain-PyTorch streaming reference (``backend="torch"``)."""

    name = "torch"

    def forward(self, x: Inputs, interval: int):
        log_z, ckpt = reference.forward(to_problem(x), interval)
        return log_z, ckpt.ring, ckpt.offset

    def backward(self, x, grad, log_z, ckpt_ring, ckpt_offset, interval, boundary_mass):
        ckpt = reference.Checkpoints(ckpt_ring, ckpt_offset)
        return reference.backward(to_problem(x), grad, log_z, ckpt, interval, boundary_mass)

    def viterbi(self, x: Inputs):
        return reference.viterbi(to_problem(x))

    def sample(self, x: Inputs, log_z, num_samples, generator):
        return reference.sample(to_problem(x), log_z, num_samples, generator)


_REFERENCE = ReferenceBackend()


def resolve(fn: str, backend: str, device: torch.device):
    """The backend object for a request; "auto" honours FLASHSEMICRF_BACKEND."""
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
        if backend not in ("auto", "cuda", "triton", "cpu", "torch"):
            raise ValueError(
                f"{fn}: the environment variable {ENV_BACKEND} must be one of "
                f"auto, cuda, triton, cpu, torch; got {backend!r}"
            )
    if backend in ("auto", "torch"):
        return _REFERENCE
    raise RuntimeError(
        f"{fn}: backend {backend!r} is not available in this build of flashsemicrf: "
        "the compiled kernels are not implemented yet; use backend='torch' or 'auto'"
    )
