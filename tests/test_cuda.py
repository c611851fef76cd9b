"""The handwritten CUDA kernels (backend="cuda") against the reference and the CPU kernel.

Skipped without a GPU (CI has none): CI only proves the kernels compile. On a
GPU machine: `make test PYTHON=python3 PYTEST_ARGS="-m cuda"`.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashsemicrf as F
from conftest import (
    OPTIONAL,
    TOL,
    assert_close,
    log_z_and_grads,
    make_case,
    random_small_cases,
)
from flashsemicrf import _backends

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _backends.HAS_CUDA_KERNELS, reason="built without CUDA kernels"),
]


def _on(kwargs, device, dtype=None):
    out = {}
    for k, v in kwargs.items():
        v = v.to(device)
        out[k] = v.to(dtype) if (dtype is not None and v.is_floating_point()) else v
    return out



def _compare(kw_cpu, oracle_backend, dtype, tol_scale=1.0):
    """CUDA on kw (moved to the GPU) against `oracle_backend` on the CPU copy."""
    tol = TOL[dtype] * tol_scale
    B = kw_cpu["scores"].shape[0]
    upstream = torch.linspace(0.5, 2.0, B, dtype=torch.float64)
    kw_gpu = _on(kw_cpu, "cuda")
    lz, g = log_z_and_grads(kw_gpu, "cuda", upstream.cuda())
    lz_ref, g_ref = log_z_and_grads(kw_cpu, oracle_backend, upstream)
    scale = float(lz_ref[torch.isfinite(lz_ref)].abs().max()) if torch.isfinite(lz_ref).any() else 1.0
    assert_close("log Z", lz.cpu(), lz_ref, tol * max(1.0, scale))
    for name in g:
        assert_close(f"d/d {name}", g[name].cpu(), g_ref[name], tol)
    best, segs = F.viterbi(**kw_gpu, backend="cuda")
    best_ref, segs_ref = F.viterbi(**kw_cpu, backend=oracle_backend)
    assert_close("viterbi best", best.cpu(), best_ref, tol * max(1.0, scale))
    if dtype == torch.float64:
        assert torch.equal(segs.cpu(), segs_ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", random_small_cases(40, seed0=21), ids=lambda c: c.id)
def test_cuda_matches_reference_small(case, dtype):
    kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in case.kwargs.items()}
    _compare(kw, "torch", dtype)


SHAPES = [
    # (B, T, K, C, duration_dependent)
    (2, 50, 4, 1, False), (2, 50, 4, 2, False), (3, 64, 5, 31, False), (3, 64, 5, 32, False),
    (3, 64, 5, 33, True), (2, 40, 3, 64, False), (1, 30, 2, 128, False), (4, 100, 1, 5, False),
    (4, 100, 2, 5, True), (4, 120, 3, 7, False), (2, 600, 200, 6, False), (1, 1500, 1000, 4, False),
    (2, 300, 200, 3, True), (1, 1, 7, 5, False), (3, 1, 1, 1, False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,T,K,C,dd", SHAPES, ids=lambda *a: None)
def test_cuda_matches_cpu_kernel_at_many_shapes(B, T, K, C, dd, dtype):
    case = make_case(B * 7 + T + K + C, B, T, K, C, duration_dependent=dd, neg_inf=C % 2 == 1)
    kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in case.kwargs.items()}
    _compare(kw, "cpu", dtype, tol_scale=10.0)


@pytest.mark.slow
@pytest.mark.parametrize("T", [10_000, 100_000])
def test_cuda_long_sequences(T):
    case = make_case(T, 2, T, 30, 6, optional=("start_transition",))
    kw = {k: (v.float() if v.is_floating_point() else v) for k, v in case.kwargs.items()}
    _compare(kw, "cpu", torch.float32, tol_scale=10.0)


def test_cuda_low_precision_inputs():
    case = make_case(3, 2, 80, 6, 5)
    for dtype in (torch.bfloat16, torch.float16):
        kw = _on(case.kwargs, "cuda", dtype)
        lz = F.log_partition(**kw, backend="cuda")
        exact = F.log_partition(**_on(kw, "cpu", torch.float64), backend="cpu")
        lz32 = F.log_partition(**_on(kw, "cpu", torch.float32), backend="cpu")
        # SPEC habit 8: at most 2x further from float64 than the same inputs in float32.
        assert (lz.cpu().double() - exact).abs().max() <= 2 * (lz32.double() - exact).abs().max() + 1e-5


def test_cuda_deterministic_bitwise():
    case = make_case(9, 4, 300, 20, 7, neg_inf=True)
    kw = _on({k: (v.float() if v.is_floating_point() else v) for k, v in case.kwargs.items()}, "cuda")
    first = log_z_and_grads(kw, "cuda", torch.ones(4, device="cuda"))
    for _ in range(3):
        again = log_z_and_grads(kw, "cuda", torch.ones(4, device="cuda"))
        assert torch.equal(first[0], again[0])
        for name in first[1]:
            assert torch.equal(first[1][name], again[1][name]), name


def test_cuda_checkpoints_interoperate_with_cpu():
    case = make_case(5, 3, 90, 6, 4, duration_dependent=True, neg_inf=True)
    from flashsemicrf._validation import check_problem

    names = ("scores", "transition", "duration", "lengths") + OPTIONAL
    x = _backends.to_compute(check_problem("t", *(case.kwargs.get(n) for n in names)))
    xg = type(x)(*(None if t is None else t.cuda() for t in x))
    lz_c, ring_c, off_c = _backends._CPU.forward(x, 7)
    lz_g, ring_g, off_g = _backends._CUDA.forward(xg, 7)
    assert_close("log Z", lz_g.cpu(), lz_c, 1e-9)
    assert_close("checkpoint ring", ring_g.cpu(), ring_c, 1e-9)
    up = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)
    g_cross = _backends._CUDA.backward(xg, up.cuda(), lz_c.cuda(), ring_c.cuda(), off_c.cuda(), 7, True)
    g_ref = _backends._CPU.backward(x, up, lz_c, ring_c, off_c, 7, True)
    for name, a, b in zip(g_ref._fields, g_cross, g_ref):
        assert_close(name, a.cpu(), b, 1e-9)


def test_cuda_on_current_stream_and_second_device_guard():
    case = make_case(2, 2, 40, 5, 3)
    kw = _on({k: (v.float() if v.is_floating_point() else v) for k, v in case.kwargs.items()}, "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        lz = F.log_partition(**kw, backend="cuda")
    stream.synchronize()
    assert_close("log Z on a side stream", lz.cpu(), F.log_partition(**_on(kw, "cpu"), backend="cpu"), 1e-4)


def test_cuda_compile_matches_eager():
    case = make_case(4, 2, 33, 5, 4, optional=("start_scores", "end_transition"))
    kw = _on({k: (v.float() if v.is_floating_point() else v) for k, v in case.kwargs.items()}, "cuda")

    def fn(**k):
        return F.log_partition(**k, backend="cuda")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    assert_close("compiled", compiled(**kw).cpu(), fn(**kw).cpu(), 1e-5)


def test_cuda_no_valid_segmentation():
    case = make_case(4, 2, 5, 3, 2)
    kw = _on(case.kwargs, "cuda")
    kw["duration"] = kw["duration"].clone()
    kw["duration"][:] = -math.inf
    kw["duration"][1, :] = 0.0
    kw["lengths"] = torch.tensor([5, 4], device="cuda")
    leaves = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in kw.items()}
    log_z = F.log_partition(**leaves, backend="cuda")
    assert log_z[0].item() == -math.inf and math.isfinite(log_z[1].item())
    log_z.sum().backward()
    assert not torch.isnan(leaves["scores"].grad).any()
