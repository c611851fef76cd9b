"""The compiled C++ CPU kernel (backend="cpu") against the reference, and its op registration."""

from __future__ import annotations

import math

import pytest
import torch

import flashsemicrf as F
from conftest import (
    GRAD_NAMES,
    OPTIONAL,
    TOL,
    assert_close,
    log_z_and_grads,
    make_case,
    random_small_cases,
)
from flashsemicrf import _backends

pytestmark = pytest.mark.skipif(
    not _backends.HAS_CPU_KERNELS, reason="flashsemicrf._C is not built"
)
ops = torch.ops.flashsemicrf
FLOAT32_TOL = 2e-4


def _cases():
    cases = random_small_cases(60, seed0=11, max_T=9, max_K=5, max_C=4)
    for i, (T, K, C, dd, ni) in enumerate(
        [(40, 5, 3, False, False), (40, 7, 4, True, True), (33, 60, 2, False, True),
         (70, 3, 5, True, False), (1, 1, 1, False, False), (50, 1, 3, False, True),
         (57, 12, 1, True, False), (64, 16, 9, False, False)]
    ):
        cases.append(make_case(1000 + i, 3, T, K, C, duration_dependent=dd, neg_inf=ni))
    return cases


CASES = _cases()



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cpu_kernel_matches_reference(case, dtype):
    kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in case.kwargs.items()}
    tol = TOL[dtype]
    upstream = torch.linspace(0.5, 2.0, case.B, dtype=torch.float64)
    lz, g = log_z_and_grads(kw, "cpu", upstream)
    lz_ref, g_ref = log_z_and_grads(kw, "torch", upstream)
    assert lz.dtype == dtype
    assert_close("log Z", lz, lz_ref, tol * max(1.0, float(lz_ref[torch.isfinite(lz_ref)].abs().max()) if torch.isfinite(lz_ref).any() else 1.0))
    for name in g:
        assert_close(f"d/d {name}", g[name], g_ref[name], tol)

    m, m_ref = F.marginals(**kw, backend="cpu"), F.marginals(**kw, backend="torch")
    assert_close("marginals.labels", m.labels, m_ref.labels, tol)
    assert_close("marginals.starts", m.starts, m_ref.starts, tol)
    assert_close("entropy", F.entropy(**kw, backend="cpu"), F.entropy(**kw, backend="torch"), 10 * tol)

    best, segs = F.viterbi(**kw, backend="cpu")
    best_ref, segs_ref = F.viterbi(**kw, backend="torch")
    assert_close("viterbi best", best, best_ref, tol * 10)
    if dtype == torch.float64:
        assert torch.equal(segs, segs_ref)
    else:  # float32 may break a near-tie differently: the path must still be optimal
        feasible = torch.isfinite(best)
        if feasible.all() and segs.numel():
            assert_close("score of the float32 path", F.score(segs, **kw), best, 1e-3)


@pytest.mark.parametrize("interval", [1, 2, 7])
@pytest.mark.parametrize("duration_dependent", [False, True])
def test_ops_match_reference_checkpoints(interval, duration_dependent):
    """Same checkpoint layout as the reference: one backend's forward feeds another's backward."""
    case = make_case(5, 3, 23, 5, 3, duration_dependent=duration_dependent, neg_inf=True)
    x = _backends.to_compute(_inputs(case))
    ref, cpu = _backends._REFERENCE, _backends._CPU
    lz_r, ring_r, off_r = ref.forward(x, interval)
    lz_c, ring_c, off_c = cpu.forward(x, interval)
    assert_close("log Z", lz_c, lz_r, 1e-9)
    assert_close("checkpoint offsets", off_c, off_r, 1e-9)
    assert_close("checkpoint ring", ring_c, ring_r, 1e-9)
    up = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g_cross = cpu.backward(x, up, lz_r, ring_r, off_r, interval, True)
    g_ref = ref.backward(x, up, lz_r, ring_r, off_r, interval, True)
    for name, a, b in zip(g_ref._fields, g_cross, g_ref):
        assert_close(name, a, b, 1e-9)


