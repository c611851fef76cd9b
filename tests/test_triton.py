"""The Triton kernels (backend="triton") against the reference, and their op registration.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set below before flashsemicrf.triton is imported): slow,
so the problems are small (T <= 12). With a GPU the same tests run the
compiled kernels on CUDA tensors, and the ``cuda`` section adds larger shapes
and the comparison with the CUDA kernels.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the import of the kernels: Triton chooses then.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flashsemicrf as F  # noqa: E402
import flashsemicrf.triton as ft  # noqa: E402
from conftest import (
    GRAD_NAMES,
    OPTIONAL,
    TOL,
    assert_close,
    log_z_and_grads,
    make_case,
    random_small_cases,
)  # noqa: E402
from flashsemicrf import _backends  # noqa: E402
from flashsemicrf._validation import check_problem  # noqa: E402

if not ft.AVAILABLE:
    pytest.skip("Triton is not installed", allow_module_level=True)
if not ft.INTERPRET and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from flashsemicrf.triton import kernels  # noqa: E402
from flashsemicrf.triton import ops as triton_ops  # noqa: E402
from flashsemicrf.triton.backend import BACKEND as TRITON  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    # The interpreter evaluates log(0) = -inf through numpy, which warns.
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning"),
]
DEVICE = "cpu" if ft.INTERPRET else "cuda"
ops = torch.ops.flashsemicrf_triton
ARG_NAMES = ("scores", "transition", "duration", "lengths") + OPTIONAL


def _cases():
    cases = random_small_cases(16, seed0=23, max_T=7, max_K=4, max_C=3)
    for i, (B, T, K, C, dd, ni) in enumerate(
        [(2, 12, 5, 3, False, True), (2, 10, 4, 3, True, True), (2, 5, 8, 2, False, False),
         (2, 6, 9, 2, True, False), (1, 1, 1, 1, False, False), (2, 9, 3, 4, True, False)]
    ):
        cases.append(make_case(2000 + i, B, T, K, C, duration_dependent=dd, neg_inf=ni))
    return cases


CASES = _cases()


def _on(kwargs, dtype=torch.float64, device=DEVICE):
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
            for k, v in kwargs.items()}



def _log_z_tol(log_z, tol):
    finite = log_z.detach()[torch.isfinite(log_z)]
    return tol * max(1.0, float(finite.abs().max())) if finite.numel() else tol


def _inputs(kwargs):
    return _backends.to_compute(check_problem("test", *(kwargs.get(n) for n in ARG_NAMES)))


def _check_viterbi(kw, dtype, C):
    best, segs = F.viterbi(**kw, backend="triton")
    ref = {k: v.cpu() for k, v in kw.items()}
    best_ref, segs_ref = F.viterbi(**ref, backend="torch")
    assert best.dtype == dtype
    assert_close("viterbi best", best, best_ref, 10 * _log_z_tol(best_ref, TOL[dtype]))
    if dtype == torch.float64 and C > 1:
        assert torch.equal(segs.cpu(), segs_ref), f"{segs} != {segs_ref}"
    elif segs.numel():
        # One label (any permutation of durations ties exactly) or float32
        # near-ties: the path found must score the optimum.
        feasible = torch.isfinite(best_ref)
        got = F.score(segs.cpu(), **ref)
        assert_close("score of the path", got[feasible], best_ref[feasible],
                     max(1e-3, _log_z_tol(best_ref, 1e-5)))


# float64 on every case, float32 on every other one (the interpreter is slow).
@pytest.mark.parametrize(
    "case,dtype",
    [(c, torch.float64) for c in CASES] + [(c, torch.float32) for c in CASES[::2]],
    ids=lambda v: v.id if hasattr(v, "id") else str(v).replace("torch.float", "f"),
)
def test_triton_matches_reference(case, dtype):
    kw = _on(case.kwargs, dtype)
    tol = TOL[dtype]
    upstream = torch.linspace(0.5, 2.0, case.B, dtype=torch.float64, device=DEVICE)
    log_z, g = log_z_and_grads(kw, "triton", upstream)
    log_z_ref, g_ref = log_z_and_grads(_on(case.kwargs, dtype, "cpu"), "torch", upstream.cpu())
    assert log_z.dtype == dtype and log_z.device.type == DEVICE
    assert_close("log Z", log_z, log_z_ref, _log_z_tol(log_z_ref, tol))
    for name in g:
        assert_close(f"d/d {name}", g[name], g_ref[name], tol)
    _check_viterbi(kw, dtype, case.C)


@pytest.mark.parametrize("case,tile", [(CASES[i], tile) for i, tile in
                                       ((7, 1), (8, 4), (16, 8), (17, 1), (19, 8))],
                         ids=lambda v: v.id if hasattr(v, "id") else f"tile{v}")
def test_chunked_duration_sweep(case, tile, monkeypatch):
    """Tiles of one or two durations (partial last chunks included): the online
    log-sum-exp across chunks, the coverage carried between chunks and the
    Viterbi tie rule across chunks."""
    monkeypatch.setattr(triton_ops, "TILE_ELEMENTS", tile)
    kw = _on(case.kwargs)
    upstream = torch.linspace(0.5, 2.0, case.B, dtype=torch.float64, device=DEVICE)
    log_z, g = log_z_and_grads(kw, "triton", upstream)
    log_z_ref, g_ref = log_z_and_grads(case.kwargs, "torch", upstream.cpu())
    assert_close("log Z", log_z, log_z_ref, 1e-9)
    for name in g:
        assert_close(f"d/d {name}", g[name], g_ref[name], 1e-9)
    _check_viterbi(kw, torch.float64, case.C)


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 16, 17)], ids=lambda c: c.id)
def test_marginals_and_entropy(case):
    kw = _on(case.kwargs)
    m, m_ref = F.marginals(**kw, backend="triton"), F.marginals(**case.kwargs, backend="torch")
    assert_close("marginals.log_partition", m.log_partition, m_ref.log_partition, 1e-9)
    assert_close("marginals.labels", m.labels, m_ref.labels, 1e-9)
    assert_close("marginals.starts", m.starts, m_ref.starts, 1e-9)
    assert_close("entropy", F.entropy(**kw, backend="triton"),
                 F.entropy(**case.kwargs, backend="torch"), 1e-8)


@pytest.mark.parametrize("interval", [0, 1, 3])
@pytest.mark.parametrize("duration_dependent", [False, True], ids=["cc", "kcc"])
def test_checkpoints_match_the_cpu_op(interval, duration_dependent):
    """The shared checkpoint layout: Triton's forward feeds the CPU op's backward and back."""
    if not _backends.HAS_CPU_KERNELS:
        pytest.skip("flashsemicrf._C is not built")
    case = make_case(5, 3, 11, 4, 3, duration_dependent=duration_dependent, neg_inf=True)
    x = _inputs(case.kwargs)
    x_dev = _inputs(_on(case.kwargs))
    cpu = _backends._CPU
    lz_t, ring_t, off_t = TRITON.forward(x_dev, interval)
    lz_c, ring_c, off_c = cpu.forward(x, interval)
    assert ring_t.shape == ring_c.shape and off_t.dtype == torch.float64
    assert_close("log Z", lz_t, lz_c, 1e-9)
    assert_close("checkpoint offsets", off_t, off_c, 1e-9)
    assert_close("checkpoint ring", ring_t, ring_c, 1e-9)
    up = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g_ref = cpu.backward(x, up, lz_c, ring_c, off_c, interval, True)
    g_cross = TRITON.backward(x_dev, up.to(DEVICE), lz_c.to(DEVICE), ring_c.to(DEVICE),
                              off_c.to(DEVICE), interval, True)
    for name, a, b in zip(g_ref._fields, g_cross, g_ref):
        assert_close(f"triton backward of the cpu forward: {name}", a, b, 1e-9)
    g_other = cpu.backward(x, up, lz_t.cpu(), ring_t.cpu(), off_t.cpu(), interval, True)
    for name, a, b in zip(g_ref._fields, g_other, g_ref):
        assert_close(f"cpu backward of the triton forward: {name}", a, b, 1e-9)


@pytest.mark.parametrize("interval", [1, 2, 3])
@pytest.mark.parametrize("duration_dependent", [False, True], ids=["cc", "kcc"])
def test_backward_reanchors_at_every_checkpoint(interval, duration_dependent):
    """The backward offset is re-anchored at the first position of every span
    (total probability 1 there: a boundary, or one segment across it). Give
    the last checkpoint's offset an error delta, as the forward's rounding
    does over a long sequence: log Z, recomputed from it, is off by delta too,
    so without the re-anchoring every earlier span's posteriors would scale by
    exp(-delta); with it only the span before the last one does, the start
    masses (span 0) come out as without the error, and the backward agrees with
    the reference's and the CPU op's, which anchor the same way."""
    T, K = 12, 4
    case = make_case(31, 3, T, K, 3, duration_dependent=duration_dependent, neg_inf=True)
    kw = dict(case.kwargs, lengths=torch.tensor([12, 10, 7]))
    x = _inputs(kw)
    x_dev = _inputs(_on(kw))
    log_z, ring, off = _backends._REFERENCE.forward(x, interval)
    n_ckpt = off.shape[1]
    last_span = torch.clamp(kw["lengths"] // interval, max=n_ckpt - 1)
    assert bool((last_span >= 2).all()), "the check needs a span between the last and span 0"
    bad = off.clone()
    bad[torch.arange(3), last_span] += 0.75
    up = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def run(backend, x, offset):
        d = x.scores.device
        return backend.backward(x, up.to(d), log_z.to(d), ring.to(d), offset.to(d), interval, True)

    clean = run(TRITON, x_dev, off)
    got = run(TRITON, x_dev, bad)
    refs = [("reference", run(_backends._REFERENCE, x, bad))]
    if _backends.HAS_CPU_KERNELS:
        refs.append(("cpu op", run(_backends._CPU, x, bad)))
    for who, ref in refs:
        for name, a, b in zip(ref._fields, got, ref):
            assert_close(f"triton vs {who}: {name}", a, b, 1e-9)
    assert float((got.scores - clean.scores).abs().max()) > 1e-3  # the error is felt ...
    # ... but not beyond the span it falls in.
    assert_close("start transition", got.start_transition, clean.start_transition, 1e-9)
    assert_close("start masses of span 0", got.start_scores[:, :interval],
                 clean.start_scores[:, :interval], 1e-9)


def test_boundary_gradient_shapes_follow_the_op_contract():
    case = make_case(8, 2, 5, 3, 2, optional=("start_scores",))
    args = TRITON.args(_inputs(_on(case.kwargs)))
    log_z, ring, off = ops.forward(*args, 2)
    for boundary_mass, start_shape, end_shape in ((False, (2, 5, 2), (0,)),
                                                  (True, (2, 5, 2), (2, 5, 2))):
        g = ops.backward(torch.ones_like(log_z), *args, log_z, ring, off, 2, boundary_mass)
        assert tuple(g[5].shape) == start_shape and tuple(g[6].shape) == end_shape


@pytest.mark.parametrize("duration_dependent", [False, True], ids=["cc", "kcc"])
def test_filter_matches_reference_history(duration_dependent):
    from flashsemicrf import reference

    case = make_case(2, 2, 9, 4, 3, duration_dependent=duration_dependent, neg_inf=True)
    alpha, sigma, offset = ops.filter(*TRITON.args(_inputs(_on(case.kwargs))))
    x = _inputs(case.kwargs)
    if _backends.HAS_CPU_KERNELS:  # the whole output, padding included
        expected = torch.ops.flashsemicrf.filter(*_backends.CompiledBackend.args(x))
        for name, a, b in zip(("alpha", "sigma", "offset"), (alpha, sigma, offset), expected):
            assert_close(name, a, b, 1e-9)
    _, h = reference.forward_history(_backends.to_problem(x))
    for b, L in enumerate(x.lengths.tolist()):
        assert_close("alpha", alpha[b, 1 : L + 1], h.alpha[b, 1 : L + 1], 1e-9)
        assert_close("sigma[0]", sigma[b, 0], h.sigma[b, 0], 1e-9)
        assert_close("offset", offset[b, : L + 1], h.offset[b, : L + 1], 1e-9)


@pytest.mark.parametrize("duration_dependent", [False, True], ids=["cc", "kcc"])
def test_samples_follow_the_exact_distribution(duration_dependent):
    from oracles import brute_force
    from test_reference import _total_variation

    case = make_case(11, 2, 4, 3, 2, duration_dependent=duration_dependent)
    oracle = brute_force(**case.kwargs)
    n = 20000
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    rows = F.sample(**_on(case.kwargs), num_samples=n, generator=gen, backend="triton").cpu()
    for b in range(case.B):
        assert _total_variation(rows, oracle, b, n) < 0.04


def test_large_magnitudes_in_float32():
    """Emissions around -1e4 per position, no centring: the ring stays O(1)
    (each position's largest emission goes to the float64 offset) and the
    backward renormalises by log Z recomputed in float64."""
    g = torch.Generator().manual_seed(0)
    B, T, K, C = 2, 12, 4, 3
    kw = dict(scores=-1e4 + torch.randn(B, T, C, generator=g, dtype=torch.float64),
              transition=torch.randn(C, C, generator=g, dtype=torch.float64),
              duration=torch.randn(K, C, generator=g, dtype=torch.float64),
              lengths=torch.tensor([T, T - 5]))
    rounded = _on(kw, torch.float32, "cpu")
    ref_z, ref_g = log_z_and_grads(_on(rounded, torch.float64, "cpu"), "torch", torch.ones(B))
    z, grads = log_z_and_grads(_on(rounded, torch.float32), "triton", torch.ones(B, device=DEVICE))
    rel = ((z.detach().cpu().double() - ref_z) / ref_z.abs()).abs().max().item()
    print(f"relative log Z error {rel:.2e}")
    assert rel < 1e-6
    assert_close("marginals", grads["scores"], ref_g["scores"], 1e-4)


def test_no_valid_segmentation():
    case = make_case(4, 2, 5, 3, 2)
    kw = {k: v.to(DEVICE) for k, v in case.leaves().items()}
    kw = {k: (v.detach().requires_grad_() if v.is_floating_point() else v) for k, v in kw.items()}
    with torch.no_grad():
        kw["duration"][:] = -math.inf
        kw["duration"][1, :] = 0.0  # only duration 2: odd lengths impossible
    kw["lengths"] = torch.tensor([5, 4], device=DEVICE)
    log_z = F.log_partition(**kw, backend="triton")
    assert log_z[0] == -math.inf and torch.isfinite(log_z[1])
    log_z.sum().backward()
    for name in GRAD_NAMES:
        assert not torch.isnan(kw[name].grad).any(), name
    assert (kw["scores"].grad[0] == 0).all()
    plain = {k: (v.detach() if v.is_floating_point() else v) for k, v in kw.items()}
    best, segs = F.viterbi(**plain, backend="triton")
    assert best[0] == -math.inf and not (segs[:, 0] == 0).any()


def test_nan_stays_in_its_sequence():
    case = make_case(5, 3, 6, 3, 2, ragged=False)
    kw = _on(case.kwargs)
    kw["scores"] = kw["scores"].clone()
    kw["scores"][1, 2, 0] = float("nan")
    log_z = F.log_partition(**kw, backend="triton")
    assert torch.isnan(log_z[1]) and torch.isfinite(log_z[[0, 2]]).all()
    best, _ = F.viterbi(**kw, backend="triton")  # must return, whatever the NaN path
    assert torch.isfinite(best[[0, 2]]).all()


def test_non_contiguous_inputs():
    case = make_case(3, 4, 8, 3, 3, duration_dependent=True)
    kw = _on(case.kwargs)
    scores = kw["scores"].transpose(1, 2).contiguous().transpose(1, 2)[::2]
    start_scores = kw["start_scores"].repeat(1, 2, 1)[::2, ::2]
    assert not scores.is_contiguous() and not start_scores.is_contiguous()
    args = dict(scores=scores,
                transition=kw["transition"].transpose(1, 2).contiguous().transpose(1, 2),
                duration=kw["duration"].t().contiguous().t(), lengths=kw["lengths"][::2],
                start_scores=start_scores, end_scores=kw["end_scores"][::2],
                start_transition=kw["start_transition"], end_transition=kw["end_transition"])
    contiguous = {k: v.contiguous().cpu() for k, v in args.items()}
    assert_close("log Z", F.log_partition(**args, backend="triton"),
                 F.log_partition(**contiguous, backend="torch"), 1e-9)
    assert_close("labels", F.marginals(**args, backend="triton").labels,
                 F.marginals(**contiguous, backend="torch").labels, 1e-9)


def test_deterministic_bitwise():
    case = make_case(9, 2, 9, 4, 3, neg_inf=True)
    kw = _on(case.kwargs, torch.float32)
    first = log_z_and_grads(kw, "triton", torch.ones(2, device=DEVICE))
    again = log_z_and_grads(kw, "triton", torch.ones(2, device=DEVICE))
    assert torch.equal(first[0], again[0])
    for name in first[1]:
        assert torch.equal(first[1][name], again[1][name]), name


def test_opcheck():
    case = make_case(6, 2, 4, 2, 2, duration_dependent=True)
    x = _inputs(_on(case.kwargs))
    args = [a.detach().requires_grad_() if a is not None and a.is_floating_point() else a
            for a in TRITON.args(x)]
    torch.library.opcheck(ops.forward, (*args, 2))
    plain = list(TRITON.args(x))
    log_z, ring, off = ops.forward(*plain, 2)
    torch.library.opcheck(ops.backward, (torch.ones_like(log_z), *plain, log_z, ring, off, 2,
                                         True))
    torch.library.opcheck(ops.viterbi, tuple(plain))
    torch.library.opcheck(ops.filter, tuple(plain))


def test_torch_compile_traces_without_recompiling():
    torch._dynamo.reset()
    graphs = {"n": 0}

    def counting_backend(gm, example_inputs):
        graphs["n"] += 1
        return gm.forward

    def fn(scores, transition, duration, lengths, start_scores):
        return F.log_partition(scores, transition, duration, lengths, start_scores=start_scores,
                               backend="triton")

    names = ("scores", "transition", "duration", "lengths", "start_scores")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counting_backend)
    for T in (5, 7, 9):
        case = make_case(T, 2, T, 3, 2, optional=("start_scores",))
        leaves = {k: v.to(DEVICE) for k, v in case.leaves(torch.float32).items()}
        leaves = {k: (v.detach().requires_grad_() if v.is_floating_point() else v)
                  for k, v in leaves.items()}
        out = compiled(*(leaves[n] for n in names))
        ref_leaves = case.leaves(torch.float32)
        ref = F.log_partition(**ref_leaves, backend="torch")
        assert_close(f"compiled log Z at T={T}", out, ref, 1e-4)
        out.sum().backward()
        ref.sum().backward()
        for n in names:
            if leaves[n].is_floating_point():
                assert_close(f"compiled d/d {n}", leaves[n].grad, ref_leaves[n].grad, 1e-4)
    assert graphs["n"] == 1, f"recompiled for a new length: {graphs['n']} graphs"


def _do_not_specialize(kernel) -> set:
    """Names a Triton kernel declares ``do_not_specialize`` (compiled or interpreted)."""
    dns = getattr(kernel, "do_not_specialize", None)
    if dns is None:
        dns = getattr(kernel, "kwargs", {}).get("do_not_specialize", ())
    names = kernel.arg_names
    return {names[i] if isinstance(i, int) else i for i in dns}


def test_lengths_are_runtime_arguments():
    """Everything that changes with T is ``do_not_specialize``, so a new length
    reuses the compiled kernel (the count of compiled kernels is checked on the
    GPU below; the interpreter keeps no kernel cache to count)."""
    per_kernel = {
        kernels._forward_kernel: {"T", "interval", "n_ckpt", "s_sb", "ss_sb", "es_sb", "ck_sb",
                                  "co_sb"},
        kernels._backward_kernel: {"T", "interval", "n_ckpt", "s_sb", "ss_sb", "es_sb", "ck_sb",
                                   "co_sb", "gs_sb", "gss_sb", "ges_sb"},
        kernels._viterbi_kernel: {"T", "s_sb", "ss_sb", "es_sb", "lab_sb"},
        kernels._filter_kernel: {"T", "s_sb", "ss_sb", "es_sb", "ha_sb", "hs_sb", "ho_sb"},
    }
    for kernel, expected in per_kernel.items():
        assert expected <= _do_not_specialize(kernel), kernel.__name__


# Run in a fresh interpreter with TRITON_INTERPRET=0 and a stand-in driver: the
# kernels go through Triton's real compiler (TTIR … PTX, ptxas) for sm_90, and
# launching is refused after compiling, so no GPU is needed.
_COMPILE_SCRIPT = r"""
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class NoLaunch(Exception):
    pass


class CompileOnlyDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, *args, **kwargs):
        raise NoLaunch()


