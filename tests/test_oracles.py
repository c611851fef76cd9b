"""Tests of the oracles in tests/oracles.py, against each other, against hand
computation, and against flash-semicrf 0.2.0 and torch-struct 0.5.

Tolerances (everything float64): log Z, Viterbi scores and gradients within
1e-9 absolute (observed ~1e-14); probabilities sum to 1 within 1e-12.
Tests against the external packages carry ``@pytest.mark.oracle`` and are
skipped when the package is missing.
"""

import math
import random
import warnings

import numpy as np
import pytest
import torch

from oracles import (
    NEG_INF,
    brute_force,
    count_segmentations,
    dense_log_partition,
    dense_viterbi_score,
    enumerate_segmentations,
    flash_semicrf_log_partition,
    flash_semicrf_phantom_start,
    random_problem,
    segmentation_score,
    sub_problem,
    torch_struct_log_partition,
    torch_struct_viterbi,
)

ATOL = 1e-9
N_RANDOM = 240


def assert_close(actual, expected, atol=ATOL, what=""):
    """Elementwise |a - e| <= atol, where equal infinities count as equal; no NaN."""
    a = torch.as_tensor(actual, dtype=torch.float64).detach()
    e = torch.as_tensor(expected, dtype=torch.float64).detach()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: NaN in actual {a}"
    assert not torch.isnan(e).any(), f"{what}: NaN in expected {e}"
    if a.numel() == 0:
        return
    same_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
    diff = torch.where(same_inf, torch.zeros_like(a), (a - e).abs())
    worst = diff.max().item()
    assert worst <= atol, f"{what}: max |diff| = {worst:.3e}\nactual   {a}\nexpected {e}"


def grad_of(t):
    """t.grad, or zeros when the input took no part in the graph (e.g. the
    transition when every sequence has length 1)."""
    return torch.zeros_like(t) if t.grad is None else t.grad


# ---------------------------------------------------------------------------
# Expected feature counts, written independently of the oracles: the score of
# a segmentation is linear in every input, score = sum_theta theta * phi(seg),
# so d logZ / d theta = E_p[phi].
# ---------------------------------------------------------------------------


def features(seg, L, B_index, shapes, trans3d):
    """phi(seg) as {input name: {index tuple: count}} for sequence B_index."""
    phi = {name: {} for name in shapes}

    def add(name, idx):
        if name in phi:
            phi[name][idx] = phi[name].get(idx, 0) + 1

    prev = None
    for k, (s, d, c) in enumerate(seg):
        for u in range(s, s + d):
            add("scores", (B_index, u, c))
        add("duration", (d - 1, c))
        if k == 0:
            add("start_transition", (c,))
        elif trans3d:
            add("transition", (d - 1, prev, c))
        else:
            add("transition", (prev, c))
        add("start_scores", (B_index, s, c))
        add("end_scores", (B_index, s + d - 1, c))
        if s + d == L:
            add("end_transition", (c,))
        prev = c
    return phi


def linear_score(phi, arrays):
    """sum theta * phi over nonzero phi (so a -inf theta only counts if used).
    ``arrays``: input name -> numpy float64 array."""
    total = 0.0
    for name, counts in phi.items():
        theta = arrays[name]
        for idx, n in counts.items():
            total += n * float(theta[idx])
    return total


def as_arrays(problem):
    return {name: t.detach().to(torch.float64).numpy() for name, t in problem.tensors().items()}


def expected_features(problem, result):
    """E_p[phi] for every present input, summed over the batch, as tensors."""
    inputs = problem.tensors()
    trans3d = problem.transition.dim() == 3
    B, T, _ = problem.scores.shape
    out = {name: np.zeros(tuple(t.shape)) for name, t in inputs.items()}
    for b in range(B):
        L = T if problem.lengths is None else int(problem.lengths[b])
        for seg, p in result.distribution[b].items():
            phi = features(seg, L, b, inputs, trans3d)
            for name, counts in phi.items():
                for idx, n in counts.items():
                    out[name][idx] += n * p
    return {name: torch.from_numpy(a) for name, a in out.items()}


