"""What is the Triton backend's alone; its op contract is tested in test_contract.py.

The chunked duration sweep, the specialisation of the kernels (a new length
never recompiles), their compilation for sm_90 with Triton's real compiler,
the interpreter's device rule, and on a GPU the compiled kernels at larger
shapes against the CUDA ones. Without a GPU the kernels run on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashsemicrf as F
from conftest import (
    DEVICE,
    assert_close,
    check_viterbi,
    log_z_and_grads,
    log_z_tol,
    make_case,
    on,
    problem,
    random_small_cases,
)
from flashsemicrf import backends
from flashsemicrf._contract import Gradients
from flashsemicrf.backends import triton as ft

if not ft.AVAILABLE:
    pytest.skip("Triton is not installed", allow_module_level=True)
if not ft.INTERPRET and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from flashsemicrf.backends.triton import kernels, launchers  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    # The interpreter evaluates log(0) = -inf through numpy, which warns.
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning"),
]
TRITON_DEVICE = DEVICE["triton"]
ROOT = Path(__file__).resolve().parent.parent
CASES = random_small_cases(16, seed0=23, max_T=7, max_K=4, max_C=3) + [
    make_case(2000 + i, B, T, K, C, duration_dependent=dd, neg_inf=ni)
    for i, (B, T, K, C, dd, ni) in enumerate(
        [(2, 12, 5, 3, False, True), (2, 10, 4, 3, True, True), (2, 5, 8, 2, False, False),
         (2, 6, 9, 2, True, False), (1, 1, 1, 1, False, False), (2, 9, 3, 4, True, False)])
]


@pytest.mark.parametrize("case,tile", [(CASES[i], tile) for i, tile in
                                       ((7, 1), (8, 4), (16, 8), (17, 1), (19, 8))],
                         ids=lambda v: v.id if hasattr(v, "id") else f"tile{v}")
def test_chunked_duration_sweep(case, tile, monkeypatch):
    """Tiles of one or two durations (partial last chunks included): the online
    log-sum-exp across chunks, the coverage carried between chunks and the
    Viterbi tie rule across chunks; and the static transition's gradient
    flushed to its float64 sum every 3 positions, inside spans too."""
    monkeypatch.setattr(launchers, "TILE_ELEMENTS", tile)
    monkeypatch.setattr(launchers, "FLUSH_POSITIONS", 3)
    kw = on(case.kwargs, TRITON_DEVICE)
    upstream = torch.linspace(0.5, 2.0, case.B, dtype=torch.float64, device=TRITON_DEVICE)
    log_z, g = log_z_and_grads(kw, "triton", upstream)
    log_z_ref, g_ref = log_z_and_grads(case.kwargs, "torch", upstream.cpu())
    assert_close("log Z", log_z, log_z_ref, 1e-9)
    for name in g:
        assert_close(f"d/d {name}", g[name], g_ref[name], 1e-9)
    check_viterbi(kw, on(kw, "cpu"), "triton", torch.float64, case.C)


def _do_not_specialize(kernel) -> set:
    """Names a Triton kernel declares ``do_not_specialize`` (compiled or interpreted)."""
    dns = getattr(kernel, "do_not_specialize", None)
    if dns is None:
        dns = getattr(kernel, "kwargs", {}).get("do_not_specialize", ())
    names = kernel.arg_names
    return {names[i] if isinstance(i, int) else i for i in dns}


SIZES = ("T", "K", "C", "interval", "n_ckpt")


def test_lengths_are_runtime_arguments():
    """Everything that changes with T is ``do_not_specialize``, so a new length
    reuses the compiled kernel (the count of compiled kernels is checked on the
    GPU below; the interpreter keeps no kernel cache to count)."""
    per_kernel = {
        kernels._forward_kernel: {"T", "interval", "n_ckpt", "chunks", "chunk_spans", "warmup"},
        kernels._backward_kernel: {"T", "interval", "n_ckpt", "warmup"},
        kernels._recompute_kernel: {"T", "interval", "n_ckpt"},
        kernels._viterbi_kernel: {"T", "interval", "n_ckpt"},
        kernels._filter_kernel: {"T"},
        kernels._exp_forward_kernel: {"T", "interval", "n_ckpt"},
    }
    for kernel, expected in per_kernel.items():
        assert expected <= _do_not_specialize(kernel), kernel.__name__
        # Pointers, sizes and meta-parameters only: the launchers make every
        # tensor contiguous, so no stride (which would change with T) is passed.
        others = [name for name in kernel.arg_names
                  if not (name.endswith("_ptr") or name.isupper() or name in SIZES
                          or name in expected)]
        assert not others, f"{kernel.__name__} takes {others}"


# Run in a fresh interpreter with TRITON_INTERPRET=0 and a stand-in driver: the
# kernels go through Triton's real compiler (TTIR … PTX, ptxas) for sm_90, and
# launching is refused after compiling, so no GPU is needed.
_COMPILE_SCRIPT = r"""
import sys
import torch

sys.path.insert(0, {root!r})
from bench.triton_registers import NoLaunch, install_compile_only_driver

install_compile_only_driver()
import flashsemicrf.backends.triton as ft
from flashsemicrf._contract import checkpoint_interval
from flashsemicrf.backends.triton import kernels, launchers

assert not ft.INTERPRET
ops = torch.ops.flashsemicrf_triton
KERNELS = (kernels._forward_kernel, kernels._backward_kernel, kernels._viterbi_kernel,
           kernels._filter_kernel)


def compiled():
    return [sum(len(entry[0]) for entry in k.device_caches.values()) for k in KERNELS]


def call_all(dtype, dd, B, T, K=5, C=3):
    g = torch.Generator().manual_seed(T)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    args = (r(B, T, C), r(K, C, C) if dd else r(C, C), r(K, C),
            torch.randint(1, T + 1, (B,), generator=g), r(C), r(C), r(B, T, C), None)
    iv = checkpoint_interval(T, K, 0)
    n = (T + iv - 1) // iv
    S = 2 * K if dd else K
    for fn in (lambda: ops.forward(*args, 0),
               lambda: ops.backward(r(B), *args, r(B), r(B, n, S, C),
                                    torch.zeros(B, n, dtype=torch.float64), 0, True),
               lambda: ops.viterbi(*args),
               lambda: ops.filter(*args)):
        try:
            fn()
        except NoLaunch:
            pass


