"""What a run leaves behind: the terminal table, the CSV and its JSON sidecar,
the plots, and the Markdown summary for the README (``results/latest.md``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .backends import ALL, CPU_ALGORITHM_ENV, OURS

COLUMNS = (
    "regime", "sweep", "device", "backend", "pass", "B", "T", "K", "C", "transition", "dtype",
    "status", "ms", "runs", "peak_mib", "lse_terms", "lse_per_s", "pct_exp_peak",
    "exp_peak_per_s", "exp_fallbacks", "logz_rel_err", "grad_err", "checked_against", "note",
)
TIMED = ("ok", "inexact")  # "inexact": right log Z, gradients beyond tolerance
NUMERIC = {"B", "T", "K", "C", "ms", "runs", "peak_mib", "lse_terms", "lse_per_s",
           "pct_exp_peak", "exp_peak_per_s", "exp_fallbacks", "logz_rel_err", "grad_err"}


def _pct(x: float) -> str:
    """A percentage with two significant digits, written out at 100 % and
    above (103%, not 1e+02%)."""
    return f"{x:.0f}%" if x >= 99.5 else f"{x:.2g}%"


def _fmt(v, digits=3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.{digits}g}"
    return str(v)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, ""), 6) for k in COLUMNS})


def read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in NUMERIC:
                v = r.get(k, "")
                if v == "":
                    r[k] = float("nan")
                else:
                    r[k] = int(v) if k in ("B", "T", "K", "C", "runs", "lse_terms") else float(v)
            rows.append(r)
    return rows


def write_json(path: Path, meta: dict) -> None:
    with open(path, "w") as f:
        json.dump(meta, f, indent=2, default=str)


def _si(x: float) -> str:
    if not isinstance(x, float) or math.isnan(x):
        return ""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _ms(x) -> str:
    """Three significant digits, never in exponent notation."""
    if not isinstance(x, float) or math.isnan(x):
        return ""
    for limit, digits in ((1, 3), (10, 2), (100, 1)):
        if x < limit:
            return f"{x:.{digits}f}"
    return f"{x:.0f}"


def _mib(x) -> str:
    if not isinstance(x, float) or math.isnan(x):
        return ""
    return "<0.01" if x < 0.01 else _ms(x)


def table(rows: list[dict]) -> str:
    """The terminal table: one line per (case, pass, backend)."""
    head = ("regime", "sweep", "backend", "pass", "B", "T", "K", "C", "tr", "ms", "MiB",
            "lse/s", "%peak", "status / note")
    lines = []
    for r in rows:
        note = r["status"] if r["status"] == "ok" and not r["note"] else (
            r["note"] if r["status"] in ("skipped", "unavailable")
            else f"{r['status']}" + (f": {r['note']}" if r["note"] else ""))
        lines.append((
            r["regime"], r["sweep"], r["backend"], r["pass"], str(r["B"]), str(r["T"]),
            str(r["K"]), str(r["C"]), "dur" if r["transition"] == "duration" else "st",
            _ms(r["ms"]), _mib(r["peak_mib"]), _si(r["lse_per_s"]), _fmt(r["pct_exp_peak"], 2),
            note[:90],
        ))
    width = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h)
             for i, h in enumerate(head)]
    right = {4, 5, 6, 7, 9, 10, 11, 12}

    def fmt(cells):
        return "  ".join(c.rjust(width[i]) if i in right else c.ljust(width[i])
                         for i, c in enumerate(cells)).rstrip()

    out = [fmt(head), fmt(["-" * w for w in width])]
    prev = None
    for r, cells in zip(rows, lines):
        case = (r["regime"], r["sweep"], r["B"], r["T"], r["K"], r["C"], r["transition"])
        if prev is not None and case != prev:
            out.append("")
        prev = case
        out.append(fmt(cells))
    return "\n".join(out)


def headline(rows: list[dict]) -> dict:
    """The issue's headline numbers, from whichever device the run was on."""
    def ok(backend, pass_, **size):
        for r in rows:
            if (r["regime"] == "headline" and r["backend"] == backend and r["pass"] == pass_
                    and r["status"] in TIMED and all(r[k] == v for k, v in size.items())):
                return r
        return None

    out = {}
    cpu = dict(B=4, T=2000, K=30, C=24)
    ours, theirs = ok("cpu", "fwd+bwd", **cpu), ok("flash-semicrf-torch", "fwd+bwd", **cpu)
    if ours and theirs:
        out["cpu_fwd_bwd_B4_T2000_K30_C24"] = {
            "cpu_ms": ours["ms"], "flash_semicrf_torch_ms": theirs["ms"],
            "speedup": theirs["ms"] / ours["ms"],
            "cpu_peak_mib": ours["peak_mib"], "flash_semicrf_torch_peak_mib": theirs["peak_mib"],
            "cpu_pct_exp_peak": ours["pct_exp_peak"],
            "cpu_grad_err": ours["grad_err"], "flash_semicrf_torch_grad_err": theirs["grad_err"],
        }
    gpu = dict(B=8, T=100_000, K=200, C=24)
    ours, theirs = ok("cuda", "fwd+bwd", **gpu), ok("flash-semicrf-triton", "fwd+bwd", **gpu)
    if ours and theirs:
        out["gpu_fwd_bwd_B8_T1e5_K200_C24"] = {
            "cuda_ms": ours["ms"], "flash_semicrf_triton_ms": theirs["ms"],
            "speedup": theirs["ms"] / ours["ms"], "cuda_pct_exp_peak": ours["pct_exp_peak"],
            "cuda_grad_err": ours["grad_err"], "flash_semicrf_triton_grad_err": theirs["grad_err"],
        }
    mem = {}
    for name in ("cuda", "triton", "flash-semicrf-triton"):
        r = ok(name, "fwd+bwd", B=1, T=1_000_000, K=1000, C=24)
        if r:
            mem[name] = {"peak_mib": r["peak_mib"], "ms": r["ms"]}
    if mem:
        out["gpu_memory_fwd_bwd_B1_T1e6_K1000_C24"] = mem
    return out


