"""The SemiCRF head (flashsemicrf/nn.py): shapes, equality with the functional API
and with brute force, NLL, gradients, centring, decoding, duration priors, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import flashsemicrf as F
from conftest import assert_close
from flashsemicrf.nn import (
    geometric_log_pmf,
    negative_binomial_log_pmf,
    poisson_log_pmf,
    soft_uniform_log_pmf,
)
from oracles import brute_force

B, T, C, K, H = 3, 17, 3, 5, 6
TOL64 = 1e-9

CONFIGS = {
    "plain": dict(),
    "scores-in": dict(hidden_dim=None),
    "kcc-boundary": dict(duration_dependent_transition=True, boundary_projections=True),
    "geometric": dict(duration_prior="geometric", duration_mean=2.5),
    "poisson": dict(duration_prior="poisson", duration_mean=[1.5, 3.0, 4.0]),
    "negbin-centred": dict(duration_prior="negative_binomial", duration_mean=3.0,
                           duration_dispersion=2.0, centering="mean", boundary_projections=True),
    "uniform": dict(duration_prior="uniform", duration_range=(2.0, 4.0)),
    "no-start-end": dict(start_end_transitions=False),
    "allowed": dict(allowed_transitions=torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 1]]).bool()),
}


def make_head(name: str, seed: int = 0, K: int = K, **extra) -> F.SemiCRF:
    """A float64 head with every parameter randomised (zeros would hide mistakes)."""
    kw = dict(hidden_dim=H)
    kw.update(CONFIGS[name])
    kw.update(extra)
    torch.manual_seed(seed)
    head = F.SemiCRF(C, K, **kw).double()
    with torch.no_grad():
        for pname, p in head.named_parameters():
            if pname in ("transition", "duration", "start_transition", "end_transition"):
                p.normal_()
    return head


def make_input(head: F.SemiCRF, seed: int = 1, B: int = B, T: int = T):
    g = torch.Generator().manual_seed(seed)
    width = head.hidden_dim or head.num_labels
    hidden = torch.randn(B, T, width, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    return hidden, lengths


def gold(head, hidden, lengths, seed=2):
    """A random valid segmentation (drawn from the head's own distribution)."""
    g = torch.Generator().manual_seed(seed)
    return head.sample(hidden, lengths, generator=g)[:, 1:]


def explicit_potentials(head: F.SemiCRF, hidden: torch.Tensor, lengths: torch.Tensor) -> dict:
    """The model's inputs written out by hand from the head's parameters."""
    def linear(layer):
        return hidden @ layer.weight.T + layer.bias

    scores = hidden if head.projection is None else linear(head.projection)
    if head.centering == "mean":
        means = torch.stack([scores[b, : int(L)].mean(0) for b, L in enumerate(lengths)])
        scores = scores - means[:, None, :]
    transition = head.transition
    if head.allowed_transitions is not None:
        transition = torch.where(head.allowed_transitions, transition, float("-inf"))
    boundary = {}
    if head.start_projection is not None:
        boundary["start_scores"] = linear(head.start_projection)
        boundary["end_scores"] = linear(head.end_projection)
    return dict(scores=scores, transition=transition, duration=head.duration_scores(),
                lengths=lengths, start_transition=head.start_transition,
                end_transition=head.end_transition, **boundary)


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes(name):
    head = make_head(name)
    hidden, lengths = make_input(head)
    assert head.log_partition(hidden, lengths).shape == (B,)
    seg = gold(head, hidden, lengths)
    assert head(hidden, seg, lengths).shape == ()
    assert head.loss(hidden, seg, lengths, reduction="none").shape == (B,)
    assert head.loss(hidden, seg, lengths, reduction="sum").shape == ()
    assert head.score(hidden, seg, lengths).shape == (B,)
    best, dec = head.decode(hidden, lengths, return_scores=True)
    assert best.shape == (B,) and dec.dim() == 2 and dec.shape[1] == 4 and dec.dtype == torch.long
    m = head.marginals(hidden, lengths)
    assert m.log_partition.shape == (B,) and m.labels.shape == (B, T, C)
    assert m.starts.shape == (B, T)
    assert head.entropy(hidden, lengths).shape == (B,)
    s = head.sample(hidden, lengths, num_samples=4)
    assert s.shape[1] == 5 and set(s[:, 0].tolist()) == {0, 1, 2, 3}
    assert head.duration_scores().shape == (K, C)
    assert head.potentials(hidden, lengths)["scores"].shape == (B, T, C)
    assert head.log_partition(hidden).shape == (B,)  # lengths default to T


@pytest.mark.parametrize("name", CONFIGS)
def test_log_partition_equals_functional_api(name):
    head = make_head(name)
    hidden, lengths = make_input(head)
    pot = explicit_potentials(head, hidden, lengths)
    assert_close("log Z", head.log_partition(hidden, lengths), F.log_partition(**pot), TOL64)
    assert_close("log Z via potentials", head.log_partition(hidden, lengths),
                 F.log_partition(**head.potentials(hidden, lengths)), 0.0)
    m_head, m_api = head.marginals(hidden, lengths), F.marginals(**pot)
    assert_close("label marginals", m_head.labels, m_api.labels, TOL64)
    assert_close("start marginals", m_head.starts, m_api.starts, TOL64)
    assert_close("entropy", head.entropy(hidden, lengths), F.entropy(**pot), TOL64)


@pytest.mark.parametrize("name", ["kcc-boundary", "negbin-centred", "allowed"])
def test_log_partition_equals_brute_force(name):
    head = make_head(name)
    hidden, lengths = make_input(head, B=2, T=6)
    pot = {k: v.detach() for k, v in explicit_potentials(head, hidden, lengths).items()
           if v is not None and k != "lengths"}
    bf = brute_force(lengths=lengths, **pot)
    assert_close("log Z vs brute force", head.log_partition(hidden, lengths), bf.log_partition, TOL64)
    best, _ = head.decode(hidden, lengths, return_scores=True)
    assert_close("Viterbi vs brute force", best, bf.best, TOL64)


@pytest.mark.parametrize("name", CONFIGS)
def test_nll_is_log_z_minus_score_and_nonnegative(name):
    head = make_head(name)
    hidden, lengths = make_input(head)
    for seed in range(3):
        seg = gold(head, hidden, lengths, seed)
        per_seq = head.loss(hidden, seg, lengths, reduction="none")
        expected = head.log_partition(hidden, lengths) - head.score(hidden, seg, lengths)
        assert_close("nll", per_seq, expected, TOL64)
        assert bool((per_seq >= -1e-9).all()), per_seq
        assert_close("mean nll", head(hidden, seg, lengths), per_seq.mean(), TOL64)
        total = head.loss(hidden, seg, lengths, reduction="sum")
        assert_close("sum nll", total, per_seq.sum(), TOL64)
        pot = explicit_potentials(head, hidden, lengths)
        assert_close("nll vs F.nll", per_seq, F.nll(seg, **pot), TOL64)


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_parameter(name):
    head = make_head(name)
    hidden, lengths = make_input(head)
    hidden.requires_grad_(True)
    seg = gold(head, hidden, lengths)
    head(hidden, seg, lengths).backward()
    params = dict(head.named_parameters())
    expected = {"transition"}
    if head.hidden_dim is not None:
        expected |= {"projection.weight", "projection.bias"}
    assert expected <= set(params)
    for pname, p in params.items():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname}: non-finite gradient {p.grad}"
        assert p.grad.abs().sum() > 0, f"{pname}: zero gradient"
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    if head.allowed_transitions is not None:
        assert (head.transition.grad[~head.allowed_transitions] == 0).all()


