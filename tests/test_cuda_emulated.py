"""The CUDA device code (csrc/cuda/*.cuh) run on the CPU under a thread-model
emulator (tests/cuda_emulator), compared with the C++ CPU kernel.

Every CUDA thread of a CTA is a fiber; __syncthreads and the warp shuffles are
scheduling points, and between them fibers run in order, reversed or shuffled,
so a missing barrier or a divergent collective changes the results or raises.
This checks the kernels' logic (indexing, barriers, reductions, every working
memory placement) on machines without a GPU; it says nothing about nvcc or the
hardware. The extension is built once (about 40 s) and cached under
build/cuda_emulator (or $FLASHSEMICRF_EMULATOR_BUILD).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from flashsemicrf import backends as _backends

from exp_problems import (assert_log_z, assert_within_log_domain_error, outshone_label,
                          random_exp_problem, random_exp_problems, widened)

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "cuda_emulator"

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator needs ucontext"),
    pytest.mark.skipif(not _backends.HAS_CPU_KERNELS, reason="needs the C++ CPU kernel"),
]

ops = torch.ops.flashsemicrf
ALL_SMEM = 227 * 1024  # H100's opt-in shared memory per block
# (mode, seed): 0 in order, 1 reversed, 2 shuffled with this seed.
SCHEDULES = ((2, 1), (1, 0))


@pytest.fixture(autouse=True)
def cpu_log_scan(monkeypatch):
    """The CUDA kernels run the log-domain scan: they are held to the CPU
    kernel's log-domain scan, bit for bit where the tests say so (the CPU's
    default exp-domain forward agrees with it to rounding only)."""
    monkeypatch.setenv("FLASHSEMICRF_CPU_ALGORITHM", "log")


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension

    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            pytest.skip("torch.utils.cpp_extension.load needs ninja")
    build = Path(os.environ.get("FLASHSEMICRF_EMULATOR_BUILD", ROOT / "build" / "cuda_emulator"))
    build.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    # FLASHSEMICRF_EMULATOR_COVERAGE=1: gcc --coverage, so that gcov says
    # which lines of the device code the tests ran (build it apart).
    coverage = os.environ.get("FLASHSEMICRF_EMULATOR_COVERAGE") == "1"
    return cpp_extension.load(
        name="flashsemicrf_cuda_emulator",
        sources=[str(HERE / "emu_ext.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(HERE)],
        extra_cflags=["-O1", "--coverage"] if coverage else ["-O2"],
        extra_ldflags=["--coverage"] if coverage else [],
        build_directory=str(build),
        verbose=False,
    )


def make(B, T, K, C, dd, boundary, dtype, seed, *, neg_inf=False, noncontig=False, ragged=True):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    scores = r(B, C, T).transpose(1, 2) if noncontig else r(B, T, C)
    trans = r(K, C, C) if dd else r(C, C)
    dur, st, et = r(K, C), r(C), r(C)
    ss = r(B, T, C) if boundary else None
    es = r(B, T, C) if boundary else None
    if neg_inf:
        def sprinkle(x):
            return x.masked_fill(torch.rand(x.shape, generator=g) < 0.3, -math.inf)
        trans, dur, st, et = sprinkle(trans), sprinkle(dur), sprinkle(st), sprinkle(et)
    if ragged:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
    else:
        lengths = torch.full((B,), T, dtype=torch.long)
    return scores, trans, dur, lengths, st, et, ss, es


def close(name, got, want, tol):
    if not got.dtype.is_floating_point:
        assert torch.equal(got, want), f"{name}: {got} != {want}"
        return
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def check(emu, args, interval, mode, seed, smem, *, boundary_mass=True, viterbi=True):
    """Every op on the emulator against the CPU kernel; returns the arenas
    ([shared memory bytes, workspace bytes per CTA]) of the forward and the
    backward."""
    dtype = args[0].dtype
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    ref = ops.forward(*args, interval)
    got = emu.forward(*args, interval, mode, seed, smem)
    for name, a, b in zip(("log_z", "ckpt_ring", "ckpt_offset"), got[:3], ref):
        close(name, a, b, tol)
    B = args[0].shape[0]
    up = torch.linspace(0.5, 1.5, B, dtype=torch.float64).to(dtype)
    gref = ops.backward(up, *args, *ref, interval, boundary_mass)
    ggot = emu.backward(up, *args, *ref, interval, boundary_mass, mode, seed, smem)
    names = ("scores", "transition", "duration", "start_transition", "end_transition",
             "start_scores", "end_scores")
    for name, a, b in zip(names, ggot[:7], gref):
        if b is None:
            assert a is None, name
        else:
            close("grad_" + name, a, b, tol)
    if viterbi:
        vref, vgot = ops.viterbi(*args), emu.viterbi(*args, mode, seed, smem)
        close("best", vgot[0], vref[0], tol)
        if dtype == torch.float64:  # float32 ties may break differently
            close("labels", vgot[1], vref[1], 0)
        fref, fgot = ops.filter(*args), emu.filter(*args, mode, seed, smem)
        for name, a, b in zip(("alpha", "sigma", "offset"), fgot, fref):
            close("filter_" + name, a, b, tol)
    return got[3].tolist(), ggot[7].tolist()


def placements(K, C, dd, dtype):
    """smem limits that put the backward's arena in every placement: all in
    shared memory; the forward ring global; the float64 gradient sums too;
    both rings too; all global. (The arrays that may be in shared memory:
    the forward ring (S, C|1), the sums (2·K·C + (K or 1)·C·C + C + max(C, 256)
    doubles), the backward ring (K, C|1), the forward's rows (5, C) and the
    sweep's (7, C) plus 2·max(C, 256) partial sums, each 16-byte aligned.)"""
    elem = torch.empty((), dtype=dtype).element_size()

    def aligned(n, size=elem):
        return -(-n * size // 16) * 16

    rows = aligned(5 * C) + aligned(7 * C + 2 * max(C, 256))
    ring = aligned(K * (C | 1))
    sums = aligned(2 * K * C + (K if dd else 1) * C * C + C + max(C, 256), 8)
    return {"all-smem": ALL_SMEM, "fwd-ring-global": sums + ring + rows,
            "sums-global": ring + rows, "rings-global": rows, "all-global": 0}


# (B, T, K, C, dd, boundary, interval): several spans (the backward re-anchors
# at each checkpoint), K > T, T = 1, C > 32 (strided labels), K > 32 (duration
# chunks), K > 256 (more durations than a lane keeps in registers).
SHAPES = [
    (2, 7, 3, 2, False, False, 3),
    (2, 7, 3, 2, True, True, 2),
    (1, 1, 3, 1, True, False, 1),
    (3, 9, 12, 3, False, True, 4),
    (3, 9, 12, 3, True, True, 3),
    (2, 40, 5, 5, False, True, 6),
    (2, 40, 5, 5, True, False, 7),
    (2, 70, 37, 3, False, True, 9),
    (2, 50, 36, 2, True, True, 8),
    (1, 12, 4, 33, False, True, 5),
    (1, 12, 4, 33, True, False, 5),
    (1, 262, 258, 2, False, True, 131),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-K{}-C{}-{}-{}-i{}".format(
    *s[:4], "kcc" if s[4] else "cc", "bd" if s[5] else "nobd", s[6]))
def test_emulated_matches_cpu(emu, shape, dtype):
    B, T, K, C, dd, boundary, interval = shape
    seed = sum(shape[:4]) + (7 if dd else 0)
    for i, (mode, sched_seed) in enumerate(SCHEDULES):
        args = make(B, T, K, C, dd, boundary, dtype, seed + i, neg_inf=(seed + i) % 3 == 0,
                    noncontig=i == 1)
        smem = ALL_SMEM if i == 0 else 0  # all in shared memory, then all global
        check(emu, args, interval, mode, sched_seed, smem, boundary_mass=i == 0)


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_emulated_placements(emu, dd):
    """Every working-memory placement gives the CPU kernel's results."""
    B, T, K, C = 2, 30, 9, 3
    for dtype in (torch.float64, torch.float32):
        seen = set()
        limits = placements(K, C, dd, dtype)
        for n, (name, smem) in enumerate(limits.items()):
            args = make(B, T, K, C, dd, True, dtype, 100 + n, neg_inf=n % 2 == 1)
            fwd, bwd = check(emu, args, 7, 2, n, smem, viterbi=False)
            seen.add(tuple(bwd))
        assert len(seen) == len(limits), seen


def test_emulated_nan_and_dead(emu):
    """NaN inputs give NaN, as on the CPU, without a hang; a sequence with no
    path (log Z = -inf) gets zero gradients."""
    for dd in (False, True):
        args = list(make(2, 10, 4, 3, dd, True, torch.float64, 5))
        args[0] = args[0].clone()
        args[0][0, 4, 1] = float("nan")
        check(emu, args, 3, 2, 0, ALL_SMEM)
        args = list(make(2, 10, 4, 3, dd, False, torch.float64, 6))
        args[5] = torch.full_like(args[5], -math.inf)  # end_transition: no path
        check(emu, args, 3, 2, 0, ALL_SMEM)


def bitwise(xs):
    return [x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)
            if x.dtype.is_floating_point else x for x in xs if x is not None]


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_emulated_deterministic(emu, dd):
    """Bit-identical results under every schedule and placement."""
    B, T, K, C = 2, 45, 36, 3
    for dtype in (torch.float64, torch.float32):
        args = make(B, T, K, C, dd, True, dtype, 11, neg_inf=True)
        up = torch.linspace(0.5, 1.5, B, dtype=dtype)
        for smem in placements(K, C, dd, dtype).values():
            outs = []
            for mode, seed in ((0, 0), (1, 0), (2, 1), (2, 2)):
                f = emu.forward(*args, 7, mode, seed, smem)
                g = emu.backward(up, *args, *f[:3], 7, True, mode, seed, smem)
                v = emu.viterbi(*args, mode, seed, smem)
                outs.append(bitwise(list(f[:3]) + list(g[:7]) + list(v)))
            for other in outs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_long(emu, dd, dtype):
    """Long sequences with many spans (the re-anchor at every checkpoint keeps
    float32 rounding from piling up), C > kThreads, K > T."""
    check(emu, make(2, 600, 8, 4, dd, True, dtype, 21, ragged=False), 25, 2, 3, ALL_SMEM,
          viterbi=False)
    check(emu, make(1, 4, 2, 300, dd, True, dtype, 22), 2, 2, 4, 0)
    check(emu, make(2, 3, 9, 4, dd, True, dtype, 23), 2, 1, 0, ALL_SMEM)


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_emulated_span_parallel_recompute_gives_the_same_bits(emu, dd):
    """FLASHSEMICRF_CUDA_RECOMPUTE=spans: every span of every sequence is
    recomputed first (recompute_kernel, one CTA a span), then the sweeps read
    the rows. The same CtaScan code writes the same rows, so every gradient
    is the in-sweep recompute's bit for bit; the workspace starts as NaN, so
    a row the recompute kernel missed shows. Ragged lengths (spans past a
    sequence's end), a dead sequence (-inf everywhere at one position), K > T,
    T = 1, one span and many, both dtypes, both placements, both schedules."""
    cases = [(3, 40, 6, 4, True, 7), (2, 23, 30, 3, False, 5), (2, 1, 3, 2, True, 1),
             (1, 12, 4, 5, True, 40)]
    for n, (B, T, K, C, boundary, interval) in enumerate(cases):
        for dtype in (torch.float64, torch.float32):
            args = list(make(B, T, K, C, dd, boundary, dtype, 60 + n, neg_inf=n % 2 == 1))
            if B == 3:
                args[0] = args[0].clone()
                args[0][1, 2, :] = -math.inf  # sequence 1 has no segmentation
            mode, seed = SCHEDULES[n % 2]
            smem = ALL_SMEM if n % 2 == 0 else 0
            f = emu.forward(*args, interval, mode, seed, smem)
            if B == 3:
                assert f[0][1] == -math.inf
            up = torch.linspace(0.5, 1.5, B, dtype=torch.float64).to(dtype)
            serial = emu.backward(up, *args, *f[:3], interval, True, mode, seed, smem)
            spans = emu.backward_spans(up, *args, *f[:3], interval, True, mode, seed, smem)
            for name, a, b in zip(("scores", "transition", "duration", "start_transition",
                                   "end_transition", "start_scores", "end_scores"),
                                  serial[:7], spans[:7]):
                assert (a is None) == (b is None), name
                if a is not None:
                    assert not torch.isnan(b).any(), (name, n, dtype)
                    assert torch.equal(bitwise([a])[0], bitwise([b])[0]), (name, n, dtype)


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_emulated_coverage_running_sums(emu, dd):
    """The scores gradient comes from running float64 sums over the whole
    sweep (the mass of the segments ending after u, less that of those
    starting after u): a few hundred positions with a small interval (many
    re-anchors, no coverage check inside a span) and -inf entries must still
    cancel to the CPU kernel's per-position sums; C > kThreads takes every
    duration of a label in one thread."""
    for dtype in (torch.float32, torch.float64):
        args = make(1, 240, 6, 3, dd, True, dtype, 51, neg_inf=True, ragged=False)
        check(emu, args, 4, 2, 7, ALL_SMEM, viterbi=False)
    check(emu, make(1, 3, 2, 257, dd, False, torch.float32, 52), 2, 2, 8, ALL_SMEM, viterbi=False)