# ---------------------------------------------------------------------------
# Random configurations
# ---------------------------------------------------------------------------


def config(seed):
    rng = random.Random(seed)
    T = rng.randint(1, 8)
    C = rng.randint(1, 3)
    K = rng.randint(1, 4)
    # keep the enumeration small enough to stay fast
    while count_segmentations(T, K, C) > 20000:
        T -= 1
    return dict(
        B=rng.randint(1, 3),
        T=T,
        C=C,
        K=K,
        trans3d=rng.random() < 0.4,
        use_lengths=rng.random() < 0.8,
        ragged=rng.random() < 0.7,
        start_transition=rng.random() < 0.5,
        end_transition=rng.random() < 0.5,
        start_scores=rng.random() < 0.5,
        end_scores=rng.random() < 0.5,
        neg_inf_prob=rng.choice([0.0, 0.0, 0.15, 0.3]),
        scale=rng.choice([0.5, 1.0, 3.0]),
    )


def make(seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    return random_problem(gen, **config(seed))


# ---------------------------------------------------------------------------
# (a) enumeration and scoring by hand
# ---------------------------------------------------------------------------


def test_enumeration_counts_and_tiling():
    for L in range(0, 8):
        for K in range(1, 5):
            for C in range(1, 4):
                segs = enumerate_segmentations(L, K, C)
                assert len(segs) == count_segmentations(L, K, C)
                assert len(set(segs)) == len(segs)
                for seg in segs:
                    pos = 0
                    for s, d, c in seg:
                        assert s == pos and 1 <= d <= K and 0 <= c < C
                        pos += d
                    assert pos == L
    # closed forms: K = 1 gives C^L; C = 1, K >= L gives the 2^(L-1) compositions
    assert len(enumerate_segmentations(5, 1, 3)) == 3**5
    assert len(enumerate_segmentations(6, 6, 1)) == 2**5
    assert enumerate_segmentations(2, 2, 1) == (((0, 1, 0), (1, 1, 0)), ((0, 2, 0),))


def test_hand_computed_example():
    # T = 3, L = 2, C = 2, K = 2, every input present.
    scores = torch.tensor([[[1.0, 2.0], [0.5, -1.0], [9.0, 9.0]]], dtype=torch.float64)
    transition = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    duration = torch.tensor([[0.0, 1.0], [-2.0, 0.5]], dtype=torch.float64)
    st = torch.tensor([0.7, -0.7], dtype=torch.float64)
    en = torch.tensor([1.5, 0.25], dtype=torch.float64)
    ss = torch.tensor([[[0.01, 0.02], [0.03, 0.04], [5.0, 5.0]]], dtype=torch.float64)
    es = torch.tensor([[[0.1, 0.2], [0.3, 0.4], [5.0, 5.0]]], dtype=torch.float64)
    lengths = torch.tensor([2])
    # one segment (0, 2, c): scores[0,c] + scores[1,c] + duration[1,c] + st[c] + ss[0,c] + es[1,c] + en[c]
    one = [
        1.0 + 0.5 - 2.0 + 0.7 + 0.01 + 0.3 + 1.5,
        2.0 - 1.0 + 0.5 - 0.7 + 0.02 + 0.4 + 0.25,
    ]
    # two segments (0,1,a), (1,1,b)
    two = {}
    for a in range(2):
        for b in range(2):
            first = [1.0, 2.0][a] + [0.0, 1.0][a] + [0.7, -0.7][a] + [0.01, 0.02][a] + [0.1, 0.2][a]
            second = (
                [0.5, -1.0][b] + [0.0, 1.0][b] + [[0.1, 0.2], [0.3, 0.4]][a][b]
                + [0.03, 0.04][b] + [0.3, 0.4][b] + [1.5, 0.25][b]
            )
            two[(a, b)] = first + second
    all_scores = one + list(two.values())
    log_z = math.log(sum(math.exp(v) for v in all_scores))
    kw = dict(start_transition=st, end_transition=en, start_scores=ss, end_scores=es)
    bf = brute_force(scores, transition, duration, lengths, **kw)
    assert abs(bf.log_partition.item() - log_z) < 1e-12
    assert abs(bf.best.item() - max(all_scores)) < 1e-12
    assert abs(dense_log_partition(scores, transition, duration, lengths, **kw).item() - log_z) < 1e-12
    assert abs(dense_viterbi_score(scores, transition, duration, lengths, **kw).item() - max(all_scores)) < 1e-12
    assert abs(segmentation_score(((0, 1, 1), (1, 1, 0)), scores[0], transition, duration, 2,
                                  st, en, ss[0], es[0]) - two[(1, 0)]) < 1e-12
    # label marginal of label 0 at position 1: segmentations (0,2,0) and (.,0)
    p0 = (math.exp(one[0]) + math.exp(two[(0, 0)]) + math.exp(two[(1, 0)])) / math.exp(log_z)
    assert abs(bf.label_marginals[0, 1, 0].item() - p0) < 1e-12
    p_start1 = sum(math.exp(v) for v in two.values()) / math.exp(log_z)
    assert abs(bf.start_marginals[0, 1].item() - p_start1) < 1e-12
    assert bf.label_marginals[0, 2].abs().sum() == 0 and bf.start_marginals[0, 2] == 0
    # 3-D transition: transition[d-1] only matters for the second segment, of duration 1
    tr3 = torch.stack([transition, transition + 100.0])
    assert abs(brute_force(scores, tr3, duration, lengths, **kw).log_partition.item() - log_z) < 1e-12


def test_segmentation_score_rejects_bad_tilings():
    scores = torch.zeros(4, 2, dtype=torch.float64)
    tr = torch.zeros(2, 2, dtype=torch.float64)
    du = torch.zeros(2, 2, dtype=torch.float64)
    for bad in [((0, 1, 0),), ((0, 1, 0), (2, 2, 0)), ((0, 3, 0), (3, 1, 0)), ((0, 2, 0), (2, 2, 0), (4, 1, 0))]:
        with pytest.raises(ValueError):
            segmentation_score(bad, scores, tr, du, 4)


# ---------------------------------------------------------------------------
# (a) brute force vs dense DP on random problems
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(N_RANDOM))
def test_brute_force_vs_dense(seed):
    p = make(seed)
    B, T, C = p.scores.shape
    bf = brute_force(*p.args(), **p.kwargs())
    q = p.with_grad()
    log_z = dense_log_partition(*q.args(), **q.kwargs())
    assert_close(log_z, bf.log_partition, what="log Z")
    assert_close(dense_viterbi_score(*p.args(), **p.kwargs()), bf.best, what="viterbi")

    lengths = [T] * B if p.lengths is None else [int(x) for x in p.lengths]
    arrays = as_arrays(p)
    for b in range(B):
        # the brute-force score table agrees with an independent linear-feature score
        for seg, v in bf.scores[b].items():
            ref = linear_score(features(seg, lengths[b], b, arrays, p.transition.dim() == 3), arrays)
            assert v == ref or abs(v - ref) <= 1e-12, (seg, v, ref)
        if bf.log_partition[b] == NEG_INF:
            assert bf.best_segmentation[b] is None
            assert bf.label_marginals[b].abs().sum() == 0 and bf.start_marginals[b].abs().sum() == 0
            assert bf.entropy[b] == 0 and bf.distribution[b] == {}
            continue
        seg = bf.best_segmentation[b]
        assert bf.scores[b][seg] == bf.best[b].item()
        assert all(v <= bf.best[b].item() for v in bf.scores[b].values())
        # marginals: a distribution over labels inside the sequence, 0 on padding
        L = lengths[b]
        assert_close(bf.label_marginals[b, :L].sum(-1), torch.ones(L), 1e-12, "labels sum")
        assert bf.label_marginals[b, L:].abs().sum() == 0 and bf.start_marginals[b, L:].abs().sum() == 0
        assert abs(bf.start_marginals[b, 0].item() - 1.0) < 1e-12
        assert abs(sum(bf.distribution[b].values()) - 1.0) < 1e-12
        assert_close(bf.segment_marginals[b].sum((1, 2)), bf.start_marginals[b], 1e-12, "segment vs start")

    # gradients: d logZ / d theta = E_p[phi] for every input; d/d scores = label marginals
    log_z.sum().backward()
    q_inputs = q.tensors()
    expected = expected_features(p, bf)
    for name, t in q_inputs.items():
        assert_close(grad_of(t), expected[name], what=f"grad {name}")
    assert_close(q.scores.grad, bf.label_marginals, what="grad scores vs label marginals")
    if p.duration is not None:
        assert_close(q.duration.grad, bf.segment_marginals.sum((0, 1)), what="grad duration")


