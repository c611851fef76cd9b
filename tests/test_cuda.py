"""What is the CUDA kernels' alone; their op contract is tested in test_contract.py.

Label counts around the warp and block sizes and long durations against the
C++ CPU kernel, long sequences, bf16/fp16 inputs, and the current stream.
Skipped without a GPU (CI has none): CI only proves the kernels compile. On a
GPU machine: `make test PYTHON=python3 PYTEST_ARGS="-m cuda"`.
"""

from __future__ import annotations

import pytest
import torch

import flashsemicrf as F
from conftest import TOL, assert_close, log_z_and_grads, log_z_tol, make_case, on, problem
from flashsemicrf import backends

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not backends.HAS_CUDA_KERNELS, reason="built without CUDA kernels"),
]


def _compare_with_cpu_kernel(kw_cpu: dict, dtype, tol_scale: float) -> None:
    """CUDA on kw (moved to the GPU) against the C++ CPU kernel on the CPU copy."""
    tol = TOL[dtype] * tol_scale
    B = kw_cpu["scores"].shape[0]
    upstream = torch.linspace(0.5, 2.0, B, dtype=torch.float64)
    kw_gpu = on(kw_cpu, "cuda")
    lz, g = log_z_and_grads(kw_gpu, "cuda", upstream.cuda())
    lz_ref, g_ref = log_z_and_grads(kw_cpu, "cpu", upstream)
    assert_close("log Z", lz, lz_ref, log_z_tol(lz_ref, tol))
    for name in g:
        assert_close(f"d/d {name}", g[name], g_ref[name], tol)
    best, segs = F.viterbi(**kw_gpu, backend="cuda")
    best_ref, segs_ref = F.viterbi(**kw_cpu, backend="cpu")
    assert_close("viterbi best", best, best_ref, log_z_tol(best_ref, tol))
    if dtype == torch.float64:
        assert torch.equal(segs.cpu(), segs_ref)


SHAPES = [
    # (B, T, K, C, duration_dependent): C around 32 (a warp) and up to 128, K up to 1000
    (2, 50, 4, 1, False), (2, 50, 4, 2, False), (3, 64, 5, 31, False), (3, 64, 5, 32, False),
    (3, 64, 5, 33, True), (2, 40, 3, 64, False), (1, 30, 2, 128, False), (4, 100, 1, 5, False),
    (4, 100, 2, 5, True), (4, 120, 3, 7, False), (2, 600, 200, 6, False), (1, 1500, 1000, 4, False),
    (2, 300, 200, 3, True), (1, 1, 7, 5, False), (3, 1, 1, 1, False),
]


