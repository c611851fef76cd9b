"""What is measured: our users' regimes as sweeps over T, B, K, C and the
transition form, a quick default and a full set for each device type.

Regimes: NER (K=16, C=9), speech (K=30, C=39, T ≤ 20k), genomics
(K=200…1000, C=6…24, T up to 10^6 and beyond on a GPU), tagging (K=1: a
linear-chain CRF, where pytorch-crf joins), and the headline cases of the
compiled-kernels issue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REGIMES = ("headline", "tagging", "ner", "speech", "genomics")
# What each regime stands for, in the words of latest.md.
REGIME_TITLES = {
    "headline": "the headline comparisons",
    "tagging": "tagging: K = 1, one label per position (a linear-chain CRF, pytorch-crf's model)",
    "ner": "named entities: segments up to K = 16 tokens, C = 9 labels",
    "speech": "speech: segments up to K = 30 frames, C = 39 labels",
    "genomics": "genomics: long segments (K = 200 to 1000), C = 6 to 24 labels, long sequences",
}
PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    regime: str
    sweep: str  # the swept variable: "T", "B", "K", "C", "transition" or "headline"
    B: int
    T: int
    K: int
    C: int
    transition: str = "static"  # or "duration": (K, C, C)
    passes: tuple = PASSES
    backends: tuple | None = None  # None: every selected backend
    force: tuple = ()  # backends run even when slow (up to the headline budget)

    @property
    def label(self) -> str:
        tr = "" if self.transition == "static" else " dur"
        return f"{self.regime} B{self.B} T{self.T} K{self.K} C{self.C}{tr}"


def lse_terms(B: int, T: int, K: int, C: int, transition: str) -> int:
    """Log-sum-exp terms of one forward: B·T·(C² + K·C) with a static
    transition (the factorised recursion), B·T·K·C² with a duration-dependent one."""
    per_position = K * C * C if transition == "duration" else C * C + K * C
    return B * T * per_position


# A forward+backward is counted as three forwards: the checkpointed backward
# recomputes the forward, sweeps the backward messages, and forms one
# posterior term per forward term.
PASS_TERMS = {"fwd": 1, "fwd+bwd": 3}


def _sweep(regime, sweep, values, **fixed):
    return [Case(regime, sweep, **{**fixed, sweep: v}) for v in values]


def _cpu(full: bool) -> dict[str, list[Case]]:
    ner = dict(K=16, C=9)
    speech = dict(K=30, C=39)
    # K = 1 has no duration to depend on: a static transition only.
    tagging = dict(K=1, C=9)
    cpu_kernel = ("cpu", "cpu-log")  # its exp-domain and log-domain algorithms
    if not full:
        return {
            "headline": [
                Case("headline", "headline", B=4, T=2000, K=30, C=24, passes=("fwd+bwd",),
                     backends=(*cpu_kernel, "torch", "flash-semicrf-torch"),
                     force=(*cpu_kernel, "flash-semicrf-torch")),
                # The two algorithms' forwards alone at the same size, and both
                # passes with a (K, C, C) transition (the genomics T sweep has
                # B=1 T=10^4 K=200 C=24): the sizes of the CPU throughput targets.
                Case("headline", "headline", B=4, T=2000, K=30, C=24, passes=("fwd",),
                     backends=cpu_kernel, force=cpu_kernel),
                Case("headline", "headline", B=1, T=2000, K=30, C=24, transition="duration",
                     backends=cpu_kernel, force=cpu_kernel),
            ],
            "tagging": _sweep("tagging", "T", (64, 256, 1024), B=4, **tagging),
            "ner": _sweep("ner", "T", (16, 64, 256, 1024), B=4, **ner)
            + _sweep("ner", "B", (1, 16, 64), T=128, **ner)
            + [Case("ner", "transition", B=4, T=256, transition="duration", **ner)],
            "speech": _sweep("speech", "T", (250, 1000, 4000), B=2, **speech)
            + [Case("speech", "transition", B=2, T=250, transition="duration", **speech)],
            "genomics": _sweep("genomics", "T", (1000, 4000, 10000), B=1, K=200, C=24)
            + _sweep("genomics", "K", (200, 500, 1000), B=1, T=4000, C=6)
            # With the T and K sweeps' C = 24 and C = 6 cases: C = 6, 12, 24 at T = 4000.
            + [Case("genomics", "C", B=1, T=4000, K=200, C=12),
               Case("genomics", "transition", B=1, T=1000, K=200, C=6, transition="duration")],
        }
    return {
        "headline": _cpu(False)["headline"],
        "tagging": _sweep("tagging", "T", (16, 64, 256, 1024, 4096), B=4, **tagging)
        + _sweep("tagging", "B", (1, 16, 64), T=256, **tagging)
        + _sweep("tagging", "C", (5, 17, 33), B=4, T=256, K=1),
        "ner": _sweep("ner", "T", (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), B=4, **ner)
        + _sweep("ner", "B", (1, 4, 16, 64, 256), T=128, **ner)
        + _sweep("ner", "C", (5, 9, 17, 33), B=4, T=512, K=16)
        + _sweep("ner", "T", (64, 256, 1024), B=4, transition="duration", **ner),
        "speech": _sweep("speech", "T", (250, 500, 1000, 2000, 5000, 10000, 20000), B=4, **speech)
        + _sweep("speech", "K", (10, 20, 30, 60), B=4, T=2000, C=39)
        + _sweep("speech", "B", (1, 4, 16), T=2000, **speech)
        + _sweep("speech", "T", (250, 1000, 4000), B=4, transition="duration", **speech),
        "genomics": _sweep("genomics", "T", (1000, 4000, 10000, 40000, 100000), B=1, K=200, C=24)
        + _sweep("genomics", "K", (200, 500, 1000), B=1, T=10000, C=6)
        + _sweep("genomics", "C", (6, 12, 24), B=1, T=10000, K=500)
        + _sweep("genomics", "B", (1, 2, 4), T=10000, K=200, C=24)
        + _sweep("genomics", "T", (1000, 10000), B=1, K=200, C=6, transition="duration"),
    }


def _gpu(full: bool) -> dict[str, list[Case]]:
    ner = dict(K=16, C=9)
    speech = dict(K=30, C=39)
    tagging = dict(K=1, C=9)
    gpu_backends = ("cuda", "cuda-exp", "cuda-spans", "cuda-parallel", "cuda-chunks", "triton",
                    "triton-chunks", "triton-exp", "triton-spans", "triton-parallel",
                    "flash-semicrf-triton")
    headline = [
        Case("headline", "headline", B=8, T=100_000, K=200, C=24, force=gpu_backends),
        # The memory headline: only the streaming GPU kernels can hold it.
        Case("headline", "headline", B=1, T=1_000_000, K=1000, C=24, backends=gpu_backends,
             force=gpu_backends),
    ]
    if not full:
        return {
            "headline": headline,
            "tagging": _sweep("tagging", "T", (256, 1024, 4096), B=32, **tagging),
            "ner": _sweep("ner", "T", (64, 256, 1024, 4096), B=32, **ner)
            + _sweep("ner", "B", (1, 32, 256, 1024), T=256, **ner)
            + [Case("ner", "transition", B=32, T=1024, transition="duration", **ner)],
            "speech": _sweep("speech", "T", (1000, 5000, 20000), B=8, **speech)
            + [Case("speech", "transition", B=8, T=5000, transition="duration", **speech)],
            "genomics": _sweep("genomics", "T", (10_000, 100_000, 1_000_000), B=4, K=200, C=24)
            + _sweep("genomics", "K", (200, 500, 1000), B=4, T=100_000, C=6)
            + _sweep("genomics", "C", (6, 12, 24), B=4, T=100_000, K=500)
            + [Case("genomics", "transition", B=4, T=100_000, K=200, C=6,
                    transition="duration")],
        }
    return {
        "headline": headline,
        "tagging": _sweep("tagging", "T", (64, 256, 1024, 4096, 16384), B=32, **tagging)
        + _sweep("tagging", "B", (1, 32, 256, 1024), T=1024, **tagging)
        + _sweep("tagging", "C", (5, 17, 33, 65), B=32, T=1024, K=1),
        "ner": _sweep("ner", "T", (16, 64, 256, 1024, 4096, 16384), B=32, **ner)
        + _sweep("ner", "B", (1, 8, 32, 128, 512, 2048), T=256, **ner)
        + _sweep("ner", "C", (5, 9, 17, 33, 65), B=32, T=1024, K=16)
        + _sweep("ner", "T", (256, 1024, 4096), B=32, transition="duration", **ner),
        "speech": _sweep("speech", "T", (500, 1000, 2000, 5000, 10000, 20000), B=16, **speech)
        + _sweep("speech", "K", (10, 20, 30, 60, 100), B=16, T=5000, C=39)
        + _sweep("speech", "B", (1, 4, 16, 64), T=5000, **speech)
        + _sweep("speech", "T", (1000, 5000, 20000), B=16, transition="duration", **speech),
        "genomics": _sweep("genomics", "T", (10_000, 100_000, 1_000_000, 10_000_000), B=1,
                           K=200, C=6)
        + _sweep("genomics", "T", (10_000, 100_000, 1_000_000), B=4, K=200, C=24)
        + _sweep("genomics", "K", (200, 500, 1000), B=1, T=1_000_000, C=24)
        + _sweep("genomics", "C", (6, 12, 24), B=1, T=1_000_000, K=500)
        + _sweep("genomics", "B", (1, 4, 16), T=100_000, K=200, C=24)
        + _sweep("genomics", "T", (10_000, 100_000, 1_000_000), B=1, K=200, C=6,
                 transition="duration"),
    }


def plan(device: torch.device, full: bool, regimes=REGIMES) -> list[Case]:
    """The cases to run, headline first (it is the one that must not be cut)."""
    table = _gpu(full) if device.type == "cuda" else _cpu(full)
    return [case for r in REGIMES if r in regimes for case in table[r]]


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The problem every backend gets: (scores, transition, duration, lengths).

    Scores are standard normal (zero-mean, the case flash-semicrf asks its
    users to prepare); every sequence has full length T. A duration-dependent
    transition is built so that its log-sum-exp over the previous label does
    not depend on the duration, which lets flash-semicrf's and torch-struct's
    free first label be expressed as our (C,) start_transition.
    """
    g = torch.Generator().manual_seed(seed)
    B, T, K, C = case.B, case.T, case.K, case.C
    scores = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    duration = 0.5 * torch.randn(K, C, generator=g, dtype=torch.float64)
    if case.transition == "static":
        transition = 0.5 * torch.randn(C, C, generator=g, dtype=torch.float64)
    else:
        raw = 0.5 * torch.randn(K, C, C, generator=g, dtype=torch.float64)
        column = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
        transition = raw - raw.logsumexp(1, keepdim=True) + column
    lengths = torch.full((B,), T, dtype=torch.long)
    floats = [t.to(device=device, dtype=dtype) for t in (scores, transition, duration)]
    return (*floats, lengths.to(device))