@pytest.mark.parametrize("interval", [5, 13])
@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_emulated_renormalises_like_cpu(emu, dd, interval):
    """Checkpoint offsets off by 0.25 … 2.25 (as the forward's rounding
    leaves them over a long sequence, much exaggerated) are taken out of the
    float32 backward by the same re-normalisations as on the CPU: the
    re-anchor at every checkpoint; with interval 13 >= 2K-1 the coverage
    check every K steps inside a span; with interval 5, where no window fits
    in a span, the first segment's mass at t = 0, which alone makes the start
    gradients right again."""
    B, T, K, C = 2, 40, 4, 3
    args = make(B, T, K, C, dd, True, torch.float32, 41, ragged=False)
    log_z, ring, off = ops.forward(*args, interval)
    bad = off + 0.25 + 0.5 * torch.arange(off.shape[1], dtype=torch.float64)
    up = torch.tensor([1.0, -0.5])
    clean = ops.backward(up, *args, log_z, ring, off, interval, True)
    want = ops.backward(up, *args, log_z, ring, bad, interval, True)
    got = emu.backward(up, *args, log_z, ring, bad, interval, True, 2, 5, ALL_SMEM)
    for name, a, b in zip(("scores", "transition", "duration", "start_transition",
                           "end_transition", "start_scores", "end_scores"), got[:7], want):
        close("grad_" + name, a, b, 2e-5)
    assert float((want[0] - clean[0]).abs().max()) > 1e-2  # the offsets' error is felt ...
    close("start transition", want[3], clean[3], 1e-5)  # ... but not by the first segment


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_emulated_sums_bitwise_like_cpu(emu, dd, dtype):
    """With one label and K = 1 every term the CUDA kernels and the CPU
    kernel compute is the same to the bit, so outputs agree to the bit: in
    particular the duration and transition gradients, which both add up in
    float64 in the order of t (a float32 sum over 400 positions would not)."""
    B, T, K, C = 1, 400, 1, 1
    args = make(B, T, K, C, dd, True, dtype, 43, ragged=False)
    up = torch.tensor([1 / 3], dtype=dtype)
    f = ops.forward(*args, 37)
    want = ops.backward(up, *args, *f, 37, True)
    got = emu.backward(up, *args, *f, 37, True, 2, 6, ALL_SMEM)
    for a, b in zip(bitwise(got[:7]), bitwise(want)):
        assert torch.equal(a, b)


# The device's launch limits. emu::launch holds every launch above to those of
# an H100/H200 (threads per block, grid, dynamic shared memory: 48 KB unless
# cudaFuncSetAttribute raised the kernel's limit, 227 KB at most); these tests
# show that it does, and that the opt-in path is taken where it must be.

DEFAULT_SMEM = 48 * 1024


def test_emulated_launch_limits_are_enforced(emu):
    emu.probe_launch(3, 1024, DEFAULT_SMEM, False)
    emu.probe_launch(1, 32, ALL_SMEM, True)
    with pytest.raises(RuntimeError, match="cudaFuncSetAttribute"):
        emu.probe_launch(1, 32, DEFAULT_SMEM + 4, False)
    with pytest.raises(RuntimeError, match="refused"):
        emu.probe_launch(1, 32, ALL_SMEM + 4, True)
    with pytest.raises(RuntimeError, match="threads per block"):
        emu.probe_launch(1, 1056, 0, False)
    with pytest.raises(RuntimeError, match="grid"):
        emu.probe_launch(2**31, 32, 0, False)


