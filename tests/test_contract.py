"""The op contract, once, over every backend that runs here.

Every backend ("cpu", "cuda", "triton", "torch") is a family of four ops with
one contract (flashsemicrf/_contract.py, docs/design.md): each test here takes
the backend as a parameter and is skipped where it does not run. Without a
GPU, "triton" runs under Triton's interpreter on CPU tensors, slowly, so its
problems are the small ones (``INTERPRETED``). What is one backend's alone
stays in its own file: test_triton.py (chunked sweeps, the compiler,
specialisation), test_cuda.py (many shapes, streams, low precision).
"""

from __future__ import annotations

import math

import pytest
import torch

import flashsemicrf as F
from conftest import (
    DEVICE,
    GRAD_NAMES,
    INTERPRETED,
    OPTIONAL,
    TOL,
    assert_close,
    backend_param,
    check_viterbi,
    log_z_and_grads,
    log_z_tol,
    make_case,
    on,
    problem,
    random_small_cases,
    total_variation,
)
from flashsemicrf import backends
from flashsemicrf._contract import Checkpoints, Gradients, History, returns_boundary_gradient
from oracles import brute_force

ALL = [backend_param(name) for name in ("cpu", "cuda", "triton", "torch")]
# Backends compared with the reference ("torch", the specification itself).
KERNELS = [backend_param(name) for name in ("cpu", "cuda", "triton")]
DD = pytest.mark.parametrize("duration_dependent", [False, True], ids=["cc", "kcc"])
REFERENCE = backends.resolve("test", "torch", "cpu")


def _ops(backend: str):
    return backends.resolve("test", backend, DEVICE[backend])


def _small(backend: str) -> bool:
    return INTERPRETED.get(backend, False)


def _leaves(kwargs):
    return {k: (v.detach().clone().requires_grad_() if v.is_floating_point() else v)
            for k, v in kwargs.items()}


# --------------------------------------------------------------------------
# Every kernel against the reference on random problems
# --------------------------------------------------------------------------


def _cases(backend: str) -> list:
    """Every optional input on and off, both transition forms, ragged
    lengths, K > T, T = 1, −inf entries; the interpreter gets fewer and smaller."""
    if backend == "triton":
        cases = random_small_cases(16, seed0=23, max_T=7, max_K=4, max_C=3)
        larger = [(2, 12, 5, 3, False, True), (2, 10, 4, 3, True, True), (2, 5, 8, 2, False, False),
                  (2, 6, 9, 2, True, False), (1, 1, 1, 1, False, False), (2, 9, 3, 4, True, False)]
        seed0 = 2000
    elif backend == "cuda":
        return random_small_cases(40, seed0=21)
    else:
        cases = random_small_cases(60, seed0=11, max_T=9, max_K=5, max_C=4)
        larger = [(3, 40, 5, 3, False, False), (3, 40, 7, 4, True, True), (3, 33, 60, 2, False, True),
                  (3, 70, 3, 5, True, False), (3, 1, 1, 1, False, False), (3, 50, 1, 3, False, True),
                  (3, 57, 12, 1, True, False), (3, 64, 16, 9, False, False)]
        seed0 = 1000
    for i, (B, T, K, C, dd, ni) in enumerate(larger):
        cases.append(make_case(seed0 + i, B, T, K, C, duration_dependent=dd, neg_inf=ni))
    return cases


def _reference_params():
    params = []
    for backend in KERNELS:
        name = backend.values[0]
        cases = _cases(name)
        # float32 on every other case under the interpreter (it is slow).
        f32 = cases[::2] if name == "triton" else cases
        for case, dtype in [(c, torch.float64) for c in cases] + [(c, torch.float32) for c in f32]:
            tag = "f64" if dtype == torch.float64 else "f32"
            params.append(pytest.param(name, case, dtype, marks=backend.marks,
                                       id=f"{name}-{case.id}-{tag}"))
    return params