def test_gradients_match_functional_api():
    head = make_head("negbin-centred")
    hidden, lengths = make_input(head)
    seg = gold(head, hidden, lengths)
    names = [n for n, _ in head.named_parameters()]
    g_head = torch.autograd.grad(head(hidden, seg, lengths), list(head.parameters()))
    g_api = torch.autograd.grad(F.nll(seg, **explicit_potentials(head, hidden, lengths)).mean(),
                                list(head.parameters()))
    for n, a, b in zip(names, g_head, g_api):
        assert_close(f"grad {n}", a, b, TOL64)


@pytest.mark.parametrize("kcc", [False, True])
def test_centring_is_the_stated_duration_shift(kcc):
    """Centred model of sequence b == uncentred model with duration − mean[b, c]·d."""
    centred = make_head("plain", boundary_projections=True, duration_dependent_transition=kcc,
                        centering="mean")
    plain = make_head("plain", boundary_projections=True, duration_dependent_transition=kcc)
    plain.load_state_dict(centred.state_dict())
    hidden, lengths = make_input(centred, B=4, T=23)
    hidden = hidden * 3 + 2  # a large mean makes a wrong shift obvious
    shift = centred.centering_shift(hidden, lengths)  # (B, K, C)
    assert shift.shape == (4, K, C)
    scores = plain.potentials(hidden, lengths)["scores"]
    d = torch.arange(1, K + 1, dtype=torch.float64)
    for b in range(4):
        L = int(lengths[b])
        mean = scores[b, :L].mean(0)
        assert_close("shift", shift[b], -mean[None, :] * d[:, None], TOL64)
    seg = gold(centred, hidden, lengths)
    log_z, nll = centred.log_partition(hidden, lengths), centred.loss(hidden, seg, lengths, reduction="none")
    best, _ = centred.decode(hidden, lengths, return_scores=True)
    for b in range(4):
        L = int(lengths[b])
        pot = plain.potentials(hidden[b:b + 1, :L])
        pot["duration"] = pot["duration"] + shift[b]
        seg_b = seg[seg[:, 0] == b].clone()
        seg_b[:, 0] = 0
        assert_close(f"log Z[{b}]", log_z[b:b + 1], F.log_partition(**pot), 1e-8)
        assert_close(f"nll[{b}]", nll[b:b + 1], F.nll(seg_b, **pot), 1e-8)
        assert_close(f"viterbi[{b}]", best[b:b + 1], F.viterbi(**pot)[0], 1e-8)
    assert plain.centering_shift(hidden, lengths) is None
    assert F.SemiCRF(C, K, centering=True).centering == "mean"
    assert F.SemiCRF(C, K, centering=False).centering is None


