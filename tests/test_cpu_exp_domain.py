"""The C++ CPU kernel's scaled exp-domain forward and backward
(FLASHSEMICRF_CPU_ALGORITHM = "exp", the default) against its log-domain scan
and backward ("log").

The exp-domain forward keeps probabilities relative to one float64 offset per
sequence and bounds what underflow loses; where the bound cannot certify log
Z it hands the sequence to the log scan. The exp-domain backward checks that
the posteriors covering every position sum to 1 (and that every re-anchor
and log Z agree); where they do not it hands the sequence to the log-domain
backward. So the results must match the log kernel's on every input, the
fallbacks must be taken where exp-domain arithmetic alone would be wrong (the
adversarial problems below), and never on ordinary random inputs. The
fallback counts are read from ``torch.ops.flashsemicrf_testing``
(``cpu_exp_fallbacks``, ``cpu_exp_backward_fallbacks``), outside the public
API.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pytest
import torch

import flashsemicrf  # noqa: F401  (loads the compiled ops when they are built)
from conftest import assert_close, log_z_and_grads, make_case, random_small_cases
from exp_problems import (assert_log_z, assert_within_log_domain_error, random_exp_problems,
                          widened)

ENV = "FLASHSEMICRF_CPU_ALGORITHM"
GRADIENTS = ("scores", "transition", "duration", "start_transition", "end_transition",
             "start_scores", "end_scores")
NEG_INF = -math.inf
F32, F64 = torch.float32, torch.float64


def _has_cpu_op() -> bool:
    try:
        torch.ops.flashsemicrf.forward.default
        torch.ops.flashsemicrf_testing.cpu_exp_fallbacks.default
        torch.ops.flashsemicrf_testing.cpu_exp_backward_fallbacks.default
    except (AttributeError, RuntimeError):
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_cpu_op(), reason="needs the C++ CPU kernel")


def fallbacks() -> int:
    return int(torch.ops.flashsemicrf_testing.cpu_exp_fallbacks())


def bwd_fallbacks() -> int:
    return int(torch.ops.flashsemicrf_testing.cpu_exp_backward_fallbacks())


def op_args(kw: dict, dtype) -> list:
    """The positional arguments of the forward op (missing boundary
    transitions are zeros, as the public functions pass them)."""
    C = kw["scores"].shape[-1]
    zero = torch.zeros(C, dtype=F64)

    def cast(v):
        return v.to(dtype) if v is not None and v.is_floating_point() else v

    return [cast(kw["scores"]), cast(kw["transition"]), cast(kw["duration"]), kw["lengths"],
            cast(kw.get("start_transition", zero)), cast(kw.get("end_transition", zero)),
            cast(kw.get("start_scores")), cast(kw.get("end_scores"))]


def forward(monkeypatch, algorithm: str, kw: dict, dtype, interval: int = 0):
    """(log Z, checkpoint ring, checkpoint offsets, fallbacks taken) of one op call."""
    monkeypatch.setenv(ENV, algorithm)
    before = fallbacks()
    out = torch.ops.flashsemicrf.forward(*op_args(kw, dtype), interval)
    return (*out, fallbacks() - before)


def backward(monkeypatch, algorithm: str, kw: dict, dtype, fwd, interval: int = 0, upstream=None):
    """(every gradient output of the backward op, fallbacks taken) from the
    forward outputs fwd = (log Z, ring, offsets, ...), boundary masses on."""
    monkeypatch.setenv(ENV, algorithm)
    x = op_args(kw, dtype)
    B = x[0].shape[0]
    if upstream is None:
        upstream = torch.linspace(1.0, -0.5, B, dtype=F64)
    before = bwd_fallbacks()
    out = torch.ops.flashsemicrf.backward(upstream.to(dtype), *x, *fwd[:3], interval, True)
    return list(out), bwd_fallbacks() - before


def centred(kw: dict) -> dict:
    """The same posteriors with each position's scores shifted by their
    finite max (every segmentation covers each position once): float64
    computes them to ~1e-15 however large the scores, the truth the float64
    kernels are held to on problems without start/end scores."""
    if "start_scores" in kw or "end_scores" in kw:
        return kw
    s = kw["scores"]
    top = torch.where(torch.isfinite(s), s, torch.full_like(s, NEG_INF)).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return dict(kw, scores=s - top)


def grads(monkeypatch, algorithm: str, kw: dict, dtype):
    monkeypatch.setenv(ENV, algorithm)
    return log_z_and_grads({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()},
                           "cpu")


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN where NaN."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


# -- random problems: exp and log agree, no fallback ---------------------------------------------

@pytest.mark.parametrize("case", random_small_cases(60, seed0=14, max_T=12, max_K=6, max_C=4),
                         ids=lambda c: c.id)
def test_exp_matches_log_small(monkeypatch, case):
    """Every optional input, ragged lengths, K > T, T = 1, -inf entries, both
    transition forms: log Z and every gradient, float64, to 1e-10."""
    z_log, g_log = grads(monkeypatch, "log", case.kwargs, F64)
    before, before_bwd = fallbacks(), bwd_fallbacks()
    z_exp, g_exp = grads(monkeypatch, "exp", case.kwargs, F64)
    assert fallbacks() == before and bwd_fallbacks() == before_bwd
    scale = max(1.0, z_log[torch.isfinite(z_log)].abs().max().item()) if torch.isfinite(z_log).any() else 1.0
    assert_close("log Z", z_exp, z_log, 1e-10 * scale)
    for name in g_log:
        assert_close(name, g_exp[name], g_log[name], 1e-10)


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("neg_inf", [False, True])
def test_exp_matches_log_medium(monkeypatch, seed, neg_inf, dd):
    case = make_case(seed, 3, 150, 20, 6, duration_dependent=dd, neg_inf=neg_inf, scale=2.0)
    z_log, g_log = grads(monkeypatch, "log", case.kwargs, F64)
    before = bwd_fallbacks()
    z_exp, g_exp = grads(monkeypatch, "exp", case.kwargs, F64)
    assert bwd_fallbacks() == before
    assert_close("log Z", z_exp, z_log, 1e-10 * z_log.abs().max().item())
    for name in g_log:
        assert_close(name, g_exp[name], g_log[name], 1e-10)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_no_fallback_on_benchmark_inputs(monkeypatch, dtype):
    """The benchmark's problem (N(0, 1) scores and parameters, C = 24), shorter."""
    g = torch.Generator().manual_seed(0)
    B, T, K, C = 2, 400, 30, 24
    kw = dict(scores=torch.randn(B, T, C, generator=g, dtype=F64),
              transition=torch.randn(C, C, generator=g, dtype=F64),
              duration=torch.randn(K, C, generator=g, dtype=F64), lengths=torch.full((B,), T))
    fwd_exp = forward(monkeypatch, "exp", kw, dtype)
    z_exp, taken = fwd_exp[0], fwd_exp[3]
    assert taken == 0
    fwd_log = forward(monkeypatch, "log", kw, dtype)
    z_log = fwd_log[0]
    assert_close("log Z", z_exp, z_log, (1e-6 if dtype == F32 else 1e-12) * z_log.abs().max().item())
    g_exp, taken = backward(monkeypatch, "exp", kw, dtype, fwd_exp)
    assert taken == 0
    g_log, _ = backward(monkeypatch, "log", kw, dtype, fwd_log)
    if dtype == F64:
        for a, b in zip(g_exp, g_log):
            assert_close("gradient", a, b, 1e-10 * max(1.0, b.abs().max().item()))
    else:
        g_64, _ = backward(monkeypatch, "log", kw, F64, forward(monkeypatch, "log", kw, F64))
        for a, b, c in zip(g_exp, g_log, g_64):
            own = (b.double() - c).abs().max().item()
            assert_close("gradient", a, c, max(1e-5 * max(1.0, c.abs().max().item()), 2 * own))