@pytest.mark.parametrize("seed", range(0, N_RANDOM, 12))
def test_ragged_batch_equals_sequences_alone(seed):
    p = make(seed)
    full = dense_log_partition(*p.args(), **p.kwargs())
    vit = dense_viterbi_score(*p.args(), **p.kwargs())
    for b in range(p.scores.shape[0]):
        one = sub_problem(p, b)
        assert_close(full[b : b + 1], dense_log_partition(*one.args(), **one.kwargs()), what="ragged")
        assert_close(vit[b : b + 1], dense_viterbi_score(*one.args(), **one.kwargs()), what="ragged vit")
    # padding content is irrelevant
    if p.lengths is not None and int(p.lengths.min()) < p.scores.shape[1]:
        pad = torch.arange(p.scores.shape[1]).view(1, -1, 1) >= p.lengths.view(-1, 1, 1)
        p.scores = p.scores.masked_fill(pad, 123.0)
        if p.end_scores is not None:
            p.end_scores = p.end_scores.masked_fill(pad, -7.0)
        assert_close(dense_log_partition(*p.args(), **p.kwargs()), full, what="padding")


@pytest.mark.parametrize("seed", range(6))
def test_dense_gradcheck(seed):
    cfg = config(seed)
    cfg.update(neg_inf_prob=0.0, start_transition=True, end_transition=True, start_scores=True, end_scores=True)
    p = random_problem(torch.Generator().manual_seed(seed), **cfg)
    q = p.with_grad()
    names = list(q.tensors())

    def f(*xs):
        kw = dict(zip(names, xs))
        return dense_log_partition(kw["scores"], kw["transition"], kw["duration"], q.lengths,
                                   start_transition=kw["start_transition"], end_transition=kw["end_transition"],
                                   start_scores=kw["start_scores"], end_scores=kw["end_scores"])

    assert torch.autograd.gradcheck(f, tuple(q.tensors().values()), eps=1e-6, atol=1e-7)