@pytest.mark.parametrize("name", ["plain", "kcc-boundary", "allowed", "uniform"])
def test_decode_returns_a_valid_tiling(name):
    head = make_head(name)
    hidden, lengths = make_input(head, B=4, T=40)
    best, seg = head.decode(hidden, lengths, return_scores=True)
    b, s, d, c = seg.unbind(1)
    assert ((d >= 1) & (d <= K)).all() and ((c >= 0) & (c < C)).all()
    for i in range(4):
        rows = seg[b == i]
        assert rows[0, 1] == 0
        assert (rows[1:, 1] == rows[:-1, 1] + rows[:-1, 2]).all()
        assert rows[-1, 1] + rows[-1, 2] == lengths[i]
    labels = F.segments_to_labels(seg, 4, 40)
    inside = torch.arange(40)[None, :] < lengths[:, None]
    assert ((labels >= 0) == inside).all()
    assert_close("viterbi score", head.score(hidden, seg, lengths), best, 1e-9)
    samples = head.sample(hidden, lengths, num_samples=5)
    for k in range(5):
        sk = samples[samples[:, 0] == k, 1:]
        assert (head.score(hidden, sk, lengths) <= best + 1e-9).all()
    if head.allowed_transitions is not None:
        same = b[1:] == b[:-1]
        assert head.allowed_transitions[c[:-1][same], c[1:][same]].all()


