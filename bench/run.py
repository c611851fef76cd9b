"""The measurement loop: for each case and pass, run every backend once,
check its result, then time the ones that agree.

One case, one pass:

1. each backend's first call on the case's inputs — its warm-up; on the CPU
   also the peak-memory call (on a GPU a second call measures memory);
   a backend whose estimated time is over the budget is skipped instead,
   the estimate coming from the same backend at a smaller size;
2. every result (log Z, and for fwd+bwd the gradients of scores, duration
   and a static transition) is compared with a float64 run of our C++ kernel
   (or, where that would take too long, with another backend's result);
   a wrong log Z is a "mismatch" and is not timed, right log Z with gradients
   beyond tolerance is "inexact" and is timed;
3. the timing: the median of several calls, or the first call itself when
   it took longer than ``once_s``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import backends as bk
from . import measure
from .cases import PASS_TERMS, Case, lse_terms, make_inputs

# Agreement with the reference: log Z relative error (to max(1, |log Z|)) and
# gradient error (max |Δ| relative to max(1, max |g|)), per compute dtype.
TOLERANCE = {
    torch.float32: {"logz": 1e-4, "grad": 2e-3},
    torch.float64: {"logz": 1e-9, "grad": 1e-7},
}
# Cross-checks when the float64 reference is too slow, in order of trust.
CROSS_CHECK_ORDER = ("cuda", "cuda-exp", "cuda-spans", "cuda-parallel", "cuda-chunks", "triton",
                     "triton-chunks", "triton-exp", "triton-spans", "triton-parallel", "cpu",
                     "cpu-log", "torch", "flash-semicrf-triton", "flash-semicrf-torch",
                     "torch-struct", "pytorch-crf")


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype = torch.float32
    repeat: int = 5
    budget_s: float = 6.0  # skip a call estimated to take longer
    headline_budget_s: float = 300.0
    ref_budget_s: float = 60.0  # the float64 check run
    once_s: float = 3.0  # a first call this long is the measurement
    target_s: float = 2.0  # spend about this long on the repeated calls
    deadline: float | None = None  # time.monotonic() after which the rest is skipped
    dense_limit_bytes: int = 4 * 2**30
    exp_per_s: float = float("nan")
    # measure.cpu_exp_peak()'s dict: per-backend peaks (backends.exp_peak_for)
    # instead of the one ``exp_per_s``.
    exp_peak: dict | None = None

    def exp_peak_for(self, name: str, B: int) -> float:
        if self.exp_peak is None:
            return self.exp_per_s
        return bk.exp_peak_for(self.exp_peak, name, B)


@dataclass
class Sample:
    B: int
    T: int
    K: int
    C: int
    seconds: float


@dataclass
class Outcome:
    log_z: torch.Tensor
    grads: dict | None
    seconds: float  # the first (or, on a GPU, the memory) call
    mib: float
    fallbacks: float = float("nan")  # exp-domain sequences handed to the log scan


def _leaves(inputs, grad: bool):
    *floats, lengths = inputs
    return [t.detach().requires_grad_(grad) for t in floats] + [lengths]


def call(backend, inputs, pass_: str):
    """One call; returns (log Z, {name: grad} or None). The backend's
    environment variables hold over the backward too."""
    with bk.environment(getattr(backend, "env", {})):
        return _call(backend, inputs, pass_)


def _call(backend, inputs, pass_: str):
    if pass_ == "fwd":
        with torch.no_grad():
            return backend(*inputs).detach(), None
    scores, transition, duration, lengths = _leaves(inputs, True)
    z = backend(scores, transition, duration, lengths)
    z.sum().backward()
    grads = {"scores": scores.grad, "transition": transition.grad, "duration": duration.grad}
    return z.detach(), grads


def exp_fallbacks() -> float:
    """Passes the C++ kernel's exp-domain forward and backward have handed to
    their log-domain versions so far in this process, one per sequence and
    pass (NaN without the counters)."""
    try:
        testing = torch.ops.flashsemicrf_testing
        return float(testing.cpu_exp_fallbacks() + testing.cpu_exp_backward_fallbacks())
    except (AttributeError, RuntimeError):
        return float("nan")


def _slice_T(inputs, T: int):
    scores, transition, duration, lengths = inputs
    return (scores[:, :T].contiguous(), transition, duration, torch.full_like(lengths, T))


def _fmt_s(s: float) -> str:
    return f"{s:.3g} s" if s < 100 else f"{s:.0f} s"


class Runner:
    def __init__(self, settings: Settings, backends: dict[str, bk.Backend], progress=None):
        self.s = settings
        self.backends = backends
        self.progress = progress
        self.history: dict[tuple, list[Sample]] = {}
        self.rows: list[dict] = []
        self.ref = self._reference_backend()

    # -- the float64 reference --------------------------------------------------

    def _reference_backend(self) -> bk.Backend:
        from flashsemicrf import backends as ours

        name = "cpu" if ours.HAS_CPU_KERNELS else "torch"
        b = bk.make(name, torch.device("cpu"))
        return bk.Backend(f"{name}-f64", bk.KIND[name], b.fn, env=b.env)

    def calibrate(self) -> None:
        """Seed the reference's time history, so the first big case can be
        estimated before it is run."""
        cpu = torch.device("cpu")
        for tr in ("static", "duration"):
            case = Case("calibration", "-", B=1, T=300, K=30, C=24, transition=tr)
            inputs = make_inputs(case, cpu, torch.float64)
            for pass_ in ("fwd", "fwd+bwd"):
                call(self.ref, inputs, pass_)  # first-call overheads
                t = measure.wall(lambda: call(self.ref, inputs, pass_), cpu)
                self._record(self.ref.name, pass_, case, t)

    def _reference(self, case: Case, inputs, passes) -> tuple[object, str]:
        """(Outcome of the float64 run, '') or (None, why it was not run)."""
        pass_ = "fwd+bwd" if "fwd+bwd" in passes else "fwd"
        est = self.estimate(self.ref, case, pass_, None)
        if est is not None and est > self.s.ref_budget_s:
            return None, f"float64 check est. {_fmt_s(est)}"
        if self._out_of_time(est or 0.0):
            return None, "out of run time for the float64 check"
        cpu = torch.device("cpu")
        ref_inputs = tuple(
            t.detach().to(cpu, torch.float64) if t.is_floating_point() else t.cpu()
            for t in inputs
        )
        t0 = time.perf_counter()
        log_z, grads = call(self.ref, ref_inputs, pass_)
        self._record(self.ref.name, pass_, case, time.perf_counter() - t0)
        return Outcome(log_z, grads, 0.0, float("nan")), ""

    # -- estimates ------------------------------------------------------------------

    def _record(self, name: str, pass_: str, case: Case, seconds: float) -> None:
        key = (name, pass_, case.transition)
        self.history.setdefault(key, []).append(Sample(case.B, case.T, case.K, case.C, seconds))

    def _units(self, name: str, transition: str, B: int, T: int, K: int, C: int) -> float:
        return bk.cost_units(name, B, T, K, C, transition, torch.get_num_threads())

    def estimate(self, b: bk.Backend, case: Case, pass_: str, inputs) -> float | None:
        """Seconds one call should take, scaled from the same backend at a
        comparable size (``backends.cost_units``); probes a shorter sequence of
        the same shape when there is nothing to go on (slow kinds only;
        ``inputs`` None: never probe). None: no estimate, just run."""
        shape = (case.B, case.K, case.C)
        hist = [h for h in self.history.get((b.name, pass_, case.transition), [])
                if bk.comparable(b.name, (h.B, h.K, h.C), shape)]
        if hist:
            # The nearest measured size, from below where there is one.
            units = self._units(b.name, case.transition, case.B, case.T, case.K, case.C)
            scored = [(self._units(b.name, case.transition, h.B, h.T, h.K, h.C), h) for h in hist]
            below = [(u, h) for u, h in scored if u <= units]
            u, h = max(below, key=lambda x: x[0]) if below else min(scored, key=lambda x: x[0])
            return h.seconds * units / u
        if pass_ == "fwd+bwd":
            fwd = self.estimate(b, case, "fwd", None)
            if fwd is not None:
                return fwd * bk.FWD_BWD_OVER_FWD[b.kind]
        if b.kind == "kernel" or inputs is None:
            return None
        T_probe = min(case.T, 64 if b.kind == "loop" else 16)
        if T_probe == case.T:
            return None
        probe = Case(case.regime, case.sweep, case.B, T_probe, case.K, case.C, case.transition)
        t = measure.wall(lambda: call(b, _slice_T(inputs, T_probe), pass_), self.s.device)
        self._record(b.name, pass_, probe, t)
        return self.estimate(b, case, pass_, None)

    def _out_of_time(self, est: float) -> bool:
        return self.s.deadline is not None and time.monotonic() + est > self.s.deadline

    def _skip_reason(self, b: bk.Backend, case: Case, pass_: str, inputs) -> str:
        if self._out_of_time(0.0):
            return "skipped: run time limit reached (--max-minutes)"
        if b.kind == "dense":
            need = bk.dense_peak_bytes(case.B, case.T, case.K, case.C, self.s.dtype.itemsize)
            if need > self.s.dense_limit_bytes:
                return (f"skipped: dense chart needs ~{need / 2**30:.3g} GiB "
                        f"(limit {self.s.dense_limit_bytes / 2**30:.3g} GiB)")
        budget = self.s.headline_budget_s if b.name in case.force else self.s.budget_s
        est = self.estimate(b, case, pass_, inputs)
        if est is not None and est > budget:
            return f"skipped: too slow (est. {_fmt_s(est)} > budget {_fmt_s(budget)})"
        if est is not None and self._out_of_time(est):
            return f"skipped: run time limit (est. {_fmt_s(est)}, --max-minutes)"
        return ""

    # -- one case -------------------------------------------------------------------

    def _row(self, case: Case, name: str, pass_: str, **kw) -> dict:
        row = {
            "regime": case.regime, "sweep": case.sweep, "device": self.s.device.type,
            "backend": name, "pass": pass_, "B": case.B, "T": case.T, "K": case.K, "C": case.C,
            "transition": case.transition, "dtype": str(self.s.dtype).replace("torch.", ""),
            "status": "", "ms": float("nan"), "runs": 0, "peak_mib": float("nan"),
            "lse_terms": lse_terms(case.B, case.T, case.K, case.C, case.transition)
            * PASS_TERMS[pass_],
            "lse_per_s": float("nan"), "pct_exp_peak": float("nan"),
            "exp_peak_per_s": float("nan"), "exp_fallbacks": float("nan"),
            "logz_rel_err": float("nan"), "grad_err": float("nan"), "checked_against": "",
            "note": "",
        }
        row.update(kw)
        return row

    def _first_call(self, b: bk.Backend, inputs, pass_: str) -> Outcome:
        dev = self.s.device
        if dev.type == "cuda":
            log_z, grads = call(b, inputs, pass_)  # warm-up (and compilation)
            measure.sync(dev)
            with measure.peak_meter(dev) as peak:
                t = measure.wall(lambda: call(b, inputs, pass_), dev)
            return Outcome(log_z, grads, t, peak.mib)
        counts = bk.CPU_ALGORITHM.get(b.name) == "exp"
        before = exp_fallbacks() if counts else float("nan")
        with measure.peak_meter(dev) as peak:
            t0 = time.perf_counter()
            log_z, grads = call(b, inputs, pass_)
            t = time.perf_counter() - t0
        after = exp_fallbacks() if counts else float("nan")
        return Outcome(log_z, grads, t, peak.mib, after - before)

    def _compare(self, out: Outcome, ref: Outcome, transition: str) -> tuple[float, float]:
        def rel(a, r):
            a, r = a.detach().double().cpu(), r.detach().double().cpu()
            if a.shape != r.shape:
                return math.inf
            d = (a - r).abs()
            d = torch.where(torch.isfinite(d) | (a == r), d, torch.full_like(d, math.inf))
            d = torch.nan_to_num(d, nan=math.inf)
            return float(d.max()) / max(1.0, float(r.abs().max()))

        logz = rel(out.log_z, ref.log_z)
        grad = float("nan")
        if out.grads is not None and ref.grads is not None:
            # With a (K, C, C) transition the libraries spread the first
            # segment's transition gradient differently (same log Z, different
            # parametrisation of the free first label): not compared.
            names = ("scores", "duration") + (("transition",) if transition == "static" else ())
            grad = max(rel(out.grads[n], ref.grads[n]) if out.grads[n] is not None else math.inf
                       for n in names)
        return logz, grad

    def _time(self, b: bk.Backend, inputs, pass_: str, first: Outcome) -> tuple[float, int]:
        if first.seconds >= self.s.once_s:
            return first.seconds, 1
        runs = max(1, min(self.s.repeat, int(self.s.target_s / max(first.seconds, 1e-6))))
        return measure.median_seconds(lambda: call(b, inputs, pass_), self.s.device, runs), runs

    def _tick(self, case: Case, name: str, pass_: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(f"{case.label} {pass_} {name}", refresh=False)
            self.progress.update(1)

    def run_case(self, case: Case, names: list[str]) -> list[dict]:
        names = case_backends(case, names)
        dev = self.s.device
        try:
            inputs = make_inputs(case, dev, self.s.dtype)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            note = f"inputs do not fit: {type(exc).__name__}: {str(exc).splitlines()[0]}"[:200]
            rows = [self._row(case, n, p, status="oom", note=note)
                    for p in case.passes for n in names]
            for r in rows:
                self._tick(case, r["backend"], r["pass"])
            self.rows.extend(rows)
            self._cleanup()
            return rows
        ref, ref_why = None, ""
        rows = []
        for pass_ in case.passes:
            outcomes: dict[str, Outcome] = {}
            pending: dict[str, dict] = {}
            done: dict[str, dict] = {}  # by backend, listed in the order of ``names``
            for name in names:
                b = self.backends[name]
                if b.fn is None:
                    done[name] = self._row(case, name, pass_, status="unavailable", note=b.why)
                    self._tick(case, name, pass_)
                    continue
                out = None
                try:
                    why = self._skip_reason(b, case, pass_, inputs)  # may probe: may fail
                    if why:
                        done[name] = self._row(case, name, pass_, status="skipped", note=why)
                    else:
                        out = self._first_call(b, inputs, pass_)
                except torch.OutOfMemoryError as exc:
                    done[name] = self._row(case, name, pass_, status="oom",
                                           note=str(exc).splitlines()[0][:160])
                except Exception as exc:  # noqa: BLE001 — reported, the run goes on
                    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    done[name] = self._row(case, name, pass_, status="error",
                                           note=f"{type(exc).__name__}: {msg}"[:200])
                if out is None:
                    self._cleanup()  # after the except block has let go of a failure's frames
                    self._tick(case, name, pass_)
                    continue
                self._record(name, pass_, case, out.seconds)
                outcomes[name] = out
                pending[name] = self._row(case, name, pass_, peak_mib=out.mib,
                                          exp_fallbacks=out.fallbacks)

            if outcomes and ref is None and not ref_why:
                try:
                    ref, ref_why = self._reference(case, inputs, case.passes)
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    ref_why = f"float64 check failed: {type(exc).__name__}"
            tol = TOLERANCE.get(self.s.dtype, TOLERANCE[torch.float32])
            for name, out in outcomes.items():
                row = pending[name]
                against, check = self._pick_check(name, ref, outcomes)
                if check is None:
                    row["checked_against"] = "none"
                    row["note"] = f"unchecked: {ref_why or 'no reference'}; no other backend ran"
                else:
                    logz, grad = self._compare(out, check, case.transition)
                    row.update(logz_rel_err=logz, grad_err=grad, checked_against=against)
                    if not logz <= tol["logz"]:
                        # A wrong log Z is a wrong answer: reported, not timed.
                        row.update(status="mismatch", note=(
                            f"log Z disagrees with {against}: rel. err. {logz:.3g} "
                            f"(tolerance {tol['logz']:g}); not timed"))
                        done[name] = row
                        self._tick(case, name, pass_)
                        continue
                    if against != self.ref.name:
                        row["note"] = f"cross-checked ({ref_why})"
                    if grad > tol["grad"]:
                        # log Z right, gradients off: timed, and flagged.
                        row["status"] = "inexact"
                        row["note"] = (row["note"] + "; " if row["note"] else "") + (
                            f"gradients differ from {against} by {grad:.3g} "
                            f"(tolerance {tol['grad']:g})")
                seconds, runs = self._time(self.backends[name], inputs, pass_, out)
                ms = seconds * 1e3
                rate = row["lse_terms"] / seconds
                peak = self.s.exp_peak_for(name, case.B)
                row.update(status=row["status"] or "ok", ms=ms, runs=runs, lse_per_s=rate,
                           pct_exp_peak=100.0 * rate / peak, exp_peak_per_s=peak)
                if runs == 1:
                    row["note"] = (row["note"] + "; " if row["note"] else "") + "single run"
                done[name] = row
                self._tick(case, name, pass_)
            rows.extend(done[n] for n in names if n in done)
            outcomes.clear()
            self._cleanup()
        self.rows.extend(rows)
        return rows

    def _pick_check(self, name: str, ref, outcomes: dict) -> tuple[str, object]:
        if ref is not None:
            return self.ref.name, ref
        for other in CROSS_CHECK_ORDER:
            if other != name and other in outcomes:
                return other, outcomes[other]
        return "", None

    def _cleanup(self) -> None:
        if self.s.device.type == "cuda":
            torch.cuda.empty_cache()


def case_backends(case: Case, names: list[str]) -> list[str]:
    """The backends a case runs: those it names (all when it names none) that
    can compute its K at all."""
    return [n for n in names
            if (case.backends is None or n in case.backends) and bk.handles(n, case.K)]


def slots(cases: list[Case], names: list[str]) -> int:
    """How many rows the plan makes (the progress bar's total)."""
    return sum(len(c.passes) * len(case_backends(c, names)) for c in cases)