@pytest.mark.parametrize("algorithm", ["exp", "log"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,T,K,C,dd", SHAPES, ids=lambda *a: None)
def test_cuda_matches_cpu_kernel_at_many_shapes(monkeypatch, B, T, K, C, dd, dtype, algorithm):
    """Both CUDA algorithms (FLASHSEMICRF_CUDA_ALGORITHM: the exp-domain
    forward and backward sweep, and the log-domain ones, the default) against
    the C++ CPU kernel."""
    monkeypatch.setenv("FLASHSEMICRF_CUDA_ALGORITHM", algorithm)
    case = make_case(B * 7 + T + K + C, B, T, K, C, duration_dependent=dd, neg_inf=C % 2 == 1)
    _compare_with_cpu_kernel(on(case.kwargs, dtype=dtype), dtype, tol_scale=10.0)


@pytest.mark.parametrize("algorithm", ["exp", "log"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,T,K,C,dd", SHAPES, ids=lambda *a: None)
def test_cuda_span_parallel_sweeps(monkeypatch, B, T, K, C, dd, dtype, algorithm):
    """FLASHSEMICRF_CUDA_SWEEP=parallel (the mirror image's forward, with
    either algorithm, then one CTA a span; the (K, C, C) transition keeps the
    serial sweep) against the C++ CPU kernel."""
    monkeypatch.setenv("FLASHSEMICRF_CUDA_ALGORITHM", algorithm)
    monkeypatch.setenv("FLASHSEMICRF_CUDA_SWEEP", "parallel")
    case = make_case(B * 5 + T + K + C, B, T, K, C, duration_dependent=dd, neg_inf=C % 2 == 0)
    _compare_with_cpu_kernel(on(case.kwargs, dtype=dtype), dtype, tol_scale=10.0)
    if (B, T) == (2, 50):
        monkeypatch.setenv("FLASHSEMICRF_CUDA_SWEEP", "spans")
        with pytest.raises(RuntimeError,
                           match="FLASHSEMICRF_CUDA_SWEEP must be 'parallel' or 'serial'"):
            _compare_with_cpu_kernel(on(case.kwargs, dtype=dtype), dtype, tol_scale=10.0)


@pytest.mark.parametrize("algorithm", ["exp", "log"])
def test_cuda_forward_saves_the_mirror(monkeypatch, algorithm):
    """FLASHSEMICRF_CUDA_SWEEP=parallel: the forward op also runs the mirror
    image's forward, on a second stream, and returns 2B checkpoint rows;
    rows 0 … B-1 and log Z are the serial mode's bits, and the backward from
    the 2B rows gives the bits of the backward that runs the mirror itself
    (given B rows). The training loss under torch.compile(fullgraph=True),
    whose fake forward must say 2B rows too, agrees with eager mode."""
    monkeypatch.setenv("FLASHSEMICRF_CUDA_ALGORITHM", algorithm)
    case = make_case(31, 3, 400, 12, 5, duration_dependent=False, neg_inf=True)
    x = problem(on(case.kwargs, "cuda"))
    ops = backends.resolve("test", "cuda", "cuda")
    monkeypatch.setenv("FLASHSEMICRF_CUDA_SWEEP", "serial")
    log_z, ckpt = ops.forward(x, 40)
    monkeypatch.setenv("FLASHSEMICRF_CUDA_SWEEP", "parallel")
    log_z2, ckpt2 = ops.forward(x, 40)
    assert ckpt2.ring.shape[0] == ckpt2.offset.shape[0] == 6
    assert torch.equal(log_z, log_z2)
    assert torch.equal(ckpt.ring, ckpt2.ring[:3]) and torch.equal(ckpt.offset, ckpt2.offset[:3])
    up = torch.linspace(0.5, 2.0, 3, dtype=torch.float64, device="cuda")
    saved = ops.backward(x, up, log_z2, ckpt2, 40, True)
    itself = ops.backward(x, up, log_z, ckpt, 40, True)
    for a, b in zip(saved, itself):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    kw = on(case.kwargs, "cuda")

    def loss(scores):
        return F.log_partition(scores, kw["transition"], kw["duration"], kw["lengths"],
                               backend="cuda").sum()

    scores = kw["scores"].detach().requires_grad_()
    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(scores)
    (g_got,) = torch.autograd.grad(got, scores)
    want = loss(scores)
    (g_want,) = torch.autograd.grad(want, scores)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,T,K,C,dd", [(3, 400, 12, 5, False), (2, 300, 20, 4, True),
                                        (1, 2000, 50, 24, False)], ids=lambda *a: None)
def test_cuda_span_parallel_recompute_gives_the_same_bits(monkeypatch, B, T, K, C, dd, dtype):
    """FLASHSEMICRF_CUDA_RECOMPUTE=spans (every span recomputed at once
    before the sweeps) gives the default's gradients bit for bit."""
    case = make_case(B + T + K + C, B, T, K, C, duration_dependent=dd, neg_inf=True)
    kw = on(case.kwargs, "cuda", dtype)
    upstream = torch.linspace(0.5, 2.0, B, dtype=torch.float64, device="cuda")
    monkeypatch.setenv("FLASHSEMICRF_CUDA_RECOMPUTE", "sweep")
    lz, g = log_z_and_grads(kw, "cuda", upstream)
    monkeypatch.setenv("FLASHSEMICRF_CUDA_RECOMPUTE", "spans")
    lz2, g2 = log_z_and_grads(kw, "cuda", upstream)
    assert torch.equal(lz, lz2)
    for name in g:
        assert torch.equal(g[name], g2[name]), name
    monkeypatch.setenv("FLASHSEMICRF_CUDA_RECOMPUTE", "parallel")
    with pytest.raises(RuntimeError, match="FLASHSEMICRF_CUDA_RECOMPUTE must be 'spans' or 'sweep'"):
        log_z_and_grads(kw, "cuda", upstream)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cuda_exp_forward_adversarial(monkeypatch, dtype):
    """The CPU kernel's adversarial problems for the exp-domain forward
    (mass forced through flushed labels, revived segments, NaN, ...): the
    CUDA exp-domain forward, with its fallback to the log-domain one, gives
    the C++ kernel's log Z (tests/test_cuda_emulated.py checks on the CPU
    that both hand the same sequences over)."""
    from test_cpu_exp_domain import ADVERSARIES, op_args

    monkeypatch.setenv("FLASHSEMICRF_CUDA_ALGORITHM", "exp")
    ops = torch.ops.flashsemicrf
    for adv in ADVERSARIES:
        args = op_args(adv.kw, dtype)
        want = ops.forward(*args, 0)[0]
        got = ops.forward(*[a.cuda() if a is not None else None for a in args], 0)[0].cpu()
        nan = torch.isnan(want)  # a NaN input: NaN for its sequence only
        assert torch.equal(torch.isnan(got), nan), adv.name
        assert_close(f"{adv.name}: log Z", got[~nan], want[~nan],
                     log_z_tol(want[~nan], TOL[dtype] * 10.0))


@pytest.mark.parametrize("recompute", ["sweep", "spans"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cuda_exp_backward_hands_over(monkeypatch, dtype, recompute):
    """The exp-domain backward sweep (FLASHSEMICRF_CUDA_ALGORITHM=exp) with
    either recompute mode: row 0 puts mass at risk behind an underflowed ring
    entry (label 1's emission 720 nats down at one position, its start score
    700 up), which the sweep hands to the log-domain one (the emulator test
    checks that it does); row 1 is ordinary. Every gradient is the C++
    kernel's."""
    monkeypatch.setenv("FLASHSEMICRF_CUDA_ALGORITHM", "exp")
    monkeypatch.setenv("FLASHSEMICRF_CUDA_RECOMPUTE", recompute)
    case = make_case(17, 2, 40, 5, 3, optional=("start_scores",))
    kw = on(case.kwargs, dtype=dtype)
    kw["scores"] = kw["scores"].clone()
    kw["start_scores"] = kw["start_scores"].clone()
    kw["scores"][0, 12, 1] = -720.0
    kw["start_scores"][0, 12, 1] = 700.0
    _compare_with_cpu_kernel(kw, dtype, tol_scale=10.0)


@pytest.mark.slow
@pytest.mark.parametrize("T", [10_000, 100_000])
def test_cuda_long_sequences(T):
    case = make_case(T, 2, T, 30, 6, optional=("start_transition",))
    _compare_with_cpu_kernel(on(case.kwargs, dtype=torch.float32), torch.float32, tol_scale=10.0)


def test_cuda_low_precision_inputs():
    case = make_case(3, 2, 80, 6, 5)
    for dtype in (torch.bfloat16, torch.float16):
        kw = on(case.kwargs, "cuda", dtype)
        lz = F.log_partition(**kw, backend="cuda")
        exact = F.log_partition(**on(kw, "cpu", torch.float64), backend="cpu")
        lz32 = F.log_partition(**on(kw, "cpu", torch.float32), backend="cpu")
        # At most 2x further from float64 than the same inputs in float32.
        assert (lz.cpu().double() - exact).abs().max() <= 2 * (lz32.double() - exact).abs().max() + 1e-5


def test_cuda_on_current_stream():
    case = make_case(2, 2, 40, 5, 3)
    kw = on(case.kwargs, "cuda", torch.float32)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        lz = F.log_partition(**kw, backend="cuda")
    stream.synchronize()
    assert_close("log Z on a side stream", lz.cpu(),
                 F.log_partition(**on(kw, "cpu"), backend="cpu"), 1e-4)
