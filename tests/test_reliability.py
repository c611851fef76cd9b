"""Reliability: property-based agreement of the compiled backends, constraints, scale, resources.

Bounded by default for CI. Soak run: FLASHSEMICRF_SOAK=1 (many more
hypothesis examples) and FLASHSEMICRF_RUN_SLOW=1 (the T = 10^6 / 10^7 checks).
"""

from __future__ import annotations

import gc
import math
import os
import resource
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashsemicrf as F
from conftest import OPTIONAL, assert_close, log_z_and_grads
from flashsemicrf import backends
from oracles import brute_force

SOAK = os.environ.get("FLASHSEMICRF_SOAK") == "1"
settings.register_profile(
    "flashsemicrf",
    max_examples=2000 if SOAK else 60,
    deadline=None,
    derandomize=not SOAK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("flashsemicrf")

COMPILED = [name for name in ("cpu", "cuda") if name in backends.available()]


@st.composite
def problems(draw, max_T=10, max_K=5, max_C=4, max_B=3):
    """A random problem: sizes, optional inputs, 2-D/3-D transitions, ragged
    lengths, −inf patterns and magnitudes from 1e-3 to 1e4."""
    B = draw(st.integers(1, max_B))
    T = draw(st.integers(1, max_T))
    K = draw(st.integers(1, max_K))
    C = draw(st.integers(1, max_C))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 1e4]))
    neg_inf_p = draw(st.sampled_from([0.0, 0.0, 0.2, 0.6]))
    dd = draw(st.booleans())
    optional = tuple(n for n in OPTIONAL if draw(st.booleans()))
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    def forbid(x):
        return x.masked_fill(torch.rand(x.shape, generator=g) < neg_inf_p, -math.inf)

    kw = {
        "scores": randn(B, T, C),
        "transition": forbid(randn(K, C, C) if dd else randn(C, C)),
        "duration": forbid(randn(K, C)),
        "lengths": torch.randint(1, T + 1, (B,), generator=g),
    }
    shapes = {"start_transition": (C,), "end_transition": (C,), "start_scores": (B, T, C),
              "end_scores": (B, T, C)}
    for name in optional:
        kw[name] = forbid(randn(*shapes[name]))
    return kw



def _tolerance(kw, dtype):
    """Absolute tolerance on log Z: relative to the problem's magnitude."""
    scale = max(float(v[torch.isfinite(v)].abs().max()) if torch.isfinite(v).any() else 0.0
                for v in kw.values() if v.is_floating_point())
    T = kw["scores"].shape[1]
    eps = 1e-13 if dtype == torch.float64 else 3e-6
    return eps * max(1.0, scale) * T * 4


@given(problems(max_T=7, max_K=4, max_C=3))
def test_reference_matches_brute_force(kw):
    oracle = brute_force(**kw)
    log_z = F.log_partition(**kw, backend="torch")
    assert_close("log Z", log_z, oracle.log_partition, _tolerance(kw, torch.float64))
    m = F.marginals(**kw, backend="torch")
    # Marginals are probabilities: an absolute tolerance whatever the magnitudes.
    assert_close("label marginals", m.labels, oracle.label_marginals, 1e-7)
    best, _ = F.viterbi(**kw, backend="torch")
    assert_close("viterbi", best, oracle.best, _tolerance(kw, torch.float64))


@pytest.mark.skipif(not COMPILED, reason="no compiled backend")
@given(problems())
def test_compiled_backends_match_reference(kw):
    ref_z, ref_g = log_z_and_grads(kw, "torch")
    for backend in COMPILED:
        for dtype in (torch.float64, torch.float32):
            cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()}
            if backend == "cuda":
                cast = {k: v.cuda() for k, v in cast.items()}
            z, g = log_z_and_grads(cast, backend)
            assert not torch.isnan(z).any()
            tol = _tolerance(kw, dtype)
            assert_close(f"{backend} {dtype} log Z", z.cpu(), ref_z, tol)
            if dtype == torch.float64 or max(abs(float(v[torch.isfinite(v)].abs().max()))
                                             if torch.isfinite(v).any() else 0.0
                                             for v in kw.values() if v.is_floating_point()) < 100:
                gtol = 1e-8 if dtype == torch.float64 else 2e-3
                for name in g:
                    assert_close(f"{backend} {dtype} d/d {name}", g[name].cpu(), ref_g[name], gtol)


@pytest.mark.parametrize("backend", ["torch"] + COMPILED)
def test_constraint_heavy_problem(backend):
    """A BIO-like grammar: most transitions forbidden, durations bounded per label."""
    C, K, T = 5, 6, 40
    transition = torch.full((C, C), -math.inf, dtype=torch.float64)
    for i in range(C):
        transition[i, (i + 1) % C] = 0.0  # a cycle: each label has one successor
    duration = torch.full((K, C), -math.inf, dtype=torch.float64)
    for c in range(C):
        duration[c % K : c % K + 2, c] = 0.0  # label c lasts (c mod K)+1 or +2
    start = torch.full((C,), -math.inf, dtype=torch.float64)
    start[0] = 0.0
    g = torch.Generator().manual_seed(1)
    kw = dict(scores=torch.randn(3, T, C, generator=g, dtype=torch.float64), transition=transition,
              duration=duration, lengths=torch.tensor([40, 23, 7]), start_transition=start)
    if backend == "cuda":
        kw = {k: v.cuda() for k, v in kw.items()}
    z, grads = log_z_and_grads(kw, backend)
    ref_z, ref_g = log_z_and_grads({k: v.cpu() for k, v in kw.items()}, "torch")
    assert_close("log Z", z.cpu(), ref_z, 1e-9)
    for name in grads:
        assert not torch.isnan(grads[name]).any()
        assert_close(f"d/d {name}", grads[name].cpu(), ref_g[name], 1e-9)
    best, segs = F.viterbi(**kw, backend=backend)
    feasible = torch.isfinite(best)
    if feasible.all():
        assert_close("score of the Viterbi path", F.score(segs, **kw).cpu(), best.cpu(), 1e-9)


