"""The contenders, each one call: ``backend(scores, transition, duration, lengths) -> log Z``.

Every backend gets the same problem in our convention (README, "The model") and maps it
to its own inputs inside the call, so the mapping is timed and its memory
counted as part of what a user of that library pays:

* ours (``cuda``, ``cuda-exp``, ``cuda-spans``, ``cuda-parallel``, ``cuda-chunks``,
  ``triton``, ``cpu``,
  ``cpu-log``, ``torch``): ``flashsemicrf.log_partition``
  with ``start_transition`` = flash-semicrf's "phantom start", the
  log-sum-exp of the transition over the previous label; ``cpu`` and
  ``cpu-log`` are the C++ kernel with its two algorithms, the scaled
  exp-domain forward (the default) and the log-domain scan, chosen by
  ``FLASHSEMICRF_CPU_ALGORITHM``, which the backend sets around each call
  (forward and backward) and restores afterwards; ``cuda`` and ``cuda-exp``
  likewise are the CUDA kernels with the log-domain forward and sweep (the
  default) and the exp-domain ones, chosen by ``FLASHSEMICRF_CUDA_ALGORITHM``,
  ``cuda-spans`` the exp-domain kernels with every span's recompute run
  before the backward's sweep (``FLASHSEMICRF_CUDA_RECOMPUTE=spans``), and
  ``cuda-parallel`` the exp-domain forward with the backward's sweeps run
  span-parallel: the mirror image's forward gives the backward ring at the
  end of every span, then one CTA sweeps each span
  (``FLASHSEMICRF_CUDA_SWEEP=parallel``); the other three set ``serial``;
  ``cuda-chunks`` is ``cuda-parallel`` with the forward (and the mirror
  image's) chunked: one CTA a span of each sequence, each from a guess a
  warm-up before it, put on one scale at the junctions
  (``FLASHSEMICRF_CUDA_FORWARD=chunks``; the others set ``serial``);
  ``triton-chunks`` is ``triton`` with the same chunked forward
  (``FLASHSEMICRF_TRITON_FORWARD=chunks``; the others set ``serial``);
  ``triton-exp`` is ``triton`` with the exp-domain forward
  (``FLASHSEMICRF_TRITON_ALGORITHM=exp``; the others set ``log``);
  ``triton-spans`` is ``triton`` with every span of the backward recomputed
  at once before its sweep (``FLASHSEMICRF_TRITON_RECOMPUTE=spans``; the
  others set ``sweep``); ``triton-parallel`` is ``triton-chunks`` with the
  backward's sweeps span-parallel, each span from a guess a warm-up after
  it, joined where the guess is forgotten
  (``FLASHSEMICRF_TRITON_SWEEP=parallel``; the others set ``serial``);
* flash-semicrf 0.2.0: ``cum_scores`` = prefix sums of the scores with a
  leading zero row, ``duration_bias`` = our duration;
* torch-struct 0.5: the dense edge tensor ``edge[b, s, d, c, c']`` (index
  d = 0 unused) built with vectorised ops, then ``SemiMarkovCRF(edge).partition``.
  All benchmark sequences have full length, so one batched call is exact
  (its wrong results with mixed lengths do not arise);
* pytorch-crf 0.7 (K = 1 only: a linear-chain CRF): ``emissions`` = scores plus
  the (1, C) duration row, ``transitions`` = our (C, C) transition (same
  ``[from, to]`` order), ``start_transitions`` = the phantom start,
  ``end_transitions`` = 0, ``mask`` from the lengths; log Z is its
  ``CRF._compute_normalizer``, the denominator of ``CRF.forward``'s
  log-likelihood (the forward also scores the gold tags, which log Z does not
  include and the other backends do not do).

With a duration-dependent transition (K, C, C) the phantom start of
flash-semicrf and torch-struct depends on the first segment's duration; the
benchmark inputs make it the same for every duration (see ``cases.make_inputs``),
so that the three libraries compute the same log Z.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

Tensor = torch.Tensor

OURS = ("cuda", "cuda-exp", "cuda-spans", "cuda-parallel", "cuda-chunks", "triton",
        "triton-chunks", "triton-exp", "triton-spans", "triton-parallel", "cpu", "cpu-log",
        "torch")
# The C++ kernel reads this variable on every call: its algorithm per backend.
CPU_ALGORITHM_ENV = "FLASHSEMICRF_CPU_ALGORITHM"
CPU_ALGORITHM = {"cpu": "exp", "cpu-log": "log"}
# Backends that run one sequence per thread (parallel over the batch only).
ONE_SEQUENCE_PER_THREAD = tuple(CPU_ALGORITHM)
# The same for the CUDA kernels: the forward's algorithm, where the backward
# recomputes its spans, whether it sweeps them one after another or all at
# once, and whether the forward runs chunked. Every backend sets all four, so
# that a value in the shell changes none of them (parallel mode ignores the
# recompute switch, and the chunked forward the algorithm's; set them anyway).
CUDA_ALGORITHM_ENV = "FLASHSEMICRF_CUDA_ALGORITHM"
CUDA_RECOMPUTE_ENV = "FLASHSEMICRF_CUDA_RECOMPUTE"
CUDA_SWEEP_ENV = "FLASHSEMICRF_CUDA_SWEEP"
CUDA_FORWARD_ENV = "FLASHSEMICRF_CUDA_FORWARD"


def _cuda_env(algorithm: str, recompute: str, sweep: str, forward: str) -> dict[str, str]:
    return {CUDA_ALGORITHM_ENV: algorithm, CUDA_RECOMPUTE_ENV: recompute,
            CUDA_SWEEP_ENV: sweep, CUDA_FORWARD_ENV: forward}


CUDA_ENV = {
    "cuda": _cuda_env("log", "sweep", "serial", "serial"),
    "cuda-exp": _cuda_env("exp", "sweep", "serial", "serial"),
    "cuda-spans": _cuda_env("exp", "spans", "serial", "serial"),
    "cuda-parallel": _cuda_env("exp", "sweep", "parallel", "serial"),
    "cuda-chunks": _cuda_env("exp", "sweep", "parallel", "chunks"),
}
# The Triton forward: serial or chunked, log or exp domain; the backward's
# recomputes: in the sweep or every span at once; its sweeps: serial or
# span-parallel (all four set always; the parallel sweeps recompute every
# span at once whatever the recompute switch says).
TRITON_FORWARD_ENV = "FLASHSEMICRF_TRITON_FORWARD"
TRITON_ALGORITHM_ENV = "FLASHSEMICRF_TRITON_ALGORITHM"
TRITON_RECOMPUTE_ENV = "FLASHSEMICRF_TRITON_RECOMPUTE"
TRITON_SWEEP_ENV = "FLASHSEMICRF_TRITON_SWEEP"


def _triton_env(forward: str, algorithm: str, recompute: str, sweep: str) -> dict[str, str]:
    return {TRITON_FORWARD_ENV: forward, TRITON_ALGORITHM_ENV: algorithm,
            TRITON_RECOMPUTE_ENV: recompute, TRITON_SWEEP_ENV: sweep}


TRITON_ENV = {"triton": _triton_env("serial", "log", "sweep", "serial"),
              "triton-chunks": _triton_env("chunks", "log", "sweep", "serial"),
              "triton-exp": _triton_env("serial", "exp", "sweep", "serial"),
              "triton-spans": _triton_env("serial", "log", "spans", "serial"),
              "triton-parallel": _triton_env("chunks", "log", "spans", "parallel")}
ALL = OURS + ("flash-semicrf-triton", "flash-semicrf-torch", "torch-struct", "pytorch-crf")
# Backends that model one label per position only (no durations): run where K = 1.
LINEAR_CHAIN_ONLY = ("pytorch-crf",)

# How run time grows, for the skip estimates: "kernel" ∝ the log-sum-exp terms;
# "loop" is a Python loop over T whose per-step cost is mostly overhead;
# "dense" is torch-struct's O(log T) matrix products on (K·C)² blocks.
KIND = {
    "cuda": "kernel",
    "cuda-exp": "kernel",
    "cuda-spans": "kernel",
    "cuda-parallel": "kernel",
    "cuda-chunks": "kernel",
    "triton": "kernel",
    "triton-chunks": "kernel",
    "triton-exp": "kernel",
    "triton-spans": "kernel",
    "triton-parallel": "kernel",
    "cpu": "kernel",
    "cpu-log": "kernel",
    "torch": "loop",
    "flash-semicrf-triton": "kernel",
    "flash-semicrf-torch": "loop",
    "torch-struct": "dense",
    "pytorch-crf": "loop",
}


def handles(name: str, K: int) -> bool:
    """Whether the backend can compute a problem with maximum duration K at all
    (a backend that cannot gets no row for that case, rather than a skip)."""
    return K == 1 or name not in LINEAR_CHAIN_ONLY


def python_steps(name: str, T: int, K: int) -> int:
    """Iterations of a loop backend's Python loop: ours steps over positions;
    flash-semicrf's PyTorch path also loops over the min(K, t) durations of
    every position t."""
    if name == "flash-semicrf-torch":
        if T <= K:
            return T * (T + 1) // 2
        return K * (K + 1) // 2 + (T - K) * K
    return T


def cost_units(name: str, B: int, T: int, K: int, C: int, transition: str, threads: int) -> float:
    """Relative run time within a family of comparable shapes (see ``comparable``).
    ``name`` may carry a "-f64" suffix (the float64 reference run)."""
    name = name.removesuffix("-f64")
    kind = KIND[name]
    if kind == "loop":
        return float(python_steps(name, T, K))
    if kind == "dense":
        return float(max(T, 1 << max(0, (T - 1).bit_length())))
    per_position = K * C * C if transition == "duration" else C * C + K * C
    if name.startswith("flash-semicrf"):
        per_position = K * C * C  # it does not factorise a static transition
    parallel = min(B, threads) if name in ONE_SEQUENCE_PER_THREAD else 1
    return B * T * per_position / parallel


def exp_peak_for(peak: dict, name: str, B: int) -> float:
    """The exp throughput a backend's log-sum-exp rate is compared with.

    On a CPU (``peak`` from ``measure.cpu_exp_peak``): our C++ kernel runs one
    sequence per thread, so on a batch of B it can use min(B, threads) threads,
    and its fair peak is that many times the single-thread peak; everything
    else gets the peak measured with all the benchmark's threads. On a GPU:
    the device's peak, whatever the batch."""
    single = peak.get("single_thread_exp_per_s")
    if single is None:
        return peak["exp_per_s"]
    if name.removesuffix("-f64") in ONE_SEQUENCE_PER_THREAD:
        return min(B, peak.get("threads", 1)) * single
    return peak.get("all_threads_exp_per_s", single)


