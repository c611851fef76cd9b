"""SemiCRFDistribution.kl and .cross_entropy against enumeration: values from the
oracle's brute force, gradients from a differentiable enumeration written here
(every segmentation's score as a torch expression, softmax over them)."""

from __future__ import annotations

import math

import pytest
import torch

import flashsemicrf as F
from conftest import OPTIONAL, assert_close, backend_param, make_case
from oracles import brute_force, enumerate_segmentations

TOL = 1e-9
FLOAT_NAMES = ("scores", "transition", "duration") + OPTIONAL


def dist(tensors: dict, backend="auto") -> F.SemiCRFDistribution:
    t = dict(tensors)
    return F.SemiCRFDistribution(t.pop("scores"), t.pop("transition"), t.pop("duration"),
                                 **t, backend=backend)


def enumerated(t: dict, b: int, L: int, K: int, C: int) -> torch.Tensor:
    """The scores of every segmentation of sequence b, differentiable."""
    out = []
    for seg in enumerate_segmentations(L, K, C):
        total = t["scores"].new_zeros(())
        prev = None
        for s, d, c in seg:
            total = total + t["scores"][b, s:s + d, c].sum() + t["duration"][d - 1, c]
            if prev is None:
                if "start_transition" in t:
                    total = total + t["start_transition"][c]
            else:
                tr = t["transition"]
                total = total + (tr[prev, c] if tr.dim() == 2 else tr[d - 1, prev, c])
            if "start_scores" in t:
                total = total + t["start_scores"][b, s, c]
            if "end_scores" in t:
                total = total + t["end_scores"][b, s + d - 1, c]
            if s + d == L and "end_transition" in t:
                total = total + t["end_transition"][c]
            prev = c
        out.append(total)
    return torch.stack(out)


def enumerated_divergences(p: dict, q: dict, lengths, K: int, C: int):
    """(cross_entropy, kl) (B,) by enumeration (finite potentials only)."""
    ce, kl = [], []
    for b, L in enumerate(lengths.tolist()):
        sp, sq = enumerated(p, b, L, K, C), enumerated(q, b, L, K, C)
        log_p, log_q = torch.log_softmax(sp, 0), torch.log_softmax(sq, 0)
        prob = log_p.exp()
        used = prob > 0  # segmentations p forbids add nothing (and no NaN gradient)
        zero = torch.zeros_like(prob)
        ce.append(-torch.where(used, prob * torch.where(used, log_q, zero), zero).sum())
        kl.append(torch.where(used, prob * torch.where(used, log_p - log_q, zero), zero).sum())
    return torch.stack(ce), torch.stack(kl)


def floats(case) -> dict:
    return {k: v for k, v in case.kwargs.items() if k != "lengths"}


PAIRS = [
    # (p, q): both transition forms, every optional input, ragged lengths
    (dict(duration_dependent=False), dict(duration_dependent=False)),
    (dict(duration_dependent=True), dict(duration_dependent=True)),
    (dict(duration_dependent=False), dict(duration_dependent=True)),
    (dict(duration_dependent=True, optional=()), dict(duration_dependent=False)),
    (dict(duration_dependent=False), dict(duration_dependent=False, optional=("end_scores",))),
]


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_values_match_brute_force(i):
    B, T, K, C = 3, 6, 3, 2
    pa, qa = PAIRS[i]
    p = make_case(100 + i, B, T, K, C, **pa)
    q = make_case(150 + i, B, T, K, C, **qa)
    q.tensors["lengths"] = p.tensors["lengths"]
    lengths = p.kwargs["lengths"]
    dp, dq = dist(p.kwargs), dist(q.kwargs)
    bp = brute_force(**p.kwargs)
    bq = brute_force(**q.kwargs)
    ce_expected, kl_expected = [], []
    for b in range(B):
        ce = kl = 0.0
        for seg, prob in bp.distribution[b].items():
            log_q = bq.scores[b][seg] - float(bq.log_partition[b])
            ce -= prob * log_q
            kl += prob * (math.log(prob) - log_q)
        ce_expected.append(ce)
        kl_expected.append(kl)
    assert_close("cross_entropy", dp.cross_entropy(dq), torch.tensor(ce_expected, dtype=torch.float64), TOL)
    assert_close("kl", dp.kl(dq), torch.tensor(kl_expected, dtype=torch.float64), TOL)
    assert_close("kl(p, p)", dp.kl(dp), torch.zeros(B), TOL)
    assert_close("cross_entropy(p, p) = entropy", dp.cross_entropy(dp), dp.entropy, TOL)
    assert lengths.shape == (B,)


@pytest.mark.parametrize("i", range(len(PAIRS)))
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gradients_in_both_arguments_match_enumeration(i, backend):
    B, T, K, C = 2, 5, 3, 2
    pa, qa = PAIRS[i]
    p = make_case(200 + i, B, T, K, C, **pa)
    q = make_case(300 + i, B, T, K, C, **qa)
    q.tensors["lengths"] = p.tensors["lengths"]
    lengths = p.kwargs["lengths"]
    upstream = torch.tensor([0.7, -1.3], dtype=torch.float64)
    for which in ("cross_entropy", "kl"):
        lp, lq = p.leaves(), q.leaves()
        fp, fq = {k: v for k, v in lp.items() if k != "lengths"}, \
                 {k: v for k, v in lq.items() if k != "lengths"}
        got = getattr(dist(lp, backend), which)(dist(lq, backend))
        ce, kl = enumerated_divergences(fp, fq, lengths, K, C)
        expected = ce if which == "cross_entropy" else kl
        assert_close(which, got, expected, TOL)
        inputs = list(fp.values()) + list(fq.values())
        g_got = torch.autograd.grad((got * upstream).sum(), inputs)
        g_exp = torch.autograd.grad((expected * upstream).sum(), inputs)
        names = [f"p.{n}" for n in fp] + [f"q.{n}" for n in fq]
        for n, a, e in zip(names, g_got, g_exp):
            assert_close(f"d {which} / d {n}", a, e, 1e-8)