def _inputs(case):
    from flashsemicrf._validation import check_problem

    names = ("scores", "transition", "duration", "lengths") + OPTIONAL
    return check_problem("test", *(case.kwargs.get(n) for n in names))


def test_filter_matches_reference_history():
    from flashsemicrf import reference

    case = make_case(2, 3, 15, 4, 3, duration_dependent=True)
    x = _backends.to_compute(_inputs(case))
    alpha, sigma, offset = ops.filter(*_backends.CompiledBackend.args(x))
    _, h = reference.forward_history(_backends.to_problem(x))
    for b, L in enumerate(x.lengths.tolist()):
        assert_close("alpha", alpha[b, 1 : L + 1], h.alpha[b, 1 : L + 1], 1e-9)
        assert_close("sigma[0]", sigma[b, 0], h.sigma[b, 0], 1e-9)
        assert_close("offset", offset[b, : L + 1], h.offset[b, : L + 1], 1e-9)


@pytest.mark.parametrize("duration_dependent", [False, True])
def test_samples_on_cpu_backend_follow_the_exact_distribution(duration_dependent):
    from oracles import brute_force
    from test_reference import _total_variation

    case = make_case(11, 2, 4, 3, 2, duration_dependent=duration_dependent)
    oracle = brute_force(**case.kwargs)
    n = 20000
    rows = F.sample(**case.kwargs, num_samples=n, generator=torch.Generator().manual_seed(1),
                    backend="cpu")
    for b in range(case.B):
        assert _total_variation(rows, oracle, b, n) < 0.04


def test_non_contiguous_inputs():
    case = make_case(3, 4, 20, 4, 3, duration_dependent=True)
    kw = case.kwargs
    # Views with strides: every other sequence, and a transposed layout for scores.
    scores = kw["scores"].transpose(1, 2).contiguous().transpose(1, 2)[::2]
    start_scores = kw["start_scores"].repeat(1, 2, 1)[::2, ::2]
    assert not scores.is_contiguous() and not start_scores.is_contiguous()
    args = dict(scores=scores, transition=kw["transition"].transpose(1, 2).contiguous().transpose(1, 2),
                duration=kw["duration"].t().contiguous().t(), lengths=kw["lengths"][::2],
                start_scores=start_scores, end_scores=kw["end_scores"][::2],
                start_transition=kw["start_transition"], end_transition=kw["end_transition"])
    contiguous = {k: v.contiguous() for k, v in args.items()}
    assert_close("log Z", F.log_partition(**args, backend="cpu"),
                 F.log_partition(**contiguous, backend="torch"), 1e-9)
    m = F.marginals(**args, backend="cpu").labels
    assert_close("labels", m, F.marginals(**contiguous, backend="torch").labels, 1e-9)


@pytest.mark.parametrize("duration_dependent", [False, True])
def test_gradcheck_cpu_op(duration_dependent):
    case = make_case(4, 2, 6, 3, 2, duration_dependent=duration_dependent)
    names = [n for n in GRAD_NAMES if n in case.tensors]
    lengths = case.tensors["lengths"]

    def fn(*xs):
        return F.log_partition(**dict(zip(names, xs)), lengths=lengths, backend="cpu")

    assert torch.autograd.gradcheck(fn, tuple(case.leaves()[n] for n in names))


def _op_args(case, dtype=torch.float64, grad=False):
    x = _backends.to_compute(_inputs(case))
    args = list(_backends.CompiledBackend.args(x))
    return [a.detach().to(dtype).requires_grad_(grad) if (a is not None and a.is_floating_point())
            else a for a in args]


@pytest.mark.parametrize("duration_dependent", [False, True])
@pytest.mark.parametrize("boundary", ["with_boundary", "without_boundary"])
def test_opcheck(duration_dependent, boundary):
    optional = OPTIONAL if boundary == "with_boundary" else ("start_transition",)
    case = make_case(6, 2, 7, 3, 3, duration_dependent=duration_dependent, optional=optional)
    interval = 3
    args = _op_args(case, grad=True)
    torch.library.opcheck(ops.forward, (*args, interval))
    plain = _op_args(case)
    log_z, ring, off = ops.forward(*plain, interval)
    grad = torch.ones_like(log_z)
    for boundary_mass in (False, True):
        torch.library.opcheck(ops.backward, (grad, *plain, log_z, ring, off, interval, boundary_mass))
    torch.library.opcheck(ops.viterbi, tuple(plain))
    torch.library.opcheck(ops.filter, tuple(plain))