@pytest.mark.parametrize("backend,case,dtype", _reference_params())
def test_matches_reference(backend, case, dtype):
    """log Z, every gradient (non-uniform upstream), marginals, entropy and Viterbi."""
    device = DEVICE[backend]
    kw, ref_kw = on(case.kwargs, device, dtype), on(case.kwargs, "cpu", dtype)
    tol = TOL[dtype]
    upstream = torch.linspace(0.5, 2.0, case.B, dtype=torch.float64)
    log_z, g = log_z_and_grads(kw, backend, upstream.to(device))
    log_z_ref, g_ref = log_z_and_grads(ref_kw, "torch", upstream)
    assert log_z.dtype == dtype and log_z.device.type == torch.device(device).type
    assert_close("log Z", log_z, log_z_ref, log_z_tol(log_z_ref, tol))
    for name in g:
        assert_close(f"d/d {name}", g[name], g_ref[name], tol)
    m, m_ref = F.marginals(**kw, backend=backend), F.marginals(**ref_kw, backend="torch")
    assert_close("marginals.log_partition", m.log_partition, m_ref.log_partition,
                 log_z_tol(log_z_ref, tol))
    assert_close("marginals.labels", m.labels, m_ref.labels, tol)
    assert_close("marginals.starts", m.starts, m_ref.starts, tol)
    assert_close("entropy", F.entropy(**kw, backend=backend),
                 F.entropy(**ref_kw, backend="torch"), 10 * tol)
    check_viterbi(kw, ref_kw, backend, dtype, case.C)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_large_magnitudes_without_centring(backend, dtype):
    """Emission log-probabilities around −1e4 per position, no centring: the
    ring stays O(1) (each position's largest emission goes to the float64
    offset) and the backward renormalises by log Z recomputed in float64."""
    g = torch.Generator().manual_seed(0)
    B, T, K, C = (2, 12, 4, 3) if _small(backend) else (2, 300, 12, 4)
    kw = dict(scores=-1e4 + torch.randn(B, T, C, generator=g, dtype=torch.float64),
              transition=torch.randn(C, C, generator=g, dtype=torch.float64),
              duration=torch.randn(K, C, generator=g, dtype=torch.float64),
              lengths=torch.tensor([T, T - 5]))
    # Against float64 on the same (rounded) inputs: a float32 score of −1e4 is
    # itself only known to ±5e-4.
    rounded = on(kw, dtype=dtype)
    ref_z, ref_g = log_z_and_grads(on(rounded, dtype=torch.float64), "torch")
    assert torch.isfinite(ref_z).all()
    # The marginals do not change when each position's scores are shifted
    # together: centred, float64 computes them to ~1e-15, the truth that
    # the uncentred reference (~3e-9 from it, its offsets' rounding) and the
    # kernels are held to.
    centred = on(rounded, dtype=torch.float64)
    centred["scores"] = centred["scores"] - centred["scores"].amax(-1, keepdim=True)
    _, truth = log_z_and_grads(centred, "torch")
    own = (ref_g["scores"] - truth["scores"]).abs().max().item()
    device = DEVICE[backend]
    z, grads = log_z_and_grads(on(rounded, device), backend, torch.ones(B, device=device))
    rel = ((z.cpu().double() - ref_z) / ref_z.abs()).abs().max().item()
    print(f"{backend} {dtype}: relative log Z error {rel:.2e}")
    assert rel < (1e-13 if dtype == torch.float64 else 1e-6)
    assert_close("marginals", grads["scores"], truth["scores"],
                 max(1e-9 if dtype == torch.float64 else 1e-4, 2 * own))


@pytest.mark.parametrize("backend", [p for p in ALL if p.values[0] != "triton" or
                                     not INTERPRETED["triton"]])
@DD
def test_gradcheck_float64(backend, duration_dependent):
    """Finite differences through the public function (too slow for the interpreter)."""
    case = make_case(4, 2, 6, 3, 2, duration_dependent=duration_dependent)
    device = DEVICE[backend]
    names = [n for n in GRAD_NAMES if n in case.tensors]
    lengths = case.tensors["lengths"].to(device)

    def fn(*xs):
        return F.log_partition(**dict(zip(names, xs)), lengths=lengths, backend=backend)

    leaves = case.leaves()
    inputs = tuple(leaves[n].detach().to(device).requires_grad_() for n in names)
    assert torch.autograd.gradcheck(fn, inputs)