def test_linear_chain_crf_at_max_duration_one():
    """K = 1 is pytorch-crf's CRF: emissions = scores, same transitions and start/end."""
    head = make_head("scores-in", K=1)
    with torch.no_grad():
        head.duration.zero_()
    em, lengths = make_input(head, B=3, T=9)
    tr, st, en = head.transition, head.start_transition, head.end_transition
    expected = []
    for b in range(3):
        alpha = st + em[b, 0]
        for t in range(1, int(lengths[b])):
            alpha = torch.logsumexp(alpha[:, None] + tr, 0) + em[b, t]
        expected.append(torch.logsumexp(alpha + en, 0))
    assert_close("linear-chain log Z", head.log_partition(em, lengths), torch.stack(expected), TOL64)


@pytest.mark.parametrize("K_big", [400])
def test_parametric_priors_are_log_pmfs(K_big):
    mean = torch.tensor([1.5, 4.0, 20.0], dtype=torch.float64)
    d = torch.arange(1, K_big + 1, dtype=torch.float64)[:, None]
    k = d - 1

    p = 1 / mean
    geo = geometric_log_pmf((p / (1 - p)).log(), K_big)
    assert_close("geometric", geo, p.log() + k * (1 - p).log(), 1e-12)
    lam = mean - 1
    poi = poisson_log_pmf(lam.log(), K_big)
    expected = torch.tensor([[j * math.log(v) - v - math.lgamma(j + 1) for v in lam.tolist()]
                             for j in range(K_big)], dtype=torch.float64)
    assert_close("poisson", poi, expected, 1e-10)
    r = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    nb = negative_binomial_log_pmf(lam.log(), r.log(), K_big)
    q = lam / (lam + r)  # NB: C(j + r − 1, j) (1 − q)^r q^j
    expected = torch.tensor([[math.lgamma(j + rr) - math.lgamma(rr) - math.lgamma(j + 1)
                              + rr * math.log(1 - qq) + j * math.log(qq)
                              for rr, qq in zip(r.tolist(), q.tolist())] for j in range(K_big)],
                            dtype=torch.float64)
    assert_close("negative binomial", nb, expected, 1e-10)
    # Truncated at K, the geometric keeps exactly 1 − (1 − p)^K of its mass.
    assert_close("geometric truncated mass", geo[:10].exp().sum(0), 1 - (1 - p) ** 10, 1e-12)
    for name, lp in (("geometric", geo), ("poisson", poi), ("negbin", nb)):
        assert_close(f"{name} total mass (K = {K_big})", lp.exp().sum(0), torch.ones(3), 1e-8)
        assert_close(f"{name} mean", (lp.exp() * d).sum(0), mean, 1e-6)
        assert (lp[:3].exp().sum(0) <= 1 + 1e-12).all()  # truncation only drops mass
    uni = soft_uniform_log_pmf(torch.tensor([3.0]).double(), torch.tensor([7.0]).double(), 10, 0.01)
    assert_close("uniform total mass", uni.exp().sum(0), torch.ones(1), 1e-12)
    hard = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.float64)[:, None] / 5
    assert_close("uniform → hard uniform", uni.exp(), hard, 1e-12)


@pytest.mark.parametrize("prior,kw,mean", [
    ("geometric", dict(duration_mean=3.0), 3.0),
    ("poisson", dict(duration_mean=3.0), 3.0),
    ("negative_binomial", dict(duration_mean=3.0, duration_dispersion=4.0), 3.0),
    ("uniform", dict(duration_range=(2, 4), duration_softness=0.05), 3.0),
])
def test_head_prior_initial_mean(prior, kw, mean):
    head = F.SemiCRF(2, 200, duration_prior=prior, **kw).double()
    lp = head.duration_scores()
    d = torch.arange(1, 201, dtype=torch.float64)[:, None]
    assert_close(f"{prior} mass", lp.exp().sum(0), torch.ones(2), 1e-6)
    assert_close(f"{prior} mean", (lp.exp() * d).sum(0), torch.full((2,), mean), 1e-3)