driver.set_active(CompileOnlyDriver())
import flashsemicrf.triton as ft
from flashsemicrf.triton import kernels
from flashsemicrf.triton.ops import _checkpoint_interval

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
    iv = _checkpoint_interval(T, K, 0)
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
"""


@pytest.mark.skipif(not ft.INTERPRET, reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_sm90_and_new_lengths_reuse_them():
    """Every kernel variant (float32/float64, (C, C)/(K, C, C)) compiles with
    Triton's compiler for sm_90; new lengths, batch sizes and checkpoint
    counts hit the compiled kernel (T is a runtime argument); torch.compile
    traces the triton_op registration into its kernels with T dynamic."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    print(out.stdout[-2000:], out.stderr[-6000:])
    assert out.returncode == 0, out.stderr[-6000:]


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
    kw = _on(case.kwargs, torch.float32, "cuda")
    lz, g = log_z_and_grads(kw, "triton", up.cuda())
    assert_close("log Z vs reference", lz, lz_ref, _log_z_tol(lz_ref, 1e-5))
    for name in g:
        assert_close(f"d/d {name} vs reference", g[name], g_ref[name], 2e-4)
    if _backends.HAS_CUDA_KERNELS:
        lz_c, g_c = log_z_and_grads(kw, "cuda", up.cuda())
        assert_close("log Z vs cuda", lz, lz_c, _log_z_tol(lz_ref, 1e-5))
        for name in g:
            assert_close(f"d/d {name} vs cuda", g[name], g_c[name], 2e-4)
    _check_viterbi(kw, torch.float32, C)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dd", [False, True], ids=["cc", "kcc"])
