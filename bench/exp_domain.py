"""The C++ CPU kernel's scaled exp-domain forward and backward against its
log-domain scan and backward, side by side in one run, one thread:
``python -m bench.exp_domain``.

Writes bench/results/exp-domain.csv and bench/results/exp-domain.md. For each
problem: forward, backward and forward+backward times with
FLASHSEMICRF_CPU_ALGORITHM = log and = exp (each setting runs its own forward
and backward), the exp-domain forward's and backward's fallback rates
(sequences handed to the log-domain kernel), and the throughput in
log-sum-exp-term equivalents per second — B·T·(C² + K·C) terms per forward,
B·T·K·C² with a (K, C, C) transition, 3x for forward+backward — as a ratio
to this machine's single-thread exp throughput, measured in the same run
(torch.exp into a preallocated, cache-resident float32 buffer, the best of a
few sizes). Times are the best of --repeats calls: the machine may be shared.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

import torch

import flashsemicrf  # noqa: F401  (registers the compiled ops)

ENV = "FLASHSEMICRF_CPU_ALGORITHM"
RESULTS = Path(__file__).resolve().parent / "results"

# (name, B, T, K, C, (K, C, C) transition)
PROBLEMS = [
    ("headline", 4, 2000, 30, 24, False),
    ("genomics", 1, 10_000, 200, 24, False),
    ("kcc", 1, 2000, 30, 24, True),
]


def exp_peak() -> float:
    """Single-thread exps per second, measured as the head-to-head benchmark
    measures it (torch.exp into cache-resident preallocated buffers)."""
    from .measure import cpu_exp_peak

    return cpu_exp_peak()["single_thread_exp_per_s"]


def problem(B: int, T: int, K: int, C: int, dd: bool, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    zero = torch.zeros(C, dtype=dtype)
    return [r(B, T, C), r(K, C, C) if dd else r(C, C), r(K, C), torch.full((B,), T), zero, zero,
            None, None]


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(name, B, T, K, C, dd, repeats: int) -> dict:
    ops = torch.ops.flashsemicrf
    fallbacks = torch.ops.flashsemicrf_testing.cpu_exp_fallbacks
    bwd_fallbacks = torch.ops.flashsemicrf_testing.cpu_exp_backward_fallbacks
    x = problem(B, T, K, C, dd)
    up = torch.ones(B)
    terms = B * T * (K * C * C if dd else C * C + K * C)
    row = dict(problem=name, B=B, T=T, K=K, C=C, transition="(K, C, C)" if dd else "(C, C)",
               dtype="float32", terms_fwd=terms)
    for algorithm in ("log", "exp"):
        os.environ[ENV] = algorithm
        before = fallbacks()
        log_z, ring, offset = ops.forward(*x, 0)
        taken = fallbacks() - before
        fwd = time_call(lambda: ops.forward(*x, 0), repeats)
        before_bwd = bwd_fallbacks()
        ops.backward(up, *x, log_z, ring, offset, 0, False)
        taken_bwd = bwd_fallbacks() - before_bwd
        bwd = time_call(lambda: ops.backward(up, *x, log_z, ring, offset, 0, False), repeats)

        def both():
            z, rg, off = ops.forward(*x, 0)
            ops.backward(up, *x, z, rg, off, 0, False)

        total = time_call(both, repeats)
        row[f"{algorithm}_fwd_ms"] = fwd * 1e3
        row[f"{algorithm}_bwd_ms"] = bwd * 1e3
        row[f"{algorithm}_fwdbwd_ms"] = total * 1e3
        if algorithm == "exp":
            row["fallbacks"] = f"{taken}/{B}"
            row["bwd_fallbacks"] = f"{taken_bwd}/{B}"
    return row


def precision(T: int, K: int = 200, C: int = 6, seed: int = 0) -> list:
    """float32 against float64 at long T, one sequence (scores N(-1.5, 1),
    parameters N(0, 1)): for each setting, its float32 forward and backward
    against the log-domain kernel in float64. Errors: log Z relative, score
    gradients absolute, the shared parameters max |Δ| / (1 + |g|)."""
    ops = torch.ops.flashsemicrf
    testing = torch.ops.flashsemicrf_testing
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    inputs = [r(1, T, C) - 1.5, r(C, C), r(K, C), torch.full((1,), T), r(C), r(C)]

    def run(algorithm, dtype):
        os.environ[ENV] = algorithm
        x = [v.to(dtype) if v.is_floating_point() else v for v in inputs] + [None, None]
        before = (testing.cpu_exp_fallbacks(), testing.cpu_exp_backward_fallbacks())
        t0 = time.perf_counter()
        log_z, ring, offset = ops.forward(*x, 0)
        grads = ops.backward(torch.ones(1, dtype=dtype), *x, log_z, ring, offset, 0, False)
        seconds = time.perf_counter() - t0
        taken = (testing.cpu_exp_fallbacks() - before[0],
                 testing.cpu_exp_backward_fallbacks() - before[1])
        return log_z.double(), [v.double() for v in grads[:5]], seconds, taken

    z64, g64, _, _ = run("log", torch.float64)
    rows = []
    for algorithm in ("log", "exp"):
        z, gr, seconds, taken = run(algorithm, torch.float32)
        row = dict(setting=algorithm, T=T, K=K, C=C, seconds=seconds,
                   fallbacks=f"{taken[0]}/1", bwd_fallbacks=f"{taken[1]}/1",
                   log_z=((z - z64).abs() / z64.abs()).max().item(),
                   scores=(gr[0] - g64[0]).abs().max().item())
        for name, a, b in zip(("transition", "duration", "start_transition", "end_transition"),
                              gr[1:], g64[1:]):
            row[name] = ((a - b).abs() / (1 + b.abs())).max().item()
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--precision-T", type=int, default=10**6,
                        help="T of the float32 precision check (0: skip it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    saved = os.environ.get(ENV)
    try:
        peak = exp_peak()
        rows = [measure(*p, repeats=args.repeats) for p in PROBLEMS]
        checks = precision(args.precision_T) if args.precision_T else []
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved
    for row in rows:
        for algorithm in ("log", "exp"):
            fwd_rate = row["terms_fwd"] / (row[f"{algorithm}_fwd_ms"] / 1e3)
            both_rate = 3 * row["terms_fwd"] / (row[f"{algorithm}_fwdbwd_ms"] / 1e3)
            row[f"{algorithm}_fwd_x_exp_peak"] = fwd_rate / peak
            row[f"{algorithm}_fwdbwd_x_exp_peak"] = both_rate / peak
        row["speedup_fwd"] = row["log_fwd_ms"] / row["exp_fwd_ms"]
        row["speedup_fwdbwd"] = row["log_fwdbwd_ms"] / row["exp_fwdbwd_ms"]
        row["exp_peak_per_s"] = peak
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "exp-domain.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# CPU kernel: exp-domain forward and backward vs the log-domain kernel",
        "",
        f"`python -m bench.exp_domain`, one thread, float32, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. Single-thread exp peak: {peak / 1e9:.2f} G exp/s "
        "(torch.exp into a cache-resident float32 buffer). Times are the best of "
        f"{args.repeats}. Each setting runs its own forward and backward "
        "(`FLASHSEMICRF_CPU_ALGORITHM=log`: the log-domain scan and backward).",
        "",
        "| problem | log fwd ms | exp fwd ms | log bwd ms | exp bwd ms | log fwd+bwd ms "
        "| exp fwd+bwd ms | fwd+bwd speed-up | exp fwd × exp peak | exp fwd+bwd × exp peak "
        "| fwd fallbacks | bwd fallbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} B={r['B']} T={r['T']} K={r['K']} C={r['C']} {r['transition']} "
            f"| {r['log_fwd_ms']:.1f} | {r['exp_fwd_ms']:.1f} | {r['log_bwd_ms']:.1f} "
            f"| {r['exp_bwd_ms']:.1f} | {r['log_fwdbwd_ms']:.1f} | {r['exp_fwdbwd_ms']:.1f} "
            f"| {r['speedup_fwdbwd']:.2f}x | {r['exp_fwd_x_exp_peak']:.2f} "
            f"| {r['exp_fwdbwd_x_exp_peak']:.2f} | {r['fallbacks']} | {r['bwd_fallbacks']} |")
    lines += ["", "Both transition forms run the exp-domain forward and backward; the (K, C, C) "
              "one takes K mat-vecs per position in the forward and 4 K·C² multiply-adds per "
              "position in the backward (the recompute, the posteriors, beta and the transition "
              "posteriors)."]
    if checks:
        lines += [
            "",
            f"## float32 precision at T = {args.precision_T}",
            "",
            "One sequence, K = 200, C = 6, scores N(-1.5, 1) uncentred: each setting's float32 "
            "forward and backward against the log-domain kernel in float64 (log Z relative, "
            "score gradients absolute, shared parameters max |Δ| / (1 + |g|)). Time: float32 "
            "forward + backward, one call.",
            "",
            "| setting | log Z | scores | transition | duration | start_transition "
            "| end_transition | s | fwd fallbacks | bwd fallbacks |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in checks:
            lines.append(
                f"| {c['setting']} | {c['log_z']:.1e} | {c['scores']:.1e} | {c['transition']:.1e} "
                f"| {c['duration']:.1e} | {c['start_transition']:.1e} | {c['end_transition']:.1e} "
                f"| {c['seconds']:.1f} | {c['fallbacks']} | {c['bwd_fallbacks']} |")
    (args.out / "exp-domain.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
