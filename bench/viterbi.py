"""Viterbi with its path on the CPU, one thread: this library's streaming
decoder against flash-semicrf 0.2.0's (``python -m bench.viterbi``).

Writes bench/results/viterbi-cpu.md (and .csv). Each row is one problem
(B = 1, K = 200, C = 24, static transition, float32 scores, random): the time
of one call that returns the best score and the segmentation (best of
--repeats), and the memory the call needed above its inputs (peak RSS
growth). Ours keeps O(√(T·K)·C) working memory (checkpoints of the
max-semiring scan, one span's backpointers at a time); flash-semicrf's
``semi_crf_streaming_viterbi_with_backpointers`` keeps (B, T, C) backpointer
tables and then walks them in Python (as its ``decode_with_traceback`` does;
that method returns no segments past ``max_traceback_length``, 10^4 by
default). flash-semicrf gives the first segment's label a free start (score
0 before its transition); ours gets the same through start_transition =
max over the previous label, so the two best scores must agree.
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
import warnings
from pathlib import Path

import torch

import flashsemicrf

from .backends import cum_scores
from .measure import peak_meter

RESULTS = Path(__file__).resolve().parent / "results"
K, C = 200, 24


def problem(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, T, C, generator=g)
    transition = torch.randn(C, C, generator=g)
    duration = torch.randn(K, C, generator=g)
    lengths = torch.tensor([T])
    return scores, transition, duration, lengths


def ours(scores, transition, duration, lengths):
    best, segments = flashsemicrf.viterbi(
        scores, transition, duration, lengths,
        start_transition=transition.max(0).values, backend="cpu")
    return float(best[0]), segments.shape[0]


def flash(scores, transition, duration, lengths):
    from flash_semicrf.streaming.pytorch_reference import (
        semi_crf_streaming_viterbi_with_backpointers,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best, bp_k, bp_c, last = semi_crf_streaming_viterbi_with_backpointers(
            cum_scores(scores.double()), transition.double(), duration.double(), lengths, K)
    # The walk decode_with_traceback does: from the end, a segment at a time.
    t, c, n = int(lengths[0]), int(last[0]), 0
    while t > 0:
        d = max(1, int(bp_k[0, t - 1, c]))
        c_prev = int(bp_c[0, t - 1, c])
        t, c, n = t - d, c_prev, n + 1
    return float(best[0]), n


def measure(fn, args, repeats: int, budget_s: float):
    """(best seconds, peak MiB, result) of up to ``repeats`` calls within the budget."""
    times, result, mib = [], None, float("nan")
    start = time.perf_counter()
    for i in range(repeats):
        meter = peak_meter(torch.device("cpu"))
        with meter:
            t0 = time.perf_counter()
            result = fn(*args)
            times.append(time.perf_counter() - t0)
        mib = meter.mib if i == 0 else min(mib, meter.mib)
        if time.perf_counter() - start > budget_s:
            break
    return min(times), mib, result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1000,10000,100000,1000000",
                    help="comma-separated T (default: %(default)s)")
    ap.add_argument("--flash-max-T", type=int, default=10_000,
                    help="largest T for flash-semicrf (a Python loop over T; default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per cell before stopping")
    ap.add_argument("--out", type=Path, default=RESULTS / "viterbi-cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warm = problem(50)  # imports and first-call allocations out of the measurements
    ours(*warm)
    flash(*warm)
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        inputs = problem(T)
        s_ours, m_ours, (best_ours, n_ours) = measure(ours, inputs, args.repeats, args.budget)
        row = dict(T=T, ours_s=s_ours, ours_mib=m_ours, segments=n_ours, best=best_ours,
                   flash_s=float("nan"), flash_mib=float("nan"), agree="")
        if T <= args.flash_max_T:
            s_f, m_f, (best_f, n_f) = measure(flash, inputs, 1, args.budget)
            row.update(flash_s=s_f, flash_mib=m_f,
                       agree=f"{abs(best_f - best_ours):.1e}, {n_f} segments")
        rows.append(row)
        print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"Viterbi with the path, CPU, one thread ({platform.processor() or platform.machine()}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"`python -m bench.viterbi` (B = 1, K = {K}, C = {C}, static transition, float32).",
        "",
        "| T | flashsemicrf | memory | segments | flash-semicrf 0.2.0 | memory "
        "| best-score difference, its segments |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fl = (f"{r['flash_s'] * 1e3:.0f} ms | {r['flash_mib']:.1f} MiB"
              if r["flash_s"] == r["flash_s"] else "not run | ")
        lines.append(f"| {r['T']:,} | {r['ours_s'] * 1e3:.1f} ms | {r['ours_mib']:.1f} MiB "
                     f"| {r['segments']} | {fl} | {r['agree']} |")
    lines += ["", "Memory: peak RSS growth during the call, above its inputs. Outputs count: "
              "a (B, T) int64 label row and (N, 4) int64 segment rows, 8 bytes a position and "
              "32 a segment, most of ours at large T (the kernel's own working memory is "
              "the checkpoints and one span's backpointers, about 4 MiB at T = 10^6)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
