"""Random and hand-built problems made to make the exp-domain kernels lose
mass that matters: shared by the tests of the C++ CPU kernel
(test_cpu_exp_domain.py), the CUDA kernels under the emulator
(test_cuda_emulated.py) and the Triton kernels under the interpreter
(test_triton.py), so that every backend meets the same problems in the same
order. Each returns the forward op's positional arguments: scores,
transition, duration, lengths, start, end, segment-start and segment-end
scores."""

from __future__ import annotations

import math

import torch


def outshone_label(dtype, gap, w, duration=None, T=80, K=96, dies=70, *, lengths=None,
                   label_1_loops=True, label_1_ends=True, extra=None):
    """Two labels, two sequences (lengths T, T-3 unless given). Label 0 may
    end; its one segment that counts runs to the end at a duration score of
    -w, `gap` nats a position below label 1: the whole sequence (duration
    None), or, after label 1, `duration` positions (started in the block
    before the last). Label 1 holds the scale with segments of any duration
    but dies at position `dies` (-inf scores): no segmentation ends in it.
    At the last block's start label 0's entry lies far below label 1's, and
    its product with the duration's weight exp(-w) lies below the dtype's
    range there, in the far part the CTA sums: a float64 product with the
    block before's factor F that underflows, a product below tiny at that
    block's scale, or one of an entry that block started. random_exp_problem
    varies it: label 1 without its self-transition or its end, and extra
    labels (their duration scores `extra`, (K, n)), 3·gap below, that lead
    to label 0."""
    lengths = torch.tensor([T, T - 3]) if lengths is None else lengths
    C = 2 + (0 if extra is None else extra.shape[1])
    scores = torch.zeros(2, T, C, dtype=torch.float64)
    scores[..., 0] = -gap
    scores[..., 2:] = -3 * gap
    scores[:, dies:, 1] = -math.inf
    trans = torch.full((C, C), -math.inf, dtype=torch.float64)
    dur = torch.full((K, C), -math.inf, dtype=torch.float64)
    dur[0, 0] = 0.0  # the largest weight, so that exp(-w) stays relative to 1
    if duration is None:
        dur[lengths - 1, 0] = -w
    else:
        trans[1, :] = 0.0
        if not label_1_loops:
            trans[1, 1] = -math.inf
        trans[2:, 0] = 0.0
        dur[duration - 1, 0] = -w
    dur[:, 1] = 0.0
    if extra is not None:
        dur[:, 2:] = extra
    st = torch.zeros(C, dtype=torch.float64)
    et = torch.full((C,), -math.inf, dtype=torch.float64)
    et[0] = 0.0
    if label_1_ends:
        et[1] = 0.0
    args = [scores, trans, dur, lengths, st, et, None, None]
    return [a.to(dtype) if a is not None and a.is_floating_point() else a for a in args]


