"""Shared test helpers: random problems with readable ids, tolerances in one
place, and the backends with the device each runs on."""

from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass, field

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under Triton's interpreter. Triton
    # reads the switch when the kernels are decorated, flashsemicrf when it is
    # imported: set it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flashsemicrf as F  # noqa: E402
from flashsemicrf import backends  # noqa: E402
from flashsemicrf._validation import check_problem  # noqa: E402
from flashsemicrf.backends import triton as triton_backend  # noqa: E402

OPTIONAL = ("start_transition", "end_transition", "start_scores", "end_scores")
ARG_NAMES = ("scores", "transition", "duration", "lengths") + OPTIONAL

# Where each backend's tensors live in the tests.
DEVICE = {
    "cpu": "cpu",
    "cuda": "cuda",
    "triton": "cpu" if triton_backend.INTERPRET else "cuda",
    "torch": "cpu",
}
# The interpreter runs a kernel thousands of times slower than a GPU: such
# tests keep their problems small.
INTERPRETED = {"triton": triton_backend.INTERPRET}


def backend_param(name: str):
    """``name`` as a pytest param, with the marks and the skip that go with it."""
    marks = []
    if name == "cuda":
        marks.append(pytest.mark.cuda)
    if name == "triton":
        marks += [
            pytest.mark.triton,
            # The interpreter evaluates log(0) = -inf through numpy, which warns.
            pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
            pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
            pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning"),
        ]
    usable = name in backends.available(DEVICE[name])
    if name == "triton" and DEVICE[name] == "cuda" and not torch.cuda.is_available():
        usable = False
    marks.append(pytest.mark.skipif(not usable, reason=f"backend {name!r} does not run here"))
    return pytest.param(name, marks=marks, id=name)


def on(kwargs: dict, device=None, dtype=None) -> dict:
    """The problem's tensors moved to ``device`` and, float ones, cast to ``dtype``."""
    out = {}
    for k, v in kwargs.items():
        if device is not None:
            v = v.to(device)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


def problem(kwargs: dict):
    """The validated Problem of keyword arguments, in its compute dtype."""
    return check_problem("test", *(kwargs.get(n) for n in ARG_NAMES)).to_compute()


def total_variation(rows: torch.Tensor, oracle, b: int, n: int) -> float:
    """Total variation distance between n samples of sequence b (rows (N, 5))
    and the exact distribution; fails if a sample has zero probability."""
    paths = collections.defaultdict(list)
    for sid, bb, s, d, c in rows.tolist():
        if bb == b:
            paths[sid].append((s, d, c))
    assert len(paths) == n
    counts = collections.Counter(tuple(v) for v in paths.values())
    dist = oracle.distribution[b]
    outside = sum(v for k, v in counts.items() if k not in dist)
    assert outside == 0, "a sample has zero probability"
    return 0.5 * sum(abs(counts.get(k, 0) / n - p) for k, p in dist.items())

# Absolute tolerances per compute dtype (max difference printed before asserting).
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


@dataclass
class Case:
    """A random problem; ``kwargs`` feed every public function."""

    B: int
    T: int
    K: int
    C: int
    duration_dependent: bool
    optional: tuple
    neg_inf: bool
    seed: int
    tensors: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        opt = "".join(name[0] + name.split("_")[1][0] for name in self.optional) or "none"
        return (
            f"B{self.B}-T{self.T}-K{self.K}-C{self.C}-{'kcc' if self.duration_dependent else 'cc'}"
            f"-opt_{opt}{'-neginf' if self.neg_inf else ''}-s{self.seed}"
        )

    @property
    def kwargs(self) -> dict:
        return dict(self.tensors)

    def leaves(self, dtype=torch.float64) -> dict:
        """Fresh leaf tensors that require grad (lengths untouched)."""
        out = {}
        for k, v in self.tensors.items():
            out[k] = v if k == "lengths" else v.detach().to(dtype).clone().requires_grad_()
        return out


def make_case(
    seed: int,
    B: int,
    T: int,
    K: int,
    C: int,
    *,
    duration_dependent: bool = False,
    optional: tuple = OPTIONAL,
    neg_inf: bool = False,
    ragged: bool = True,
    dtype=torch.float64,
    device="cpu",
    scale: float = 1.0,
) -> Case:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    def sprinkle(x, p=0.2):
        if not neg_inf:
            return x
        mask = torch.rand(x.shape, generator=g) < p
        return x.masked_fill(mask, -math.inf)

    t = {
        "scores": randn(B, T, C),
        "transition": sprinkle(randn(K, C, C) if duration_dependent else randn(C, C)),
        "duration": sprinkle(randn(K, C)),
    }
    if ragged:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        if B:
            lengths[0] = T
        t["lengths"] = lengths
    else:
        t["lengths"] = torch.full((B,), T, dtype=torch.long)
    if "start_transition" in optional:
        t["start_transition"] = sprinkle(randn(C))
    if "end_transition" in optional:
        t["end_transition"] = sprinkle(randn(C))
    if "start_scores" in optional:
        t["start_scores"] = sprinkle(randn(B, T, C), 0.1)
    if "end_scores" in optional:
        t["end_scores"] = sprinkle(randn(B, T, C), 0.1)
    t = {k: v.to(device) for k, v in t.items()}
    return Case(B, T, K, C, duration_dependent, tuple(optional), neg_inf, seed, t)