def comparable(name: str, a: tuple, b: tuple) -> bool:
    """Whether run times at shapes a and b = (B, K, C) scale by ``cost_units``:
    a Python loop's step cost depends on B and C; the dense chart on all three;
    a kernel's time follows its log-sum-exp terms at any shape."""
    kind = KIND[name.removesuffix("-f64")]
    if kind == "loop":
        return (a[0], a[2]) == (b[0], b[2])
    if kind == "dense":
        return a == b
    return True


# fwd+bwd over fwd time, when only the forward has been seen (measured:
# flash-semicrf's PyTorch path 6-7x; the others 2-5x).
FWD_BWD_OVER_FWD = {"kernel": 5.0, "loop": 8.0, "dense": 5.0}


def phantom_start(transition: Tensor) -> Tensor:
    """Our start_transition (C,) that equals flash-semicrf's and torch-struct's
    free first label: LSE over the previous label (the same for every duration
    with the benchmark's (K, C, C) inputs, so duration 1's is taken)."""
    t = transition if transition.dim() == 2 else transition[0]
    return t.logsumexp(0)


def _ours(name: str) -> Callable:
    import flashsemicrf

    def call(scores, transition, duration, lengths):
        return flashsemicrf.log_partition(
            scores, transition, duration, lengths,
            start_transition=phantom_start(transition), backend=name,
        )

    return call


