"""What a run leaves behind: the terminal table, the CSV and its JSON sidecar,
the plots, and the Markdown summary for the README (``results/latest.md``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .backends import ALL, OURS

COLUMNS = (
    "regime", "sweep", "device", "backend", "pass", "B", "T", "K", "C", "transition", "dtype",
    "status", "ms", "runs", "peak_mib", "lse_terms", "lse_per_s", "pct_exp_peak",
    "logz_rel_err", "grad_err", "checked_against", "note",
)
TIMED = ("ok", "inexact")  # "inexact": right log Z, gradients beyond tolerance
NUMERIC = {"B", "T", "K", "C", "ms", "runs", "peak_mib", "lse_terms", "lse_per_s",
           "pct_exp_peak", "logz_rel_err", "grad_err"}


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
            f"CPU fwd+bwd, B=4 T=2000 K=30 C=24 float32: ours (cpu) {_ms(x['cpu_ms'])} ms vs "
            f"flash-semicrf's CPU path {_ms(x['flash_semicrf_torch_ms'])} ms: "
            f"{x['speedup']:.3g}x faster; peak memory {_mib(x['cpu_peak_mib'])} vs "
            f"{_mib(x['flash_semicrf_torch_peak_mib'])} MiB; gradient error vs float64 "
            f"{_fmt(x['cpu_grad_err'], 2)} vs {_fmt(x['flash_semicrf_torch_grad_err'], 2)}")
    if "gpu_fwd_bwd_B8_T1e5_K200_C24" in h:
        x = h["gpu_fwd_bwd_B8_T1e5_K200_C24"]
        lines.append(
            f"GPU fwd+bwd, B=8 T=1e5 K=200 C=24: ours (cuda) {_ms(x['cuda_ms'])} ms vs "
            f"flash-semicrf-triton {_ms(x['flash_semicrf_triton_ms'])} ms: "
            f"{x['speedup']:.3g}x faster; gradient error {_fmt(x['cuda_grad_err'], 2)} vs "
            f"{_fmt(x['flash_semicrf_triton_grad_err'], 2)}")
    if "gpu_memory_fwd_bwd_B1_T1e6_K1000_C24" in h:
        parts = [f"{k} {_mib(v['peak_mib'])} MiB" for k, v in
                 h["gpu_memory_fwd_bwd_B1_T1e6_K1000_C24"].items()]
        lines.append("GPU fwd+bwd peak memory, B=1 T=1e6 K=1000 C=24: " + ", ".join(parts))
    return lines


# -- Markdown ---------------------------------------------------------------------

def _cell(r: dict) -> str:
    st = r["status"]
    if st in TIMED:
        mib = r["peak_mib"]
        mem = "" if math.isnan(mib) else f" · {_mib(mib)} MiB"
        return f"{_ms(r['ms'])} ms{mem}" + (" ‡" if st == "inexact" else "")
    if st == "skipped":
        return "too slow" if "too slow" in r["note"] else (
            "too big" if "GiB" in r["note"] else "skipped")
    return st


def markdown(rows: list[dict], meta: dict) -> str:
    """Markdown summary: device and versions, headline numbers, and per regime
    a table of cases × backends (time · peak memory)."""
    env = meta.get("environment", {})
    dev = env.get("device_name", "?")
    lines = [
        f"Results of `{meta.get('command', 'python -m bench')}` on **{dev}** "
        f"({env.get('device_type', '?')}), {meta.get('finished', '')}: torch {env.get('torch')}, "
        f"triton {env.get('triton')}, flash-semicrf {env.get('flash_semicrf')}, "
        f"torch-struct {env.get('torch_struct')}"
        + (f", CUDA {env.get('cuda_runtime')}, driver {env.get('driver')}"
           if env.get("device_type") == "cuda" else
           f", {env.get('cpu_threads')} thread{'s' * (env.get('cpu_threads') != 1)}"
           + (" (machine oversubscribed)" if "oversubscribed" in env.get("threads_policy", "")
              else ""))
        + f"; commit {env.get('git_commit', '?')}{' (dirty)' if env.get('git_dirty') else ''}.",
        "",
    ]
    peak = meta.get("exp_peak", {})
    if peak:
        lines += [f"Exp throughput of the device: {_si(peak.get('exp_per_s', float('nan')))}/s "
                  f"({peak.get('source', '')}). Cells: median time · peak memory above the "
                  "inputs; fwd+bwd includes the forward. lse/s: log-sum-exp terms per second, "
                  "B·T·(C²+K·C) per forward (B·T·K·C² with a duration-dependent transition), "
                  "3× that for fwd+bwd.", ""]
    for h in headline_lines(meta.get("headline", {})):
        lines.append(f"- {h}")
    if meta.get("headline"):
        lines.append("")
    present = [b for b in ALL if any(r["backend"] == b and r["status"] != "unavailable"
                                     for r in rows)]
    missing = [b for b in ALL if b not in present and any(r["backend"] == b for r in rows)]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        rr = [r for r in rows if r["regime"] == regime]
        keys = list(dict.fromkeys((r["B"], r["T"], r["K"], r["C"], r["transition"], r["pass"])
                                  for r in rr))
        cols = [b for b in present if any(r["backend"] == b for r in rr)]
        lines.append(f"**{regime}**")
        lines.append("")
        lines.append("| B | T | K | C | transition | pass | " + " | ".join(cols)
                     + " | ours: lse/s (% of exp peak) |")
        lines.append("|" + "---:|" * 4 + "---|---|" + "---|" * len(cols) + "---:|")
        for key in keys:
            cells = {r["backend"]: r for r in rr
                     if (r["B"], r["T"], r["K"], r["C"], r["transition"], r["pass"]) == key}
            best = min((cells[b] for b in OURS if b in cells and cells[b]["status"] in TIMED),
                       key=lambda r: r["ms"], default=None)
            thr = "" if best is None else (
                f"{_si(best['lse_per_s'])} ({best['pct_exp_peak']:.2g}%, {best['backend']})")
            B, T, K, C, tr, pass_ = key
            lines.append(f"| {B} | {T} | {K} | {C} | {tr} | {pass_} | "
                         + " | ".join(_cell(cells[b]) if b in cells else "" for b in cols)
                         + f" | {thr} |")
        lines.append("")
    inexact = sorted({r["backend"] for r in rows if r["status"] == "inexact"})
    if inexact:
        worst = {b: max(r["grad_err"] for r in rows if r["backend"] == b
                        and r["status"] == "inexact") for b in inexact}
        lines.append("‡ log Z agrees, but the gradients differ from the float64 reference by "
                     "more than the tolerance (max: "
                     + ", ".join(f"`{b}` {worst[b]:.2g}" for b in inexact)
                     + "; column grad_err of the CSV). Timed all the same.")
        lines.append("")
    if missing:
        why = {r["backend"]: r["note"] for r in rows if r["status"] == "unavailable"}
        lines.append("Not run on this device: "
                     + "; ".join(f"`{b}` ({why.get(b, '')})" for b in missing) + ".")
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
                style = dict(marker="o", ms=4, label=b, lw=2 if b in OURS else 1.2,
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
