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

from . import _extension, reference
from . import ops as _ops  # noqa: F401  (registers the fakes and the autograd formula)
from ._validation import Inputs
from .segments import segments_from_start_labels

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

    def log_partition(self, x: Inputs, interval: int) -> Tensor:
        return _ReferenceLogPartition.apply(self, interval, *x)

    def forward(self, x: Inputs, interval: int):
        log_z, ckpt = reference.forward(to_problem(x), interval)
        return log_z, ckpt.ring, ckpt.offset

    def backward(self, x, grad, log_z, ckpt_ring, ckpt_offset, interval, boundary_mass):
        ckpt = reference.Checkpoints(ckpt_ring, ckpt_offset)
        # The ops' rule: start/end score gradients when asked for or when present.
        start = boundary_mass or x.start_scores is not None
        end = boundary_mass or x.end_scores is not None
        return reference.backward(to_problem(x), grad, log_z, ckpt, interval, start, end)

    def viterbi(self, x: Inputs):
        return reference.viterbi(to_problem(x))

    def sample(self, x: Inputs, log_z, num_samples, generator):
        p = to_problem(x)
        _, history = reference.forward_history(p)
        return reference.sample(p, history, log_z, num_samples, generator)


class CompiledBackend:
    """Kernels behind ops with the contract of flashsemicrf/ops.py: the C++ CPU
    kernel (``"cpu"``) and the CUDA kernels (``"cuda"``) as
    ``torch.ops.flashsemicrf``, the Triton kernels as ``torch.ops.flashsemicrf_triton``."""

    def __init__(self, name: str, namespace: str = "flashsemicrf"):
        self.name = name
        self.namespace = namespace

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    @staticmethod
    def args(x: Inputs) -> tuple:
        """The ops' inputs: start/end transitions filled with zeros when absent."""
        C = x.scores.shape[2]
        zeros = x.scores.new_zeros(C)
        return (
            x.scores, x.transition, x.duration, x.lengths,
            zeros if x.start_transition is None else x.start_transition,
            zeros if x.end_transition is None else x.end_transition,
            x.start_scores, x.end_scores,
        )

    def log_partition(self, x: Inputs, interval: int) -> Tensor:
        return self.ops.forward(*self.args(x), interval)[0]

    def forward(self, x: Inputs, interval: int):
        return self.ops.forward(*self.args(x), interval)

    def backward(self, x, grad, log_z, ckpt_ring, ckpt_offset, interval, boundary_mass):
        g = self.ops.backward(
            grad, *self.args(x), log_z, ckpt_ring, ckpt_offset, interval, boundary_mass
        )
        boundary = [t if t.dim() == 3 else None for t in g[5:]]
        return reference.Gradients(*g[:5], *boundary)

    def viterbi(self, x: Inputs):
        best, label = self.ops.viterbi(*self.args(x))
        return best, segments_from_start_labels(label, x.lengths)

    def sample(self, x: Inputs, log_z, num_samples, generator):
        alpha, sigma, offset = self.ops.filter(*self.args(x))
        history = reference.History(alpha, sigma, offset, None, None)
        return reference.sample(to_problem(x), history, log_z, num_samples, generator)


class _ReferenceLogPartition(torch.autograd.Function):
    """log Z with the reference's checkpointed backward (no autograd through a loop)."""

    @staticmethod
    def forward(ctx, impl, interval, *tensors):
        log_z, ckpt_ring, ckpt_offset = impl.forward(Inputs(*tensors), interval)
        ctx.impl, ctx.interval = impl, interval
        ctx.save_for_backward(log_z, ckpt_ring, ckpt_offset, *tensors)
        return log_z

    @staticmethod
    def backward(ctx, grad):
        log_z, ckpt_ring, ckpt_offset, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        g = ctx.impl.backward(
            Inputs(*tensors), grad, log_z, ckpt_ring, ckpt_offset, ctx.interval, False
        )
        per_input = (
            g.scores, g.transition.sum(0), g.duration.sum(0), None,
            g.start_transition.sum(0), g.end_transition.sum(0), g.start_scores, g.end_scores,
        )
        return (None, None) + tuple(v if need else None for v, need in zip(per_input, needs))


_REFERENCE = ReferenceBackend()
_CPU = CompiledBackend("cpu")
_CUDA = CompiledBackend("cuda")
# Decided once at import, so that torch.compile traces `resolve` as constants.
HAS_CPU_KERNELS = _extension.has_cpu_kernels()
HAS_CUDA_KERNELS = _extension.has_cuda_kernels()


def _unavailable(fn: str, backend: str, why: str) -> RuntimeError:
    return RuntimeError(f"{fn}: backend {backend!r} is not available: {why}")


def resolve(fn: str, backend: str, device: torch.device):
    """The backend object for a request; "auto" honours FLASHSEMICRF_BACKEND."""
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
        if backend not in ("auto", "cuda", "triton", "cpu", "torch"):
            raise ValueError(
                f"{fn}: the environment variable {ENV_BACKEND} must be one of "
                f"auto, cuda, triton, cpu, torch; got {backend!r}"
            )
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cpu" and HAS_CPU_KERNELS:
            return _CPU
        if device.type == "cuda" and HAS_CUDA_KERNELS:
            return _CUDA
        return _REFERENCE
    if backend == "torch":
        return _REFERENCE
    build = (
        "build the compiled extension with `pip install --no-build-isolation -e .` in the "
        "source checkout"
    )
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{fn}: backend 'cpu' needs CPU tensors, got tensors on {device}")
        if not HAS_CPU_KERNELS:
            raise _unavailable(fn, backend, f"flashsemicrf._C is not loaded; {build}")
        return _CPU
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{fn}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if not HAS_CUDA_KERNELS:
            raise _unavailable(
                fn, backend, f"flashsemicrf._C was built without CUDA kernels; {build} with "
                "nvcc found through CUDA_HOME"
            )
        return _CUDA
    from . import triton as triton_backend  # lazily: importing Triton takes a while

    if not triton_backend.AVAILABLE:
        raise _unavailable(fn, backend, f"Triton is not installed; {triton_backend.INSTALL_HINT}")
    return triton_backend.backend_for(fn, device)