def test_backend_is_passed_through():
    head = make_head("kcc-boundary")
    hidden, lengths = make_input(head)
    ref = head.log_partition(hidden, lengths)
    head.backend = "torch"
    assert head.potentials(hidden, lengths)["backend"] == "torch"
    assert_close("torch backend", head.log_partition(hidden, lengths), ref, 1e-9)
    with pytest.raises(ValueError, match="backend"):
        F.SemiCRF(C, K, backend="tpu")


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    labels = torch.tensor([[0] * 4 + [1] * 3 + [2] * 5 + [0] * 4 + [1] * 3 + [2] * 5] * 2)
    x = torch.nn.functional.one_hot(labels, 3).float() + 0.8 * torch.randn(2, 24, 3)
    seg = F.labels_to_segments(labels, None, 6)
    head = F.SemiCRF(3, 6, hidden_dim=3, boundary_projections=True, duration_prior="poisson")
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = head(x, seg)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
    assert torch.equal(F.segments_to_labels(head.decode(x), 2, 24), labels)


BAD_CONSTRUCTION = [
    (dict(num_labels=0, max_duration=3), "num_labels"),
    (dict(num_labels=3, max_duration=0), "max_duration"),
    (dict(num_labels=3, max_duration=3, hidden_dim=0), "hidden_dim"),
    (dict(num_labels=3, max_duration=3, duration_prior="gamma"), "duration_prior"),
    (dict(num_labels=3, max_duration=3, centering="median"), "centering"),
    (dict(num_labels=3, max_duration=3, boundary_projections=True), "boundary_projections"),
    (dict(num_labels=3, max_duration=3, duration_prior="poisson", duration_mean=1.0),
     "duration_mean"),
    (dict(num_labels=3, max_duration=3, duration_prior="poisson", duration_mean=[2.0, 3.0]),
     "duration_mean"),
    (dict(num_labels=3, max_duration=3, duration_prior="negative_binomial",
          duration_dispersion=0.0), "duration_dispersion"),
    (dict(num_labels=3, max_duration=3, duration_prior="uniform", duration_range=(3, 2)),
     "duration_range"),
    (dict(num_labels=3, max_duration=3, duration_softness=0.0), "duration_softness"),
    (dict(num_labels=3, max_duration=3, allowed_transitions=torch.ones(2, 2, dtype=torch.bool)),
     "allowed_transitions"),
]


@pytest.mark.parametrize("kwargs,name", BAD_CONSTRUCTION, ids=[n for _, n in BAD_CONSTRUCTION])
def test_bad_construction_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        F.SemiCRF(**kwargs)


def test_bad_call_names_the_argument():
    head = make_head("plain")
    hidden, lengths = make_input(head)
    seg = gold(head, hidden, lengths)
    with pytest.raises(ValueError, match="hidden"):
        head.log_partition(hidden[..., :-1], lengths)
    with pytest.raises(ValueError, match="hidden"):
        head.log_partition(hidden[0], lengths)
    with pytest.raises(TypeError, match="hidden"):
        head.log_partition(hidden.long(), lengths)
    with pytest.raises(ValueError, match="lengths"):
        head.log_partition(hidden, lengths + T)
    with pytest.raises(ValueError, match="lengths"):
        head.log_partition(hidden, lengths[:2])
    with pytest.raises(TypeError, match="lengths"):
        head.log_partition(hidden, lengths.double())
    bad = seg.clone()
    bad[0, 2] += 1
    with pytest.raises(ValueError, match="segments"):
        head.loss(hidden, bad, lengths)
    with pytest.raises(ValueError, match="segments"):
        head(hidden, seg[1:], lengths)
    with pytest.raises(ValueError, match="reduction"):
        head.loss(hidden, seg, lengths, reduction="max")
    with pytest.raises(ValueError, match="num_samples"):
        head.sample(hidden, lengths, num_samples=0)