# --------------------------------------------------------------------------
# The ops: registration, checkpoints, outputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@DD
@pytest.mark.parametrize("boundary", [True, False], ids=["with_boundary", "without_boundary"])
def test_opcheck(backend, duration_dependent, boundary):
    """Schema, fake, autograd registration and AOT dispatch of all four ops."""
    optional = OPTIONAL if boundary else ("start_transition",)
    case = make_case(6, 2, 7, 3, 3, duration_dependent=duration_dependent, optional=optional)
    x = problem(on(case.kwargs, DEVICE[backend]))
    ops = _ops(backend).ops
    interval = 3
    args = [a.detach().requires_grad_() if a is not None and a.is_floating_point() else a
            for a in x.op_args()]
    torch.library.opcheck(ops.forward, (*args, interval))
    plain = x.op_args()
    log_z, ring, offset = ops.forward(*plain, interval)
    for boundary_mass in (False, True):
        torch.library.opcheck(ops.backward, (torch.ones_like(log_z), *plain, log_z, ring, offset,
                                             interval, boundary_mass))
    torch.library.opcheck(ops.viterbi, tuple(plain))
    torch.library.opcheck(ops.filter, tuple(plain))


@pytest.mark.parametrize("backend", ALL)
def test_boundary_gradients_follow_the_contract(backend):
    """start/end score gradients are (B, T, C) when the input is present or
    boundary_mass asks for them, else (0,)."""
    case = make_case(8, 2, 5, 3, 2, optional=("start_scores",))
    x = problem(on(case.kwargs, DEVICE[backend]))
    ops = _ops(backend)
    log_z, ckpt = ops.forward(x, 2)
    for boundary_mass in (False, True):
        g = ops.ops.backward(torch.ones_like(log_z), *x.op_args(), log_z, *ckpt, 2, boundary_mass)
        for index, present in ((5, True), (6, False)):
            returned = returns_boundary_gradient(present, boundary_mass)
            assert tuple(g[index].shape) == ((2, 5, 2) if returned else (0,))


@pytest.mark.parametrize("backend", KERNELS)
@DD
@pytest.mark.parametrize("interval", [0, 1, 2, 5])
def test_checkpoints_interoperate(backend, duration_dependent, interval):
    """The shared checkpoint layout: the backend's forward writes the
    reference's checkpoints, its backward takes the reference's, and the
    reference's backward takes its (so any two backends interoperate)."""
    case = make_case(5, 3, 13, 4, 3, duration_dependent=duration_dependent, neg_inf=True)
    device = DEVICE[backend]
    x, x_ref = problem(on(case.kwargs, device)), problem(case.kwargs)
    ops = _ops(backend)
    log_z, ckpt = ops.forward(x, interval)
    log_z_ref, ckpt_ref = REFERENCE.forward(x_ref, interval)
    assert ckpt.ring.shape == ckpt_ref.ring.shape and ckpt.offset.dtype == torch.float64
    assert_close("log Z", log_z, log_z_ref, 1e-9)
    assert_close("checkpoint offsets", ckpt.offset, ckpt_ref.offset, 1e-9)
    assert_close("checkpoint ring", ckpt.ring, ckpt_ref.ring, 1e-9)
    up = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    expected = REFERENCE.backward(x_ref, up, log_z_ref, ckpt_ref, interval, True)
    of_reference = ops.backward(x, up.to(device), log_z_ref.to(device),
                                Checkpoints(*(t.to(device) for t in ckpt_ref)), interval, True)
    reference_of = REFERENCE.backward(x_ref, up, log_z.cpu(), Checkpoints(*(t.cpu() for t in ckpt)),
                                      interval, True)
    for name, a, b, c in zip(Gradients._fields, of_reference, reference_of, expected):
        assert_close(f"{backend} backward of the reference forward: {name}", a, c, 1e-9)
        assert_close(f"reference backward of the {backend} forward: {name}", b, c, 1e-9)