def headline_lines(h: dict) -> list[str]:
    lines = []
    if "cpu_fwd_bwd_B4_T2000_K30_C24" in h:
        x = h["cpu_fwd_bwd_B4_T2000_K30_C24"]
        lines.append(
            f"CPU fwd+bwd, B=4 T=2000 K=30 C=24 float32: {LABELS['cpu']} {_ms(x['cpu_ms'])} ms "
            f"vs {LABELS['flash-semicrf-torch']} {_ms(x['flash_semicrf_torch_ms'])} ms: "
            f"{x['speedup']:.3g}x faster; peak memory {_mib(x['cpu_peak_mib'])} vs "
            f"{_mib(x['flash_semicrf_torch_peak_mib'])} MiB; gradient error vs float64 "
            f"{_fmt(x['cpu_grad_err'], 2)} vs {_fmt(x['flash_semicrf_torch_grad_err'], 2)}")
    if "gpu_fwd_bwd_B8_T1e5_K200_C24" in h:
        x = h["gpu_fwd_bwd_B8_T1e5_K200_C24"]
        lines.append(
            f"GPU fwd+bwd, B=8 T=1e5 K=200 C=24: {LABELS['cuda']} {_ms(x['cuda_ms'])} ms vs "
            f"{LABELS['flash-semicrf-triton']} {_ms(x['flash_semicrf_triton_ms'])} ms: "
            f"{x['speedup']:.3g}x faster; gradient error {_fmt(x['cuda_grad_err'], 2)} vs "
            f"{_fmt(x['flash_semicrf_triton_grad_err'], 2)}")
    if "gpu_memory_fwd_bwd_B1_T1e6_K1000_C24" in h:
        parts = [f"{LABELS[k]} {_mib(v['peak_mib'])} MiB" for k, v in
                 h["gpu_memory_fwd_bwd_B1_T1e6_K1000_C24"].items()]
        lines.append("GPU fwd+bwd peak memory, B=1 T=1e6 K=1000 C=24: " + ", ".join(parts))
    return lines


# -- Markdown ---------------------------------------------------------------------