def test_exp_is_deterministic(monkeypatch):
    case = make_case(3, 3, 200, 16, 8, neg_inf=True)
    for dtype in (F32, F64):
        first = forward(monkeypatch, "exp", case.kwargs, dtype, interval=7)
        second = forward(monkeypatch, "exp", case.kwargs, dtype, interval=7)
        for a, b in zip(first[:3], second[:3]):
            assert same_values(a, b)


@pytest.mark.parametrize("interval", [1, 3, 0])
@pytest.mark.parametrize("case", random_small_cases(16, seed0=41, max_T=14, max_K=6, max_C=4),
                         ids=lambda c: c.id)
def test_exp_backward_every_output(monkeypatch, case, interval):
    """The backward op's every output (boundary masses on), from the log
    scan's checkpoints and from the exp-domain forward's, with one span per
    position up to the default interval: float64 to 1e-10 of the log
    backward, no fallback. Both transition forms (a third of the cases are
    (K, C, C))."""
    kw = case.kwargs
    fwd_log = forward(monkeypatch, "log", kw, F64, interval)
    fwd_exp = forward(monkeypatch, "exp", kw, F64, interval)
    expected, _ = backward(monkeypatch, "log", kw, F64, fwd_log, interval)
    for fwd in (fwd_log, fwd_exp):
        got, taken = backward(monkeypatch, "exp", kw, F64, fwd, interval)
        assert taken == 0
        for name, a, b in zip(GRADIENTS, got, expected):
            assert_close(name, a, b, 1e-10 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
@pytest.mark.parametrize("interval", [5, 0])
@pytest.mark.parametrize("C", [8, 16])
def test_exp_backward_eight_label_passes(monkeypatch, C, interval, dd):
    """Label counts that are multiples of 8 take the register-blocked passes
    and mat-vecs: every output, float64, to 1e-10 of the log backward, -inf
    entries, ragged lengths, every optional input."""
    kw = make_case(11 + C, 3, 90, 12, C, duration_dependent=dd, neg_inf=True, scale=1.5).kwargs
    for algorithm in ("log", "exp"):
        fwd = forward(monkeypatch, algorithm, kw, F64, interval)
        expected, _ = backward(monkeypatch, "log", kw, F64, fwd, interval)
        got, taken = backward(monkeypatch, "exp", kw, F64, fwd, interval)
        assert taken == 0
        for name, a, b in zip(GRADIENTS, got, expected):
            assert_close(name, a, b, 1e-10 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_exp_backward_float32(monkeypatch, dd):
    """Float32, ragged lengths, every optional input, several spans: against
    float64 as close as the log backward in float32 is (or 1e-5)."""
    case = make_case(7, 3, 300, 24, 6, duration_dependent=dd, neg_inf=True, scale=2.0)
    kw = case.kwargs
    g_64, _ = backward(monkeypatch, "log", kw, F64, forward(monkeypatch, "log", kw, F64))
    g_32, _ = backward(monkeypatch, "log", kw, F32, forward(monkeypatch, "log", kw, F32))
    got, taken = backward(monkeypatch, "exp", kw, F32, forward(monkeypatch, "exp", kw, F32))
    assert taken == 0
    for name, a, b, c in zip(GRADIENTS, got, g_32, g_64):
        own = (b.double() - c).abs().max().item()
        assert_close(name, a, c, max(1e-5 * max(1.0, c.abs().max().item()), 2 * own))


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_exp_backward_is_deterministic(monkeypatch, dd):
    case = make_case(3, 3, 200, 16, 8, duration_dependent=dd, neg_inf=True)
    for dtype in (F32, F64):
        fwd = forward(monkeypatch, "exp", case.kwargs, dtype, interval=7)
        first, taken = backward(monkeypatch, "exp", case.kwargs, dtype, fwd, interval=7)
        assert taken == 0
        second, _ = backward(monkeypatch, "exp", case.kwargs, dtype, fwd, interval=7)
        for a, b in zip(first, second):
            assert same_values(a, b)


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_backward_fallback_is_the_log_backward(monkeypatch, dd):
    """Where the certificate fails, the sequence's outputs are the log
    backward's, bit for bit (the exp attempt's partial outputs are cleared);
    with FLASHSEMICRF_CPU_ALGORITHM=log the exp-domain backward never runs."""
    adv = next(a for a in ADVERSARIES if a.name == "revived_by_duration")
    if dd:
        adv = duration_dependent(adv)
    B = adv.kw["scores"].shape[0]
    for dtype in (F32, F64):
        fwd = forward(monkeypatch, "log", adv.kw, dtype)
        got, taken = backward(monkeypatch, "exp", adv.kw, dtype, fwd)
        assert taken == B
        expected, taken = backward(monkeypatch, "log", adv.kw, dtype, fwd)
        assert taken == 0
        for a, b in zip(got, expected):
            assert same_values(a, b)


def test_algorithm_variable_is_checked(monkeypatch):
    case = make_case(0, 1, 5, 2, 2)
    with pytest.raises(RuntimeError, match=ENV):
        forward(monkeypatch, "fast", case.kwargs, F64)


# -- adversarial problems ------------------------------------------------------------------------
# Each one defeats a plain exp-domain scan (one offset per sequence, a
# normaliser that follows the largest live entry, no checks) in `breaks`
# dtypes: the kernel must see it and fall back there. `clean` dtypes lose
# nothing that matters: no fallback.

@dataclass
class Adversary:
    name: str
    kw: dict
    breaks: tuple = ()
    clean: tuple = ()
    bwd_breaks: tuple = ()  # dtypes where the exp-domain backward must hand every row over
    bwd_clean: tuple = ()  # dtypes where it must not hand any over
    dead_row: int | None = None  # a row without any segmentation: -inf, zero gradients
    nan_row: int | None = None  # a row with a NaN score: NaN
    # The (K, C, C) form's breaks and clean dtypes, where they differ.
    dd_breaks: tuple | None = None
    dd_clean: tuple | None = None
    extra: dict = field(default_factory=dict)


def _allowed(n: int, which, value=0.0) -> torch.Tensor:
    """(n,) of -inf except `value` at the positions in `which`."""
    v = torch.full((n,), NEG_INF, dtype=F64)
    v[list(which)] = value
    return v


def adversaries() -> list[Adversary]:
    g = torch.Generator().manual_seed(2026)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=F64)

    out = []

    # A grammar 0 -> 1 -> 2 whose middle label, 30 nats below the best per
    # position, must hold one segment of exactly K = 100 positions: its open
    # entries flush long before they close. With a -4000 shortcut 0 -> 2 a
    # plain scan is finite but ~1000 nats off.
    for shortcut in (None, -4000.0):
        B, T, K, C = 2, 400, 100, 3
        scores = randn(B, T, C, scale=0.5)
        scores[..., 1] -= 30.0
        scores[..., 2] -= 1.0
        trans = torch.full((C, C), NEG_INF, dtype=F64)
        trans[0, 0] = trans[2, 2] = trans[0, 1] = trans[1, 2] = 0.0
        if shortcut is not None:
            trans[0, 2] = shortcut
        dur = torch.zeros(K, C, dtype=F64)
        dur[:, 1] = _allowed(K, [K - 1])
        out.append(Adversary(
            "forced_low_label" + ("_shortcut" if shortcut else ""),
            dict(scores=scores, transition=trans, duration=dur, lengths=torch.tensor([T, T - 37]),
                 start_transition=_allowed(C, [0]), end_transition=_allowed(C, [2])),
            breaks=(F32, F64)))

    # Duration scores on a ±200-nat ramp: float32 flushes the short segments'
    # weights that every segmentation needs (float64 keeps them).
    B, T, K, C = 2, 301, 40, 2
    ramp = torch.linspace(-200.0, 200.0, K, dtype=F64)
    short = torch.full((K,), NEG_INF, dtype=F64)
    short[:5], short[K - 1] = ramp[:5], ramp[K - 1]
    trans = torch.full((C, C), NEG_INF, dtype=F64)
    trans[0, 0] = trans[1, 0] = 0.0
    out.append(Adversary("wide_duration_table",
                         dict(scores=randn(B, T, C), transition=trans,
                              duration=torch.stack([short, ramp.flip(0)], 1),
                              lengths=torch.tensor([T, T - 13])),
                         breaks=(F32,)))

    # Scores of magnitude 1e4 with one allowed duration: a segment cannot
    # follow the per-position best label the offset follows.
    B, T, C, d = 2, 60, 4, 3
    dur = torch.full((d, C), NEG_INF, dtype=F64)
    dur[d - 1] = 0.0
    out.append(Adversary("huge_scores",
                         dict(scores=randn(B, T, C, scale=1e4), transition=randn(C, C), duration=dur,
                              lengths=torch.tensor([T, T - d])),
                         breaks=(F32, F64)))

    # The same magnitudes with start/end scores of 1e3: the end scores reorder
    # the open segments by more than either dtype's range.
    B, T, C, K = 2, 200, 6, 8
    out.append(Adversary("boundary_scores_1e3",
                         dict(scores=randn(B, T, C, scale=1e4), transition=randn(C, C),
                              duration=randn(K, C), lengths=torch.tensor([T, T // 2]),
                              start_scores=randn(B, T, C, scale=1e3),
                              end_scores=randn(B, T, C, scale=1e3)),
                         breaks=(F32, F64)))

    # ... and without them: whatever underflows is negligible for good.
    out.append(Adversary("benign_large_scores",
                         dict(scores=randn(B, T, C, scale=1e4), transition=randn(C, C),
                              duration=randn(K, C), lengths=torch.tensor([T, T // 2])),
                         clean=(F32, F64)))

    # Long runs of -inf (one label allowed for 40-120 positions), banded
    # transitions, sparse durations: exact zeros, nothing to fall back for.
    B, T, C, K = 3, 500, 5, 30
    scores = randn(B, T, C)
    pos = 0
    while pos < T:
        run = int(torch.randint(40, 121, (1,), generator=g))
        keep = int(torch.randint(0, C, (1,), generator=g))
        scores[:, pos:pos + run, [c for c in range(C) if c != keep]] = NEG_INF
        pos += run + int(torch.randint(20, 60, (1,), generator=g))
    trans = torch.full((C, C), NEG_INF, dtype=F64)
    dur = torch.full((K, C), NEG_INF, dtype=F64)
    for c in range(C):
        trans[c, c], trans[c, (c + 1) % C] = randn(2)
        dur[torch.randperm(K, generator=g)[:4], c] = randn(4)
        dur[0, c] = -2.0
    out.append(Adversary("neg_inf_runs",
                         dict(scores=scores, transition=trans, duration=dur,
                              lengths=torch.tensor([T, T - 50, T - 211])),
                         clean=(F32, F64)))

    # A position where every label is -inf: row 0 has no segmentation.
    B, T, C, K = 2, 50, 3, 6
    scores = randn(B, T, C)
    scores[0, 30] = NEG_INF
    out.append(Adversary("blocked_position",
                         dict(scores=scores, transition=randn(C, C), duration=randn(K, C),
                              lengths=torch.tensor([T, 25])),
                         clean=(F32, F64), dead_row=0))

    # Label 0 is 20 nats per position above the rest until t = 50 and -inf
    # after, with one duration K = 60: its open segments carry the mass and
    # all die, leaving labels the offset had flushed.
    B, T, K, C = 2, 300, 60, 3
    scores = randn(B, T, C)
    scores[:, :50, 0] += 20.0
    scores[:, 50:, 0] = NEG_INF
    dur = randn(K, C, scale=0.3)
    dur[:, 0] = _allowed(K, [K - 1])
    out.append(Adversary("doomed_segments",
                         dict(scores=scores, transition=randn(C, C), duration=dur,
                              lengths=torch.tensor([T, T - 30])),
                         breaks=(F32, F64)))

    # Minimum durations 35 (label 0, which can neither end nor be followed
    # by anything but label 1) and 31 (label 1): label 0 dominates the last
    # 30 positions by 30 nats each, but no segment there can finish in time.
    B, T, K, C = 2, 200, 40, 3
    scores = randn(B, T, C)
    lengths = torch.tensor([T, T - 20])
    for b in range(B):
        scores[b, int(lengths[b]) - 30:int(lengths[b]), 0] += 30.0
    dur = randn(K, C, scale=0.3)
    dur[:, 0] = _allowed(K, range(34, K))
    dur[:, 1] = _allowed(K, range(30, K))
    trans = randn(C, C)
    trans[0, :] = NEG_INF
    trans[0, 1] = 0.0
    out.append(Adversary("doomed_by_length",
                         dict(scores=scores, transition=trans, duration=dur, lengths=lengths,
                              end_transition=_allowed(C, [1, 2])),
                         breaks=(F32, F64)))

    # Label 0, 15 nats per position below, whose only duration (80) carries
    # a duration score of 1300: the mass sits in segments that are flushed
    # while open.
    B, T, K, C = 2, 240, 80, 3
    scores = randn(B, T, C)
    scores[..., 0] -= 15.0
    dur = randn(K, C, scale=0.3)
    dur[:, 0] = _allowed(K, [K - 1], 1300.0)
    out.append(Adversary("revived_by_duration",
                         dict(scores=scores, transition=randn(C, C), duration=dur,
                              lengths=torch.tensor([T, T - 7])),
                         breaks=(F32, F64)))

    # Only label 0 may end, it needs >= 50 positions and is 40 nats per
    # position below the best over the last 60.
    B, T, K, C = 2, 300, 60, 4
    scores = randn(B, T, C)
    lengths = torch.tensor([T, T - 41])
    for b in range(B):
        scores[b, int(lengths[b]) - K:int(lengths[b]), 0] -= 40.0
    dur = randn(K, C, scale=0.3)
    dur[:, 0] = _allowed(K, range(49, K))
    out.append(Adversary("revived_at_end",
                         dict(scores=scores, transition=randn(C, C), duration=dur, lengths=lengths,
                              end_transition=_allowed(C, [0])),
                         breaks=(F32, F64)))

    # Label 0 scores 25 nats per position above the rest but can neither
    # transition nor end: the normaliser ignores labels that cannot reach an
    # end, so nothing falls back.
    B, T, K, C = 2, 300, 40, 3
    scores = randn(B, T, C)
    scores[..., 0] += 25.0
    trans = randn(C, C)
    trans[0, :] = NEG_INF
    out.append(Adversary("dead_end_label",
                         dict(scores=scores, transition=trans, duration=randn(K, C, scale=0.3),
                              lengths=torch.tensor([T, T - 3]), end_transition=_allowed(C, [1, 2])),
                         clean=(F32, F64)))

    # A NaN score in row 0 (row 1 ends before it).
    B, T, C, K = 2, 40, 3, 5
    scores = randn(B, T, C)
    scores[0, 20, 1] = math.nan
    out.append(Adversary("nan_input",
                         dict(scores=scores, transition=randn(C, C), duration=randn(K, C),
                              lengths=torch.tensor([T, 15])),
                         nan_row=0))

    # Every segmentation starts a label-1 segment at position 30 (no other
    # label may cover 30, and label 1 may not cover 29), where label 1's
    # start score is 120 nats below the others': float32 flushes its start
    # factor, so all the mass rides on sigma_hat's ghost (float64 keeps it).
    # The (K, C, C) forward takes a new segment's start score, emission and
    # scale together in float64, and normalises after the emission, where
    # only label 1 is alive: it loses nothing in either dtype.
    B, T, K, C = 2, 60, 4, 3
    scores = randn(B, T, C)
    scores[:, 30, 0] = scores[:, 30, 2] = scores[:, 29, 1] = NEG_INF
    start_scores = torch.zeros(B, T, C, dtype=F64)
    start_scores[:, 30, 1] = -120.0
    out.append(Adversary("flushed_start",
                         dict(scores=scores, transition=randn(C, C),
                              duration=randn(K, C, scale=0.3), lengths=torch.tensor([T, T - 5]),
                              start_scores=start_scores),
                         breaks=(F32,), clean=(F64,), dd_breaks=(), dd_clean=(F32, F64)))

    # The exp-domain backward runs in float64 whatever the dtype: it loses
    # mass (and must hand the row over) where float64 does, which is where
    # the forward needed the log scan in both dtypes. Float32 rows of the
    # wide duration table lose nothing in float64; the dead-end label's
    # float32 log Z differs from the float32 log scan's (whose offsets follow
    # the dead end) by more than that scan's rounding allows for, and goes
    # to the log backward.
    both = (F32, F64)
    for a in out:
        if a.breaks == both:
            a.bwd_breaks = both
        elif a.name in ("wide_duration_table", "dead_end_label"):
            a.bwd_clean = (F64,)
        elif a.clean == both:
            a.bwd_clean = both
    return out


ADVERSARIES = adversaries()


def _forward_falls_back_where_it_must(monkeypatch, adv, dtype):
    """The exp-domain forward's outputs and fallback count, checked against
    the adversary's breaks and clean dtypes."""
    B = adv.kw["scores"].shape[0]
    z_exp, ring_exp, off_exp, taken = forward(monkeypatch, "exp", adv.kw, dtype)
    z_log, ring_log, off_log, _ = forward(monkeypatch, "log", adv.kw, dtype)
    if dtype in adv.breaks:
        # Every row is one that a plain exp-domain scan gets wrong: each must
        # have gone to the log scan, whose results these are, bit for bit.
        assert taken == B
        assert same_values(z_exp, z_log)
        assert same_values(ring_exp, ring_log) and torch.equal(off_exp, off_log)
    if dtype in adv.clean:
        assert taken == 0
    return z_exp, ring_exp, off_exp, taken


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("adv", ADVERSARIES, ids=lambda a: a.name)
def test_adversarial(monkeypatch, adv, dtype):
    _check_adversary(monkeypatch, adv, dtype)


def _check_adversary(monkeypatch, adv, dtype):
    """Forward and backward fall back where the adversary says they must
    (then with the log kernel's results, bit for bit) and nowhere else it
    marks clean; the results agree with float64 as well as the log kernel's."""
    B = adv.kw["scores"].shape[0]
    z_exp, ring_exp, off_exp, taken = _forward_falls_back_where_it_must(monkeypatch, adv, dtype)
    # The backward from these checkpoints: handed over where it must be,
    # and then the log backward's outputs, bit for bit.
    fwd = (z_exp, ring_exp, off_exp)
    g_exp, taken_bwd = backward(monkeypatch, "exp", adv.kw, dtype, fwd)
    if dtype in adv.bwd_breaks:
        assert taken_bwd == B
        g_log, _ = backward(monkeypatch, "log", adv.kw, dtype, fwd)
        for a, b in zip(g_exp, g_log):
            assert same_values(a, b)
    if dtype in adv.bwd_clean:
        assert taken_bwd == 0
    if adv.nan_row is not None:
        assert taken == 1 and torch.isnan(z_exp[adv.nan_row])
        rest = [b for b in range(B) if b != adv.nan_row]
        z_log = forward(monkeypatch, "log", adv.kw, dtype)[0]
        assert_close("log Z", z_exp[rest], z_log[rest],
                     (1e-6 if dtype == F32 else 1e-12) * z_log[rest].abs().max().item())
        return
    _as_close_to_float64_as_log(monkeypatch, adv, dtype)


def _as_close_to_float64_as_log(monkeypatch, adv, dtype):
    """Where the exp-domain result stands, it agrees with float64 as well as
    the log scan in the same dtype does (or better)."""
    B = adv.kw["scores"].shape[0]
    z64, _ = grads(monkeypatch, "log", adv.kw, F64)
    _, g64 = grads(monkeypatch, "log", centred(adv.kw), F64)
    z_e, g_e = grads(monkeypatch, "exp", adv.kw, dtype)
    z_l, g_l = grads(monkeypatch, "log", adv.kw, dtype)
    finite = torch.isfinite(z64)
    rel = 1e-6 if dtype == F32 else 1e-12
    own = (z_l.double() - z64)[finite].abs().max().item() if finite.any() else 0.0
    assert_close("log Z", z_e, z64, max(rel * max(1.0, z64[finite].abs().max().item()), 2 * own))
    for name in g64:
        own = (g_l[name].double() - g64[name]).abs().max().item()
        assert_close(name, g_e[name], g64[name], max(1e-5 if dtype == F32 else 1e-9, 2 * own))
    if adv.dead_row is not None:
        assert z_e[adv.dead_row] == NEG_INF
        for name, gr in g_e.items():
            if gr.dim() > 0 and gr.shape[0] == B:
                assert (gr[adv.dead_row] == 0).all(), name


@pytest.mark.parametrize("family", ["mixed", "boundary", "outshone"])
def test_random_adversaries(monkeypatch, family):
    """random_exp_problem's problems, built to make an exp-domain kernel lose
    mass that matters (labels dying partway, duration scores to the dtype's
    range, start and end scores up to 200 nats, the outshone label), both
    dtypes: the exp-domain forward gives the float64 log-domain log Z
    (certified or handed to the log scan), and the exp-domain backward every
    gradient to within what the log-domain backward in the same dtype itself
    misses, plus rounding: no NaN. The same problems, in the same order, as
    the CUDA kernels' under the emulator; 6 a family by default, and those
    where a kernel was once wrong (FLASHSEMICRF_EXP_FUZZ_PROBLEMS=N runs N a
    family)."""
    n = int(os.environ.get("FLASHSEMICRF_EXP_FUZZ_PROBLEMS", "6"))
    # Boundary problem 135 (float64, log Z 25 639): the exp-domain backward
    # gave NaN transition and end-score gradients. Its alpha-beta scale
    # exp(aoff - Qb) overflowed to inf where a label had alpha_hat = 0, and
    # 0 * inf reached the posteriors that the coverage check does not sum.
    found = {("boundary", 135)}
    up64 = torch.tensor([0.7, 1.3], dtype=F64)
    checked = 0
    for drawn, i, dtype, args in random_exp_problems(n, found):
        if drawn != family:
            continue
        checked += 1
        where = f"{family} problem {i} ({dtype})"
        wide = widened(args)
        monkeypatch.setenv(ENV, "log")
        truth = torch.ops.flashsemicrf.forward(*wide, 0)
        plain_fwd = torch.ops.flashsemicrf.forward(*args, 0)
        monkeypatch.setenv(ENV, "exp")
        fwd = torch.ops.flashsemicrf.forward(*args, 0)
        assert_log_z(where, fwd[0], truth[0], dtype)
        if not bool(torch.isfinite(truth[0]).all()):
            continue
        up = up64.to(dtype)
        got = torch.ops.flashsemicrf.backward(up, *args, *fwd[:3], 0, True)
        monkeypatch.setenv(ENV, "log")
        want = torch.ops.flashsemicrf.backward(up64, *wide, *truth[:3], 0, True)
        plain = torch.ops.flashsemicrf.backward(up, *args, *plain_fwd[:3], 0, True)
        assert_within_log_domain_error(where, got, want, plain, dtype)
    assert checked >= 2 * n


# -- the duration-dependent (K, C, C) transition --------------------------------------------------
# Its exp-domain forward (K mat-vecs per position) and backward (K mat-vecs
# for the posteriors, K for beta, K outer products for the transition
# posteriors) have the static path's certificates and fallbacks.

def duration_dependent(adv: Adversary) -> Adversary:
    """The same problem with transition[d] = transition for every duration d:
    the same distribution, through the (K, C, C) kernels, which must fall
    back where the static ones do."""
    kw = dict(adv.kw)
    K = kw["duration"].shape[0]
    kw["transition"] = kw["transition"].expand(K, *kw["transition"].shape).contiguous()
    breaks = adv.breaks if adv.dd_breaks is None else adv.dd_breaks
    clean = adv.clean if adv.dd_clean is None else adv.dd_clean
    return Adversary(adv.name, kw, breaks=breaks, clean=clean, bwd_breaks=adv.bwd_breaks,
                     bwd_clean=adv.bwd_clean, dead_row=adv.dead_row, nan_row=adv.nan_row)


def duration_dependent_adversaries() -> list[Adversary]:
    """Problems of the (K, C, C) form alone: the tables A_d = exp(transition[d]
    - max over d and c') are per call, so one duration's transitions far below
    the others' flush there, while its duration score carries its segments."""
    g = torch.Generator().manual_seed(2027)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=F64)

    out = []
    B, T, K, C, d_low = 2, 200, 12, 4, 5
    for gap in (200.0, 800.0):
        trans, dur = randn(K, C, C), randn(K, C, scale=0.3)
        trans[d_low - 1] -= gap
        dur[d_low - 1] += gap
        # 200 nats flush float32's tables (the forward's log scan takes
        # them), not the float64 backward's; 800 flush float64's too, while
        # the duration-5 segments after the first carry their share of the
        # mass (the first, which takes no transition, is nearly always one).
        out.append(Adversary(f"transitions_{int(gap)}_below_for_one_duration",
                             dict(scores=randn(B, T, C), transition=trans, duration=dur,
                                  lengths=torch.tensor([T, T - 17])),
                             breaks=(F32,) if gap < 700 else (F32, F64),
                             clean=(F64,) if gap < 700 else (),
                             bwd_breaks=() if gap < 700 else (F32, F64),
                             bwd_clean=(F32, F64) if gap < 700 else ()))

    # Transitions only after segments of durations 2, 5 and 9 (the first
    # segment needs none): exact zeros, nothing to fall back for.
    trans = randn(K, C, C)
    trans[[d - 1 for d in range(1, K + 1) if d not in (2, 5, 9)]] = NEG_INF
    out.append(Adversary("transitions_for_three_durations",
                         dict(scores=randn(B, T, C), transition=trans, duration=randn(K, C),
                              lengths=torch.tensor([T, T - 60])),
                         clean=(F32, F64), bwd_clean=(F32, F64)))
    return out


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("adv", [duration_dependent(a) for a in ADVERSARIES] +
                         duration_dependent_adversaries(), ids=lambda a: a.name)
def test_adversarial_duration_dependent(monkeypatch, adv, dtype):
    _check_adversary(monkeypatch, adv, dtype)


@pytest.mark.parametrize("seed", range(2))
def test_duration_dependent_matches_log(monkeypatch, seed):
    """Every optional input, ragged lengths, -inf entries, several spans:
    log Z and every gradient, float64 to 1e-10 of the log kernel, no
    fallback."""
    kw = make_case(seed, 3, 120, 16, 6, duration_dependent=True, neg_inf=True, scale=2.0).kwargs
    for interval in (7, 0):
        fwd_log = forward(monkeypatch, "log", kw, F64, interval)
        fwd_exp = forward(monkeypatch, "exp", kw, F64, interval)
        assert fwd_exp[3] == 0
        assert_close("log Z", fwd_exp[0], fwd_log[0], 1e-12 * fwd_log[0].abs().max().item())
        expected, _ = backward(monkeypatch, "log", kw, F64, fwd_log, interval)
        got, taken = backward(monkeypatch, "exp", kw, F64, fwd_exp, interval)
        assert taken == 0
        for name, a, b in zip(GRADIENTS, got, expected):
            assert_close(name, a, b, 1e-10 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_duration_dependent_no_fallback_on_benchmark_inputs(monkeypatch, dtype):
    """The benchmark's (K, C, C) problem (N(0, 1) everything, C = 24),
    shorter: no fallback, log Z and the gradients as close to float64 as
    the log kernel's own in float32 (float64: to 1e-12 / 1e-10)."""
    g = torch.Generator().manual_seed(1)
    B, T, K, C = 2, 300, 30, 24
    kw = dict(scores=torch.randn(B, T, C, generator=g, dtype=F64),
              transition=torch.randn(K, C, C, generator=g, dtype=F64),
              duration=torch.randn(K, C, generator=g, dtype=F64), lengths=torch.tensor([T, T - 37]))
    fwd_exp = forward(monkeypatch, "exp", kw, dtype)
    assert fwd_exp[3] == 0
    fwd_log = forward(monkeypatch, "log", kw, dtype)
    fwd_64 = forward(monkeypatch, "log", kw, F64)
    g_exp, taken = backward(monkeypatch, "exp", kw, dtype, fwd_exp)
    assert taken == 0
    g_log, _ = backward(monkeypatch, "log", kw, dtype, fwd_log)
    g_64, _ = backward(monkeypatch, "log", kw, F64, fwd_64)
    if dtype == F64:
        assert_close("log Z", fwd_exp[0], fwd_log[0], 1e-12 * fwd_log[0].abs().max().item())
        for a, b in zip(g_exp, g_log):
            assert_close("gradient", a, b, 1e-10 * max(1.0, b.abs().max().item()))
    else:
        own = (fwd_log[0].double() - fwd_64[0]).abs().max().item()
        assert_close("log Z", fwd_exp[0], fwd_64[0], max(1e-6 * fwd_64[0].abs().max().item(), 2 * own))
        for name, a, b, c in zip(GRADIENTS, g_exp, g_log, g_64):
            own = (b.double() - c).abs().max().item()
            assert_close(name, a, c, max(1e-5 * max(1.0, c.abs().max().item()), 2 * own))


def test_duration_dependent_entries_at_the_float64_floor(monkeypatch):
    """K = 200: the open segments' gains decay by a few nats a step, so every
    checkpoint holds entries near float64's smallest normal, which the
    exp-domain forward keeps relative to its own normaliser. Loading them
    must not flush them (that would hand the sequence to the log backward):
    no fallback, every output to 1e-10 of the log backward."""
    g = torch.Generator().manual_seed(0)
    B, T, K, C = 3, 700, 200, 12
    kw = dict(scores=torch.randn(B, T, C, generator=g, dtype=F64) - 1.0,
              transition=torch.randn(K, C, C, generator=g, dtype=F64),
              duration=torch.randn(K, C, generator=g, dtype=F64),
              lengths=torch.tensor([T, T - 31, T - 77]))
    fwd = forward(monkeypatch, "exp", kw, F64, interval=13)
    assert fwd[3] == 0
    expected, _ = backward(monkeypatch, "log", kw, F64, fwd, interval=13)
    got, taken = backward(monkeypatch, "exp", kw, F64, fwd, interval=13)
    assert taken == 0
    for name, a, b in zip(GRADIENTS, got, expected):
        assert_close(name, a, b, 1e-10 * max(1.0, b.abs().max().item()))


def test_duration_dependent_is_deterministic(monkeypatch):
    kw = make_case(5, 3, 150, 12, 6, duration_dependent=True, neg_inf=True).kwargs
    for dtype in (F32, F64):
        first = forward(monkeypatch, "exp", kw, dtype, interval=7)
        second = forward(monkeypatch, "exp", kw, dtype, interval=7)
        assert first[3] == 0
        for a, b in zip(first[:3], second[:3]):
            assert same_values(a, b)


def test_float32_gradients_from_exp_checkpoints(monkeypatch):
    """The log-domain backward recomputes each span from a checkpoint the
    exp-domain forward wrote; their float32 roundings differ, and the
    backward spreads the difference it measures at each span's end over the
    span. Without that, the label marginals of the last positions of each
    span were ~10x further from float64 than the log scan's own."""
    g = torch.Generator().manual_seed(0)
    T, K, C = 40_000, 200, 6
    kw = dict(scores=torch.randn(1, T, C, generator=g, dtype=F64) - 1.5,
              transition=torch.randn(C, C, generator=g, dtype=F64),
              duration=torch.randn(K, C, generator=g, dtype=F64), lengths=torch.full((1,), T))

    def marginals(algorithm, dtype):
        monkeypatch.setenv(ENV, algorithm)
        x = op_args(kw, dtype)
        log_z, ring, offset = torch.ops.flashsemicrf.forward(*x, 0)
        return torch.ops.flashsemicrf.backward(torch.ones(1, dtype=dtype), *x, log_z, ring, offset,
                                               0, False)[0].double()

    truth = marginals("log", F64)
    own = (marginals("log", F32) - truth).abs().max().item()
    got = (marginals("exp", F32) - truth).abs().max().item()
    print(f"label marginals vs float64: log scan {own:.1e}, exp-domain forward {got:.1e}")
    assert got <= 2 * own + 2e-6