def random_small_cases(n: int, seed0: int = 0, max_T: int = 8, max_K: int = 4, max_C: int = 3):
    """n problems small enough to enumerate: every optional input on and off,
    2-D and 3-D transitions, ragged lengths, K > T, T = 1, −inf entries."""
    g = torch.Generator().manual_seed(seed0)
    cases = []
    for i in range(n):
        r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
        T = 1 if i % 10 == 0 else r(1, max_T)
        K = r(1, max_K)
        if i % 7 == 0:
            K = max(K, T + 1)  # K > T
        C = r(1, max_C)
        optional = tuple(name for j, name in enumerate(OPTIONAL) if (i >> j) & 1)
        cases.append(
            make_case(
                seed0 * 100003 + i,
                r(1, 3),
                T,
                K,
                C,
                duration_dependent=bool(i % 3 == 1),
                optional=optional,
                neg_inf=bool(i % 4 == 3),
            )
        )
    return cases


GRAD_NAMES = ("scores", "transition", "duration") + OPTIONAL


def log_z_and_grads(kwargs: dict, backend: str, upstream=None):
    """(log Z, {name: d(Σ upstream·log Z)/d name}) on fresh leaves; sequences at
    −inf contribute nothing (their gradient is defined as 0)."""
    leaves = {k: (v.detach().clone().requires_grad_() if v.is_floating_point() else v)
              for k, v in kwargs.items()}
    log_z = F.log_partition(**leaves, backend=backend)
    if upstream is None:
        upstream = torch.ones(log_z.shape[0])
    live = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))
    names = [n for n in GRAD_NAMES if n in leaves]
    grads = torch.autograd.grad((live * upstream.to(live)).sum(), [leaves[n] for n in names])
    return log_z.detach(), dict(zip(names, grads))


def assert_close(name: str, got, expected, tol: float) -> None:
    """|got − expected| ≤ tol elementwise, ±inf must match exactly; prints the max difference."""
    got = torch.as_tensor(got, dtype=torch.float64).detach().cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64).detach().cpu()
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    inf_mismatch = torch.isinf(got) != torch.isinf(expected)
    inf_mismatch |= torch.isinf(got) & (got != expected)
    assert not inf_mismatch.any(), f"{name}: infinities differ: got {got}, expected {expected}"
    finite = torch.isfinite(expected)
    diff = (got[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    print(f"{name}: max |diff| = {diff:.3e} (tol {tol:.1e})")
    assert diff <= tol, f"{name}: max |diff| {diff:.3e} > {tol:.1e}"


def log_z_tol(log_z, tol: float) -> float:
    """An absolute tolerance on log Z: ``tol`` relative to its largest finite value."""
    finite = log_z.detach()[torch.isfinite(log_z)]
    return tol * max(1.0, float(finite.abs().max())) if finite.numel() else tol


def check_viterbi(kw: dict, ref_kw: dict, backend: str, dtype, C: int) -> None:
    """``backend``'s Viterbi on ``kw`` against the reference's on ``ref_kw`` (CPU)."""
    best, segs = F.viterbi(**kw, backend=backend)
    best_ref, segs_ref = F.viterbi(**ref_kw, backend="torch")
    assert best.dtype == dtype
    assert_close("viterbi best", best, best_ref, 10 * log_z_tol(best_ref, TOL[dtype]))
    if dtype == torch.float64 and C > 1:
        assert torch.equal(segs.cpu(), segs_ref), f"{segs} != {segs_ref}"
    elif segs.numel() and bool(torch.isfinite(best_ref).all()):
        # One label (splits of a run into durations can tie exactly) or float32
        # near-ties: the path found must score the optimum. (score needs every
        # sequence tiled, so problems with an infeasible sequence are left out.)
        got = F.score(segs.cpu(), **ref_kw)
        assert_close("score of the path", got, best_ref, max(1e-3, log_z_tol(best_ref, 1e-5)))


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (soak and scale runs) run only when asked for:
    FLASHSEMICRF_RUN_SLOW=1, or a marker expression (`-m slow`, `-m cuda`)."""
    if os.environ.get("FLASHSEMICRF_RUN_SLOW") == "1" or config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: set FLASHSEMICRF_RUN_SLOW=1 or select with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