def test_emulator_catches_what_it_says_it_catches(emu):
    """The emulator's scheduler, checked on kernels that break its rules:
    a missing barrier changes results, a divergent or partial-mask shuffle
    and a barrier some threads skip raise, and values cross fibers intact."""
    neighbour = (torch.arange(64, dtype=torch.float32) + 1) % 64
    for mode, seed in SCHEDULES:
        assert torch.equal(emu.probe_rules(0, mode, seed), neighbour)
    # In order, thread i reads thread i+1's slot before it is written: the
    # shared memory's NaN fill shows.
    assert emu.probe_rules(1, 0, 0)[:63].isnan().all()
    with pytest.raises(RuntimeError, match="divergent shuffle"):
        emu.probe_rules(2, 2, 1)
    with pytest.raises(RuntimeError, match="partial mask"):
        emu.probe_rules(3, 2, 1)
    with pytest.raises(RuntimeError, match="exited threads"):
        emu.probe_rules(4, 0, 0)
    # After an error the next launch runs normally.
    warp_sums = torch.tensor([float(sum(range(32)))] * 32 + [float(sum(range(32, 64)))] * 32)
    for mode, seed in SCHEDULES:
        assert torch.equal(emu.probe_rules(5, mode, seed), warp_sums)


def test_emulated_launches_take_the_opt_in_path(emu):
    """Working memory over 48 KB goes through the attribute; with a limit
    above the device's (a host that misread it), the launch is refused."""
    emu.clear_launch_log()
    # float64, K = 300, C = 24: the forward ring is 300·25·8 = 60 KB.
    args = make(2, 12, 300, 24, False, True, torch.float64, 31)
    check(emu, args, 4, 2, 0, ALL_SMEM, viterbi=True)
    log = emu.launch_log()
    assert len(log) == 4 and all(threads == 256 and grid == 2 for grid, threads, _, _ in log)
    assert all(DEFAULT_SMEM < smem <= allowed <= ALL_SMEM for _, _, smem, allowed in log), log
    # float32, K = 300, C = 33: the backward's two rings and its float64 sums
    # need (300 + 300)·33·4 + (2·300·33 + 33² + 33 + 256)·8 = 248 KB, over the
    # device's 227 KB and under the 300 KB the host is told.
    args = make(1, 5, 300, 33, False, False, torch.float32, 32)
    ref = ops.forward(*args, 2)
    with pytest.raises(RuntimeError, match="refused"):
        emu.backward(torch.ones(1), *args, *ref, 2, False, 2, 0, 300 * 1024)
    emu.backward(torch.ones(1), *args, *ref, 2, False, 2, 0, ALL_SMEM)
    _, _, smem, _ = emu.launch_log()[-1]
    assert smem <= ALL_SMEM


def viterbi_placements(T, K, C, dd, dtype):
    """smem limits that put the Viterbi kernel's arena in every placement: all
    in shared memory (but the checkpoints, always in the workspace); the
    span's backpointers (2·(interval+1)·C int32) in the workspace; the ring
    too; all in the workspace."""
    elem = torch.empty((), dtype=dtype).element_size()

    def aligned(n, size=elem):
        return -(-n * size // 16) * 16

    ring = aligned((2 * K if dd else K) * (C | 1))
    rows = aligned(5 * C)
    span = aligned(2 * (math.isqrt(T * K) + 1) * C, 4)
    return {"all-smem": ring + rows + span, "span-global": ring + rows, "ring-global": rows,
            "all-global": 0}


@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_emulated_viterbi_placements(emu, dd):
    """The streaming Viterbi (traceback span by span, T = 50, K = 4: four
    spans of 14) gives the CPU kernel's best and segmentation bit for bit with
    the span's backpointers in shared memory or in the workspace, and the ring
    in either."""
    B, T, K, C = 3, 50, 4, 3
    for dtype in (torch.float64, torch.float32):
        limits = viterbi_placements(T, K, C, dd, dtype)
        for n, (name, smem) in enumerate(limits.items()):
            args = make(B, T, K, C, dd, True, dtype, 200 + n, neg_inf=n % 2 == 1)
            want = ops.viterbi(*args)
            got = emu.viterbi(*args, 2, n, smem)
            assert torch.equal(bitwise(got[:1])[0], bitwise(want[:1])[0]), name
            assert torch.equal(got[1], want[1]), name
            assert got[2][0] == smem, (name, got[2].tolist())


def test_emulated_viterbi_working_memory_grows_as_sqrt_T(emu):
    """The Viterbi kernel's arena beyond the forward's (checkpoints, their
    offsets, one span's backpointers) takes about 4 times the memory for 16
    times the length: O(sqrt(T·K)·C), where the full backpointer tables took
    2·(T+1)·C int32."""
    K, C = 2, 2
    extra = []
    for T in (40, 640):
        args = make(1, T, K, C, False, False, torch.float32, 51, ragged=False)
        smem, workspace = emu.viterbi(*args, 0, 0, 0)[2].tolist()
        fwd_smem, fwd_workspace = emu.forward(*args, 0, 0, 0, 0)[3].tolist()
        assert smem == fwd_smem == 0
        extra.append(workspace - fwd_workspace)
    assert 3.5 <= extra[1] / extra[0] <= 4.5, extra
    assert extra[1] * 4 < 2 * (640 + 1) * C * 4, extra


# The exp-domain forward (exp_forward_kernel, static transition; what
# FLASHSEMICRF_CUDA_ALGORITHM=exp runs), then the log-domain
# forward for the sequences it marks: held to the C++ CPU kernel's
# exp-domain forward, which makes the same decisions from the same bounds.

def cpu_exp_forward(monkeypatch, args, interval):
    """The CPU kernel's exp-domain forward: (log Z, ring, offsets, fallbacks)."""
    monkeypatch.setenv("FLASHSEMICRF_CPU_ALGORITHM", "exp")
    fallbacks = torch.ops.flashsemicrf_testing.cpu_exp_fallbacks
    before = int(fallbacks())
    out = ops.forward(*args, interval)
    return (*out, int(fallbacks()) - before)


def check_exp_forward(emu, monkeypatch, args, interval, mode, seed, smem, tol=None,
                      blocked=False, dead_labels=()):
    """The emulated exp-domain forward (blocked: exp_blocked_kernel, else the
    per-step exp_forward_kernel) against the CPU kernel's: the same number of
    sequences handed to the log scan, log Z and checkpoints to rounding.

    dead_labels: labels that cannot reach an end and outgrow the rest until
    alpha_hat is capped at the dtype's largest value. The capped value's log
    then depends on the normaliser (the blocked kernel's powers of two
    against the CPU kernel's exact maxima), and so does the checkpoints'
    split into rows and offset; for the blocked kernel, where they are
    given, the checkpoints are compared as row + offset on the other labels
    (each put in the CPU kernel's terms: row + offset - the CPU's offset).
    Returns (verdicts, arena sizes)."""
    dtype = args[0].dtype
    tol = tol if tol is not None else (1e-9 if dtype == torch.float64 else 2e-4)
    *want, taken = cpu_exp_forward(monkeypatch, args, interval)
    got = emu.forward_exp(*args, interval, mode, seed, smem, blocked)
    verdicts = got[4]
    assert set(verdicts.tolist()) <= {0, 1}, verdicts
    assert int(verdicts.sum()) == taken, (verdicts.tolist(), taken)
    close("log_z", got[0], want[0], tol)
    ring, ring_cpu = got[1], want[1]
    if blocked and dead_labels:
        keep = [c for c in range(ring.shape[-1]) if c not in dead_labels]
        # Both in the CPU kernel's terms (its offset), so that the tolerance
        # applies to the rows' magnitudes, as below.
        ring = (ring.double() + (got[2] - want[2])[..., None, None])[..., keep]
        ring_cpu = ring_cpu.double()[..., keep]
    else:
        close("ckpt_offset", got[2], want[2], tol)
    # The CPU kernel runs with subnormals flushed; the device code keeps them
    # (nvcc's default). A ring entry that fell below the dtype's normal range
    # relative to the normaliser may so be -inf in one checkpoint and finite
    # in the other; elsewhere they agree to rounding.
    below = math.log(torch.finfo(dtype).tiny) + 1.0
    top = torch.maximum(ring, ring_cpu).flatten(2).amax(-1)[..., None, None]
    one_sided = torch.isinf(ring) != torch.isinf(ring_cpu)
    finite_side = torch.where(torch.isinf(ring), ring_cpu, ring)
    assert bool((finite_side[one_sided] < (top.expand_as(ring) + below)[one_sided]).all())
    close("ckpt_ring", torch.where(one_sided, ring_cpu, ring), ring_cpu, tol)
    return verdicts, got[3].tolist()


STATIC_SHAPES = [s for s in SHAPES if not s[4]] + [(2, 30, 40, 3, False, True, 7),
                                                  (1, 9, 5, 300, False, False, 4)]


# The two exp-domain kernels: per step (any C), and blocked (C <= 32, what
# the device runs there).
EXP_KERNELS = pytest.mark.parametrize("blocked", [False, True], ids=["step", "blocked"])


@EXP_KERNELS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", STATIC_SHAPES, ids=lambda s: "B{}-T{}-K{}-C{}-{}-i{}".format(
    *s[:4], "bd" if s[5] else "nobd", s[6]))