def test_infeasible_sequences_give_neg_inf_and_zero_grads():
    gen = torch.Generator().manual_seed(7)
    p = random_problem(gen, 3, 5, 2, 2, start_transition=True, end_transition=True,
                       start_scores=True, end_scores=True, ragged=False)
    # sequence 1: no label may end its last segment -> infeasible; 0 and 2 untouched
    p.end_scores = p.end_scores.clone()
    p.end_scores[1, 4, :] = NEG_INF
    bf = brute_force(*p.args(), **p.kwargs())
    assert bf.log_partition[1] == NEG_INF and bf.best[1] == NEG_INF and bf.entropy[1] == 0
    assert torch.isfinite(bf.log_partition[[0, 2]]).all()
    q = p.with_grad()
    log_z = dense_log_partition(*q.args(), **q.kwargs())
    assert_close(log_z, bf.log_partition, what="log Z with an infeasible sequence")
    log_z[[0, 2]].sum().backward()
    grads = {n: grad_of(t).clone() for n, t in q.tensors().items()}
    q2 = p.with_grad()
    dense_log_partition(*q2.args(), **q2.kwargs()).sum().backward()  # includes the -inf entry
    for name, t in q2.tensors().items():
        assert not torch.isnan(grad_of(t)).any(), name
        assert_close(grad_of(t), grads[name], what=f"infeasible sequence adds no gradient to {name}")
    assert q2.scores.grad[1].abs().sum() == 0
    assert bf.label_marginals[1].abs().sum() == 0 and bf.start_marginals[1].abs().sum() == 0

    # everything forbidden: all -inf, gradients all exactly 0, Viterbi -inf
    p.duration = torch.full_like(p.duration, NEG_INF)
    q = p.with_grad()
    log_z = dense_log_partition(*q.args(), **q.kwargs())
    assert (log_z == NEG_INF).all()
    log_z.sum().backward()
    for name, t in q.tensors().items():
        assert torch.equal(grad_of(t), torch.zeros_like(t)), name
    assert (dense_viterbi_score(*p.args(), **p.kwargs()) == NEG_INF).all()
    assert (brute_force(*p.args(), **p.kwargs()).log_partition == NEG_INF).all()


