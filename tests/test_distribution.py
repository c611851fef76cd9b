"""SemiCRFDistribution (flashsemicrf/distribution.py) against the functional API,
and log_prob as a normalised distribution over every segmentation of tiny problems."""

from __future__ import annotations

import pytest
import torch

import flashsemicrf as F
from conftest import OPTIONAL, assert_close, make_case
from oracles import enumerate_segmentations, segments_to_tensor

TOL64 = 1e-9

CASES = [
    make_case(11, 3, 13, 4, 3),
    make_case(12, 2, 9, 3, 2, duration_dependent=True),
    make_case(13, 3, 10, 5, 3, optional=(), ragged=False),
    make_case(14, 2, 12, 3, 3, neg_inf=True),
]


def split(case):
    kw = case.kwargs
    return (kw.pop("scores"), kw.pop("transition"), kw.pop("duration")), kw


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_methods_equal_the_functional_api(case):
    args, kw = split(case)
    dist = F.SemiCRFDistribution(*args, **kw)
    assert (dist.batch_size, dist.num_labels, dist.max_duration) == (case.B, case.C, case.K)
    assert_close("log_partition", dist.log_partition, F.log_partition(*args, **kw), TOL64)
    assert dist.partition is dist.log_partition
    m, m_api = dist.marginals, F.marginals(*args, **kw)
    assert_close("marginals.labels", m.labels, m_api.labels, TOL64)
    assert_close("marginals.starts", m.starts, m_api.starts, TOL64)
    best, seg = F.viterbi(*args, **kw)
    assert torch.equal(dist.argmax, seg)
    assert_close("max", dist.max, best, TOL64)
    assert_close("entropy", dist.entropy, F.entropy(*args, **kw), TOL64)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    expected = F.sample(*args, **kw, num_samples=3, generator=g2)
    assert torch.equal(dist.sample(3, generator=g1), expected)
    live = torch.isfinite(best)
    assert_close("score(argmax)", dist.score(seg)[live], best[live], TOL64)
    if bool(live.all()):
        expected = F.score(seg, *args, **kw) - F.log_partition(*args, **kw)
        assert_close("log_prob(argmax)", dist.log_prob(seg), expected, TOL64)


def test_log_partition_is_cached_and_log_prob_reuses_it(monkeypatch):
    case = CASES[0]
    args, kw = split(case)
    dist = F.SemiCRFDistribution(*args, **kw)
    calls = []
    real = F.api.log_partition
    monkeypatch.setattr(F.api, "log_partition", lambda *a, **k: calls.append(1) or real(*a, **k))
    samples = dist.sample(4)
    for i in range(4):
        dist.log_prob(samples[samples[:, 0] == i, 1:])
    assert dist.log_partition is dist.log_partition
    assert len(calls) == 1
    assert dist.marginals is dist.marginals and dist.entropy is dist.entropy


def test_log_prob_is_differentiable():
    case = make_case(21, 2, 11, 3, 3)
    leaves = case.leaves()
    names = [n for n in ("scores", "transition", "duration") + OPTIONAL if n in leaves]
    args = [leaves.pop(n) for n in ("scores", "transition", "duration")]
    dist = F.SemiCRFDistribution(*args, **leaves)
    seg = dist.argmax
    lp = dist.log_prob(seg)
    assert bool((lp <= 1e-9).all()) and bool((lp > -float("inf")).all())
    inputs = args + [leaves[n] for n in names[3:]]
    g = torch.autograd.grad(lp.sum(), inputs)
    g_api = torch.autograd.grad((-F.nll(seg, *args, **leaves)).sum(), inputs)
    for n, a, b in zip(names, g, g_api):
        assert_close(f"d log_prob / d {n}", a, b, TOL64)


@pytest.mark.parametrize("duration_dependent", [False, True])
@pytest.mark.parametrize("L,T,K,C", [(5, 5, 3, 2), (4, 6, 4, 2), (3, 3, 2, 3)])
def test_log_prob_sums_to_one_over_all_segmentations(L, T, K, C, duration_dependent):
    """Σ over every segmentation of exp(log_prob) = 1, each log_prob ≤ 0 (padding past L)."""
    case = make_case(31 + L, 1, T, K, C, duration_dependent=duration_dependent, ragged=False)
    everything = enumerate_segmentations(L, K, C)
    n = len(everything)
    # One batch row per segmentation: the same sequence repeated n times.
    kw = case.kwargs
    for name in ("scores", "start_scores", "end_scores"):
        kw[name] = kw[name].expand(n, T, C)
    kw["lengths"] = torch.full((n,), L, dtype=torch.long)
    args = [kw.pop(k) for k in ("scores", "transition", "duration")]
    dist = F.SemiCRFDistribution(*args, **kw)
    lp = dist.log_prob(segments_to_tensor(everything))  # (n,)
    print(f"{n} segmentations, max log_prob {lp.max().item():.3f}")
    assert bool((lp <= 1e-12).all())
    assert_close("Σ exp(log_prob)", lp.exp().sum(), torch.tensor(1.0), 1e-10)
    assert_close("entropy", dist.entropy[0], -(lp.exp() * lp).sum(), 1e-10)


def test_bad_input_names_the_argument():
    args, kw = split(CASES[0])
    with pytest.raises(ValueError, match="transition"):
        F.SemiCRFDistribution(args[0], args[1][:, :2], args[2], **kw)
    with pytest.raises(ValueError, match="duration"):
        F.SemiCRFDistribution(args[0], args[1], args[2][:, :2], **kw)
    with pytest.raises(ValueError, match="lengths"):
        F.SemiCRFDistribution(*args, **{**kw, "lengths": kw["lengths"] + 100})
    with pytest.raises(ValueError, match="start_scores"):
        F.SemiCRFDistribution(*args, **{**kw, "start_scores": kw["start_scores"][:, :3]})
    with pytest.raises(ValueError, match="backend"):
        F.SemiCRFDistribution(*args, **kw, backend="gpu")
    dist = F.SemiCRFDistribution(*args, **kw)
    bad = dist.argmax.clone()
    bad[0, 3] = 99
    with pytest.raises(ValueError, match="segments"):
        dist.log_prob(bad)
    with pytest.raises(ValueError, match="num_samples"):
        dist.sample(0)
    assert "SemiCRFDistribution(B=3" in repr(dist)