def test_emulated_exp_forward_matches_cpu(emu, monkeypatch, shape, dtype, blocked):
    """Random problems (ragged, -inf entries, strided scores, K > T, T = 1,
    C > 32 and C > kThreads, K > 256): no sequence falls back, and log Z and
    the checkpoints are the CPU exp-domain forward's to rounding, in shared
    memory and in the workspace."""
    B, T, K, C, _, boundary, interval = shape
    if blocked and C > 32:
        pytest.skip("the blocked kernel takes C <= 32")
    seed = sum(shape[:4]) + 3
    for i, (mode, sched_seed) in enumerate(SCHEDULES):
        args = make(B, T, K, C, False, boundary, dtype, seed + i, neg_inf=(seed + i) % 3 == 0,
                    noncontig=i == 1)
        smem = ALL_SMEM if i == 0 else 0
        verdicts, _ = check_exp_forward(emu, monkeypatch, args, interval, mode, sched_seed, smem,
                                        blocked=blocked)
        assert int(verdicts.sum()) == 0


@EXP_KERNELS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_backward_from_exp_forward(emu, monkeypatch, dtype, blocked):
    """The CUDA backward from the CUDA exp-domain forward's checkpoints (what
    autograd runs by default) against the CPU kernel's log-domain backward
    from the same checkpoints: every gradient output, several spans."""
    B, T, K, C, interval = 3, 60, 7, 4, 9
    args = make(B, T, K, C, False, True, dtype, 61, neg_inf=True)
    fwd = emu.forward_exp(*args, interval, 2, 2, ALL_SMEM, blocked)
    assert int(fwd[4].sum()) == 0
    monkeypatch.setenv("FLASHSEMICRF_CPU_ALGORITHM", "log")
    up = torch.linspace(0.5, 1.5, B, dtype=torch.float64).to(dtype)
    want = ops.backward(up, *args, *fwd[:3], interval, True)
    got = emu.backward(up, *args, *fwd[:3], interval, True, 2, 3, ALL_SMEM)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for name, a, b in zip(("scores", "transition", "duration", "start_transition",
                           "end_transition", "start_scores", "end_scores"), got[:7], want):
        close("grad_" + name, a, b, tol)


def exp_placements(K, C, dtype, blocked=False):
    """smem limits that put the exp-domain forward's arena in every
    placement: all in shared memory; the float64 transition bound in the
    workspace; the scalar transition too; the weights and the ring too; all
    in the workspace."""
    elem = torch.empty((), dtype=dtype).element_size()

    def aligned(n, size=elem):
        return -(-n * size // 16) * 16

    ring = weight = aligned(K * C)
    trans, bound = aligned(C * C), aligned(C * C, 8)
    partials = max(32 * C, 256) if blocked else max(C, 256)
    rows = aligned(20 * C, 8) + aligned(11 * C + 3 * partials) + aligned(3 * C + 3, 4)
    if blocked:  # near entries, staged inputs, alpha rows, far sums and maxima; F, the
        # block's scalars, per-step doubles and far charges; flush marks
        rows += (aligned(7 * 32 * C) + aligned(C + 3 + 3 * 32 + 32 * C, 8)
                 + aligned(2 * C + 2, 4))
    return {"all-smem": ALL_SMEM, "bound-global": ring + weight + trans + rows,
            "transition-global": ring + weight + rows, "tables-global": rows, "all-global": 0}


@EXP_KERNELS
def test_emulated_exp_forward_placements(emu, monkeypatch, blocked):
    """Every placement of the exp-domain forward's working memory gives the
    CPU kernel's results."""
    B, T, K, C = 2, 30, 9, 3
    for dtype in (torch.float64, torch.float32):
        seen = set()
        limits = exp_placements(K, C, dtype, blocked)
        for n, (name, smem) in enumerate(limits.items()):
            args = make(B, T, K, C, False, True, dtype, 300 + n, neg_inf=n % 2 == 1)
            _, sizes = check_exp_forward(emu, monkeypatch, args, 7, 2, n, smem, blocked=blocked)
            seen.add(tuple(sizes))
        assert len(seen) == len(limits), seen


def _static_adversaries():
    from test_cpu_exp_domain import ADVERSARIES
    return ADVERSARIES


@EXP_KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("adv", _static_adversaries(), ids=lambda a: a.name)
def test_emulated_exp_forward_adversarial(emu, monkeypatch, adv, dtype, blocked):
    """The CPU kernel's adversarial problems (mass forced through flushed
    labels, revived segments, dead ends, NaN, ...): the CUDA exp-domain
    forward hands exactly the sequences to the log scan that the CPU kernel
    does, every one where the adversary says a plain exp-domain scan is
    wrong, and its results are the CPU's to rounding."""
    from test_cpu_exp_domain import op_args

    args = op_args(adv.kw, dtype)
    B = args[0].shape[0]
    # Label 0 of dead_end_label can neither transition nor end.
    dead = (0,) if adv.name == "dead_end_label" else ()
    verdicts, _ = check_exp_forward(emu, monkeypatch, args, 0, 2, 5, ALL_SMEM,
                                    tol=1e-9 if dtype == torch.float64 else 1e-4,
                                    blocked=blocked, dead_labels=dead)
    if dtype in adv.breaks:
        assert int(verdicts.sum()) == B
    if dtype in adv.clean:
        assert int(verdicts.sum()) == 0


@pytest.mark.parametrize("score", [2e8, -2e8], ids=["high", "low"])
@pytest.mark.parametrize("where", ["end", "start"])
def test_emulated_blocked_forward_hands_over_scales_past_its_range(emu, score, where):
    """The blocked kernel ranks labels for its end and start scales by
    exponents clamped to +-2^27 (scores of 9 * 10^7 nats). Every label's end
    (or start) score at one position of row 0 set to +-2 * 10^8: that row's
    scale lies at a clamp, and the row goes to the log scan; row 1 (ordinary
    scores) does not."""
    B, T, K, C = 2, 20, 4, 3
    scores, trans, dur, lengths, st, et, ss, es = make(B, T, K, C, False, True, torch.float64, 11,
                                                       ragged=False)
    ss, es = ss.clone(), es.clone()
    (es if where == "end" else ss)[0, 6, :] = score
    got = emu.forward_exp(scores, trans, dur, lengths, st, et, ss, es, 0, 2, 1, ALL_SMEM, True)
    assert got[4].tolist() == [1, 0]


@pytest.mark.parametrize("dtype,gap,w,duration", [
    (torch.float64, 8.0, 300.0, None), (torch.float64, 8.0, 500.0, None),
    (torch.float64, 8.0, 600.0, 40), (torch.float32, 1.0, 50.0, None),
    (torch.float32, 1.0, 70.0, 40)],
    ids=["f64-F-times-sum-underflows", "f64-below-tiny-summed-ahead",
         "f64-below-tiny-block-before", "f32", "f32-block-before"])
def test_emulated_blocked_forward_charges_what_the_far_part_loses(emu, dtype, gap, w, duration):
    """Where label 0's mass, lost in the blocked forward's far part, is all
    of Z once label 1 dies, the blocked kernel must see the loss and hand the
    sequences to the log scan: log Z is the reference's (it was -inf, with no
    hand-over, when float64's underflow of F times the far sum went
    uncharged; each float64 case fails if its charge is left out). The
    per-step kernel gets the same log Z."""
    args = outshone_label(dtype, gap, w, duration)
    want = ops.forward(*widened(args), 0)[0]
    assert bool(torch.isfinite(want).all())
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for blocked in (True, False):
        got = emu.forward_exp(*args, 0, 2, 1, ALL_SMEM, blocked)
        close(f"log_z (blocked={blocked})", got[0].double(), want, tol * abs(float(want[0])))


def scaled_problems(seed, seed0, n, max_T, max_K, max_C):
    """n random static problems, two sequences each, in both dtypes, with
    every score and parameter scaled by 1, 10, 40 or 120 in turn (start and
    end scores every other problem, -inf entries every third): yields
    (i, scale, args)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        T = int(torch.randint(20, max_T, (1,), generator=g))
        K = int(torch.randint(2, max_K, (1,), generator=g))
        C = int(torch.randint(1, max_C, (1,), generator=g))
        scale = (1.0, 10.0, 40.0, 120.0)[i % 4]
        for dtype in (torch.float32, torch.float64):
            yield i, scale, [a * scale if a is not None and a.is_floating_point() else a
                             for a in make(2, T, K, C, False, i % 2 == 0, dtype, seed0 + i,
                                           neg_inf=i % 3 == 0)]


@EXP_KERNELS
def test_emulated_exp_forward_decisions_at_large_scales(emu, monkeypatch, blocked):
    """Random problems with scores and parameters scaled up to 120 (where
    float32, and at the largest scales float64, flushes mass that matters):
    sequence by sequence, the CUDA exp-domain forward hands over exactly as
    many sequences as the CPU kernel's, and log Z agrees with it (the log
    scan's where handed over)."""
    taken_total = 0
    for i, _, args in scaled_problems(5, 1000, 24, 120, 30, 7):
        verdicts, _ = check_exp_forward(emu, monkeypatch, args, 0, 2, i, ALL_SMEM,
                                        tol=1e-9 if args[0].dtype == torch.float64 else 1e-4,
                                        blocked=blocked)
        taken_total += int(verdicts.sum())
    assert taken_total > 0  # the scales do reach the fallback


# The exp-domain backward sweep (exp_backward_kernel, static transition;
# FLASHSEMICRF_CUDA_ALGORITHM=exp), then backward_kernel for the sequences it
# marked, as semicrf_cuda.cu runs them, against the CPU kernel's log-domain
# backward from the same checkpoints.

GRAD_NAMES = ("scores", "transition", "duration", "start_transition", "end_transition",
              "start_scores", "end_scores")


def check_exp_backward(emu, args, interval, mode, seed, smem, *, spans=False, tol=None,
                       boundary_mass=True):
    """Every gradient of the emulated exp-domain backward (spans: every span
    recomputed first) against the CPU kernel's log-domain one; returns
    (verdicts, the exp sweep's arena sizes, the gradients)."""
    dtype = args[0].dtype
    tol = tol if tol is not None else (1e-9 if dtype == torch.float64 else 2e-4)
    fwd = ops.forward(*args, interval)
    B = args[0].shape[0]
    up = torch.linspace(0.5, 1.5, B, dtype=torch.float64).to(dtype)
    want = ops.backward(up, *args, *fwd, interval, boundary_mass)
    run = emu.backward_exp_spans if spans else emu.backward_exp
    got = run(up, *args, *fwd, interval, boundary_mass, mode, seed, smem)
    verdicts = got[8]
    assert set(verdicts.tolist()) <= {0, 1}, verdicts  # every CTA wrote one
    for name, a, b in zip(GRAD_NAMES, got[:7], want):
        assert (a is None) == (b is None), name
        if b is not None:
            close("grad_" + name, a, b, tol)
    return verdicts, got[7].tolist(), got[:7]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", STATIC_SHAPES, ids=lambda s: "B{}-T{}-K{}-C{}-{}-i{}".format(
    *s[:4], "bd" if s[5] else "nobd", s[6]))