@pytest.mark.skipif(not COMPILED, reason="no compiled backend")
def test_repeated_calls_do_not_grow_memory():
    g = torch.Generator().manual_seed(4)
    kw = dict(scores=torch.randn(4, 400, 6, generator=g), transition=torch.randn(6, 6, generator=g),
              duration=torch.randn(20, 6, generator=g))

    def work():
        leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
        F.log_partition(**leaves, backend="cpu").sum().backward()
        F.viterbi(**kw, backend="cpu")
        F.marginals(**kw, backend="cpu")

    for _ in range(20):
        work()
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(200):
        work()
    gc.collect()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"peak RSS grew by {grown_kib} KiB over 200 calls")
    # One call's tensors are ~ 100 KiB; a leak of them per call would add ~20 MiB.
    assert grown_kib < 8 * 1024


@pytest.mark.skipif(not COMPILED, reason="no compiled backend")
def test_calls_from_two_threads_at_once():
    g = torch.Generator().manual_seed(5)
    problems_ = [dict(scores=torch.randn(2, 300, 5, generator=g, dtype=torch.float64),
                      transition=torch.randn(5, 5, generator=g, dtype=torch.float64),
                      duration=torch.randn(15, 5, generator=g, dtype=torch.float64))
                 for _ in range(2)]
    expected = [log_z_and_grads(kw, "cpu") for kw in problems_]
    results: list = [None, None]
    errors: list = []

    def run(i):
        try:
            for _ in range(5):
                results[i] = log_z_and_grads(problems_[i], "cpu")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (z, g_), (ez, eg) in zip(results, expected):
        assert torch.equal(z, ez)
        assert torch.equal(g_["scores"], eg["scores"])


# Gradients that sum a term of every position: float64 accumulation is what
# keeps them within shared_tol. start/end_transition are shared too, but each
# sequence adds one posterior (of the segments starting at 0 / ending at L):
# their error is a per-position one, held to the per-position target.
SUMS_OVER_T = ("transition", "duration")
ONE_TERM_PER_SEQUENCE = ("start_transition", "end_transition")


def _scale_check(T: int, shared_tol: float, backend: str = "cpu") -> None:
    """float32 against float64 on the same (float32-rounded) inputs at length T
    (B = 1, C = 6, K = 200, uncentred scores). The targets: log Z within 1e-6
    relative; d/d scores, d/d start_transition and d/d end_transition within
    1e-4 absolute; the transition and duration gradients (sums over T
    positions) within ``shared_tol`` relative, measured per element as
    |Δ| / (1 + |g|)."""
    K, C = 200, 6
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).float()

    kw32 = dict(scores=randn(1, T, C) - 1.5, transition=randn(C, C), duration=randn(K, C),
                start_transition=randn(C), end_transition=randn(C))
    z64, g64 = log_z_and_grads({k: v.double() for k, v in kw32.items()}, backend)
    z32, g32 = log_z_and_grads(kw32, backend)
    rel = ((z32.double() - z64) / z64.abs()).abs().item()
    per_position = {name: (g32[name].double() - g64[name]).abs().max().item()
                    for name in ("scores",) + ONE_TERM_PER_SEQUENCE}
    sums = {name: ((g32[name].double() - g64[name]).abs() / (1 + g64[name].abs())).max().item()
            for name in SUMS_OVER_T}
    print(f"T={T} ({backend}): float32 log Z relative error {rel:.2e}; max |Δ| "
          + ", ".join(f"d/d {name} {e:.2e}" for name, e in per_position.items())
          + "; max |Δ|/(1+|g|) " + ", ".join(f"d/d {name} {e:.2e}" for name, e in sums.items()))
    assert rel < 1e-6
    for name, e in per_position.items():
        assert e < 1e-4, f"d/d {name}: {e:.2e} absolute > 1e-4"
    for name, e in sums.items():
        assert e < shared_tol, f"d/d {name}: {e:.2e} relative > {shared_tol:.0e}"


@pytest.mark.slow
@pytest.mark.skipif(not COMPILED, reason="no compiled backend")
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("T,shared_tol", [(10**6, 1e-5), (10**7, 1e-4)], ids=["1e6", "1e7"])
def test_float32_at_scale(T, shared_tol, backend):
    _scale_check(T, shared_tol, backend)


@pytest.mark.skipif(not COMPILED, reason="no compiled backend")
def test_float32_at_moderate_scale():
    _scale_check(20_000, 1e-5)