def test_dense_handles_length_100_quickly():
    import time

    gen = torch.Generator().manual_seed(3)
    p = random_problem(gen, 2, 100, 4, 8, start_scores=True, end_scores=True, end_transition=True)
    q = p.with_grad()
    t0 = time.perf_counter()
    dense_log_partition(*q.args(), **q.kwargs()).sum().backward()
    assert time.perf_counter() - t0 < 10.0
    # d logZ / d scores is a marginal: sums to 1 over labels inside each sequence, 0 outside
    for b in range(2):
        L = int(p.lengths[b])
        assert_close(q.scores.grad[b, :L].sum(-1), torch.ones(L), 1e-10, "marginals sum")
        assert q.scores.grad[b, L:].abs().sum() == 0


# ---------------------------------------------------------------------------
# (c) entropy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(0, N_RANDOM, 4))
def test_entropy(seed):
    p = make(seed)
    bf = brute_force(*p.args(), **p.kwargs())
    for b, dist in enumerate(bf.distribution):
        h = -sum(q * math.log(q) for q in dist.values() if q > 0)
        assert abs(bf.entropy[b].item() - h) < 1e-9
        assert bf.entropy[b] >= -1e-12
        n = len(enumerate_segmentations(p.scores.shape[1] if p.lengths is None else int(p.lengths[b]),
                                        p.duration.shape[0], p.scores.shape[2]))
        assert bf.entropy[b] <= math.log(n) + 1e-9
    # third route (docs/design.md, "Entropy"): H = logZ - <theta, grad logZ>, from the dense DP
    for b in range(p.scores.shape[0]):
        if not torch.isfinite(bf.log_partition[b]):
            continue
        one = sub_problem(p, b).with_grad()
        lz = dense_log_partition(*one.args(), **one.kwargs())
        lz.sum().backward()
        inner = 0.0
        for t in one.tensors().values():
            g = grad_of(t)
            used = g != 0
            inner += (t.detach()[used] * g[used]).sum().item()
        assert abs(lz.item() - inner - bf.entropy[b].item()) < 1e-9


def test_entropy_uniform():
    # all-zero inputs: uniform over the n segmentations, H = log n
    for (T, C, K) in [(1, 1, 1), (4, 2, 3), (6, 3, 2)]:
        z = torch.zeros(1, T, C, dtype=torch.float64)
        bf = brute_force(z, torch.zeros(C, C, dtype=torch.float64), torch.zeros(K, C, dtype=torch.float64))
        n = count_segmentations(T, K, C)
        assert abs(bf.entropy.item() - math.log(n)) < 1e-12
        assert abs(bf.log_partition.item() - math.log(n)) < 1e-12


# ---------------------------------------------------------------------------
# (b) flash-semicrf 0.2.0
# ---------------------------------------------------------------------------


