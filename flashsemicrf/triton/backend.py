"""``backend="triton"``: the adapter from the validated problem to the Triton ops,
mirroring ``CompiledBackend`` (flashsemicrf/_backends.py)."""

from __future__ import annotations

import torch

from .. import reference
from .._backends import CompiledBackend, segments_from_starts, to_problem
from .._validation import Inputs
from . import ops  # noqa: F401  (registers torch.ops.flashsemicrf_triton)

Tensor = torch.Tensor


class TritonBackend:
    """The Triton kernels through the ``torch.ops.flashsemicrf_triton`` ops."""

    name = "triton"
    args = staticmethod(CompiledBackend.args)

    def log_partition(self, x: Inputs, interval: int) -> Tensor:
        return torch.ops.flashsemicrf_triton.forward(*self.args(x), interval)[0]

    def forward(self, x: Inputs, interval: int):
        return torch.ops.flashsemicrf_triton.forward(*self.args(x), interval)

    def backward(self, x, grad, log_z, ckpt_ring, ckpt_offset, interval, boundary_mass):
        g = torch.ops.flashsemicrf_triton.backward(
            grad, *self.args(x), log_z, ckpt_ring, ckpt_offset, interval, boundary_mass
        )
        boundary = [t if t.dim() == 3 else None for t in g[5:]]
        return reference.Gradients(*g[:5], *boundary)

    def viterbi(self, x: Inputs):
        best, label = torch.ops.flashsemicrf_triton.viterbi(*self.args(x))
        return best, segments_from_starts(label, x.lengths)

    def sample(self, x: Inputs, log_z, num_samples, generator):
        alpha, sigma, offset = torch.ops.flashsemicrf_triton.filter(*self.args(x))
        history = reference.History(alpha, sigma, offset, None, None)
        return reference.sample(to_problem(x), history, log_z, num_samples, generator)


BACKEND = TritonBackend()