@pytest.mark.parametrize("backend", ALL)
def test_backward_takes_the_mirror_rows(backend):
    """With the static transition every backward also takes checkpoints with
    2B rows (what the CUDA forward returns for its span-parallel backward:
    rows B … 2B-1 the mirror image's) and reads rows 0 … B-1: NaN in the
    others changes no bit."""
    case = make_case(7, 3, 13, 4, 3, duration_dependent=False, neg_inf=True)
    device = DEVICE[backend]
    x = problem(on(case.kwargs, device))
    ops = _ops(backend)
    log_z, ckpt = REFERENCE.forward(problem(case.kwargs), 5)
    log_z, ckpt = log_z.to(device), Checkpoints(*(t.to(device) for t in ckpt))
    doubled = Checkpoints(*(torch.cat([t, torch.full_like(t, math.nan)]) for t in ckpt))
    up = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device=device)
    want = ops.backward(x, up, log_z, ckpt, 5, True)
    got = ops.backward(x, up, log_z, doubled, 5, True)
    for name, a, b in zip(Gradients._fields, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name


def test_fake_forward_has_the_mirror_rows_where_the_cuda_op_does(monkeypatch):
    """The fake forward (torch.compile's shapes) gives 2B checkpoint rows
    exactly where the C++ op's CUDA forward saves the mirror image's: the
    flashsemicrf namespace, CUDA tensors, the static transition,
    FLASHSEMICRF_CUDA_SWEEP=parallel. (No GPU is needed for fake tensors.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def rows(namespace, device, sweep, dd=False):
        monkeypatch.setenv("FLASHSEMICRF_CUDA_SWEEP", sweep)
        with FakeTensorMode():
            s = torch.empty(2, 30, 3, device=device)
            tr = torch.empty(*((5, 3, 3) if dd else (3, 3)), device=device)
            d, bt = torch.empty(5, 3, device=device), torch.empty(3, device=device)
            n = torch.empty(2, dtype=torch.long, device=device)
            out = getattr(torch.ops, namespace).forward(s, tr, d, n, bt, bt, None, None, 7)
        assert out[1].shape[0] == out[2].shape[0]
        return out[1].shape[0]

    assert rows("flashsemicrf", "cuda", "parallel") == 4
    assert rows("flashsemicrf", "cuda", "serial") == 2
    assert rows("flashsemicrf", "cuda", "parallel", dd=True) == 2
    assert rows("flashsemicrf", "cpu", "parallel") == 2
    assert rows("flashsemicrf_torch", "cuda", "parallel") == 2


@pytest.mark.parametrize("backend", ALL)
@DD
@pytest.mark.parametrize("interval", [1, 2, 3])
def test_backward_reanchors_at_every_checkpoint(backend, duration_dependent, interval):
    """The backward offset is re-anchored at the first position of every span
    (total probability 1 there: a boundary, or one segment across it). Give
    the last checkpoint's offset an error delta, as the forward's rounding
    does over a long sequence: log Z, recomputed from it, is off by delta too,
    so without the re-anchoring every earlier span's posteriors would scale by
    exp(-delta); with it only the span before the last one does, the start
    masses (span 0) come out as without the error, and the backward agrees with
    the reference's, which anchors the same way."""
    T, K = 12, 4
    case = make_case(31, 3, T, K, 3, duration_dependent=duration_dependent, neg_inf=True)
    kw = dict(case.kwargs, lengths=torch.tensor([12, 10, 7]))
    device = DEVICE[backend]
    x, x_ref = problem(on(kw, device)), problem(kw)
    log_z, ckpt = REFERENCE.forward(x_ref, interval)
    n_ckpt = ckpt.offset.shape[1]
    last_span = torch.clamp(kw["lengths"] // interval, max=n_ckpt - 1)
    assert bool((last_span >= 2).all()), "the check needs a span between the last and span 0"
    bad = ckpt.offset.clone()
    bad[torch.arange(3), last_span] += 0.75
    up = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def run(ops, x, offset):
        d = x.scores.device
        return ops.backward(x, up.to(d), log_z.to(d), Checkpoints(ckpt.ring.to(d), offset.to(d)),
                            interval, True)

    clean = run(_ops(backend), x, ckpt.offset)
    got = run(_ops(backend), x, bad)
    expected = run(REFERENCE, x_ref, bad)
    for name, a, b in zip(Gradients._fields, got, expected):
        assert_close(f"{backend} vs reference: {name}", a, b, 1e-9)
    assert float((got.scores - clean.scores).abs().max()) > 1e-3  # the error is felt ...
    # ... but not beyond the span it falls in.
    assert_close("start transition", got.start_transition, clean.start_transition, 1e-9)
    assert_close("start masses of span 0", got.start_scores[:, :interval],
                 clean.start_scores[:, :interval], 1e-9)


@pytest.mark.parametrize("backend", KERNELS)
@DD
def test_filter_matches_reference(backend, duration_dependent):
    """The filter op's whole output, padding included."""
    case = make_case(2, 3, 9, 4, 3, duration_dependent=duration_dependent, neg_inf=True)
    history = _ops(backend).filter_messages(problem(on(case.kwargs, DEVICE[backend])))
    expected = REFERENCE.filter_messages(problem(case.kwargs))
    for name, a, b in zip(History._fields, history, expected):
        assert_close(name, a, b, 1e-9)


@pytest.mark.parametrize("backend", ALL)
@DD
def test_samples_follow_the_exact_distribution(backend, duration_dependent):
    case = make_case(11, 2, 4, 3, 2, duration_dependent=duration_dependent)
    oracle = brute_force(**case.kwargs)
    n = 20000
    device = DEVICE[backend]
    generator = torch.Generator(device=device).manual_seed(1)
    rows = F.sample(**on(case.kwargs, device), num_samples=n, generator=generator,
                    backend=backend).cpu()
    assert rows.shape[1] == 5
    for b in range(case.B):
        tv = total_variation(rows, oracle, b, n)
        # ~50 outcomes at n = 20000: sampling noise gives TV ≈ 0.01–0.02.
        print(f"b={b}: total variation {tv:.4f}")
        assert tv < 0.04


# --------------------------------------------------------------------------
# Edge cases and guarantees
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_no_valid_segmentation(backend):
    """log Z = −inf, zero gradients (never NaN), entropy 0, no Viterbi path, no samples."""
    case = make_case(4, 2, 5, 3, 2)
    kw = on(case.kwargs, DEVICE[backend])
    duration = torch.full_like(kw["duration"], -math.inf)
    duration[1] = 0.0  # only duration 2: odd lengths are impossible
    kw.update(duration=duration, lengths=torch.tensor([5, 4], device=duration.device))
    leaves = _leaves(kw)
    log_z = F.log_partition(**leaves, backend=backend)
    assert log_z[0].item() == -math.inf and math.isfinite(log_z[1].item())
    log_z.sum().backward()
    for name in GRAD_NAMES:
        grad = leaves[name].grad
        assert grad is not None and not torch.isnan(grad).any(), name
    assert (leaves["scores"].grad[0] == 0).all()
    m = F.marginals(**kw, backend=backend)
    assert (m.labels[0] == 0).all() and (m.starts[0] == 0).all()
    ent = F.entropy(**kw, backend=backend)
    assert ent[0].item() == 0 and torch.isfinite(ent).all()
    best, segs = F.viterbi(**kw, backend=backend)
    assert best[0].item() == -math.inf and not (segs[:, 0] == 0).any()
    rows = F.sample(**kw, num_samples=3, backend=backend)
    assert not (rows[:, 1] == 0).any() and (rows[:, 1] == 1).any()


@pytest.mark.parametrize("backend", ALL)
def test_nan_stays_in_its_sequence(backend):
    case = make_case(5, 3, 6, 3, 2, ragged=False)
    kw = on(case.kwargs, DEVICE[backend])
    kw["scores"] = kw["scores"].clone()
    kw["scores"][1, 2, 0] = float("nan")
    log_z = F.log_partition(**kw, backend=backend)
    assert torch.isnan(log_z[1]) and torch.isfinite(log_z[[0, 2]]).all()
    best, _ = F.viterbi(**kw, backend=backend)  # must return, whatever the NaN path
    assert torch.isfinite(best[[0, 2]]).all()


@pytest.mark.parametrize("backend", ALL)
def test_non_contiguous_inputs(backend):
    T = 8 if _small(backend) else 20
    case = make_case(3, 4, T, 4, 3, duration_dependent=True)
    kw = on(case.kwargs, DEVICE[backend])
    # Views with strides: every other sequence, a transposed layout, a strided T.
    scores = kw["scores"].transpose(1, 2).contiguous().transpose(1, 2)[::2]
    start_scores = kw["start_scores"].repeat(1, 2, 1)[::2, ::2]
    assert not scores.is_contiguous() and not start_scores.is_contiguous()
    args = dict(scores=scores,
                transition=kw["transition"].transpose(1, 2).contiguous().transpose(1, 2),
                duration=kw["duration"].t().contiguous().t(), lengths=kw["lengths"][::2],
                start_scores=start_scores, end_scores=kw["end_scores"][::2],
                start_transition=kw["start_transition"], end_transition=kw["end_transition"])
    contiguous = {k: v.contiguous().cpu() for k, v in args.items()}
    assert_close("log Z", F.log_partition(**args, backend=backend),
                 F.log_partition(**contiguous, backend="torch"), 1e-9)
    assert_close("labels", F.marginals(**args, backend=backend).labels,
                 F.marginals(**contiguous, backend="torch").labels, 1e-9)


@pytest.mark.parametrize("backend", ALL)
@DD
def test_repeated_runs_are_bitwise_identical(backend, duration_dependent):
    """Gradients are written without atomics: reruns agree to the bit."""
    B, T, K, C = (2, 9, 4, 3) if _small(backend) else ((3, 50, 6, 4) if backend == "torch"
                                                       else (4, 300, 20, 7))
    case = make_case(9, B, T, K, C, duration_dependent=duration_dependent, neg_inf=True)
    kw = on(case.kwargs, DEVICE[backend], torch.float32)
    ones = torch.ones(B, device=DEVICE[backend])
    first = log_z_and_grads(kw, backend, ones)
    again = log_z_and_grads(kw, backend, ones)
    assert torch.equal(first[0], again[0])
    for name in first[1]:
        assert torch.equal(first[1][name], again[1][name]), name
    m1, m2 = F.marginals(**kw, backend=backend), F.marginals(**kw, backend=backend)
    assert torch.equal(m1.labels, m2.labels)
    assert torch.equal(F.viterbi(**kw, backend=backend)[1], F.viterbi(**kw, backend=backend)[1])


@pytest.mark.parametrize("backend", ALL)
def test_empty_batch(backend):
    case = make_case(1, 0, 5, 3, 2)
    kw = on(case.kwargs, DEVICE[backend])
    leaves = _leaves(kw)
    log_z = F.log_partition(**leaves, backend=backend)
    assert log_z.shape == (0,)
    log_z.sum().backward()
    assert leaves["transition"].grad.shape == kw["transition"].shape
    m = F.marginals(**kw, backend=backend)
    assert m.labels.shape == (0, 5, 2) and m.starts.shape == (0, 5)
    assert F.entropy(**kw, backend=backend).shape == (0,)
    best, segs = F.viterbi(**kw, backend=backend)
    assert best.shape == (0,) and segs.shape == (0, 4)
    assert F.sample(**kw, backend=backend).shape == (0, 5)


@pytest.mark.parametrize("backend", ALL)
def test_inputs_are_not_modified(backend):
    case = make_case(6, 2, 7, 3, 3, duration_dependent=True, neg_inf=True)
    kw = on(case.kwargs, DEVICE[backend])
    before = {k: v.clone() for k, v in kw.items()}
    F.log_partition(**_leaves(kw), backend=backend).sum().backward()
    for fn in (F.marginals, F.entropy, F.viterbi):
        fn(**kw, backend=backend)
    F.sample(**kw, num_samples=2, backend=backend)
    for k, v in kw.items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("backend", ALL)
def test_torch_compile_fullgraph_dynamic_without_recompiling(backend):
    """log Z under torch.compile(fullgraph=True, dynamic=True) with Inductor:
    one graph for three lengths, the values and gradients of eager mode."""
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    graphs = []

    def counting_inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    def fn(scores, transition, duration, lengths, start_scores):
        return F.log_partition(scores, transition, duration, lengths, start_scores=start_scores,
                               backend=backend)

    names = ("scores", "transition", "duration", "lengths", "start_scores")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counting_inductor)
    device = DEVICE[backend]
    for T in ((5, 7, 9) if _small(backend) else (12, 17, 30)):
        case = make_case(T, 3, T, 4, 3, optional=("start_scores",))
        leaves = _leaves(on(case.kwargs, device, torch.float32))
        eager = _leaves(leaves)
        out = compiled(*(leaves[n] for n in names))
        ref = fn(*(eager[n] for n in names))
        assert_close(f"compiled log Z at T={T}", out, ref, 1e-5)
        out.sum().backward()
        ref.sum().backward()
        for n in names:
            if leaves[n].is_floating_point():
                assert_close(f"compiled d/d {n} at T={T}", leaves[n].grad, eager[n].grad, 1e-5)
    assert len(graphs) == 1, f"recompiled for a new length: {len(graphs)} graphs"