def _column_normalised_3d(transition, semiring, g):
    """A 3-D transition whose reduction over the previous label does not
    depend on the duration (so flash's phantom start is a (C,) vector g)."""
    red = transition.logsumexp(1, keepdim=True) if semiring == "log" else transition.amax(1, keepdim=True)
    return transition - red + g


FLASH_CASES = [
    # (B, T, C, K, trans3d, boundary scores)
    (1, 1, 2, 3, False, False),
    (3, 2, 3, 4, False, True),
    (2, 7, 3, 1, False, False),
    (2, 7, 3, 1, True, True),
    (3, 8, 2, 2, False, False),
    (3, 8, 2, 2, True, False),
    (3, 8, 2, 2, True, True),
    (2, 9, 3, 3, False, True),
    (3, 12, 4, 5, True, False),
    (2, 30, 3, 6, False, True),
    (2, 40, 4, 8, True, True),
]


@pytest.mark.oracle
@pytest.mark.parametrize("case", FLASH_CASES)
@pytest.mark.parametrize("semiring", ["log", "max"])
def test_flash_semicrf_mapping(case, semiring):
    pytest.importorskip("flash_semicrf")
    B, T, C, K, trans3d, boundary = case
    gen = torch.Generator().manual_seed(FLASH_CASES.index(case) * 2 + (semiring == "max"))
    p = random_problem(gen, B, T, C, K, trans3d=trans3d, start_scores=boundary, end_scores=boundary)
    if trans3d:
        p.transition = _column_normalised_3d(p.transition, semiring, torch.randn(C, generator=gen, dtype=torch.float64))
    q = p.with_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = flash_semicrf_log_partition(*q.args(), semiring=semiring,
                                             start_scores=q.start_scores, end_scores=q.end_scores)
    r = p.with_grad()
    kw = r.kwargs()
    kw["start_transition"] = flash_semicrf_phantom_start(r.transition, semiring)
    ours = (dense_log_partition if semiring == "log" else dense_viterbi_score)(*r.args(), **kw)
    assert_close(theirs, ours, what="flash vs dense")
    if T <= 8:
        bf = brute_force(*p.args(), **{**p.kwargs(), "start_transition": kw["start_transition"].detach()})
        assert_close(theirs, bf.log_partition if semiring == "log" else bf.best, what="flash vs brute force")
    if semiring == "log":
        theirs.sum().backward()
        ours.sum().backward()
        for name, t in q.tensors().items():
            if name == "transition" and trans3d:
                # equal values, different functions: its first segment uses
                # LSE_c' transition[d-1, c', c] for each d, ours the d = 1 slice
                continue
            assert_close(grad_of(t), grad_of(r.tensors()[name]), what=f"flash grad {name}")


@pytest.mark.oracle
def test_flash_semicrf_3d_phantom_start_depends_on_duration():
    """With a general 3-D transition, flash-semicrf prices the first segment
    (0, d, c) with LSE_{c'} transition[d-1, c', c]; reproduce that by brute force."""
    pytest.importorskip("flash_semicrf")
    gen = torch.Generator().manual_seed(11)
    B, T, C, K = 2, 6, 3, 3
    p = random_problem(gen, B, T, C, K, trans3d=True)
    with pytest.raises(ValueError):
        flash_semicrf_phantom_start(p.transition)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = flash_semicrf_log_partition(*p.args())
    phantom = p.transition.logsumexp(1)  # (K, C): [d-1, c]
    bf = brute_force(*p.args())  # no start transition
    ref = []
    for b in range(B):
        ref.append(math.log(sum(
            math.exp(v + phantom[seg[0][1] - 1, seg[0][2]].item()) for seg, v in bf.scores[b].items()
        )))
    assert_close(theirs, torch.tensor(ref, dtype=torch.float64), what="flash 3-D phantom start")
    # its gradient w.r.t. the 3-D transition: expected transition counts plus,
    # for a first segment (0, d, c), softmax_c'(transition[d-1, :, c])
    q = p.with_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flash_semicrf_log_partition(*q.args()).sum().backward()
    soft = torch.softmax(p.transition, dim=1)  # [d-1, c', c]
    expected = torch.zeros_like(p.transition)
    for b in range(B):
        L = int(p.lengths[b])
        for seg, v in bf.scores[b].items():
            prob = math.exp(v + phantom[seg[0][1] - 1, seg[0][2]].item() - ref[b])
            s0, d0, c0 = seg[0]
            expected[d0 - 1, :, c0] += prob * soft[d0 - 1, :, c0]
            for (_, _, a), (_, d, c) in zip(seg, seg[1:]):
                expected[d - 1, a, c] += prob
    assert_close(q.transition.grad, expected, what="flash 3-D transition grad")
    # and it is NOT ours with a duration-1 (or any single) phantom start vector
    for d in range(K):
        ours = dense_log_partition(*p.args(), start_transition=phantom[d])
        assert (theirs - ours).abs().max() > 1e-3