# Column names for a reader: the library first, then which of its code paths.
LABELS = {
    "cuda": "flashsemicrf CUDA",
    "cuda-exp": "flashsemicrf CUDA exp-domain",
    "cuda-spans": "flashsemicrf CUDA exp-domain, span-parallel recompute",
    "cuda-parallel": "flashsemicrf CUDA exp-domain, span-parallel sweeps",
    "cuda-chunks": "flashsemicrf CUDA chunked forward, span-parallel sweeps",
    "triton": "flashsemicrf Triton",
    "triton-chunks": "flashsemicrf Triton, chunked forward",
    "triton-exp": "flashsemicrf Triton exp-domain",
    "triton-spans": "flashsemicrf Triton, span-parallel recompute",
    "triton-parallel": "flashsemicrf Triton chunked forward, span-parallel sweeps",
    "cpu": "flashsemicrf C++ (CPU)",
    "cpu-log": "flashsemicrf C++ log-domain (CPU)",
    "torch": "flashsemicrf (PyTorch reference)",
    "flash-semicrf-triton": "flash-semicrf (Triton)",
    "flash-semicrf-torch": "flash-semicrf (PyTorch)",
    "torch-struct": "torch-struct",
    "pytorch-crf": "pytorch-crf",
}
# Our backends as the throughput column names them.
SHORT = {"cuda": "CUDA", "cuda-exp": "CUDA exp", "cuda-spans": "CUDA spans",
         "cuda-parallel": "CUDA parallel", "cuda-chunks": "CUDA chunks", "triton": "Triton",
         "triton-chunks": "Triton chunks", "triton-exp": "Triton exp",
         "triton-spans": "Triton spans", "triton-parallel": "Triton parallel", "cpu": "C++",
         "cpu-log": "C++ log",
         "torch": "PyTorch ref."}
# The comparison packages' versions when a run's JSON does not record them (the
# versions the bench and test extras pin).
PINNED = {"flash_semicrf": "0.2.0", "torch_struct": "0.5", "pytorch_crf": "0.7.2"}

PROBLEM_COLUMNS = ("B", "T", "K", "C", "transition", "pass")
THROUGHPUT = "flashsemicrf's fastest: exp/s (% of device max)"
NOT_IN_CASE = "—"

# The C++ kernel's two algorithms side by side (rendered when a run has both).
ALGORITHMS_TITLE = "CPU kernel: exp-domain vs log-domain"
ALG_EXP = "exp-domain (default)"
ALG_LOG = "log-domain"
ALG_SPEEDUP = "log ÷ exp time"
ALG_EXP_RATIO = "exp-domain terms/s ÷ exp peak"
ALG_LOG_RATIO = "log-domain terms/s ÷ exp peak"
ALG_PEAK = "exp peak used"
ALG_FALLBACKS = "exp-domain fallbacks"
ALGORITHM_COLUMNS = (ALG_EXP, ALG_LOG, ALG_SPEEDUP, ALG_EXP_RATIO, ALG_LOG_RATIO, ALG_PEAK,
                     ALG_FALLBACKS)
# The sizes of the CPU throughput targets, shown when the run has them:
# (B, T, K, C, transition).
ALGORITHM_SIZES = ((4, 2000, 30, 24, "static"), (1, 10_000, 200, 24, "static"),
                   (1, 2000, 30, 24, "duration"))


def _versions(env: dict) -> dict:
    return {k: env.get(k) or v for k, v in PINNED.items()}


def _device_max(peak: dict) -> str:
    """Which exp throughput the percentages divide by, in words."""
    single = peak.get("single_thread_exp_per_s")
    if single is None:
        rate = _si(peak.get("exp_per_s", float("nan")))
        return f"{rate}/s here, {peak.get('source', '')}" if rate else "not measured in this run"
    threads = peak.get("threads", 1)
    every = peak.get("all_threads_exp_per_s", single)
    return (f"measured at the start of the run: `torch.exp` writing into a preallocated "
            f"float32 buffer small enough to stay in cache, the best of a few sizes, "
            f"{_si(single)}/s on one thread"
            + (f" and {_si(every)}/s on all {threads} threads" if threads > 1 else "")
            + ". The C++ kernel runs one sequence per thread, so its rows are divided by "
            "min(B, threads) times the one-thread rate, the threads a batch of B can keep "
            "busy; the other backends' rows by the all-threads rate. The CSV's "
            "`exp_peak_per_s` column holds each row's divisor")