def random_exp_problem(rng, dtype, family):
    """One random static problem, two sequences, for the exp-domain
    kernels' certificates (the forward op's positional arguments):
    "mixed": labels a few nats a position apart, some dying partway
    (-inf scores from a random position), sparse duration columns with
    very negative scores, -inf transitions and boundary transitions;
    "boundary": the same with start and end scores up to 200 nats (float32:
    40); "outshone": outshone_label's pattern with every size at random
    (label 0's one segment, of random duration, starts after label 1 or at
    0; extra weaker labels), where the far part's losses are all of Z.
    Sizes go up to the float64 range: 12 nats a position and duration
    scores of -700 (float32: 2 and -85)."""
    f64 = dtype == torch.float64
    neg = -math.inf
    g = torch.Generator().manual_seed(rng.randrange(2**31))

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if family == "outshone":
        T = rng.randint(40, 200)
        D = rng.randint(2, T)
        K = rng.randint(D, D + 40)
        gap, w = (rng.uniform(3, 12), rng.uniform(0, 700)) if f64 else \
            (rng.uniform(0.3, 2.0), rng.uniform(0, 85))
        C = rng.randint(2, 4)
        lengths = torch.tensor([T, rng.randint(T - 5, T)])
        dies = rng.randint(T - D, T)
        loops = rng.random() < 0.5
        ends = rng.random() < 0.5
        return outshone_label(dtype, gap, w, D, T, K, dies, lengths=lengths, label_1_loops=loops,
                              label_1_ends=ends, extra=randn(K, C - 2))
    else:
        C, T = rng.randint(2, 5), rng.randint(30, 160)
        K = rng.randint(2, T + 20)
        gap = rng.choice([1, 4, 10] if f64 else [0.3, 1, 2])
        scores = randn(2, T, C)
        for c in range(C):
            scores[..., c] -= gap * rng.choice([0, 0, 1, 2, 4])
        for _ in range(rng.randint(0, 2)):
            c, at = rng.randrange(C), rng.randint(0, T)
            scores[:, at:, c] = neg if rng.random() < 0.7 else scores[:, at:, c] + 5 * gap
        trans = randn(C, C).masked_fill(torch.rand(C, C, generator=g) < 0.4, neg)
        dur = randn(K, C)
        w = rng.choice([50, 300, 600] if f64 else [10, 40, 70])
        for c in range(C):
            if rng.random() < 0.4:
                dur[:, c] = neg
                dur[0, c] = 0.0
                for d in rng.sample(range(K), min(K, rng.randint(1, 3))):
                    dur[d, c] = -w * rng.random() if d else 0.0
            elif rng.random() < 0.3:
                dur[:, c] = torch.linspace(0, -w, K, dtype=torch.float64)
        st = randn(C).masked_fill(torch.rand(C, generator=g) < 0.3, neg)
        et = randn(C).masked_fill(torch.rand(C, generator=g) < 0.3, neg)
        st[rng.randrange(C)] = 0.0
        et[rng.randrange(C)] = 0.0
        lengths = torch.tensor([T, rng.randint(1, T)])
        ss = es = None
        if family == "boundary":
            scale = rng.choice([1, 30, 200] if f64 else [1, 10, 40])
            ss, es = randn(2, T, C) * scale, randn(2, T, C) * scale
        args = [scores, trans, dur, lengths, st, et, ss, es]
    return [a.to(dtype) if a is not None and a.is_floating_point() else a for a in args]


FAMILIES = ("mixed", "boundary", "outshone")


def random_exp_problems(n, found=(), seed=20261205):
    """(family, i, dtype, args): random_exp_problem's problems i < 2n of
    each family (float32 at even i, float64 at odd), and those named in
    `found` ((family, i) pairs). One generator draws 2·max(n, 80) problems
    a family, every family in FAMILIES' order, whatever n, so that a
    problem found wrong keeps its name."""
    import random

    rng = random.Random(seed)
    for family in FAMILIES:
        for i in range(2 * max(n, 80)):
            dtype = (torch.float32, torch.float64)[i % 2]
            args = random_exp_problem(rng, dtype, family)
            if i < 2 * n or (family, i) in found:
                yield family, i, dtype, args


def widened(args):
    """The op's arguments with every floating tensor in float64 (the truth
    the exp-domain kernels are held to)."""
    return [a.double() if a is not None and a.is_floating_point() else a for a in args]


def assert_log_z(where, got, want, dtype):
    """log Z `got` (a kernel's, in `dtype`) is the float64 log-domain `want`
    to 1e-9 (float64) or 1e-4 (float32) relative, at least absolute; -inf
    where it is -inf."""
    got = got.double().cpu()
    tol = (1e-9 if dtype == torch.float64 else 1e-4) * want.abs().clamp(min=1.0)
    ok = ((got - want).abs() <= tol) | (torch.isinf(want) & (got == want))
    assert bool(ok.all()), f"{where}: log Z {got.tolist()} != {want.tolist()}"

# The op's gradient outputs, in its order.
OP_GRAD_NAMES = ("scores", "transition", "duration", "start_transition", "end_transition",
                 "start_scores", "end_scores")


def assert_within_log_domain_error(where, got, want, plain, dtype):
    """Every gradient `got` (an exp-domain backward's, in `dtype`) is the
    float64 log-domain backward's `want` to within four times what the
    log-domain backward in `dtype` (`plain`) itself misses, plus 1e-9
    (float64) or 2e-4 (float32) of the largest entry: an exp-domain
    backward may round differently, never lose more."""
    for name, a, b, base in zip(OP_GRAD_NAMES, got, want, plain):
        if b is None or b.numel() == 0:
            continue
        magnitude = max(1.0, float(b.abs().max()))
        slack = (1e-9 if dtype == torch.float64 else 2e-4) * magnitude
        limit = 4 * float((base.double() - b).abs().max()) + slack
        err = float((a.double() - b).abs().max())  # NaN fails: NaN <= limit is False
        assert err <= limit, f"{where}, d{name}: {err} > {limit}"