# ---------------------------------------------------------------------------
# (b) torch-struct 0.5
# ---------------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("seed", range(0, N_RANDOM, 8))
def test_torch_struct_mapping(seed):
    pytest.importorskip("torch_struct")
    p = make(seed)
    bf = brute_force(*p.args(), **p.kwargs())
    feasible = torch.isfinite(bf.log_partition)
    if not feasible.any():  # same shapes and options, no -inf entries
        cfg = {**config(seed), "neg_inf_prob": 0.0}
        p = random_problem(torch.Generator().manual_seed(1000 + seed), **cfg)
        bf = brute_force(*p.args(), **p.kwargs())
        feasible = torch.isfinite(bf.log_partition)
    # torch-struct prices infeasible sequences at ~-1e9 and gives them junk
    # gradients: compare feasible sequences only.
    keep = [b for b in range(p.scores.shape[0]) if feasible[b]]
    sub = lambda t: None if t is None else t[keep]
    p.scores, p.start_scores, p.end_scores = sub(p.scores), sub(p.start_scores), sub(p.end_scores)
    p.lengths = None if p.lengths is None else p.lengths[keep]
    q = p.with_grad()
    theirs = torch_struct_log_partition(*q.args(), **q.kwargs())
    assert_close(theirs, bf.log_partition[keep], what="torch-struct log Z")
    r = p.with_grad()
    ours = dense_log_partition(*r.args(), **r.kwargs())
    theirs.sum().backward()
    ours.sum().backward()
    for name, t in q.tensors().items():
        assert_close(grad_of(t), grad_of(r.tensors()[name]), what=f"torch-struct grad {name}")
    best, segs = torch_struct_viterbi(*p.args(), **p.kwargs())
    assert_close(best, bf.best[keep], what="torch-struct max")
    for i, b in enumerate(keep):
        assert abs(bf.scores[b][segs[i]] - bf.best[b].item()) < 1e-9  # its argmax scores the max


@pytest.mark.oracle
@pytest.mark.parametrize("seed", range(8))
def test_torch_struct_native_phantom_start(seed):
    """torch-struct with transition at position 0 too (its native layout) equals
    ours with start_transition = transition.logsumexp(0); 3-D: per duration."""
    pytest.importorskip("torch_struct")
    gen = torch.Generator().manual_seed(500 + seed)
    trans3d = seed % 2 == 1
    p = random_problem(gen, 2, 7, 3, 3, trans3d=trans3d, end_transition=True, start_scores=True)
    if trans3d:
        p.transition = _column_normalised_3d(p.transition, "log", torch.randn(3, generator=gen, dtype=torch.float64))
        start = p.transition.logsumexp(1)[0]
    else:
        start = p.transition.logsumexp(0)
    kw = p.kwargs()
    theirs = torch_struct_log_partition(*p.args(), **kw, phantom_start=True)
    kw["start_transition"] = start
    assert_close(theirs, brute_force(*p.args(), **kw).log_partition, what="phantom start")
    kw["start_transition"] = None
    assert (theirs - dense_log_partition(*p.args(), **kw)).abs().max() > 1e-6