def test_forbidden_parts_give_inf_or_zero():
    B, T, K, C = 3, 5, 2, 2
    p = make_case(9, B, T, K, C, neg_inf=True)  # sequence 2 has no segmentation
    q = make_case(9, B, T, K, C, neg_inf=True)
    q.tensors = {k: (v if k == "lengths" else v + 0.3 * torch.randn_like(v))
                 for k, v in q.tensors.items()}
    # q forbids label 1 entirely at position 0 of sequence 1: +inf there when p may use it
    q.tensors["scores"] = q.tensors["scores"].clone()
    q.tensors["scores"][1, 0, :] = -math.inf
    dp, dq = dist(p.kwargs), dist(q.kwargs)
    bp, bq = brute_force(**p.kwargs), brute_force(**q.kwargs)
    ce = dp.cross_entropy(dq)
    kl = dp.kl(dq)
    for b in range(B):
        if not bp.distribution[b]:
            assert float(ce[b]) == 0.0 and float(kl[b]) == 0.0
            continue
        expected_ce, expected_kl = 0.0, 0.0
        for seg, prob in bp.distribution[b].items():
            if bq.scores[b][seg] == -math.inf:  # q forbids a segmentation p may take
                expected_ce = expected_kl = math.inf
                break
            log_q = bq.scores[b][seg] - float(bq.log_partition[b])
            expected_ce -= prob * log_q
            expected_kl += prob * (math.log(prob) - log_q)
        assert_close(f"cross_entropy[{b}]", ce[b], expected_ce, TOL)
        assert_close(f"kl[{b}]", kl[b], expected_kl, TOL)
    assert float(ce[1]) == math.inf and float(ce[2]) == 0.0


def test_float32_and_mismatched_inputs():
    p = make_case(8, 2, 7, 3, 3, dtype=torch.float32)
    q = make_case(9, 2, 7, 3, 3, dtype=torch.float32)
    q.tensors["lengths"] = p.tensors["lengths"]
    got = dist(p.kwargs).kl(dist(q.kwargs))
    assert got.dtype == torch.float32 and got.shape == (2,)
    p64 = {k: (v.double() if v.is_floating_point() else v) for k, v in p.kwargs.items()}
    q64 = {k: (v.double() if v.is_floating_point() else v) for k, v in q.kwargs.items()}
    assert_close("float32 kl", got, dist(p64).kl(dist(q64)), 1e-4)
    other = make_case(9, 2, 7, 2, 3)
    with pytest.raises(ValueError, match="longest duration K"):
        dist(p.kwargs).kl(dist(other.kwargs))
    shorter = dict(q.kwargs, lengths=q.kwargs["lengths"].clamp(max=3))
    with pytest.raises(ValueError, match="same lengths"):
        dist(p.kwargs).cross_entropy(dist(shorter))
    with pytest.raises(TypeError, match="SemiCRFDistribution"):
        dist(p.kwargs).kl(q.kwargs)


def test_gradients_with_forbidden_parts_match_enumeration():
    # −inf in both models (the same parts forbidden): finite divergences whose
    # gradients must be exact, not NaN, on the allowed parts.
    B, T, K, C = 2, 5, 2, 2
    p = make_case(18, B, T, K, C, neg_inf=True)
    lp = p.leaves()
    lq = {k: (v if k == "lengths" else (v.detach() + 0.5 * torch.randn_like(v)).requires_grad_())
          for k, v in lp.items()}
    fp = {k: v for k, v in lp.items() if k != "lengths"}
    fq = {k: v for k, v in lq.items() if k != "lengths"}
    got = dist(lp).kl(dist(lq))
    ce, kl = enumerated_divergences(fp, fq, p.kwargs["lengths"], K, C)
    assert_close("kl", got, kl, TOL)
    inputs = list(fp.values()) + list(fq.values())
    g_got = torch.autograd.grad(got.sum(), inputs)
    assert bool(torch.isfinite(kl).all())
    g_exp = torch.autograd.grad(kl.sum(), inputs)
    for n, a, e in zip(list(fp) + list(fq), g_got, g_exp):
        assert_close(f"d kl / d {n}", a, e, 1e-8)


@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_values_on_triton(backend):
    p = make_case(61, 2, 5, 3, 2, duration_dependent=True)
    q = make_case(62, 2, 5, 3, 2)
    q.tensors["lengths"] = p.tensors["lengths"]
    for which in ("cross_entropy", "kl"):
        got = getattr(dist(p.kwargs, backend), which)(dist(q.kwargs, backend))
        expected = getattr(dist(p.kwargs, "torch"), which)(dist(q.kwargs, "torch"))
        assert_close(which, got, expected, 1e-9)