def test_gpu_cross_backend_checkpoints(dd):
    """Forward of one backend, backward of another, through the shared layout."""
    case = make_case(31, 3, 150, 10, 5, duration_dependent=dd, neg_inf=True)
    x = _inputs(_on(case.kwargs, torch.float32, "cuda"))
    up = torch.tensor([1.0, -2.0, 0.5], device="cuda", dtype=torch.float32)
    others = [_backends._REFERENCE] + ([_backends._CUDA] if _backends.HAS_CUDA_KERNELS else [])
    for other in others:
        lz_o, ring_o, off_o = other.forward(x, 0)
        lz_t, ring_t, off_t = TRITON.forward(x, 0)
        assert_close(f"checkpoints vs {other.name}", ring_t, ring_o, 1e-4)
        assert_close(f"offsets vs {other.name}", off_t, off_o, 1e-6)
        g_ref = other.backward(x, up, lz_o, ring_o, off_o, 0, True)
        for fwd, bwd, (lz, ring, off) in ((TRITON, other, (lz_t, ring_t, off_t)),
                                          (other, TRITON, (lz_o, ring_o, off_o))):
            g = bwd.backward(x, up, lz, ring, off, 0, True)
            for name, a, b in zip(g_ref._fields, g, g_ref):
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
        kw = _on(case.kwargs, torch.float32, "cuda")
        log_z, g = log_z_and_grads(kw, "triton", torch.ones(2, device="cuda"))
        F.viterbi(**kw, backend="triton")
        F.sample(**kw, backend="triton")
        counts.append([_compiled_kernel_count(k) for k in (
            kernels._forward_kernel, kernels._backward_kernel, kernels._viterbi_kernel,
            kernels._filter_kernel)])
    assert all(c == counts[0] for c in counts), counts


@pytest.mark.cuda
@needs_gpu
def test_gpu_torch_compile_with_inductor():
    torch._dynamo.reset()

    def fn(scores, transition, duration, lengths, end_scores):
        return F.log_partition(scores, transition, duration, lengths, end_scores=end_scores,
                               backend="triton")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    names = ("scores", "transition", "duration", "lengths", "end_scores")
    for T in (40, 64, 101):
        case = make_case(T, 3, T, 5, 4, optional=("end_scores",))
        leaves = {k: (v.detach().to("cuda", torch.float32).requires_grad_()
                      if v.is_floating_point() else v.cuda()) for k, v in case.tensors.items()}
        eager = {k: (v.detach().clone().requires_grad_() if v.is_floating_point() else v)
                 for k, v in leaves.items()}
        out = compiled(*(leaves[n] for n in names))
        ref = fn(*(eager[n] for n in names))
        assert_close(f"compiled log Z at T={T}", out, ref, 1e-4)
        out.sum().backward()
        ref.sum().backward()
        for n in names:
            if leaves[n].is_floating_point():
                assert_close(f"compiled d/d {n}", leaves[n].grad, eager[n].grad, 1e-4)