def cum_scores(scores: Tensor) -> Tensor:
    """(B, T, C) -> (B, T+1, C): prefix sums with a leading zero row."""
    B, _, C = scores.shape
    return torch.cat([scores.new_zeros(B, 1, C), scores.cumsum(1)], 1)


def _flash(use_triton: bool) -> Callable:
    from flash_semicrf.streaming import semi_crf_streaming_forward

    def call(scores, transition, duration, lengths):
        with warnings.catch_warnings():
            # It warns about un-centred long sequences; the inputs are centred
            # random scores and its result is checked against ours anyway.
            warnings.simplefilter("ignore")
            return semi_crf_streaming_forward(
                cum_scores(scores), transition, duration, lengths, duration.shape[0],
                use_triton=use_triton,
            )

    return call


def dense_edges(scores: Tensor, transition: Tensor, duration: Tensor) -> Tensor:
    """torch-struct's edge (B, T, K+1, C, C): edge[b, s, d, c, c'] is the score of
    segment (s, d, c) after label c'; d = 0 and segments past T are -inf."""
    B, T, C = scores.shape
    K = duration.shape[0]
    dev = scores.device
    prefix = cum_scores(scores)  # (B, T+1, C)
    start = torch.arange(T, device=dev).unsqueeze(1)  # (T, 1)
    dur = torch.arange(K + 1, device=dev).unsqueeze(0)  # (1, K+1)
    end = start + dur
    valid = (end <= T) & (dur >= 1)  # (T, K+1)
    seg = prefix[:, end.clamp(max=T)] - prefix[:, start.expand(T, K + 1)]  # (B, T, K+1, C)
    seg = seg + torch.cat([duration.new_zeros(1, C), duration], 0)
    seg = seg.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    if transition.dim() == 2:
        trans = transition.t().expand(K + 1, C, C)  # [d, c, c']
    else:
        trans = torch.cat([transition[:1], transition], 0).transpose(1, 2)
    return seg.unsqueeze(-1) + trans