def test_emulated_exp_backward_matches_cpu(emu, shape, dtype):
    """Random problems (ragged, -inf entries, strided scores, several spans,
    K > T, T = 1, C > 32 and C > kThreads, K > 256), spans recomputed in the
    sweep and all at once: the exp-domain sweep certifies every sequence,
    and every gradient is the CPU kernel's to rounding, in shared memory and
    in the workspace."""
    B, T, K, C, _, boundary, interval = shape
    seed = sum(shape[:4]) + 5
    for i, (mode, sched_seed) in enumerate(SCHEDULES):
        args = make(B, T, K, C, False, boundary, dtype, seed + i, neg_inf=(seed + i) % 3 == 0,
                    noncontig=i == 1)
        smem = ALL_SMEM if i == 0 else 0
        for spans in (False, True):
            verdicts, _, _ = check_exp_backward(emu, args, interval, mode, sched_seed, smem,
                                                spans=spans, boundary_mass=i == 0)
            assert verdicts.tolist() == [0] * B


def exp_backward_placements(K, C, dtype):
    """smem limits that put the exp sweep's arena in every placement: all in
    shared memory; the recompute's ring in the workspace; the float64 sums
    too; the float64 ring too; the tables too; all in the workspace."""
    elem = torch.empty((), dtype=dtype).element_size()

    def aligned(n, size=elem):
        return -(-n * size // 16) * 16

    rows = aligned(5 * C) + aligned(5 * C)  # the recompute's rows, the staged rows
    tables = aligned(K * C + C * C + 14 * C + 4 * max(C, 256) + 1, 8)
    ring = aligned(K * (C | 1), 8)
    sums = aligned(2 * K * C + C * C + C, 8)
    return {"all-smem": ALL_SMEM, "scan-ring-global": sums + ring + tables + rows,
            "sums-global": ring + tables + rows, "ring-global": tables + rows,
            "tables-global": rows, "all-global": 0}


def test_emulated_exp_backward_placements(emu):
    """Every placement of the exp sweep's working memory gives the CPU
    kernel's gradients, and the same bits under every schedule."""
    B, T, K, C, interval = 2, 30, 9, 3, 7
    for dtype in (torch.float64, torch.float32):
        seen = set()
        limits = exp_backward_placements(K, C, dtype)
        for n, (name, smem) in enumerate(limits.items()):
            args = make(B, T, K, C, False, True, dtype, 400 + n, neg_inf=n % 2 == 1)
            outs = []
            for mode, seed in SCHEDULES:
                verdicts, sizes, grads = check_exp_backward(emu, args, interval, mode, seed, smem)
                assert verdicts.tolist() == [0] * B, name
                outs.append(bitwise(list(grads)))
            assert all(torch.equal(a, b) for a, b in zip(*outs)), name
            seen.add(tuple(sizes))
        assert len(seen) == len(limits), seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_exp_backward_long(emu, dtype):
    """A few hundred positions and many spans: the re-anchors at every
    checkpoint and (float32) the coverage renormalisations every K positions
    keep the exp sweep on the CPU kernel's gradients; the scores gradient's
    running sums cancel as in the log sweep."""
    args = make(2, 300, 8, 4, False, True, dtype, 71, neg_inf=True, ragged=False)
    verdicts, _, _ = check_exp_backward(emu, args, 13, 2, 3, ALL_SMEM)
    assert verdicts.tolist() == [0, 0]
    verdicts, _, _ = check_exp_backward(emu, args, 40, 1, 0, 0, spans=True)
    assert verdicts.tolist() == [0, 0]


def test_emulated_exp_backward_hands_over_what_it_cannot_certify(emu):
    """Row 0 of each problem is one the exp sweep must not certify, row 1 an
    ordinary one; row 0 goes to the log-domain sweep, and every gradient is
    the CPU kernel's (NaN where it has NaN):
    - mass at risk: at one position label 1's emission is 720 nats below
      label 0's (the ring's label-1 entries fall below float64's normal
      range as they move past it) while its start score there is 700 nats
      up, so that its segments' posterior weight is ~e^700: the ghost
      times that weight is past the tolerance (with the check disabled,
      these rows are accepted);
    - a NaN score;
    - a finite duration score 800 nats below the label's largest (its
      weight underflows in the table);
    and a dead sequence (log Z = -inf) is certified with zero gradients."""
    for dtype in (torch.float64, torch.float32):
        args = list(make(2, 12, 4, 3, False, True, dtype, 3, ragged=False))
        args[0], args[6] = args[0].clone(), args[6].clone()
        args[0][0, 6, 1] = -720.0
        args[6][0, 6, 1] = 700.0
        verdicts, _, _ = check_exp_backward(emu, args, 5, 2, 1, ALL_SMEM)
        assert verdicts.tolist() == [1, 0], dtype

        args = list(make(2, 12, 4, 3, False, False, dtype, 4, ragged=False))
        args[0] = args[0].clone()
        args[0][0, 3, 2] = float("nan")
        verdicts, _, grads = check_exp_backward(emu, args, 5, 1, 0, ALL_SMEM)
        assert verdicts.tolist() == [1, 0], dtype
        assert torch.isnan(grads[0][0]).any() and not torch.isnan(grads[0][1]).any()

        args = list(make(2, 12, 4, 3, False, False, dtype, 5, ragged=False))
        args[2] = args[2].clone()
        args[2][1, 0] = args[2][:, 0].max() - 800.0
        verdicts, _, _ = check_exp_backward(emu, args, 5, 2, 2, 0)
        assert verdicts.tolist() == [1, 1], dtype  # the tables are every sequence's

        args = list(make(2, 12, 4, 3, False, False, dtype, 6, ragged=False))
        args[0] = args[0].clone()
        args[0][0, 5, :] = -math.inf  # no segmentation of row 0
        verdicts, _, grads = check_exp_backward(emu, args, 5, 2, 3, ALL_SMEM)
        assert verdicts.tolist() == [0, 0], dtype
        assert all(not g[0].any() for g in grads if g is not None)


def test_emulated_exp_backward_at_large_scales(emu):
    """Random problems with scores and parameters scaled up to 120 (where
    ring entries fall out of float64's range, and new ones overflow it): every
    gradient is the CPU kernel's whether the exp sweep certified the
    sequence or handed it to the log-domain one. The bounds stay tight up to
    scale 40 (no sequence handed over: with one absolute bound a label
    instead of a relative one, 2 of 8 float64 sequences were at scale 10 and
    7 of 8 at 40); at 120 some are (a new entry overflows, or entries that
    fell below the smallest normal meet weights of 1e85 and more)."""
    handed = {1.0: 0, 10.0: 0, 40.0: 0, 120.0: 0}
    for i, scale, args in scaled_problems(9, 2000, 16, 90, 25, 6):
        verdicts, _, _ = check_exp_backward(emu, args, 0, 2, i, ALL_SMEM,
                                            tol=1e-9 if args[0].dtype == torch.float64 else 1e-4)
        handed[scale] += int(verdicts.sum())
    assert handed[1.0] == handed[10.0] == handed[40.0] == 0, handed
    assert handed[120.0] > 0, handed


def test_emulated_exp_domain_random_adversaries(emu, monkeypatch):
    """Random problems built to make the exp-domain kernels lose mass that
    matters (random_exp_problem's three families, both dtypes): the blocked
    and per-step CUDA forwards give the float64 log-domain log Z, certified
    or handed over; the CUDA exp-domain backward gives every gradient to
    within what the float32 log-domain backward itself misses (or 1e-9,
    float64) plus rounding. It runs 6 problems a family and those where a
    kernel was once wrong (FLASHSEMICRF_EXP_FUZZ_PROBLEMS=N: N a family; 80
    ran clean). test_cpu_exp_domain.py holds the C++ CPU kernel's
    exp-domain forward and backward to the same problems."""
    n = int(os.environ.get("FLASHSEMICRF_EXP_FUZZ_PROBLEMS", "6"))
    # Problems this test found wrong: the CUDA exp-domain backward certified
    # a sequence whose new entry beta_hat · exp(end terms) had underflowed
    # uncharged (beta_hat was 1e255). (Problem 135 of the same family, where
    # the CPU kernel's exp-domain backward gave NaN, is
    # test_cpu_exp_domain.py's.)
    found = {("boundary", 155)}
    up64 = torch.tensor([0.7, 1.3], dtype=torch.float64)
    for family, i, dtype, args in random_exp_problems(n, found):
        wide = widened(args)
        where = f"{family} problem {i} ({dtype})"
        ref = ops.forward(*wide, 0)
        for blocked, name in ((True, "blocked"), (False, "step")):  # C <= 5 here
            got = emu.forward_exp(*args, 0, 2, i, ALL_SMEM, blocked)[0]
            assert_log_z(f"{where}, {name}", got, ref[0], dtype)
        if not bool(torch.isfinite(ref[0]).all()):
            continue
        # The gradients, against the float64 log-domain backward; the
        # float32 log-domain backward's own error sets the scale.
        grads = ops.backward(up64, *wide, *ref, 0, True)
        up = up64.to(dtype)
        fwd = ops.forward(*args, 0)
        plain = ops.backward(up, *args, *fwd, 0, True)
        got = emu.backward_exp(up, *args, *fwd, 0, True, 2, i, ALL_SMEM)
        assert_within_log_domain_error(f"{where}, cuda-exp", got, grads, plain, dtype)


def test_emulated_span_parallel_sweeps(emu):
    """FLASHSEMICRF_CUDA_SWEEP=parallel: the mirror image's forward gives the
    backward ring at the last position of every span, and one CTA a span
    sweeps it alone (its own recompute, its own float64 sums, the coverage
    past its span spilled to the host). Every gradient is the CPU kernel's
    log-domain backward's, to rounding: shapes with ragged lengths (spans
    past a sequence's end), -inf entries, a dead sequence, boundary scores,
    strided scores, K > interval (coverage spills over several spans), one
    position spans (interval 1), C > kThreads; both dtypes, both placements,
    every schedule; the mirror's forward in the log and the exp domain. The
    mirror's log Z is the problem's, and another schedule and placement give
    the same bits. Every other case hands the sweeps a log Z off by 0.25:
    each span anchors its offset where its sweep starts (a boundary, or a
    segment across it, has probability 1), so that a span whose backward
    ring comes from the mirror still gets posteriors that sum to 1."""
    cases = [  # B, T, K, C, boundary, interval, noncontig, neg_inf
        (3, 40, 6, 4, True, 7, False, False), (2, 23, 5, 3, False, 9, True, True),
        (2, 12, 6, 2, True, 2, False, False), (1, 9, 3, 3, True, 1, False, True),
        (2, 30, 4, 5, True, 10, False, False), (1, 6, 2, 257, False, 3, False, False),
        (1, 400, 8, 4, True, 35, False, False)]  # coverage checks within the spans
    for n, (B, T, K, C, boundary, interval, noncontig, neg_inf) in enumerate(cases):
        for dtype in (torch.float64, torch.float32):
            tol = 1e-9 if dtype == torch.float64 else 2e-4
            args = list(make(B, T, K, C, False, boundary, dtype, 80 + n, neg_inf=neg_inf,
                             noncontig=noncontig))
            if B == 3:
                args[0] = args[0].clone()
                args[0][1, 2, :] = -math.inf  # sequence 1 has no segmentation
            mode, seed = SCHEDULES[n % 2]
            smem = ALL_SMEM if n % 2 == 0 else 0
            f = ops.forward(*args, interval)
            up = torch.linspace(0.5, 1.5, B, dtype=torch.float64).to(dtype)
            want = ops.backward(up, *args, *f, interval, True)
            log_z = f[0] + 0.25 if n % 2 == 0 else f[0]
            got = emu.backward_parallel(up, *args, log_z, *f[1:], interval, True, n % 2 == 1,
                                        mode, seed, smem)
            for name, a, b in zip(("scores", "transition", "duration", "start_transition",
                                   "end_transition", "start_scores", "end_scores"),
                                  got[:7], want):
                close(f"{name} case {n} {dtype}", a, b, tol)
            close(f"mirror log_z case {n} {dtype}", got[8], f[0], tol)
            # Another schedule and the other placement: the same bits.
            mode2, seed2 = SCHEDULES[(n + 1) % 2]
            again = emu.backward_parallel(up, *args, log_z, *f[1:], interval, True, n % 2 == 1,
                                          mode2, seed2, ALL_SMEM - smem)
            for a, b in zip(bitwise(got[:7]), bitwise(again[:7])):
                assert torch.equal(a, b), (n, dtype)


def test_emulated_span_parallel_sweeps_after_a_hand_over(emu):
    """The mirror image's exp-domain forward hands a sequence over to the
    log-domain forward like any other (row 0's end scores at one position
    are 2 * 10^8, the mirror's start scores there, past the blocked kernel's
    range: test_emulated_blocked_forward_hands_over_scales_past_its_range);
    the log-domain forward then saves the mirror's checkpoints in the same
    places, and every gradient is the CPU kernel's."""
    B, T, K, C = 2, 20, 4, 3
    args = list(make(B, T, K, C, False, True, torch.float64, 11, ragged=False))
    args[7] = args[7].clone()
    args[7][0, 6, :] = 2e8
    f = ops.forward(*args, 6)
    up = torch.tensor([1.0, 0.5], dtype=torch.float64)
    want = ops.backward(up, *args, *f, 6, True)
    got = emu.backward_parallel(up, *args, *f, 6, True, True, 2, 3, ALL_SMEM)
    assert got[11].tolist() == [1, 0]
    for name, a, b in zip(("scores", "transition", "duration", "start_transition",
                           "end_transition", "start_scores", "end_scores"), got[:7], want):
        close(name, a, b, 1e-6)


def test_emulated_span_parallel_sweeps_at_large_scales(emu):
    """The span-parallel sweeps on the random problems scaled up to 120
    (scaled_problems; three or four spans each, the mirror's forward in the
    exp domain, so at large scales some of it hands over): every gradient is
    the CPU kernel's, so the anchors hold where the offsets are thousands of
    nats."""
    for i, scale, args in scaled_problems(9, 2100, 8, 90, 25, 6):
        dtype = args[0].dtype
        interval = max(1, args[0].shape[1] // 3)
        f = ops.forward(*args, interval)
        up = torch.tensor([1.0, 0.75], dtype=torch.float64).to(dtype)
        want = ops.backward(up, *args, *f, interval, True)
        got = emu.backward_parallel(up, *args, *f, interval, True, True, 2, i, ALL_SMEM)
        for name, a, b in zip(("scores", "transition", "duration", "start_transition",
                               "end_transition", "start_scores", "end_scores"), got[:7], want):
            close(f"{name} problem {i} scale {scale} {dtype}", a, b,
                  1e-9 if dtype == torch.float64 else 1e-4)


def test_emulated_span_parallel_sweeps_random_adversaries(emu):
    """The span-parallel sweeps on random_exp_problem's adversarial families
    (about five spans a sequence; the mirror's forward in the log and the
    exp domain, which hands some sequences over): every gradient is the
    float64 log-domain backward's to within what the log-domain backward in
    the same dtype misses, plus rounding. 6 problems a family
    (FLASHSEMICRF_EXP_FUZZ_PROBLEMS=N: N a family; 80, 838 runs, 162 of them
    with a hand-over, ran clean in 3 min)."""
    n = int(os.environ.get("FLASHSEMICRF_EXP_FUZZ_PROBLEMS", "6"))
    up64 = torch.tensor([0.7, 1.3], dtype=torch.float64)
    for family, i, dtype, args in random_exp_problems(n):
        interval = max(1, args[0].shape[1] // 5)
        wide = widened(args)
        truth = ops.forward(*wide, interval)
        if not bool(torch.isfinite(truth[0]).all()):
            continue
        want = ops.backward(up64, *wide, *truth, interval, True)
        f = ops.forward(*args, interval)
        up = up64.to(dtype)
        plain = ops.backward(up, *args, *f, interval, True)
        for exp_mirror in (False, True):
            mode, seed = SCHEDULES[i % 2]
            got = emu.backward_parallel(up, *args, *f, interval, True, exp_mirror, mode, seed,
                                        ALL_SMEM)
            assert_within_log_domain_error(f"{family} problem {i} ({dtype}), exp {exp_mirror}",
                                           got[:7], want, plain, dtype)


def test_emulated_forward_saves_the_mirror_for_the_sweeps(emu):
    """With the span-parallel sweeps the forward op also runs the mirror
    image's forward (on a GPU beside its own, on a second stream) and returns
    its checkpoints as rows B … 2B-1. Rows 0 … B-1 and log Z are the plain
    forward's bits; the backward given the 2B rows skips the mirror's
    forward and gives the bits of the backward that runs it (and the CPU
    kernel's gradients); the CPU op's backward takes the 2B rows too (it
    reads rows 0 … B-1). With one span the mirror does not run and its rows
    stay zeros."""
    cases = [  # B, T, K, C, boundary, interval, exp
        (3, 40, 6, 4, True, 7, True), (2, 23, 5, 3, False, 9, False),
        (2, 30, 4, 40, True, 10, True), (2, 12, 6, 2, True, 12, True)]
    for n, (B, T, K, C, boundary, interval, exp) in enumerate(cases):
        for dtype in (torch.float64, torch.float32):
            args = make(B, T, K, C, False, boundary, dtype, 90 + n, neg_inf=n % 2 == 1)
            mode, seed = SCHEDULES[n % 2]
            smem = ALL_SMEM if n % 2 == 0 else 0
            got = emu.forward_with_mirror(*args, interval, exp, mode, seed, smem, -2)
            log_z, ring, off = got[:3]
            assert ring.shape[0] == off.shape[0] == 2 * B
            if exp:
                plain = emu.forward_exp(*args, interval, mode, seed, smem, C <= 32)
            else:
                plain = emu.forward(*args, interval, mode, seed, smem)
            for a, b in zip(bitwise([log_z, ring[:B], off[:B]]), bitwise(plain[:3])):
                assert torch.equal(a, b), (n, dtype)
            up = torch.linspace(0.5, 1.5, B, dtype=torch.float64).to(dtype)
            cpu = ops.backward(up, *args, log_z, ring, off, interval, True)
            want = ops.backward(up, *args, log_z, ring[:B], off[:B], interval, True)
            for a, b in zip(bitwise(cpu), bitwise(want)):
                assert torch.equal(a, b), (n, dtype)
            if T <= interval:  # one span: no mirror
                assert got[4].numel() == 0
                assert not ring[B:].any() and not off[B:].any()
                continue
            saved = emu.backward_parallel(up, *args, log_z, ring, off, interval, True, exp,
                                          mode, seed, smem)
            assert saved[8].numel() == 0  # the mirror's forward did not run again
            again = emu.backward_parallel(up, *args, log_z, ring[:B], off[:B], interval, True,
                                          exp, mode, seed, smem)
            for a, b in zip(bitwise(saved[:7]), bitwise(again[:7])):
                assert torch.equal(a, b), (n, dtype)
            tol = 1e-9 if dtype == torch.float64 else 2e-4
            for name, a, b in zip(GRAD_NAMES, saved[:7], want):
                close(f"{name} case {n} {dtype}", a, b, tol)


def chunked_problems(seed0, *, wide=True):
    """Problems for the chunked forward (static transition, several spans),
    each of which makes two chunks or more in both dtypes, the later ones
    starting from a guess; wide=False leaves out C > kThreads (which runs in
    float32 only: its emulation is slow, and float64 would need a longer
    sequence for two chunks). Yields (name, args, interval, schedule, smem)."""
    cases = [  # B, T, K, C, boundary, interval, noncontig, neg_inf, lengths
        (3, 400, 8, 4, True, 0, False, False, None),  # the default interval, 56
        (2, 600, 5, 3, False, 20, True, True, None),
        (2, 600, 30, 6, True, 12, False, False, None),  # K > interval: chunks of many spans
        (1, 170, 4, 257, False, 40, False, False, None),  # C > kThreads
        (4, 500, 6, 5, True, 50, False, False, [500, 1, 137, 250]),  # ragged, T = 1
    ]
    for n, (B, T, K, C, boundary, interval, noncontig, neg_inf, lengths) in enumerate(cases):
        if C > 256 and not wide:
            continue
        for dtype in (torch.float64, torch.float32)[(C > 256):]:
            args = list(make(B, T, K, C, False, boundary, dtype, seed0 + n, neg_inf=neg_inf,
                             noncontig=noncontig))
            if lengths is not None:
                args[3] = torch.tensor(lengths)
            yield (f"case {n} {dtype}", args, interval, SCHEDULES[n % 2],
                   ALL_SMEM if n % 2 == 0 else 0)


def same_checkpoints(name, got, want, tol):
    """Two checkpoint sets (ring, offsets) hold the same log values (entry +
    offset) to tol relative, and -inf in the same places."""
    ring_g, off_g = got
    ring_w, off_w = want
    dead_g, dead_w = ring_g == -math.inf, ring_w == -math.inf
    assert torch.equal(dead_g, dead_w), name
    value_g = ring_g.double() + off_g[..., None, None]
    value_w = ring_w.double() + off_w[..., None, None]
    close(name, value_g[~dead_g], value_w[~dead_w], tol)


def test_emulated_chunked_forward(emu):
    """FLASHSEMICRF_CUDA_FORWARD=chunks: one CTA a span, each from a guess
    chunk_warmup positions before its span, and the junctions put them on one
    scale. On random problems every sequence with more than one span is
    accepted (verdict 0), and log Z, the checkpoints and the gradients the
    backward gets from them are the serial forward's to rounding: ragged
    lengths (a T = 1 sequence, chunks past a sequence's end), -inf entries,
    boundary scores, strided scores, K > interval, C > kThreads; both
    dtypes, both placements, every schedule. Another schedule and placement
    give the same bits."""
    for case, args, interval, (mode, seed), smem in chunked_problems(120):
        B, dtype = args[0].shape[0], args[0].dtype
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        serial = emu.forward(*args, interval, mode, seed, smem)
        got = emu.forward_chunked(*args, interval, -1, mode, seed, smem)
        assert got[3].tolist() == got[4].tolist() == [0] * B, (case, got[3:])
        close(f"log_z {case}", got[0], serial[0], tol)
        same_checkpoints(f"checkpoints {case}", got[1:3], serial[1:3], tol)
        up = torch.linspace(0.5, 1.5, B, dtype=torch.float64).to(dtype)
        want = ops.backward(up, *args, *serial[:3], interval, True)
        grads = ops.backward(up, *args, *got[:3], interval, True)
        for name, a, b in zip(GRAD_NAMES, grads, want):
            close(f"{name} {case}", a, b, 1e-9 if dtype == torch.float64 else 2e-4)
        mode2, seed2 = SCHEDULES[1 - SCHEDULES.index((mode, seed))]
        again = emu.forward_chunked(*args, interval, -1, mode2, seed2, ALL_SMEM - smem)
        for a, b in zip(bitwise(got), bitwise(again)):
            assert torch.equal(a, b), case


def test_emulated_chunked_forward_hands_over_what_it_has_not_forgotten(emu):
    """A chunk whose ring still depends on its guess is not accepted; its
    sequence's chunks try again with a warm-up four times as long, and if
    that fails too the serial forward redoes the sequence, bit for bit: a
    warm-up shorter than K both times (the ring still holds the guess's
    empty entries; one that is too short only the first time is accepted
    the second, to rounding), two groups of labels
    that never transition into each other (the guess's split of the mass
    between them is never forgotten), a sequence with no segmentation (its
    truth dies where the guess lives), and NaN scores; the other sequences
    of the batch are still accepted."""
    for dtype in (torch.float64, torch.float32):
        args = list(make(3, 600, 6, 4, False, True, dtype, 7, ragged=False))
        serial = emu.forward(*args, 30, 2, 4, ALL_SMEM)
        short = emu.forward_chunked(*args, 30, 1, 2, 4, ALL_SMEM)  # the retry's: 4
        assert short[3].tolist() == short[4].tolist() == [1, 1, 1], dtype
        for a, b in zip(bitwise(short[:3]), bitwise(serial[:3])):
            assert torch.equal(a, b), dtype
        # 8 positions are too few (K = 6, and these labels take longer to
        # mix); the retry's 32 are enough.
        retried = emu.forward_chunked(*args, 30, 8, 2, 4, ALL_SMEM)
        assert retried[4].tolist() == [1, 1, 1] and retried[3].tolist() == [0, 0, 0], dtype
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        close(f"retried log_z {dtype}", retried[0], serial[0], tol)
        same_checkpoints(f"retried checkpoints {dtype}", retried[1:3], serial[1:3], tol)
        # Labels {0, 1} and {2, 3} apart; sequence 1 dies at position 5;
        # sequence 2 has a NaN score at position 150. Warm-ups of 8 and then
        # 32 positions, chunks of one span (30): from chunk 2 on both start
        # after position 5 from a guess.
        trans = args[1].clone()
        trans[:2, 2:] = -math.inf
        trans[2:, :2] = -math.inf
        apart = list(args)
        apart[1] = trans
        scores = args[0].clone()
        scores[1, 5, :] = -math.inf
        scores[2, 150, 1] = math.nan
        mixed = list(args)
        mixed[0] = scores
        for case, problem, verdicts in (("apart", apart, [1, 1, 1]),
                                        ("dead and NaN", mixed, [0, 1, 1])):
            serial = emu.forward(*problem, 30, 2, 4, ALL_SMEM)
            got = emu.forward_chunked(*problem, 30, 8, 1, 0, 0)
            assert got[3].tolist() == verdicts, (case, dtype, got[3].tolist())
            for a, b in zip(bitwise(got[:3]), bitwise(serial[:3])):
                b0 = [x[1:] for x in (a, b)] if case != "apart" else (a, b)
                assert torch.equal(*b0), (case, dtype)
        assert got[0][1] == -math.inf and math.isnan(got[0][2])


def test_emulated_chunked_forward_for_the_span_parallel_sweeps(emu):
    """The mirror image's forward chunked as well (FLASHSEMICRF_CUDA_FORWARD=
    chunks with FLASHSEMICRF_CUDA_SWEEP=parallel, where nothing of the
    backward's chain stays serial): every gradient of the span-parallel
    sweeps from its checkpoints is the CPU kernel's, and log Z the serial
    forward's, to rounding."""
    for case, args, interval, (mode, seed), smem in chunked_problems(140, wide=False):
        B, dtype = args[0].shape[0], args[0].dtype
        got = emu.forward_with_mirror(*args, interval, False, mode, seed, smem, -1)
        log_z, ring, off = got[:3]
        assert got[3].tolist() == [0] * B and got[4].tolist() == [0] * B, case
        f = ops.forward(*args, interval)
        close(f"log_z {case}", log_z, f[0], 1e-9 if dtype == torch.float64 else 1e-5)
        up = torch.linspace(0.5, 1.5, B, dtype=torch.float64).to(dtype)
        want = ops.backward(up, *args, *f, interval, True)
        grads = emu.backward_parallel(up, *args, log_z, ring, off, interval, True, False,
                                      mode, seed, smem)
        for name, a, b in zip(GRAD_NAMES, grads[:7], want):
            close(f"{name} {case}", a, b, 1e-9 if dtype == torch.float64 else 2e-4)


def test_emulated_chunked_forward_random_adversaries(emu):
    """The chunked forward on random_exp_problem's adversarial families
    (dying labels, sparse durations down to -700, -inf transitions, start
    and end scores up to 200 nats, a label that outshines another and
    dies), about five spans a sequence, warm-ups drawn from 1 to 3K so that
    junctions are met near the edge of forgetting: a sequence the junctions
    accept has the serial forward's log Z and checkpoints to rounding, one
    they reject its bits. It runs 4 problems a family
    (FLASHSEMICRF_CHUNK_FUZZ_PROBLEMS=N: N a family); both verdicts occur."""
    import random

    n = int(os.environ.get("FLASHSEMICRF_CHUNK_FUZZ_PROBLEMS", "4"))
    rng = random.Random(20261206)
    verdicts = []
    for family in ("mixed", "boundary", "outshone"):
        for i in range(2 * n):
            dtype = (torch.float32, torch.float64)[i % 2]
            args = random_exp_problem(rng, dtype, family)
            T, K = args[0].shape[1], args[2].shape[0]
            interval = max(1, T // 5)
            warmup = rng.randint(1, 3 * K)
            where = f"{family} problem {i} ({dtype}), warm-up {warmup}"
            mode, seed = SCHEDULES[i % 2]
            serial = emu.forward(*args, interval, mode, seed, ALL_SMEM)
            got = emu.forward_chunked(*args, interval, warmup, mode, seed, ALL_SMEM)
            if got[3].numel() == 0:  # one chunk: the serial forward ran
                continue
            tol = 1e-9 if dtype == torch.float64 else 1e-4
            for b, verdict in enumerate(got[3].tolist()):
                verdicts.append(verdict)
                rows = [x[b] for x in got[:3]], [x[b] for x in serial[:3]]
                if verdict:
                    for a, w in zip(bitwise(rows[0]), bitwise(rows[1])):
                        assert torch.equal(a, w), f"{where}, sequence {b}"
                else:
                    have, want = float(got[0][b]), float(serial[0][b])
                    if math.isfinite(want):
                        assert abs(have - want) <= tol * max(1.0, abs(want)), \
                            f"{where}, sequence {b}: log Z {have} != {want}"
                    else:
                        assert have == want, f"{where}, sequence {b}: log Z {have} != {want}"
                    same_checkpoints(f"{where}, sequence {b}: checkpoints", rows[0][1:],
                                     rows[1][1:], tol)
    assert 0 in verdicts and 1 in verdicts, verdicts
