"""The plain-PyTorch reference (backend="torch") against independent oracles.

Brute-force enumeration on ≥ 200 small random problems (every function of the
public API), the dense O(T·K·C²) autograd DP at T ≈ 50–100, and the two
external packages through the mappings of README, "Coming from flash-semicrf
or torch-struct". What every backend shares (gradcheck, exact sampling, edge
cases) is in test_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashsemicrf as F
from conftest import GRAD_NAMES, assert_close, make_case, problem, random_small_cases
from flashsemicrf import reference
from oracles import brute_force, dense_log_partition, segments_to_tensor

TOL = 1e-9
SMALL = random_small_cases(240, seed0=1)


def _dense_gradients(case, upstream):
    leaves = case.leaves()
    log_z = dense_log_partition(**leaves)
    live = torch.isfinite(log_z)
    total = (torch.where(live, log_z, torch.zeros_like(log_z)) * upstream).sum()
    names = [n for n in GRAD_NAMES if n in leaves]
    grads = torch.autograd.grad(total, [leaves[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, grads)}


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.id)
def test_log_partition_and_gradients_match_oracles(case):
    oracle = brute_force(**case.kwargs)
    leaves = case.leaves()
    log_z = F.log_partition(**leaves, backend="torch")
    assert_close("log Z", log_z, oracle.log_partition, TOL)

    # A non-uniform upstream gradient, with zero for sequences at -inf.
    upstream = torch.linspace(0.5, 2.0, case.B, dtype=torch.float64)
    names = [n for n in GRAD_NAMES if n in leaves]
    total = (torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z)) * upstream).sum()
    grads = torch.autograd.grad(total, [leaves[n] for n in names], allow_unused=True)
    expected = _dense_gradients(case, upstream)
    for name, got in zip(names, grads):
        got = torch.zeros_like(leaves[name]) if got is None else got
        assert_close(f"d logZ / d {name}", got, expected[name], TOL)

    # d log Z / d scores is the label marginal (brute force, upstream 1).
    m = F.marginals(**case.kwargs, backend="torch")
    assert_close("marginals.log_partition", m.log_partition, oracle.log_partition, TOL)
    assert_close("marginals.labels", m.labels, oracle.label_marginals, TOL)
    assert_close("marginals.starts", m.starts, oracle.start_marginals, TOL)
    assert_close("entropy", F.entropy(**case.kwargs, backend="torch"), oracle.entropy, 1e-8)


@pytest.mark.parametrize("case", SMALL[:120], ids=lambda c: c.id)
def test_viterbi_score_and_nll_match_brute_force(case):
    oracle = brute_force(**case.kwargs)
    best, segments = F.viterbi(**case.kwargs, backend="torch")
    assert_close("viterbi best", best, oracle.best, TOL)
    feasible = [b for b in range(case.B) if oracle.best[b] > -math.inf]
    # The returned segmentation attains the best score.
    rows = segments.tolist()
    for b in range(case.B):
        mine = tuple((s, d, c) for (bb, s, d, c) in rows if bb == b)
        if b in feasible:
            assert_close(f"score of the Viterbi path of b={b}", oracle.scores[b][mine], oracle.best[b], TOL)
        else:
            assert mine == ()
    if len(feasible) < case.B:
        return
    # score and nll of a random segmentation per sequence, and of the best one.
    g = torch.Generator().manual_seed(case.seed)
    chosen = []
    for b in range(case.B):
        options = list(oracle.scores[b])
        chosen.append(options[int(torch.randint(len(options), (1,), generator=g))])
    segs = segments_to_tensor(chosen)
    got = F.score(segs, **case.kwargs, backend="torch")
    assert_close("score", got, [oracle.scores[b][chosen[b]] for b in range(case.B)], TOL)
    nll = F.nll(segments, **case.kwargs, backend="torch")
    assert_close("nll of the Viterbi path", nll, oracle.log_partition - oracle.best, TOL)
    assert (nll >= -1e-9).all()


@pytest.mark.parametrize("interval", [1, 2, 3, 5])
@pytest.mark.parametrize("duration_dependent", [False, True])
def test_checkpoint_interval_does_not_change_results(interval, duration_dependent):
    case = make_case(7, 3, 13, 4, 3, duration_dependent=duration_dependent, neg_inf=True)
    p = problem(case.kwargs)
    full = 100
    lz_a, ck_a = reference.forward(p, interval)
    lz_b, ck_b = reference.forward(p, full)
    assert_close("log Z across intervals", lz_a, lz_b, 1e-12)
    up = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    ga = reference.backward(p, up, lz_a, ck_a, interval, True, True)
    gb = reference.backward(p, up, lz_b, ck_b, full, True, True)
    for name, a, b in zip(ga._fields, ga, gb):
        assert_close(name, a, b, 1e-12)


@pytest.mark.parametrize("duration_dependent", [False, True])
@pytest.mark.parametrize("T,K,C", [(64, 6, 3), (100, 12, 2), (50, 60, 2)])
def test_dense_dp_at_moderate_length(T, K, C, duration_dependent):
    case = make_case(T * 7 + K, 3, T, K, C, duration_dependent=duration_dependent)
    leaves = case.leaves()
    log_z = F.log_partition(**leaves, backend="torch")
    upstream = torch.tensor([1.0, 0.3, -1.7], dtype=torch.float64)
    names = [n for n in GRAD_NAMES if n in leaves]
    grads = torch.autograd.grad((log_z * upstream).sum(), [leaves[n] for n in names])
    dense = case.leaves()
    expected_z = dense_log_partition(**dense)
    expected = torch.autograd.grad((expected_z * upstream).sum(), [dense[n] for n in names])
    assert_close("log Z", log_z, expected_z, 1e-9)
    for name, a, b in zip(names, grads, expected):
        assert_close(f"d/d {name}", a, b, 1e-9)


def test_samples_are_reproducible_with_a_generator():
    case = make_case(2, 2, 6, 3, 3)
    a = F.sample(**case.kwargs, num_samples=3, generator=torch.Generator().manual_seed(5))
    b = F.sample(**case.kwargs, num_samples=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_float32_reference_tracks_float64():
    case = make_case(9, 2, 200, 8, 4, scale=3.0)
    lz64 = F.log_partition(**case.kwargs, backend="torch")
    kw32 = {k: (v.float() if v.is_floating_point() else v) for k, v in case.kwargs.items()}
    lz32 = F.log_partition(**kw32, backend="torch")
    assert lz32.dtype == torch.float32
    assert_close("float32 log Z (relative)", (lz32.double() - lz64) / lz64.abs(), torch.zeros(2), 1e-6)
    m64 = F.marginals(**case.kwargs, backend="torch").labels
    m32 = F.marginals(**kw32, backend="torch").labels
    assert_close("float32 label marginals", m32, m64, 1e-4)


@pytest.mark.oracle
@pytest.mark.parametrize("seed", range(6))
def test_flash_semicrf_mapping(seed):
    pytest.importorskip("flash_semicrf")
    from oracles import flash_semicrf_log_partition

    case = make_case(seed, 3, 12, 4, 3, optional=("start_scores", "end_scores"))
    kw = case.kwargs
    phantom = kw["transition"].logsumexp(0)
    ours = F.log_partition(**kw, start_transition=phantom, backend="torch")
    theirs = flash_semicrf_log_partition(
        kw["scores"], kw["transition"], kw["duration"], kw["lengths"],
        start_scores=kw["start_scores"], end_scores=kw["end_scores"],
    )
    assert_close("log Z vs flash-semicrf", ours, theirs, 1e-8)
    best, _ = F.viterbi(**kw, start_transition=kw["transition"].amax(0), backend="torch")
    theirs_best = flash_semicrf_log_partition(
        kw["scores"], kw["transition"], kw["duration"], kw["lengths"], semiring="max",
        start_scores=kw["start_scores"], end_scores=kw["end_scores"],
    )
    assert_close("Viterbi vs flash-semicrf", best, theirs_best, 1e-8)


@pytest.mark.oracle
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("duration_dependent", [False, True])
def test_torch_struct_mapping(seed, duration_dependent):
    pytest.importorskip("torch_struct")
    from oracles import torch_struct_log_partition

    # torch-struct 0.5 mishandles ragged batches (its issue #110): full length,
    # one sequence at a time inside the helper.
    case = make_case(seed, 2, 9, 4, 3, duration_dependent=duration_dependent, ragged=False,
                     optional=("end_transition", "start_scores", "end_scores"))
    kw = case.kwargs
    start = kw["transition"].logsumexp(0)
    if duration_dependent:
        start = None  # the phantom start depends on d: compare the exact model
    leaves = case.leaves()
    ours = F.log_partition(**leaves, start_transition=start, backend="torch")
    theirs_leaves = case.leaves()
    theirs = torch_struct_log_partition(
        **theirs_leaves, start_transition=start, phantom_start=start is not None
    )
    assert_close("log Z vs torch-struct", ours, theirs, 1e-8)
    ours.sum().backward()
    theirs.sum().backward()
    assert_close("d/d scores vs torch-struct", leaves["scores"].grad, theirs_leaves["scores"].grad, 1e-8)


def test_low_precision_inputs_compute_in_float32():
    case = make_case(8, 2, 10, 3, 3)
    for dtype in (torch.bfloat16, torch.float16):
        kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in case.kwargs.items()}
        lz = F.log_partition(**kw)
        assert lz.dtype == torch.float32
        # Same inputs (rounded to dtype) in float64: the difference is float32 rounding only.
        exact = F.log_partition(**{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()})
        assert_close(f"{dtype} log Z", lz, exact, 1e-4)
        leaves = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in kw.items()}
        F.log_partition(**leaves).sum().backward()
        assert leaves["scores"].grad.dtype == dtype