def _torch_struct() -> Callable:
    from torch_struct import SemiMarkovCRF

    def call(scores, transition, duration, lengths):
        with warnings.catch_warnings():  # its Distribution subclass lacks arg_constraints
            warnings.simplefilter("ignore")
            return SemiMarkovCRF(dense_edges(scores, transition, duration)).partition

    return call


def _pytorch_crf() -> Callable:
    from torchcrf import CRF

    crfs: dict[tuple, CRF] = {}  # one module per (C, device, dtype), its parameters replaced

    def call(scores, transition, duration, lengths):
        B, T, C = scores.shape
        if duration.shape[0] != 1:
            raise ValueError(f"pytorch-crf is a linear-chain CRF: K = 1 only, got K = "
                             f"{duration.shape[0]}")
        key = (C, scores.device, scores.dtype)
        if key not in crfs:
            crf = CRF(C, batch_first=True).to(scores.device, scores.dtype)
            # Plain attributes instead of its Parameters, so that the gradients
            # flow to the benchmark's inputs like everyone else's.
            for name in ("transitions", "start_transitions", "end_transitions"):
                delattr(crf, name)
            crfs[key] = crf
        crf = crfs[key]
        crf.transitions = transition if transition.dim() == 2 else transition[0]
        crf.start_transitions = phantom_start(transition)
        crf.end_transitions = scores.new_zeros(C)
        emissions = scores + duration[0]
        mask = torch.arange(T, device=scores.device) < lengths.unsqueeze(1)
        try:
            # Its time-major layout, as CRF.forward(batch_first=True) makes it.
            return crf._compute_normalizer(emissions.transpose(0, 1), mask.transpose(0, 1))
        finally:
            # Hold nothing of this call (its memory is measured per call).
            crf.transitions = crf.start_transitions = crf.end_transitions = None

    return call