def column_legend(meta: dict) -> dict[str, str]:
    """What every column of the Markdown tables means, by its header, in the
    order the legend lists them."""
    v = _versions(meta.get("environment", {}))
    device_max = _device_max(meta.get("exp_peak", {}))
    algorithms = meta.get("cpu_algorithms", {})
    cpu_algorithm = (
        f" with its default algorithm, `{CPU_ALGORITHM_ENV}=exp`: the scaled exp-domain "
        "forward and backward (both transition forms), each of which hands a sequence to "
        "its log-domain version where scaled probabilities could lose precision"
        if algorithms.get("cpu") == "exp" else "")
    return {
        "B": "sequences in the batch.",
        "T": "length of every sequence, in positions (tokens, frames, bases).",
        "K": "longest segment allowed; K = 1 means every segment is one position, i.e. "
             "one label per position (a linear-chain CRF).",
        "C": "number of labels.",
        "transition": "`static`: one (C, C) table of label-to-label scores; `duration`: a "
                      "(K, C, C) table that also depends on the incoming segment's length "
                      "(K·C² work per position instead of C² + K·C).",
        "pass": "`fwd`: log Z only, no gradients (what inference costs); `fwd+bwd`: log Z "
                "and its gradients with respect to the scores, transition and duration "
                "(what the CRF part of a training step costs). Every call computes the "
                "whole batch.",
        LABELS["cuda"]: "this library's handwritten CUDA kernels (`--backends cuda`) with "
                        "their default, log-domain forward (`FLASHSEMICRF_CUDA_ALGORITHM=log`).",
        LABELS["cuda-exp"]: "the same CUDA kernels with the exp-domain forward and backward "
                            "sweep for the static transition "
                            "(`FLASHSEMICRF_CUDA_ALGORITHM=exp`, `--backends cuda-exp`).",
        LABELS["cuda-spans"]: "the exp-domain forward and sweep again, and every span's "
                              "recompute run before the backward's sweep, one CTA a span "
                              "(`FLASHSEMICRF_CUDA_RECOMPUTE=spans`, `--backends cuda-spans`).",
        LABELS["cuda-parallel"]: "the exp-domain forward, then the backward's sweeps "
                                 "span-parallel: the mirror image's forward gives the backward "
                                 "ring at every span's end and one CTA sweeps each span "
                                 "(`FLASHSEMICRF_CUDA_SWEEP=parallel`, "
                                 "`--backends cuda-parallel`).",
        LABELS["cuda-chunks"]: "the span-parallel sweeps, and the forward (the problem's and "
                               "its mirror image's) chunked: one CTA a span, each starting "
                               "a warm-up before its span from a guess, the chunks put on "
                               "one scale where each has forgotten its guess "
                               "(`FLASHSEMICRF_CUDA_FORWARD=chunks`, `--backends cuda-chunks`).",
        LABELS["triton"]: "this library's Triton kernels (`--backends triton`).",
        LABELS["triton-chunks"]: "the Triton kernels with the chunked forward of the CUDA "
                                 "one (`FLASHSEMICRF_TRITON_FORWARD=chunks`, "
                                 "`--backends triton-chunks`).",
        LABELS["triton-exp"]: "the Triton kernels with the exp-domain forward of the CUDA one "
                              "(`FLASHSEMICRF_TRITON_ALGORITHM=exp`, `--backends triton-exp`).",
        LABELS["triton-spans"]: "the Triton kernels with every span of the backward recomputed "
                                "at once, one program a span, before the sweep "
                                "(`FLASHSEMICRF_TRITON_RECOMPUTE=spans`, "
                                "`--backends triton-spans`).",
        LABELS["triton-parallel"]: "the Triton kernels with the chunked forward and the "
                                   "backward's sweeps span-parallel, each span from a guess a "
                                   "warm-up after it, joined where the guess is forgotten "
                                   "(`FLASHSEMICRF_TRITON_FORWARD=chunks`, "
                                   "`FLASHSEMICRF_TRITON_SWEEP=parallel`, "
                                   "`--backends triton-parallel`).",
        LABELS["cpu"]: "this library's compiled C++ kernel, one sequence per thread "
                       f"(`--backends cpu`){cpu_algorithm}.",
        LABELS["cpu-log"]: "the same C++ kernel with its older log-domain algorithm, "
                           f"`{CPU_ALGORITHM_ENV}=log`, set around each call "
                           "(`--backends cpu-log`): every log-sum-exp term costs an "
                           "exponential.",
        LABELS["torch"]: "this library's plain-PyTorch implementation of the same streaming "
                         "algorithm: the readable reference the kernels are tested against, "
                         "and what runs where no kernel is built (`--backends torch`; "
                         "`backend=\"torch\"` in the API). Not PyTorch itself.",
        LABELS["flash-semicrf-triton"]:
            f"flash-semicrf {v['flash_semicrf']}, `semi_crf_streaming_forward(..., "
            "use_triton=True)` (`--backends flash-semicrf-triton`).",
        LABELS["flash-semicrf-torch"]:
            f"flash-semicrf {v['flash_semicrf']} with `use_triton=False`: its PyTorch code "
            "path, the one it runs on a CPU (`--backends flash-semicrf-torch`).",
        LABELS["torch-struct"]:
            f"torch-struct {v['torch_struct']}, `SemiMarkovCRF(edge).partition` on the dense "
            "(B, T, K+1, C, C) edge tensor, whose building is timed too "
            "(`--backends torch-struct`).",
        LABELS["pytorch-crf"]:
            f"pytorch-crf {v['pytorch_crf']}, `torchcrf.CRF`: a linear-chain CRF, so it "
            "appears only where K = 1; timed is its log Z, the normaliser inside "
            "`CRF.forward` (`--backends pytorch-crf`).",
        THROUGHPUT:
            "how hard the fastest of this library's backends in that row (named in the "
            "cell: C++, C++ log, CUDA, CUDA exp, Triton or PyTorch ref.) keeps the device busy. "
            "Log Z is a "
            "sum of log-sum-exp terms, one exponential each: B·T·(C² + K·C) per forward "
            "with a static transition, B·T·K·C² with a duration-dependent one, three "
            "times that for fwd+bwd. The first number is those terms per second; the "
            "percentage divides it by the most exponentials per second the device can "
            f"compute ({device_max}). 100% would mean the device does nothing but "
            "exponentials; the rest of the time goes to memory traffic, synchronisation "
            "and overhead. It shows the headroom left in our kernels, not a comparison "
            "with the other libraries.",
        ALG_EXP: f"the C++ kernel's exp-domain algorithm (`{CPU_ALGORITHM_ENV}=exp`, the "
                 f"default; column {LABELS['cpu']}): time · memory, as in the other tables.",
        ALG_LOG: f"the same kernel's log-domain algorithm (`{CPU_ALGORITHM_ENV}=log`; column "
                 f"{LABELS['cpu-log']}), in the same run on the same inputs.",
        ALG_SPEEDUP: "the log-domain time divided by the exp-domain time: above 1× the "
                     "exp-domain algorithm is faster.",
        ALG_EXP_RATIO: "log-sum-exp terms per second of the exp-domain algorithm (B·T·(C² + "
                       "K·C) per forward with a static transition, B·T·K·C² with a "
                       "duration-dependent one, three times that for fwd+bwd), divided by "
                       "the exp throughput of the threads it can use (next column). 1× "
                       "means as many terms per second as the machine computes "
                       "exponentials: a log-domain algorithm, which needs one exponential "
                       "per term, cannot get there.",
        ALG_LOG_RATIO: "the same ratio for the log-domain algorithm.",
        ALG_PEAK: "the exp throughput both ratios divide by: the one-thread rate of "
                  "`torch.exp` into a cache-resident buffer, measured in this run, times "
                  "the threads the kernel can use on this batch, min(B, threads) (it runs "
                  "one sequence per thread).",
        ALG_FALLBACKS: "sequences of the checked call that the exp-domain forward or "
                       "backward handed to its log-domain version (of B per pass).",
    }


