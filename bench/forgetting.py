"""How many positions the forward scan needs to forget where it started: the
warm-up of the chunked CUDA forward (``FLASHSEMICRF_CUDA_FORWARD=chunks``,
docs/design.md "The forward in chunks"), measured without a GPU.

    python -m bench.forgetting [--seeds 3]

For each benchmark regime's problem (``bench.cases.make_inputs``: standard
normal scores, static transition) and two adversaries, the scan runs in
float64 from position 0 to a position tau, and a second scan starts at tau
from the state a sequence has at its start (what a chunk guesses). Both then
step together; printed is the first step after which every entry of the two
rings has the same log ratio to within 2^-17 (the float32 junction's
allowance, twice its slack) and 2^-35 (float64's), against the kernel's
warm-ups (3K + 128 and 6K + 256 positions). "never" means not within
8K + 512 steps: the "apart" adversary's labels form two groups that never
transition into each other, so the split of the mass between them is never
forgotten, and the chunked forward must (and does) hand such a sequence to
the serial forward.
"""

from __future__ import annotations

import argparse
import math

import torch

from .cases import Case, make_inputs

THRESHOLDS = (2.0**-17, 2.0**-35)


def warmups(K: int) -> tuple[int, int]:
    """The chunked forward's warm-ups, float32 and float64 (csrc/cuda/forward_kernel.cuh,
    chunk_warmup)."""
    return 3 * K + 128, 6 * K + 256


def _step(ring, scores_t, duration, transition):
    alpha = torch.logsumexp(ring + duration, dim=0)
    sigma = torch.logsumexp(alpha[:, None] + transition, dim=0)
    return torch.cat([(sigma + scores_t)[None], ring[:-1] + scores_t], dim=0)


def spread(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest minus smallest log ratio over the entries finite in both; inf if
    an entry is finite in one ring only."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb):
        return math.inf
    if not fa.any():
        return 0.0
    d = (a - b)[fa]
    return float(d.max() - d.min())


def steps_to_forget(scores, transition, duration, tau: int, max_steps: int,
                    thresholds=THRESHOLDS) -> list[int | None]:
    """Steps after tau until the guessed scan's ring matches the true one to each
    threshold (None: not within max_steps). scores (T, C) with T >= tau + max_steps."""
    K, C = duration.shape
    start = torch.zeros(C, dtype=scores.dtype)

    def fresh(t):
        ring = torch.full((K, C), -math.inf, dtype=scores.dtype)
        ring[0] = start + scores[t]
        return ring

    true = fresh(0)
    for t in range(1, tau):
        true = _step(true, scores[t], duration, transition)
    guess = fresh(tau - 1)  # the state at tau of a sequence started at tau - 1
    found: list[int | None] = [None] * len(thresholds)
    for m in range(max_steps):
        true = _step(true, scores[tau + m], duration, transition)
        guess = _step(guess, scores[tau + m], duration, transition)
        s = spread(true, guess)
        for i, th in enumerate(thresholds):
            if found[i] is None and s <= th:
                found[i] = m + 1
        if all(f is not None for f in found):
            break
    return found


def problems(seed: int):
    """(name, scores (T, C), transition, duration, tau, max_steps) for every regime's
    static problem and the two adversaries."""
    shapes = [("ner", 16, 9), ("speech", 30, 39), ("genomics", 200, 24), ("genomics", 500, 6)]
    for name, K, C in shapes:
        max_steps = 8 * K + 512
        tau = 2 * K + 100
        scores, transition, duration, _ = make_inputs(
            Case(name, "T", B=1, T=tau + max_steps, K=K, C=C), torch.device("cpu"),
            torch.float64, seed)
        yield f"{name} K={K} C={C}", scores[0], transition, duration, tau, max_steps
    K, C = 200, 24
    max_steps, tau = 8 * K + 512, 2 * K + 100
    scores, transition, duration, _ = make_inputs(
        Case("genomics", "T", B=1, T=tau + max_steps, K=K, C=C), torch.device("cpu"),
        torch.float64, seed)
    sparse = torch.full((C, C), -math.inf, dtype=torch.float64)
    for c in range(C):  # each label enters two others: a slow-mixing ring of labels
        sparse[c, (c + 1) % C] = 0.0
        sparse[c, (c + 5) % C] = -1.0
    yield (f"sparse transitions, weak scores K={K} C={C}", 0.1 * scores[0], sparse, duration,
           tau, max_steps)
    apart = transition.clone()
    apart[: C // 2, C // 2:] = -math.inf
    apart[C // 2:, : C // 2] = -math.inf
    yield f"apart (two groups that never meet) K={K} C={C}", scores[0], apart, duration, tau, \
        max_steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    print("| problem | seed | steps to 2^-17 (float32 warm-up) | steps to 2^-35 (float64 warm-up) |")
    print("|---|---|---|---|")
    for seed in range(args.seeds):
        for name, scores, transition, duration, tau, max_steps in problems(seed):
            K = duration.shape[0]
            found = steps_to_forget(scores, transition, duration, tau, max_steps)
            cells = [f"{'never' if f is None else f} ({w})" for f, w in zip(found, warmups(K))]
            print(f"| {name} | {seed} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