def dense_peak_bytes(B: int, T: int, K: int, C: int, itemsize: int) -> int:
    """torch-struct's peak memory, roughly: its first log-semiring product
    broadcasts (B·N/2, KC, KC, KC) with N = T rounded up to a power of two, and
    logsumexp makes a second tensor of that size; the backward keeps the levels."""
    n = 1 << max(0, (T - 1).bit_length())
    m = K * C
    return 3 * B * max(1, n // 2) * m**3 * itemsize


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then put back what was there
    (unset stays unset), even when the block raises."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Backend:
    name: str
    kind: str
    fn: Callable | None  # None: unavailable
    why: str = ""  # why it is unavailable
    # Set around every call; ``run.call`` also holds them over the backward.
    env: dict[str, str] = field(default_factory=dict)

    def __call__(self, *args):
        with environment(self.env):
            return self.fn(*args)


def _import_error(exc: BaseException) -> str:
    return f"cannot import: {type(exc).__name__}: {exc}"


def make(name: str, device: torch.device) -> Backend:
    """The backend, or one whose ``why`` says why it cannot run on ``device``."""
    kind = KIND[name]
    cuda = device.type == "cuda"
    if name in CUDA_ENV and not cuda:
        return Backend(name, kind, None, "needs a CUDA device")
    if name in TRITON_ENV and not cuda:
        return Backend(name, kind, None, "needs a CUDA device (on CPU only under "
                       "TRITON_INTERPRET=1: not benchmarked)")
    if name == "flash-semicrf-triton" and not cuda:
        return Backend(name, kind, None, "needs a CUDA device")
    if name in CPU_ALGORITHM and cuda:
        return Backend(name, kind, None, "runs on CPU tensors only (run with --device cpu)")
    env = ({CPU_ALGORITHM_ENV: CPU_ALGORITHM[name]} if name in CPU_ALGORITHM else
           dict(CUDA_ENV[name]) if name in CUDA_ENV else
           dict(TRITON_ENV[name]) if name in TRITON_ENV else {})
    try:
        if name in CPU_ALGORITHM:
            fn = _ours("cpu")
        elif name in CUDA_ENV:
            fn = _ours("cuda")
        elif name in TRITON_ENV:
            fn = _ours("triton")
        elif name in OURS:
            fn = _ours(name)
        elif name == "flash-semicrf-triton":
            fn = _flash(True)
        elif name == "flash-semicrf-torch":
            fn = _flash(False)
        elif name == "pytorch-crf":
            fn = _pytorch_crf()
        else:
            fn = _torch_struct()
    except ImportError as exc:
        return Backend(name, kind, None, _import_error(exc))
    return Backend(name, kind, fn, env=env)


def smoke_test(backend: Backend, device: torch.device) -> str:
    """Run a tiny problem; '' when it works, else the reason it does not
    (e.g. our kernels not built, or the Triton kernel not written yet)."""
    g = torch.Generator().manual_seed(0)
    B, T, K, C = 2, 8, 1 if backend.name in LINEAR_CHAIN_ONLY else 4, 3
    args = (
        torch.randn(B, T, C, generator=g).to(device),
        torch.randn(C, C, generator=g).to(device),
        torch.randn(K, C, generator=g).to(device),
        torch.full((B,), T, dtype=torch.long, device=device),
    )
    try:
        with torch.no_grad():
            z = backend(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if name_takes_fallback(backend.name, args[0]):
            return "flash-semicrf would fall back to its PyTorch path here"
        if not torch.isfinite(z).all():
            return "gives a non-finite log Z on a tiny problem"
    except Exception as exc:  # noqa: BLE001 — any failure means "not available"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {msg}"[:200]
    return ""


def prepare(names, device: torch.device) -> dict[str, Backend]:
    """The named backends, each smoke-tested on ``device``; one that cannot run
    says why. Prints one line per backend."""
    out = {}
    for name in names:
        b = make(name, device)
        if b.fn is not None:
            why = smoke_test(b, device)
            if why:
                b = Backend(name, b.kind, None, f"not available: {why}", env=b.env)
        out[name] = b
        print(f"  {name:21s} {'ready' if b.fn else b.why}", flush=True)
    return out


def name_takes_fallback(name: str, scores: Tensor) -> bool:
    """flash-semicrf's Triton path silently runs its PyTorch code off CUDA or
    without Triton; it must not be timed under the Triton name then."""
    if name != "flash-semicrf-triton":
        return False
    try:
        from flash_semicrf.streaming.triton_forward import HAS_TRITON
    except ImportError:
        return True
    return not (HAS_TRITON and scores.is_cuda)