for dtype in (torch.float32, torch.float64):
    for dd in (False, True):
        before = compiled()
        call_all(dtype, dd, 2, 9)
        after = compiled()
        assert all(a == b + 1 for a, b in zip(after, before)), (dtype, dd, before, after)
        for B, T in ((3, 17), (2, 40), (1, 1), (2, 1000)):
            call_all(dtype, dd, B, T)
            assert compiled() == after, f"recompiled for T={T}: {after} -> {compiled()}"
print("compiled", compiled())

# torch.compile through the triton_op registration: AOTAutograd decomposes the
# op into its kernels with T symbolic, forward and backward, in one graph.
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

traced = []


def keep(gm, example_inputs):
    traced.append(gm.code)
    return make_boxed_func(gm.forward)


def log_z(scores, transition, duration, lengths, start_scores):
    zeros = scores.new_zeros(scores.shape[2])
    return ops.forward(scores, transition, duration, lengths, zeros, zeros, start_scores, None,
                       0)[0]


fn = torch.compile(log_z, fullgraph=True, dynamic=True,
                   backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
for T in (12, 17, 30):
    x = [torch.randn(2, T, 3, requires_grad=True), torch.randn(3, 3, requires_grad=True),
         torch.randn(4, 3, requires_grad=True), torch.tensor([T, T - 3]),
         torch.randn(2, T, 3, requires_grad=True)]
    try:
        fn(*x)
    except NoLaunch:
        pass
assert len(traced) == 2, f"{len(traced)} graphs for three lengths"
assert all("triton_kernel_wrapper" in code for code in traced)
print("torch.compile: one forward and one backward graph")


# log_z traced afresh (with the switches as they are now) into one forward
# and one backward graph: the kernel launches in the backward graph.
def traced_launches():
    torch._dynamo.reset()
    traced.clear()
    fn = torch.compile(log_z, fullgraph=True, dynamic=True,
                       backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    try:
        fn(*x)
    except NoLaunch:
        pass
    assert len(traced) == 2, traced
    return traced[1].count("triton_kernel_wrapper_functional(")


# The chunked forward runs the same forward kernel, chunk sizes and warm-up
# being runtime arguments: it compiles nothing new (its first launch is
# refused, so the junctions and the serial redo are the interpreter's to test).
import os

os.environ["FLASHSEMICRF_TRITON_FORWARD"] = "chunks"
launchers.CHUNK_WARMUP = 8
before = compiled()
for dtype in (torch.float32, torch.float64):
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    try:
        ops.forward(r(2, 200, 3), r(3, 3), r(5, 3), torch.tensor([200, 120]), r(3), r(3),
                    r(2, 200, 3), None, 10)
    except NoLaunch:
        pass
    else:
        raise AssertionError("the chunked forward launched nothing")
assert compiled() == before, (before, compiled())
print("chunked forward: the compiled forward kernels, for both dtypes")

# The exp-domain forward: one kernel a dtype, whatever the length.
os.environ["FLASHSEMICRF_TRITON_FORWARD"] = "serial"
os.environ["FLASHSEMICRF_TRITON_ALGORITHM"] = "exp"
exp_kernels = lambda: sum(len(e[0]) for e in kernels._exp_forward_kernel.device_caches.values())
for dtype in (torch.float32, torch.float64):
    before = exp_kernels()
    for T in (9, 40, 1000):
        g = torch.Generator().manual_seed(T)
        r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
        try:
            ops.forward(r(2, T, 3), r(3, 3), r(5, 3), torch.tensor([T, 1]), r(3), r(3),
                        r(2, T, 3), r(2, T, 3), 0)
        except NoLaunch:
            pass
        else:
            raise AssertionError("the exp-domain forward launched nothing")
        assert exp_kernels() == before + 1, (dtype, T, before, exp_kernels())
print("exp-domain forward: one kernel a dtype")

# The span recomputes in parallel: one recompute kernel and one sweep-only
# backward a dtype and transition form, whatever the length (the recompute's
# launch compiles without running, so that the backward after it compiles).
from bench.triton_registers import compiled_not_launched

os.environ["FLASHSEMICRF_TRITON_ALGORITHM"] = "log"
os.environ["FLASHSEMICRF_TRITON_RECOMPUTE"] = "spans"
SPAN_KERNELS = (kernels._recompute_kernel, kernels._backward_kernel)
span_kernels = lambda: [sum(len(e[0]) for e in k.device_caches.values()) for k in SPAN_KERNELS]
with compiled_not_launched(kernels._recompute_kernel):
    for dtype in (torch.float32, torch.float64):
        for dd in (False, True):
            before = span_kernels()
            for B, T in ((2, 9), (3, 17), (1, 1), (2, 1000)):
                g = torch.Generator().manual_seed(T)
                r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
                K, C = 5, 3
                iv = checkpoint_interval(T, K, 0)
                n = (T + iv - 1) // iv
                S = 2 * K if dd else K
                try:
                    ops.backward(r(B), r(B, T, C), r(K, C, C) if dd else r(C, C), r(K, C),
                                 torch.randint(1, T + 1, (B,), generator=g), r(C), r(C), None,
                                 None, r(B), r(B, n, S, C), torch.zeros(B, n, dtype=torch.float64),
                                 0, True)
                except NoLaunch:
                    pass
                else:
                    raise AssertionError("the sweep after the span recomputes launched nothing")
                assert span_kernels() == [b + 1 for b in before], (dtype, dd, T, span_kernels())
print("span recomputes: one recompute kernel and one sweep a variant")

# torch.compile keeps the switch it read when traced: its backward graph
# launches the recompute kernel, then the sweep.
assert traced_launches() == 2 and "RECOMPUTED': True" in traced[1], traced[-1]
print("torch.compile, span recomputes: the recompute and the sweep in the backward graph")

# The sweeps in parallel: one parallel sweep and one redo variant a dtype,
# whatever the length (every launch compiles without running; the junctions
# then read unwritten workspace, which only decides what the redo takes).
os.environ["FLASHSEMICRF_TRITON_RECOMPUTE"] = "sweep"
os.environ["FLASHSEMICRF_TRITON_SWEEP"] = "parallel"
with compiled_not_launched(kernels._recompute_kernel, kernels._backward_kernel):
    for dtype in (torch.float32, torch.float64):
        before = span_kernels()
        for B, T in ((2, 9), (3, 17), (2, 1000)):
            g = torch.Generator().manual_seed(T)
            r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
            K, C = 5, 3
            iv = checkpoint_interval(T, K, 0)
            n = (T + iv - 1) // iv
            ops.backward(r(B), r(B, T, C), r(C, C), r(K, C), torch.full((B,), T), r(C), r(C),
                         None, None, r(B), r(B, n, K, C),
                         torch.zeros(B, n, dtype=torch.float64), 0, True)
            assert span_kernels() == [before[0], before[1] + 2], (dtype, T, span_kernels())
print("parallel sweeps: one parallel sweep and one redo kernel a dtype")

assert traced_launches() == 3 and "PARALLEL': True" in traced[1], traced[-1]
print("torch.compile, parallel sweeps: the recompute, the sweeps and the redo in one graph")
"""


@pytest.mark.skipif(not ft.INTERPRET, reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_sm90_and_new_lengths_reuse_them():
    """Every kernel variant (float32/float64, (C, C)/(K, C, C)) compiles with
    Triton's compiler for sm_90; new lengths, batch sizes and checkpoint
    counts hit the compiled kernel (T is a runtime argument); torch.compile
    traces the triton_op registration into its kernels with T dynamic."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = _COMPILE_SCRIPT.replace("{root!r}", repr(str(ROOT)))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=600)
    print(out.stdout[-2000:], out.stderr[-6000:])
    assert out.returncode == 0, out.stderr[-6000:]


def _chunk_problem(dtype, seed, *, apart=False):
    """Three sequences (80, 80, 23 positions), K = 4, C = 3, boundary scores;
    apart: labels {0} and {1, 2} never transition into each other."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    transition = r(3, 3)
    if apart:
        transition[0, 1:] = float("-inf")
        transition[1:, 0] = float("-inf")
    return [x.to(TRITON_DEVICE) if x is not None else None for x in (
        r(3, 80, 3), transition, r(4, 3), torch.tensor([80, 80, 23]), r(3), r(3), r(3, 80, 3),
        r(3, 80, 3))]


def test_chunked_forward_joins_chunks_from_guesses(monkeypatch):
    """FLASHSEMICRF_TRITON_FORWARD=chunks (docs/design.md, "The forward in
    chunks"): checkpoints every 8 positions, a warm-up of 20 (chunks of three
    spans, each but the first starting from a guess 20 positions early; the
    23-long sequence makes one chunk). float32 joins every chunk at the
    first try; float64, with its tighter allowance, only at the retry, whose
    warm-up of 80 starts every chunk at 0. Log Z, the checkpoints and the
    gradients a backward takes from them are the serial forward's to
    rounding. With labels that never mix and a warm-up of 8 (chunks of one
    span; the retry's 32 still start the later chunks from guesses) the long
    sequences are rejected both times and the serial forward redoes them,
    bit for bit; the short one joins at the retry."""
    ops = torch.ops.flashsemicrf_triton
    monkeypatch.setattr(launchers, "CHUNK_WARMUP", 20)
    for dtype, first_try in ((torch.float32, [True] * 3), (torch.float64, [False, False, True])):
        args = _chunk_problem(dtype, 5)
        monkeypatch.setenv("FLASHSEMICRF_TRITON_FORWARD", "serial")
        serial = ops.forward(*args, 8)
        monkeypatch.setenv("FLASHSEMICRF_TRITON_FORWARD", "chunks")
        *got, first, final = launchers.forward_with_verdicts(*args, 8)
        assert first.tolist() == first_try and final.tolist() == [True] * 3, (dtype, first, final)
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        assert_close(f"log Z {dtype}", got[0], serial[0], tol)
        dead = got[1] == float("-inf")
        assert torch.equal(dead, serial[1] == float("-inf"))
        values = [(ring.double() + off[..., None, None])[~dead] for ring, off in (got[1:],
                                                                                 serial[1:])]
        assert_close(f"checkpoints {dtype}", values[0], values[1], tol)
        # The C++ kernel's backward takes either's checkpoints (one layout).
        up = torch.tensor([0.5, 1.0, 1.5], dtype=dtype)
        cpu = [x.cpu() if x is not None else None for x in args]
        want = torch.ops.flashsemicrf.backward(up, *cpu, *[x.cpu() for x in serial], 8, True)
        grads = torch.ops.flashsemicrf.backward(up, *cpu, *[x.cpu() for x in got], 8, True)
        for name, a, b in zip(Gradients._fields, grads, want):
            assert_close(f"d/d {name} {dtype}", a, b, 1e-9 if dtype == torch.float64 else 2e-4)
    monkeypatch.setattr(launchers, "CHUNK_WARMUP", 8)
    args = _chunk_problem(torch.float32, 5, apart=True)
    monkeypatch.setenv("FLASHSEMICRF_TRITON_FORWARD", "serial")
    serial = ops.forward(*args, 8)
    monkeypatch.setenv("FLASHSEMICRF_TRITON_FORWARD", "chunks")
    *got, first, final = launchers.forward_with_verdicts(*args, 8)
    assert first.tolist() == [False] * 3 and final.tolist() == [False, False, True], (first, final)
    for a, b in zip(got, serial):
        assert torch.equal(a[:2], b[:2])
    assert_close("log Z, the short sequence", got[0][2], serial[0][2], 1e-5)


# --------------------------------------------------------------------------
# The span recomputes in parallel (FLASHSEMICRF_TRITON_RECOMPUTE=spans)
# --------------------------------------------------------------------------

# (B, T, K, C, dd, interval): several spans with ragged lengths (the last span
# short or a sequence ending before the last checkpoint), K > interval (open
# segments across several checkpoints), interval 1, T = 1, one span.
RECOMPUTE_SHAPES = [(3, 23, 4, 3, False, 5), (3, 17, 6, 2, True, 4), (2, 9, 7, 3, False, 2),
                    (2, 6, 3, 2, True, 1), (2, 1, 3, 2, False, 0), (2, 8, 2, 3, False, 0)]


def _poison_workspace(monkeypatch):
    """Workspace filled with NaN, so that a row no kernel wrote shows (freed
    memory would otherwise hand the spans' buffers the sweep's old rows)."""
    monkeypatch.setattr(launchers._Launch, "empty", lambda self, *shape, dtype=None: torch.full(
        shape, float("nan"), dtype=dtype or self.scores.dtype, device=self.scores.device))


def _recompute_both_ways(monkeypatch, args, interval, up):
    ops = torch.ops.flashsemicrf_triton
    _poison_workspace(monkeypatch)
    fwd = ops.forward(*args, interval)
    grads = []
    for mode in ("sweep", "spans"):
        monkeypatch.setenv("FLASHSEMICRF_TRITON_RECOMPUTE", mode)
        grads.append(ops.backward(up, *args, *fwd, interval, True))
    return fwd[0], grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", RECOMPUTE_SHAPES, ids=lambda s: "B{}-T{}-K{}-C{}-dd{:d}-i{}"
                         .format(*s))
def test_span_recompute_gives_the_same_bits(monkeypatch, shape, dtype):
    """FLASHSEMICRF_TRITON_RECOMPUTE=spans: every span of every sequence is
    recomputed at once (_recompute_kernel, one program a span) and the sweep
    reads the rows; they come from the same code in the same order, so
    every gradient is the default's bit for bit, and the reference's. The
    first sequence is dead (a position no label may take: log Z = -inf),
    whose spans both ways skip, leaving zero gradients."""
    B, T, K, C, dd, interval = shape
    case = make_case(101, B, T, K, C, duration_dependent=dd, neg_inf=True, dtype=dtype)
    kw = dict(case.kwargs)
    kw["scores"] = kw["scores"].clone()
    kw["scores"][0, T // 2] = float("-inf")
    args = _op_args(kw, dtype)
    up = torch.linspace(0.5, 2.0, B, dtype=dtype, device=TRITON_DEVICE)
    log_z, (sweep, spans) = _recompute_both_ways(monkeypatch, args, interval, up)
    assert log_z[0] == float("-inf") and bool(torch.isfinite(log_z[1:]).all()), log_z
    for name, a, b in zip(Gradients._fields, spans, sweep):
        assert torch.equal(a, b), name
        assert not bool(a[:1].ne(0).any()) if a.dim() > 1 else True, name
    # And the reference's, so that neither way can be wrong in the same way.
    ref = torch.ops.flashsemicrf.backward(
        up.cpu(), *[x.cpu() if x is not None else None for x in args],
        *[x.cpu() for x in torch.ops.flashsemicrf.forward(
            *[x.cpu() if x is not None else None for x in args], interval)], interval, True)
    for name, a, b in zip(Gradients._fields, spans, ref):
        assert_close(f"d/d {name}", a.cpu(), b, 1e-9 if dtype == torch.float64 else 2e-4)


def test_span_recompute_switch_is_checked(monkeypatch):
    monkeypatch.setenv("FLASHSEMICRF_TRITON_RECOMPUTE", "parallel")
    case = make_case(3, 1, 4, 2, 2)
    with pytest.raises(ValueError, match="FLASHSEMICRF_TRITON_RECOMPUTE must be 'spans' or"):
        log_z_and_grads(on(case.kwargs, TRITON_DEVICE), "triton",
                        torch.ones(1, dtype=torch.float64, device=TRITON_DEVICE))


# --------------------------------------------------------------------------
# The sweeps in parallel (FLASHSEMICRF_TRITON_SWEEP=parallel)
# --------------------------------------------------------------------------

# (B, T, K, C, interval, warm-up): several spans, ragged; K > interval (spill
# rows of one span over several later ones); interval 1.
PARALLEL_SHAPES = [(3, 40, 4, 3, 8, 20), (2, 23, 6, 2, 4, 30), (2, 17, 3, 3, 1, 12)]


def _sweep_both_ways(monkeypatch, args, interval, up):
    """(forward, serial sweep's gradients, parallel sweeps' gradients, the
    sequences whose parallel sweeps were accepted), NaN in every workspace."""
    ops = torch.ops.flashsemicrf_triton
    _poison_workspace(monkeypatch)
    fwd = ops.forward(*args, interval)
    monkeypatch.setenv("FLASHSEMICRF_TRITON_SWEEP", "serial")
    serial = ops.backward(up, *args, *fwd, interval, True)
    monkeypatch.setenv("FLASHSEMICRF_TRITON_SWEEP", "parallel")
    parallel, accepted = launchers.backward_with_verdicts(up, *args, *fwd, interval, True)
    return fwd, serial, parallel, accepted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", PARALLEL_SHAPES, ids=lambda s: "B{}-T{}-K{}-C{}-i{}-w{}"
                         .format(*s))
def test_parallel_sweeps_match_the_serial_sweep(monkeypatch, shape, dtype):
    """FLASHSEMICRF_TRITON_SWEEP=parallel: one program a span, each but the
    last from a guess a warm-up after its span, anchored at the next span's
    first position, joined where the guess is forgotten. Boundary scores,
    -inf entries, ragged lengths and a dead sequence (zero gradients).
    float32, whose allowance a short warm-up meets: every live sequence is
    joined at once and every gradient is the serial sweep's and the
    reference's to rounding. float64: the short warm-up may not forget to
    its allowance, and what is not joined is redone by the serial sweep;
    with a warm-up past the end every span starts from the exact ring and
    every sequence is joined."""
    B, T, K, C, interval, warmup = shape
    case = make_case(101, B, T, K, C, neg_inf=True, dtype=dtype)
    kw = dict(case.kwargs)
    # A full-length sequence (spans that start from guesses), a dead one, and
    # one a position short of the end.
    kw["lengths"] = torch.tensor([T, T // 2, T - 1][:B])
    kw["scores"] = kw["scores"].clone()
    kw["scores"][1, 0] = float("-inf")  # sequence 1 dies
    args = _op_args(kw, dtype)
    up = torch.linspace(0.5, 2.0, B, dtype=dtype, device=TRITON_DEVICE)
    cpu = [x.cpu() if x is not None else None for x in args]
    ref = torch.ops.flashsemicrf.backward(up.cpu(), *cpu, *torch.ops.flashsemicrf.forward(
        *cpu, interval), interval, True)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    warmups = (warmup,) if dtype == torch.float32 else (warmup, T)
    for w in warmups:
        monkeypatch.setattr(launchers, "CHUNK_WARMUP", w)
        fwd, serial, parallel, accepted = _sweep_both_ways(monkeypatch, args, interval, up)
        assert fwd[0][1] == float("-inf") and bool(torch.isfinite(fwd[0][::2]).all()), fwd[0]
        if dtype == torch.float32 or w == T:
            assert accepted.tolist() == [True] * B, (w, accepted)
        for name, a, b, r in zip(Gradients._fields, parallel, serial, ref):
            if a.dim() > 1:
                assert not bool(a[1].ne(0).any()), name  # the dead sequence
            assert_close(f"d/d {name} w={w}, vs serial", a, b, tol)
            assert_close(f"d/d {name} w={w}, vs reference", a.cpu(), r, tol)


def test_parallel_sweeps_hand_over_what_they_have_not_forgotten(monkeypatch):
    """Labels {0} and {1, 2} never transition into each other: a guess's
    split of the mass between them is never forgotten, so every junction
    after a guess fails and the serial sweep redoes the sequence, bit for
    bit; the 23-long sequence's spans all start within a warm-up of its end
    but the first, whose junction fails too."""
    monkeypatch.setattr(launchers, "CHUNK_WARMUP", 8)
    args = _chunk_problem(torch.float32, 5, apart=True)
    up = torch.tensor([0.5, 1.0, 1.5], device=TRITON_DEVICE)
    _, serial, parallel, accepted = _sweep_both_ways(monkeypatch, args, 8, up)
    assert accepted.tolist() == [False] * 3, accepted
    for name, a, b in zip(Gradients._fields, parallel, serial):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_chunks_and_parallel_sweeps_random_adversaries(monkeypatch):
    """The chunked forward and the parallel sweeps on random_exp_problem's
    adversarial families (labels dying partway, sparse durations down to
    -700, -inf transitions, start and end scores up to 200 nats, the
    outshone label), about five spans a sequence, warm-ups drawn from 1 to
    min(3K, T/2) so that junctions are met near the edge of forgetting: log
    Z is the float64 log domain's (a sequence the forward's junctions reject
    has the serial forward's bits), and every gradient the parallel sweeps
    take from the chunked forward's checkpoints is the float64 log-domain
    backward's to within what the serial sweep in the same dtype misses,
    plus rounding. One problem a family by default (float32, float64,
    float32; the interpreter takes 20-50 s each), and both verdicts of both
    passes occur; FLASHSEMICRF_TRITON_FUZZ_PROBLEMS=N runs 2N a family."""
    import random

    from exp_problems import (assert_log_z, assert_within_log_domain_error, random_exp_problem,
                              widened)

    ops = torch.ops.flashsemicrf_triton
    variable = "FLASHSEMICRF_TRITON_FUZZ_PROBLEMS"
    count = 2 * int(os.environ[variable]) if variable in os.environ else 1
    rng = random.Random(20261207)
    verdicts = {"forward": set(), "sweeps": set()}
    up64 = torch.tensor([0.7, 1.3], dtype=torch.float64)
    for f, family in enumerate(("mixed", "boundary", "outshone")):
        for i in range(count):
            dtype = (torch.float32, torch.float64)[(f + i) % 2]
            args = random_exp_problem(rng, dtype, family)
            T, K = args[0].shape[1], args[2].shape[0]
            interval = max(1, T // 5)
            warmup = rng.randint(1, max(1, min(3 * K, T // 2)))
            where = f"{family} problem {i} ({dtype}), warm-up {warmup}"
            monkeypatch.setattr(launchers, "CHUNK_WARMUP", warmup)
            wide = widened(args)
            monkeypatch.setenv("FLASHSEMICRF_CPU_ALGORITHM", "log")
            truth = torch.ops.flashsemicrf.forward(*wide, interval)
            args = [a.to(TRITON_DEVICE) if a is not None else None for a in args]
            monkeypatch.setenv("FLASHSEMICRF_TRITON_FORWARD", "serial")
            serial = ops.forward(*args, interval)
            monkeypatch.setenv("FLASHSEMICRF_TRITON_FORWARD", "chunks")
            *fwd, _, joined = launchers.forward_with_verdicts(*args, interval)
            assert_log_z(where, fwd[0], truth[0], dtype)
            if joined is not None:  # two chunks or more
                verdicts["forward"] |= set(joined.tolist())
                for b in (~joined).nonzero().flatten().tolist():
                    for a, s in zip(fwd, serial):
                        assert torch.equal(a[b], s[b]), where
            if not bool(torch.isfinite(truth[0]).all()):
                continue
            up = up64.to(dtype).to(TRITON_DEVICE)
            grads64 = torch.ops.flashsemicrf.backward(up64, *wide, *truth[:3], interval, True)
            monkeypatch.setenv("FLASHSEMICRF_TRITON_SWEEP", "serial")
            plain = [g.cpu() for g in ops.backward(up, *args, *serial, interval, True)]
            monkeypatch.setenv("FLASHSEMICRF_TRITON_SWEEP", "parallel")
            grads, accepted = launchers.backward_with_verdicts(up, *args, *fwd, interval, True)
            if accepted is not None:  # two spans or more
                verdicts["sweeps"] |= set(accepted.tolist())
            assert_within_log_domain_error(where, [g.cpu() for g in grads], grads64, plain, dtype)
    assert verdicts == {"forward": {False, True}, "sweeps": {False, True}}, verdicts


def test_parallel_sweeps_switch_is_checked(monkeypatch):
    monkeypatch.setenv("FLASHSEMICRF_TRITON_SWEEP", "spans")
    case = make_case(3, 1, 4, 2, 2)
    with pytest.raises(ValueError, match="FLASHSEMICRF_TRITON_SWEEP must be 'parallel' or"):
        log_z_and_grads(on(case.kwargs, TRITON_DEVICE), "triton",
                        torch.ones(1, dtype=torch.float64, device=TRITON_DEVICE))


# --------------------------------------------------------------------------
# The exp-domain forward (FLASHSEMICRF_TRITON_ALGORITHM=exp), held to the C++
# CPU kernel's, whose bounds it applies, and to the float64 log domain
# --------------------------------------------------------------------------


def _check_exp_forward(monkeypatch, args, interval, tol):
    """Triton's exp-domain forward against the CPU kernel's: as many sequences
    handed to the log scan, log Z, the checkpoints and their offsets to
    rounding. Returns the sequences it certified (B,) and its outputs (on the
    CPU)."""
    monkeypatch.setenv("FLASHSEMICRF_CPU_ALGORITHM", "exp")
    fallbacks = torch.ops.flashsemicrf_testing.cpu_exp_fallbacks
    before = int(fallbacks())
    want = torch.ops.flashsemicrf.forward(*[x.cpu() if x is not None else None for x in args],
                                          interval)
    taken = int(fallbacks()) - before
    monkeypatch.setenv("FLASHSEMICRF_TRITON_ALGORITHM", "exp")
    *outputs, _, certified = launchers.forward_with_verdicts(*args, interval)
    got = outputs = [x.cpu() for x in outputs]
    certified = certified.cpu()
    assert int((~certified).sum()) == taken, (certified.tolist(), taken)
    # NaN inputs give NaN from both (the log scan's); the rest must agree.
    nan = torch.isnan(want[0])
    assert torch.equal(torch.isnan(got[0]), nan)
    got, want = [x[~nan] for x in got], [x[~nan] for x in want]
    assert_close("log Z", got[0], want[0], tol)
    assert_close("checkpoint offsets", got[2], want[2], tol)
    # Both flush subnormals, but an entry at the bottom of the dtype's range
    # relative to the normaliser may round to either side of it: -inf in
    # one checkpoint and finite in the other; elsewhere they agree.
    ring, ring_cpu = got[1], want[1]
    below = math.log(torch.finfo(ring.dtype).tiny) + 1.0
    top = torch.maximum(ring, ring_cpu).flatten(2).amax(-1)[..., None, None]
    one_sided = torch.isinf(ring) != torch.isinf(ring_cpu)
    finite_side = torch.where(torch.isinf(ring), ring_cpu, ring)
    assert bool((finite_side < top + below)[one_sided].all())
    # Entries far below the normaliser are large logs: rounding relative to them.
    scale = torch.where(torch.isfinite(ring_cpu), ring_cpu.abs().clamp(min=1.0), 1.0)
    assert_close("checkpoints / max(1, |checkpoint|)", torch.where(one_sided, ring_cpu, ring)
                 / scale, ring_cpu / scale, tol)
    return certified, outputs


# (B, T, K, C, interval): ragged lengths, K > T, T = 1, C = 1, one span and several.
EXP_SHAPES = [(3, 20, 5, 3, 4), (2, 6, 9, 2, 0), (1, 1, 1, 1, 0), (2, 24, 3, 5, 7),
              (2, 12, 4, 1, 5)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", EXP_SHAPES, ids=lambda s: "B{}-T{}-K{}-C{}-i{}".format(*s))
def test_exp_forward_matches_the_cpu_kernels(monkeypatch, shape, dtype):
    """Random problems with every optional input, -inf entries on odd seeds:
    no sequence falls back, and log Z and the checkpoints are the CPU
    exp-domain forward's to rounding."""
    B, T, K, C, interval = shape
    seed = sum(shape)
    case = make_case(seed, B, T, K, C, neg_inf=seed % 2 == 1, dtype=dtype)
    args = _op_args(case.kwargs, dtype)
    certified, _ = _check_exp_forward(monkeypatch, args, interval,
                                      1e-9 if dtype == torch.float64 else 2e-4)
    assert bool(certified.all())


def _op_args(kw, dtype):
    """The forward op's positional arguments, on the Triton device."""
    from test_cpu_exp_domain import op_args

    return [x.to(TRITON_DEVICE) if x is not None else None for x in op_args(kw, dtype)]


def _adversaries():
    from test_cpu_exp_domain import ADVERSARIES

    return ADVERSARIES


# The interpreter takes 15-40 s for each of the other adversaries (T = 200-500,
# K = 8-100); FLASHSEMICRF_TRITON_ADVERSARIES=all runs them too.
QUICK_ADVERSARIES = {"huge_scores", "blocked_position", "nan_input", "flushed_start"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("adv", _adversaries(), ids=lambda a: a.name)
def test_exp_forward_adversaries(monkeypatch, adv, dtype):
    """The CPU kernel's adversarial problems (mass forced through flushed
    labels, revived segments, dead ends, NaN, ...): the Triton exp-domain
    forward hands as many sequences to the log scan as the CPU kernel does,
    every one where the adversary says a plain exp-domain scan is wrong,
    none where it says the scan is clean, and its results are the CPU's to
    rounding."""
    if adv.name not in QUICK_ADVERSARIES and \
            os.environ.get("FLASHSEMICRF_TRITON_ADVERSARIES") != "all":
        pytest.skip("slow under the interpreter: FLASHSEMICRF_TRITON_ADVERSARIES=all runs it")
    args = _op_args(adv.kw, dtype)
    certified, _ = _check_exp_forward(monkeypatch, args, 0,
                                      1e-9 if dtype == torch.float64 else 1e-4)
    if dtype in adv.breaks:
        assert not bool(certified.any())
    if dtype in adv.clean:
        assert bool(certified.all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_exp_forward_falls_back_where_underflow_matters(monkeypatch, dtype):
    """The CPU kernel's forced_low_label, small enough for every run: in the
    grammar 0 -> 1 -> 2 the middle label, `gap` nats a position below the
    others, must hold one segment of exactly K = 8 positions, so its open
    entries fall below the dtype's range long before they close and a plain
    exp-domain scan loses all of Z. Only the ghosts' charges for entries
    taken below the smallest normal see it: the sequence goes to the log
    scan, as on the CPU; the other, where label 1 scores as the others do, is
    certified."""
    T, K, C = 40, 8, 3
    gap = 20.0 if dtype == torch.float32 else 120.0
    g = torch.Generator().manual_seed(3)
    scores = 0.5 * torch.randn(2, T, C, generator=g, dtype=torch.float64)
    scores[0, :, 1] -= gap
    neg = -math.inf
    trans = torch.full((C, C), neg, dtype=torch.float64)
    trans[0, 0] = trans[2, 2] = trans[0, 1] = trans[1, 2] = 0.0
    dur = torch.zeros(K, C, dtype=torch.float64)
    dur[:, 1] = neg
    dur[K - 1, 1] = 0.0
    ends = torch.full((C,), neg, dtype=torch.float64)
    ends[2] = 0.0
    starts = torch.full((C,), neg, dtype=torch.float64)
    starts[0] = 0.0
    kw = dict(scores=scores, transition=trans, duration=dur, lengths=torch.tensor([T, T - 5]),
              start_transition=starts, end_transition=ends)
    certified, _ = _check_exp_forward(monkeypatch, _op_args(kw, dtype), 0,
                                      1e-9 if dtype == torch.float64 else 1e-4)
    assert certified.tolist() == [False, True]


def test_exp_forward_random_adversaries(monkeypatch):
    """random_exp_problem's three families of problems built to make an
    exp-domain scan lose mass that matters (labels dying partway, duration
    scores to the dtype's range, boundary scores up to 200 nats, the
    outshone label), both dtypes: as many fallbacks as the CPU kernel and
    its results to rounding (_check_exp_forward); log Z is the float64
    log-domain scan's, the sequences handed to the log scan are the Triton
    log forward's results bit for bit, and the certified ones' checkpoints
    are its to rounding. One problem a family and dtype by default (the
    interpreter takes 5-30 s each); FLASHSEMICRF_TRITON_FUZZ_PROBLEMS=N
    runs N. (It found the outshone problem of _flushed's comment.)"""
    import random

    from exp_problems import assert_log_z, random_exp_problem, widened

    n = int(os.environ.get("FLASHSEMICRF_TRITON_FUZZ_PROBLEMS", "1"))
    rng = random.Random(20261205)
    for family in ("mixed", "boundary", "outshone"):
        for i in range(2 * n):
            dtype = (torch.float32, torch.float64)[i % 2]
            where = f"{family} problem {i} ({dtype})"
            args = random_exp_problem(rng, dtype, family)
            monkeypatch.setenv("FLASHSEMICRF_CPU_ALGORITHM", "log")
            truth = torch.ops.flashsemicrf.forward(*widened(args), 0)[0]
            args = [a.to(TRITON_DEVICE) if a is not None else None for a in args]
            monkeypatch.setenv("FLASHSEMICRF_TRITON_ALGORITHM", "log")
            plain = [x.cpu() for x in launchers.forward(*args, 0)]
            tol = 1e-9 if dtype == torch.float64 else 1e-4
            certified, got = _check_exp_forward(monkeypatch, args, 0, tol)
            assert_log_z(where, got[0], truth, dtype)
            for a, b in zip(got, plain):
                assert torch.equal(a[~certified], b[~certified]), where
            ring = [(r.double() + o[..., None, None])[certified] for r, o in (got[1:], plain[1:])]
            # Entries below the dtype's normal range relative to the
            # checkpoint's largest (-inf in the exp-domain ring) are inside
            # the certified bound; the others agree to rounding.
            top = ring[1].flatten(2).amax(-1)[..., None, None]
            normal = ring[1] > top + math.log(torch.finfo(dtype).tiny) + 1.0
            scale = ring[1][normal].abs().clamp(min=1.0)
            assert_close(f"checkpoints, {where}", ring[0][normal] / scale,
                         ring[1][normal] / scale, tol)


def test_exp_forward_gradients(monkeypatch):
    """With FLASHSEMICRF_TRITON_ALGORITHM=exp the public functions' log Z and
    every gradient (the Triton backward from the exp-domain forward's
    checkpoints) are the reference's; the (K, C, C) transition keeps the log
    scan."""
    monkeypatch.setenv("FLASHSEMICRF_TRITON_ALGORITHM", "exp")
    for dd in (False, True):
        case = make_case(77, 3, 14, 4, 3, duration_dependent=dd, neg_inf=True)
        up = torch.linspace(0.5, 2.0, case.B, dtype=torch.float64)
        log_z, g = log_z_and_grads(on(case.kwargs, TRITON_DEVICE), "triton",
                                   up.to(TRITON_DEVICE))
        log_z_ref, g_ref = log_z_and_grads(case.kwargs, "torch", up)
        assert_close(f"log Z dd={dd}", log_z, log_z_ref, 1e-9)
        for name in g:
            assert_close(f"d/d {name} dd={dd}", g[name], g_ref[name], 1e-9)


def test_exp_forward_switch_is_checked(monkeypatch):
    monkeypatch.setenv("FLASHSEMICRF_TRITON_ALGORITHM", "fast")
    case = make_case(3, 1, 4, 2, 2)
    with pytest.raises(ValueError, match="FLASHSEMICRF_TRITON_ALGORITHM must be 'exp' or 'log'"):
        F.log_partition(**on(case.kwargs, TRITON_DEVICE), backend="triton")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    case = make_case(1, 1, 3, 2, 2)
    monkeypatch.setattr(ft, "INTERPRET", False)
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        F.log_partition(**case.kwargs, backend="triton")


# --------------------------------------------------------------------------
# GPU only: compiled Triton vs the CUDA kernels vs the reference
# --------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(ft.INTERPRET or not torch.cuda.is_available(),
                               reason="needs a GPU and compiled (not interpreted) Triton kernels")
GPU_SHAPES = [(4, 200, 8, 5, False), (3, 300, 30, 9, True), (2, 257, 64, 6, False),
              (3, 100, 12, 24, False), (2, 64, 128, 3, True)]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("B,T,K,C,dd", GPU_SHAPES, ids=lambda v: str(v))
def test_gpu_triton_matches_cuda_and_reference(B, T, K, C, dd):
    case = make_case(T, B, T, K, C, duration_dependent=dd, neg_inf=True)
    up = torch.linspace(0.5, 2.0, B, dtype=torch.float64)
    lz_ref, g_ref = log_z_and_grads(case.kwargs, "torch", up)
    kw = on(case.kwargs, "cuda", torch.float32)
    lz, g = log_z_and_grads(kw, "triton", up.cuda())
    assert_close("log Z vs reference", lz, lz_ref, log_z_tol(lz_ref, 1e-5))
    for name in g:
        assert_close(f"d/d {name} vs reference", g[name], g_ref[name], 2e-4)
    if backends.HAS_CUDA_KERNELS:
        lz_c, g_c = log_z_and_grads(kw, "cuda", up.cuda())
        assert_close("log Z vs cuda", lz, lz_c, log_z_tol(lz_ref, 1e-5))
        for name in g:
            assert_close(f"d/d {name} vs cuda", g[name], g_c[name], 2e-4)
    check_viterbi(kw, on(kw, "cpu"), "triton", torch.float32, C)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("B,T,K,C,dd", GPU_SHAPES, ids=lambda v: str(v))
def test_gpu_span_recompute_matches_the_sweep(monkeypatch, B, T, K, C, dd):
    """FLASHSEMICRF_TRITON_RECOMPUTE=spans compiled: every gradient is the
    default's (bit for bit under the interpreter; here two compiled kernels
    hold the recompute, so to rounding), with checkpoints every 16
    positions."""
    case = make_case(T, B, T, K, C, duration_dependent=dd, neg_inf=True, dtype=torch.float32)
    args = [x.cuda() if x is not None else None for x in _op_args(case.kwargs, torch.float32)]
    up = torch.linspace(0.5, 2.0, B, device="cuda")
    _, (sweep, spans) = _recompute_both_ways(monkeypatch, args, 16, up)
    for name, a, b in zip(Gradients._fields, spans, sweep):
        scale = b.abs().max().clamp(min=1.0) if b.numel() else 1.0
        assert_close(f"d/d {name}, relative to its largest", a / scale, b / scale, 1e-5)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("B,T,K,C,dd", [s for s in GPU_SHAPES if not s[4]], ids=lambda v: str(v))
def test_gpu_parallel_sweeps_match_the_serial_sweep(monkeypatch, B, T, K, C, dd):
    """FLASHSEMICRF_TRITON_SWEEP=parallel compiled, checkpoints every 16
    positions and a warm-up of 2K + 16, so that most spans start from a
    guess: every gradient is the serial sweep's to rounding, whichever
    sequences were joined."""
    monkeypatch.setattr(launchers, "CHUNK_WARMUP", 2 * K + 16)
    case = make_case(T, B, T, K, C, neg_inf=True, dtype=torch.float32)
    args = [x.cuda() if x is not None else None for x in _op_args(case.kwargs, torch.float32)]
    up = torch.linspace(0.5, 2.0, B, device="cuda")
    _, serial, parallel, accepted = _sweep_both_ways(monkeypatch, args, 16, up)
    for name, a, b in zip(Gradients._fields, parallel, serial):
        scale = b.abs().max().clamp(min=1.0) if b.numel() else 1.0
        assert_close(f"d/d {name}, relative to its largest ({accepted.tolist()} joined)",
                     a / scale, b / scale, 1e-4)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_gpu_cross_backend_checkpoints(dd):
    """Forward of one backend, backward of another, through the shared layout."""
    case = make_case(31, 3, 150, 10, 5, duration_dependent=dd, neg_inf=True)
    x = problem(on(case.kwargs, "cuda", torch.float32))
    up = torch.tensor([1.0, -2.0, 0.5], device="cuda", dtype=torch.float32)
    triton_ops = backends.resolve("test", "triton", "cuda")
    others = [backends.resolve("test", name, "cuda") for name in ("torch", "cuda")
              if name in backends.available("cuda")]
    for other in others:
        lz_o, ckpt_o = other.forward(x)
        lz_t, ckpt_t = triton_ops.forward(x)
        assert_close(f"checkpoints vs {other.name}", ckpt_t.ring, ckpt_o.ring, 1e-4)
        assert_close(f"offsets vs {other.name}", ckpt_t.offset, ckpt_o.offset, 1e-6)
        g_ref = other.backward(x, up, lz_o, ckpt_o, boundary_mass=True)
        for fwd, bwd, lz, ckpt in ((triton_ops, other, lz_t, ckpt_t),
                                   (other, triton_ops, lz_o, ckpt_o)):
            g = bwd.backward(x, up, lz, ckpt, boundary_mass=True)
            for name, a, b in zip(Gradients._fields, g, g_ref):
                assert_close(f"{bwd.name} backward of {fwd.name} forward: {name}", a, b, 2e-4)


def _compiled_kernel_count(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in getattr(kernel, "cache", {}).values())


@pytest.mark.cuda
@needs_gpu
def test_gpu_new_length_does_not_recompile():
    counts = []
    for T in (50, 77, 133, 1000):
        case = make_case(T, 2, T, 6, 4)
        kw = on(case.kwargs, "cuda", torch.float32)
        log_z, g = log_z_and_grads(kw, "triton", torch.ones(2, device="cuda"))
        F.viterbi(**kw, backend="triton")
        F.sample(**kw, backend="triton")
        counts.append([_compiled_kernel_count(k) for k in (
            kernels._forward_kernel, kernels._backward_kernel, kernels._viterbi_kernel,
            kernels._filter_kernel)])
    assert all(c == counts[0] for c in counts), counts


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gpu_triton_exp_forward_matches_the_cpu_kernels(monkeypatch, dtype):
    """The compiled exp-domain forward against the CPU kernel's: no sequence
    falls back on the GPU shapes' static problems, as many as the CPU
    kernel's on each of its adversarial problems, and log Z and the
    checkpoints agree to rounding."""
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    for B, T, K, C, dd in GPU_SHAPES:
        if not dd:
            case = make_case(T, B, T, K, C, neg_inf=True, dtype=dtype)
            args = [x.cuda() if x is not None else None for x in _op_args(case.kwargs, dtype)]
            assert bool(_check_exp_forward(monkeypatch, args, 0, tol)[0].all()), (B, T, K, C)
    for adv in _adversaries():
        args = [x.cuda() if x is not None else None for x in _op_args(adv.kw, dtype)]
        certified, _ = _check_exp_forward(monkeypatch, args, 0, tol)
        if dtype in adv.breaks:
            assert not bool(certified.any()), adv.name
        if dtype in adv.clean:
            assert bool(certified.all()), adv.name