def test_torch_compile_matches_eager_without_recompiling():
    torch._dynamo.reset()
    calls = {"n": 0}

    def counting_backend(gm, example_inputs):
        calls["n"] += 1
        return gm.forward

    def fn(scores, transition, duration, lengths, start_scores):
        return F.log_partition(scores, transition, duration, lengths, start_scores=start_scores,
                               backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for T in (12, 17, 30):
        case = make_case(T, 3, T, 4, 3, optional=("start_scores",))
        kw = case.leaves(torch.float32)
        args = (kw["scores"], kw["transition"], kw["duration"], kw["lengths"], kw["start_scores"])
        out = compiled(*args)
        ref_leaves = case.leaves(torch.float32)
        ref_args = (ref_leaves["scores"], ref_leaves["transition"], ref_leaves["duration"],
                    ref_leaves["lengths"], ref_leaves["start_scores"])
        ref = fn(*ref_args)
        assert_close(f"compiled log Z at T={T}", out, ref, 1e-5)
        out.sum().backward()
        ref.sum().backward()
        for a, b in zip(args, ref_args):
            if a.is_floating_point():
                assert_close("compiled gradient", a.grad, b.grad, 1e-5)
    counted = torch.compile(fn, fullgraph=True, dynamic=True, backend=counting_backend)
    for T in (12, 17, 30):
        case = make_case(T, 3, T, 4, 3, optional=("start_scores",))
        kw = case.kwargs
        counted(kw["scores"].float(), kw["transition"].float(), kw["duration"].float(),
                kw["lengths"], kw["start_scores"].float())
    assert calls["n"] == 1, f"recompiled for a new length: {calls['n']} graphs"


def test_deterministic_bitwise():
    case = make_case(9, 4, 60, 8, 5, duration_dependent=False, neg_inf=True)
    kw = {k: (v.float() if v.is_floating_point() else v) for k, v in case.kwargs.items()}
    first = log_z_and_grads(kw, "cpu", torch.ones(4))
    for _ in range(2):
        again = log_z_and_grads(kw, "cpu", torch.ones(4))
        assert torch.equal(first[0], again[0])
        for name in first[1]:
            assert torch.equal(first[1][name], again[1][name]), name


def test_no_valid_segmentation_on_cpu():
    case = make_case(4, 2, 5, 3, 2)
    kw = case.leaves()
    with torch.no_grad():
        kw["duration"][:] = -math.inf
        kw["duration"][1, :] = 0.0  # only duration 2: odd lengths impossible
    kw["lengths"] = torch.tensor([5, 4])
    log_z = F.log_partition(**kw, backend="cpu")
    assert log_z[0] == -math.inf and torch.isfinite(log_z[1])
    log_z.sum().backward()
    for name in GRAD_NAMES:
        assert not torch.isnan(kw[name].grad).any(), name
    assert (kw["scores"].grad[0] == 0).all()
    best, segs = F.viterbi(**{k: v.detach() if v.is_floating_point() else v for k, v in kw.items()},
                           backend="cpu")
    assert best[0] == -math.inf and not (segs[:, 0] == 0).any()


def test_nan_stays_in_its_sequence():
    case = make_case(5, 3, 6, 3, 2, ragged=False)
    kw = dict(case.kwargs)
    kw["scores"] = kw["scores"].clone()
    kw["scores"][1, 2, 0] = float("nan")
    log_z = F.log_partition(**kw, backend="cpu")
    assert torch.isnan(log_z[1]) and torch.isfinite(log_z[[0, 2]]).all()


def test_auto_picks_the_cpu_kernel():
    assert _backends.resolve("t", "auto", torch.device("cpu")) is _backends._CPU