def marker_legend(meta: dict) -> dict[str, str]:
    """What every non-time entry of a table cell means, by the text shown."""
    settings = meta.get("settings", {})
    budget = settings.get("budget_s")
    over = f"{budget:g} s" if isinstance(budget, (int, float)) else "the per-call budget"
    return {
        "too slow": f"not run: the call was estimated (from the same library at a smaller "
                    f"size) to take over {over}, the run's per-call time budget "
                    "(`--budget`; at least 300 s for the headline cases).",
        "too big": "not run: torch-struct's dense chart, which grows as B·T·(K·C)³, was "
                   "estimated to need more memory than the run allows (on a CPU the smaller "
                   "of 4 GiB and 30% of free memory, on a GPU 80% of free memory).",
        "out of time": "not run: the run's time limit (`--max-minutes`) was reached first.",
        "skipped": "not run, for the reason in the CSV's `note` column.",
        "out of memory": "the device ran out of memory.",
        "wrong log Z": "ran, but its log Z disagreed with the float64 reference beyond the "
                       "tolerance (1e-4 relative in float32): not timed.",
        "error": "the call raised an exception (the CSV's `note` column has the message).",
        "not available": "the library could not run here (the CSV's `note` column says why).",
        "‡": "timed, and its log Z is right, but its gradients differ from the float64 "
             "reference by more than the tolerance (2e-3 relative in float32); see the "
             "note under the tables.",
        NOT_IN_CASE: "not part of this case: the headline cases compare chosen libraries "
                     "only.",
    }


def _marker(r: dict) -> str:
    """The legend key of a row without a time."""
    st, note = r["status"], r["note"]
    if st == "skipped":
        if "too slow" in note:
            return "too slow"
        if "GiB" in note:
            return "too big"
        if "run time limit" in note:
            return "out of time"
        return "skipped"
    return {"oom": "out of memory", "mismatch": "wrong log Z",
            "unavailable": "not available"}.get(st, "error")


def _cell(r: dict) -> tuple[str, str | None]:
    """(cell text, its legend key or None for a plain time)."""
    if r["status"] in TIMED:
        mib = r["peak_mib"]
        mem = "" if math.isnan(mib) else f" · {_mib(mib)} MiB"
        if r["status"] == "inexact":
            return f"{_ms(r['ms'])} ms{mem} ‡", "‡"
        return f"{_ms(r['ms'])} ms{mem}", None
    key = _marker(r)
    return key, key


CELL_FORMAT = (
    "A timed cell reads `12.3 ms · 0.50 MiB`: the median time of one call (fwd+bwd "
    "includes the forward), then the memory the call needed on top of its inputs: its "
    "peak minus what was allocated before it, so outputs, gradients, saved tensors and "
    "scratch space count. `<0.01 MiB`: under 10 KiB, which on a CPU is within "
    "measurement noise. Lower is better for both. Every result was checked against a "
    "float64 run before it was timed."
)


def _ratio(x) -> str:
    """Two decimals, two significant digits below 0.1 (0.024×, not 0.02×)."""
    if not isinstance(x, float) or math.isnan(x):
        return ""
    return f"{x:.2f}×" if x >= 0.1 else f"{x:.2g}×"


def algorithm_rows(rows: list[dict]) -> list[tuple[tuple, dict, dict]]:
    """(problem key, exp-domain row, log-domain row) of the cases where the run
    has both of the C++ kernel's algorithms: those at ``ALGORITHM_SIZES`` when
    there are any, else every such case. Empty when there is no ``cpu-log``."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["backend"] in ("cpu", "cpu-log"):
            key = (r["B"], r["T"], r["K"], r["C"], r["transition"], r["pass"])
            by_key.setdefault(key, {}).setdefault(r["backend"], r)
    both = {k: v for k, v in by_key.items() if len(v) == 2}
    targets = [(*size, pass_) for size in ALGORITHM_SIZES for pass_ in ("fwd", "fwd+bwd")
               if (*size, pass_) in both]
    return [(k, both[k]["cpu"], both[k]["cpu-log"]) for k in (targets or list(both))]


def algorithm_table(rows: list[dict], peak: dict) -> list[str]:
    """The C++ kernel's exp-domain and log-domain algorithms side by side:
    time, speed-up, terms per second over the exp peak, the fallbacks."""
    found = algorithm_rows(rows)
    if not found:
        return []
    single = peak.get("single_thread_exp_per_s")
    head = [*PROBLEM_COLUMNS, *ALGORITHM_COLUMNS]
    out = [f"**{ALGORITHMS_TITLE}**", "",
           "| " + " | ".join(head) + " |",
           "|" + "---:|" * 4 + "---|---|" + "---|" * 2 + "---:|" * 5]
    for key, exp, log in found:
        timed = exp["status"] in TIMED and log["status"] in TIMED
        nan = float("nan")
        divisor = (exp if exp["status"] in TIMED else log).get("exp_peak_per_s", nan)
        used = ""
        if isinstance(divisor, float) and not math.isnan(divisor):
            used = f"{_si(divisor)}/s"
            if single:
                n = round(divisor / single)
                used += f" ({n} thread{'s' * (n != 1)})"
        cells = [
            _cell(exp)[0], _cell(log)[0],
            _ratio(log["ms"] / exp["ms"]) if timed else "",
            _ratio(exp["lse_per_s"] / exp.get("exp_peak_per_s", nan))
            if exp["status"] in TIMED else "",
            _ratio(log["lse_per_s"] / log.get("exp_peak_per_s", nan))
            if log["status"] in TIMED else "",
            used,
            "" if math.isnan(exp.get("exp_fallbacks", nan))
            else str(int(exp["exp_fallbacks"])),
        ]
        B, T, K, C, tr, pass_ = key
        out.append(f"| {B} | {T} | {K} | {C} | {tr} | {pass_} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _load(env: dict) -> str:
    """The CPU's load when the run began: other work on the machine slows a
    CPU run down, and the reader should know."""
    load, cores = env.get("load_average_start"), env.get("cpu_count")
    if not load or not cores:
        return ""
    busy = " (shared with other work: timings are noisy)" if load[0] > 0.75 * cores else ""
    return f", load average {load[0]:.1f} on {cores} cores at the start{busy}"


def markdown(rows: list[dict], meta: dict) -> str:
    """Markdown summary: device and versions, headline numbers, a legend of the
    columns and cell markers used, and per regime a table of cases × backends
    (time · peak memory)."""
    from .cases import REGIME_TITLES

    env = meta.get("environment", {})
    v = _versions(env)
    dev = env.get("device_name", "?")
    lines = [
        f"Results of `{meta.get('command', 'python -m bench')}` on **{dev}** "
        f"({env.get('device_type', '?')}), {meta.get('finished', '')}: torch {env.get('torch')}, "
        f"triton {env.get('triton')}, flash-semicrf {v['flash_semicrf']}, "
        f"torch-struct {v['torch_struct']}"
        + (f", pytorch-crf {v['pytorch_crf']}"
           if any(r["backend"] == "pytorch-crf" for r in rows) else "")
        + (f", CUDA {env.get('cuda_runtime')}, driver {env.get('driver')}"
           if env.get("device_type") == "cuda" else
           f", {env.get('cpu_threads')} thread{'s' * (env.get('cpu_threads') != 1)}"
           + (" (machine oversubscribed)" if "oversubscribed" in env.get("threads_policy", "")
              else "")
           + _load(env))
        + f"; commit {env.get('git_commit', '?')}{' (dirty)' if env.get('git_dirty') else ''}.",
        "",
        "Time and memory of exact semi-Markov CRF inference (log Z, and its gradients) in "
        "this library and in the libraries users come from, on the same problems "
        "(random scores, float32). The legend below the headline numbers explains every "
        "column and every entry that is not a time.",
        "",
    ]
    for h in headline_lines(meta.get("headline", {})):
        lines.append(f"- {h}")
    if meta.get("headline"):
        lines.append("")

    present = [b for b in ALL if any(r["backend"] == b and r["status"] != "unavailable"
                                     for r in rows)]
    missing = [b for b in ALL if b not in present and any(r["backend"] == b for r in rows)]
    headers: list[str] = []
    used: set[str] = set()
    tables: list[str] = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        rr = [r for r in rows if r["regime"] == regime]
        keys = list(dict.fromkeys((r["B"], r["T"], r["K"], r["C"], r["transition"], r["pass"])
                                  for r in rr))
        cols = [b for b in present if any(r["backend"] == b for r in rr)]
        head = [*PROBLEM_COLUMNS, *(LABELS[b] for b in cols), THROUGHPUT]
        headers += [h for h in head if h not in headers]
        title = REGIME_TITLES.get(regime, regime)
        tables += [f"**{title}**", ""]
        tables.append("| " + " | ".join(head) + " |")
        tables.append("|" + "---:|" * 4 + "---|---|" + "---|" * len(cols) + "---:|")
        for key in keys:
            cells = {r["backend"]: r for r in rr
                     if (r["B"], r["T"], r["K"], r["C"], r["transition"], r["pass"]) == key}
            best = min((cells[b] for b in OURS if b in cells and cells[b]["status"] in TIMED),
                       key=lambda r: r["ms"], default=None)
            thr = "" if best is None else (
                f"{_si(best['lse_per_s'])} ({_pct(best['pct_exp_peak'])}, "
                f"{SHORT[best['backend']]})")
            texts = []
            for b in cols:
                if b in cells:
                    text, marker = _cell(cells[b])
                else:
                    text, marker = NOT_IN_CASE, NOT_IN_CASE
                if marker is not None:
                    used.add(marker)
                texts.append(text)
            B, T, K, C, tr, pass_ = key
            tables.append(f"| {B} | {T} | {K} | {C} | {tr} | {pass_} | "
                          + " | ".join(texts) + f" | {thr} |")
        tables.append("")

    algorithms = algorithm_table(rows, meta.get("exp_peak", {}))
    if algorithms:
        headers += [h for h in (*PROBLEM_COLUMNS, *ALGORITHM_COLUMNS) if h not in headers]
        found = algorithm_rows(rows)
        used |= {_cell(r)[1] for _, e, lg in found for r in (e, lg)} - {None}
        tables = algorithms + tables
    columns, markers = column_legend(meta), marker_legend(meta)
    lines += ["**How to read the tables**", "", CELL_FORMAT, "", "Columns:", ""]
    lines += [f"- **{h}**: {columns[h]}" for h in columns if h in headers]
    if used:
        lines += ["", "Entries other than a time:", ""]
        lines += [f"- **{m}**: {markers[m]}" for m in markers if m in used]
    lines.append("")
    lines += tables

    inexact = sorted({r["backend"] for r in rows if r["status"] == "inexact"})
    if inexact:
        worst = {b: max(r["grad_err"] for r in rows if r["backend"] == b
                        and r["status"] == "inexact") for b in inexact}
        lines.append("‡ log Z agrees, but the gradients differ from the float64 reference by "
                     "more than the tolerance (largest: "
                     + ", ".join(f"{LABELS[b]} {worst[b]:.2g}" for b in inexact)
                     + "; column `grad_err` of the CSV). Timed all the same.")
        lines.append("")
    if missing:
        why = {r["backend"]: r["note"] for r in rows if r["status"] == "unavailable"}
        lines.append("Not run on this device: "
                     + "; ".join(f"{LABELS[b]}: {why.get(b, '')}" for b in missing) + ".")
        lines.append("")
    return "\n".join(lines)


# -- plots ------------------------------------------------------------------------

def plots(rows: list[dict], stem: Path, exp_per_s: float) -> list[Path]:
    """One PNG per T sweep: time, peak memory and throughput against T, per
    backend, forward and forward+backward side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["sweep"] == "T" and r["status"] in TIMED:
            groups.setdefault((r["regime"], r["B"], r["K"], r["C"], r["transition"]), []).append(r)
    paths = []
    for (regime, B, K, C, tr), rr in groups.items():
        fig, axes = plt.subplots(3, 2, figsize=(10, 9.5), sharex=True)
        for j, pass_ in enumerate(("fwd", "fwd+bwd")):
            for b in ALL:
                pts = sorted((r["T"], r["ms"], r["peak_mib"], r["pct_exp_peak"]) for r in rr
                             if r["backend"] == b and r["pass"] == pass_)
                if not pts:
                    continue
                T = [p[0] for p in pts]
                style = dict(marker="o", ms=4, label=LABELS[b], lw=2 if b in OURS else 1.2,
                             ls="-" if b in OURS else "--")
                axes[0, j].plot(T, [p[1] for p in pts], **style)
                mem = [(t, p[2]) for t, p in zip(T, pts) if not math.isnan(p[2])]
                if mem:
                    axes[1, j].plot([m[0] for m in mem], [max(m[1], 1e-2) for m in mem], **style)
                axes[2, j].plot(T, [p[3] for p in pts], **style)
            axes[0, j].set_title(f"{pass_}")
            axes[0, j].set_ylabel("time (ms)")
            axes[1, j].set_ylabel("peak memory above inputs (MiB)\n(0 drawn at 0.01)")
            axes[2, j].set_ylabel("% of device exp throughput")
            axes[2, j].set_xlabel("T")
            for i in range(3):
                ax = axes[i, j]
                ax.set_xscale("log")
                ax.set_yscale("log")
                for axis in (ax.xaxis, ax.yaxis):
                    # 1-2-5 labels, so that a range inside one decade is labelled too.
                    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
                    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    axis.set_minor_formatter(NullFormatter())
                ax.grid(True, which="both", alpha=0.3)
        handles, labels = {}, {}
        for ax in axes.flat:
            for h, l in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(l, h)
        labels = list(handles)
        trs = "static" if tr == "static" else "duration-dependent"
        fig.suptitle(f"{regime}: B={B}, K={K}, C={C}, {trs} transition "
                     f"(exp peak {_si(exp_per_s)}/s)", y=0.99)
        fig.legend([handles[l] for l in labels], labels, loc="upper center",
                   bbox_to_anchor=(0.5, 0.965), ncol=min(4, len(labels)), frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        suffix = "" if tr == "static" else "-duration"
        path = stem.parent / f"{stem.name}-{regime}-B{B}-K{K}-C{C}{suffix}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
