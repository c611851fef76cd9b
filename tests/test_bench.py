"""The benchmark's user-facing parts on this CPU: latest.md names and explains
every column and every cell entry, pytorch-crf maps onto our K = 1 problem (an
oracle test: its log-likelihood and log Z equal ours), and the plan holds a
K = 1 case that pytorch-crf joins and no other."""

from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest
import torch

from toolchain import ROOT

sys.path.append(str(ROOT))  # bench/, after the flashsemicrf already imported
import flashsemicrf as fsc  # noqa: E402
from bench import backends as bk  # noqa: E402
from bench import cli  # noqa: E402
from bench import measure  # noqa: E402
from bench import report  # noqa: E402
from bench.cases import REGIME_TITLES, REGIMES, Case, plan  # noqa: E402
from bench.run import Runner, Settings, case_backends  # noqa: E402

LATEST = ROOT / "bench" / "results" / "latest.md"
TIME_CELL = re.compile(r"^\d[\d.]* ms( · (<0\.01|\d[\d.]*) MiB)?( ‡)?$")
THROUGHPUT_CELL = re.compile(
    r"^\d[\d.]*[kMGT]? \(\d[\d.]*%, (C\+\+|C\+\+ log|CUDA|CUDA exp|Triton|PyTorch ref\.)\)$")
RATIO_CELL = re.compile(r"^\d+(\.\d+)?(e-\d+)?×$")
# The numeric cells of the exp-domain vs log-domain section, by column.
NUMBER_CELLS = {
    report.ALG_SPEEDUP: RATIO_CELL,
    report.ALG_EXP_RATIO: RATIO_CELL,
    report.ALG_LOG_RATIO: RATIO_CELL,
    report.ALG_PEAK: re.compile(r"^\d[\d.]*[kMGT]?/s \(\d+ threads?\)$"),
    report.ALG_FALLBACKS: re.compile(r"^\d+$"),
}


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, body rows) of every Markdown table in ``text``."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|--"):
            split = lambda s: [c.strip() for c in s.strip().strip("|").split("|")]  # noqa: E731
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                body.append(split(row))
            out.append((split(line), body))
    return out


def _legend(text: str) -> dict[str, str]:
    """The legend's ``- **name**: meaning`` entries."""
    return dict(re.findall(r"^- \*\*(.+?)\*\*: (.+)$", text, re.M))


def undefined(text: str) -> list[str]:
    """Column headers and non-time cell entries of ``text`` that its legend
    does not define."""
    legend = _legend(text)
    missing = []
    tables = _tables(text)
    assert tables, "no table found"
    for header, body in tables:
        missing += [f"column {h!r}" for h in header if h not in legend]
        for row in body:
            assert len(row) == len(header), (header, row)
            for h, cell in zip(header, row):
                if h in report.PROBLEM_COLUMNS or cell == "":
                    continue
                if h == report.THROUGHPUT:
                    if not THROUGHPUT_CELL.match(cell):
                        missing.append(f"throughput cell {cell!r}")
                    continue
                if h in NUMBER_CELLS:
                    if not NUMBER_CELLS[h].match(cell):
                        missing.append(f"cell {cell!r} in column {h!r}")
                    continue
                if TIME_CELL.match(cell):
                    if cell.endswith("‡") and "‡" not in legend:
                        missing.append("marker '‡'")
                elif cell not in legend:
                    missing.append(f"cell {cell!r} in column {h!r}")
    return sorted(set(missing))


def _row(backend, status, regime="ner", K=16, pass_="fwd", note="", ms=1.5, **kw):
    timed = status in report.TIMED
    r = {"regime": regime, "sweep": "T", "device": "cpu", "backend": backend, "pass": pass_,
         "B": 2, "T": 64, "K": K, "C": 9, "transition": "static", "dtype": "float32",
         "status": status, "ms": ms if timed else math.nan, "runs": 3 if timed else 0,
         "peak_mib": 0.25 if timed else math.nan, "lse_terms": 1000,
         "lse_per_s": 1e9 if timed else math.nan, "pct_exp_peak": 40.0 if timed else math.nan,
         "logz_rel_err": math.nan, "grad_err": 0.01 if status == "inexact" else math.nan,
         "checked_against": "", "note": note}
    r.update(kw)
    return r


def every_kind_of_row() -> list[dict]:
    """One row of every status and skip reason, over every backend and regime."""
    rows = []
    notes = {
        "torch-struct": ("skipped", "skipped: dense chart needs ~9 GiB (limit 4 GiB)"),
        "flash-semicrf-torch": ("skipped", "skipped: too slow (est. 40 s > budget 6 s)"),
        "flash-semicrf-triton": ("skipped", "skipped: run time limit reached (--max-minutes)"),
        "triton": ("mismatch", "log Z disagrees"),
        "cuda": ("oom", "CUDA out of memory"),
    }
    for b in bk.ALL:
        status, note = notes.get(b, ("ok", ""))
        if b != "pytorch-crf":
            rows.append(_row(b, status, note=note))
            rows.append(_row(b, "inexact" if b == "torch" else "error", pass_="fwd+bwd",
                             note="" if b == "torch" else "RuntimeError: boom"))
        rows.append(_row(b, "ok", regime="tagging", K=1))
        rows.append(_row(b, "skipped", regime="tagging", K=1, pass_="fwd+bwd",
                         note="skipped: for a reason of its own"))
    # Two cases, the second naming its backends: the others have no row there.
    rows.append(_row("cpu", "ok", regime="headline", pass_="fwd+bwd"))
    rows.append(_row("torch", "ok", regime="headline", pass_="fwd+bwd"))
    rows.append(_row("cpu", "ok", regime="headline", pass_="fwd+bwd", T=128))
    rows.append(_row("cpu", "unavailable", regime="speech", note="not built"))
    return rows


META = {
    "environment": {"device_name": "a CPU", "device_type": "cpu", "cpu_threads": 2,
                    "torch": torch.__version__, "git_commit": "abc1234",
                    "flash_semicrf": "0.2.0", "torch_struct": "0.5", "pytorch_crf": "0.7.2"},
    "exp_peak": {"exp_per_s": 1.2e9, "source": "measured"},
    "settings": {"budget_s": 6.0},
}


def test_legend_defines_every_column_and_cell_entry():
    rows = every_kind_of_row()
    text = report.markdown(rows, META)
    assert undefined(text) == []
    # Every kind of entry was exercised, so the check above covered them all.
    cells = {c for _, body in _tables(text) for row in body for c in row}
    for entry in report.marker_legend(META):
        assert entry in cells or any(c.endswith(" " + entry) for c in cells), entry
    headers = {h for header, _ in _tables(text) for h in header}
    assert {report.LABELS[b] for b in bk.ALL} <= headers


def test_the_check_sees_a_missing_legend_entry():
    text = report.markdown(every_kind_of_row(), META)
    name = report.LABELS["torch"]
    without = re.sub(rf"^- \*\*{re.escape(name)}\*\*: .*\n", "", text, flags=re.M)
    assert undefined(without) == [f"column {name!r}"]
    without = re.sub(r"^- \*\*too slow\*\*: .*\n", "", text, flags=re.M)
    assert undefined(without) == ["cell 'too slow' in column 'flash-semicrf (PyTorch)'"]


def test_columns_name_the_library():
    # Our plain-PyTorch reference is never a bare "torch" next to "torch-struct".
    assert len(set(report.LABELS.values())) == len(report.LABELS)
    for name in bk.OURS:
        assert report.LABELS[name].startswith("flashsemicrf ")
    assert "reference" in report.LABELS["torch"]
    text = report.markdown(every_kind_of_row(), META)
    assert "% of exp peak" not in text
    assert "| torch |" not in text
    # pytorch-crf is a column of the K = 1 table only.
    for header, body in _tables(text):
        ks = {row[header.index("K")] for row in body}
        assert (report.LABELS["pytorch-crf"] in header) == (ks == {"1"}), (header, ks)


def test_committed_latest_md_is_readable():
    text = LATEST.read_text()
    assert undefined(text) == []
    assert "% of exp peak" not in text and "| torch |" not in text
    # It holds the K = 1 comparison with pytorch-crf.
    assert any(report.LABELS["pytorch-crf"] in header for header, _ in _tables(text))


def test_committed_latest_md_is_the_report_of_the_newest_results():
    """latest.md is what the report code makes of the newest CSV and its JSON,
    so the file and the code that explains it cannot drift apart."""
    newest = cli.newest_csv(LATEST.parent)
    meta = json.loads(newest.with_suffix(".json").read_text())
    rows = report.read_csv(newest)
    meta.setdefault("headline", report.headline(rows))
    assert LATEST.read_text() == report.markdown(rows, meta) + "\n", (
        "bench/results/latest.md is stale: python -m bench --markdown re-renders it")


def test_plan_has_a_k1_case_for_pytorch_crf_only():
    for device in ("cpu", "cuda"):
        for full in (False, True):
            cases = plan(torch.device(device), full)
            assert {c.regime for c in cases} == set(REGIMES) <= set(REGIME_TITLES)
            k1 = [c for c in cases if c.K == 1]
            assert k1 and all(c.regime == "tagging" for c in k1), (device, full)
            for c in cases:
                assert ("pytorch-crf" in case_backends(c, list(bk.ALL))) == (c.K == 1), c


# -- pytorch-crf, the oracle of K = 1 ---------------------------------------------------


def _k1_problem(B=3, T=7, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    lengths = torch.tensor([T, 4, 1][:B])
    return dict(scores=r(B, T, C), transition=r(C, C), duration=r(1, C), lengths=lengths,
                start_transition=r(C), end_transition=r(C)), g


@pytest.mark.oracle
def test_pytorch_crf_log_likelihood_and_log_z_equal_ours():
    torchcrf = pytest.importorskip("torchcrf", reason="pytorch-crf is not installed "
                                   "(pip install pytorch-crf==0.7.2; the test extra has it)")
    p, g = _k1_problem()
    B, T, C = p["scores"].shape
    crf = torchcrf.CRF(C, batch_first=True).double()
    with torch.no_grad():
        crf.transitions.copy_(p["transition"])
        crf.start_transitions.copy_(p["start_transition"])
        crf.end_transitions.copy_(p["end_transition"])
    emissions = p["scores"] + p["duration"][0]  # K = 1: the duration row is a label bias
    mask = torch.arange(T) < p["lengths"].unsqueeze(1)
    tags = torch.randint(0, C, (B, T), generator=g) * mask

    llh = crf(emissions, tags, mask=mask, reduction="none")
    log_z = fsc.log_partition(**p, backend="torch")
    gold = fsc.score(segments=fsc.labels_to_segments(tags, p["lengths"], 1), **p,
                     backend="torch")
    torch.testing.assert_close(llh, gold - log_z, rtol=0, atol=1e-10)
    normaliser = crf._compute_normalizer(emissions.transpose(0, 1), mask.transpose(0, 1))
    torch.testing.assert_close(normaliser, log_z, rtol=0, atol=1e-10)


@pytest.mark.oracle
def test_bench_pytorch_crf_backend_gives_our_log_z_and_gradients():
    pytest.importorskip("torchcrf", reason="pytorch-crf is not installed "
                        "(pip install pytorch-crf==0.7.2; the bench extra has it)")
    p, _ = _k1_problem(seed=1)
    args = [p["scores"], p["transition"], p["duration"]]
    ours = bk.make("torch", torch.device("cpu"))
    theirs = bk.make("pytorch-crf", torch.device("cpu"))
    assert theirs.fn is not None, theirs.why
    results = []
    for backend in (ours, theirs):
        leaves = [a.detach().requires_grad_() for a in args]
        z = backend(*leaves, p["lengths"])
        grads = torch.autograd.grad(z.sum(), leaves)
        results.append((z.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-10)
    for name, a, b in zip(("scores", "transition", "duration"), results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")
    # A semi-Markov problem (K > 1) is not pytorch-crf's: a clear error, never a number.
    with pytest.raises(ValueError, match="K = 1 only"):
        theirs(p["scores"], p["transition"], torch.zeros(3, p["scores"].shape[2]), p["lengths"])


@pytest.mark.oracle
def test_runner_checks_and_times_pytorch_crf_on_a_k1_case():
    pytest.importorskip("torchcrf", reason="pytorch-crf is not installed")
    cpu = torch.device("cpu")
    names = ["torch", "pytorch-crf"]
    # As the CLI does: smoke-tested first, which also pays one-time costs (the
    # first custom-op call imports torch._dynamo, seconds on a busy machine)
    # outside the timed calls.
    backends = bk.prepare(names, cpu)
    settings = Settings(device=cpu, repeat=1, target_s=0.01, exp_per_s=1e9)
    runner = Runner(settings, backends)
    rows = runner.run_case(Case("tagging", "T", B=2, T=24, K=1, C=3), names)
    assert sorted((r["backend"], r["pass"]) for r in rows) == sorted(
        (n, p) for n in names for p in ("fwd", "fwd+bwd"))
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["logz_rel_err"] <= 1e-4, r
    # The same runner gives pytorch-crf no row on a K > 1 case.
    rows = runner.run_case(Case("ner", "T", B=2, T=24, K=4, C=3, passes=("fwd",)), names)
    assert [r["backend"] for r in rows] == ["torch"]


# -- the C++ kernel's two algorithms and the exp peak --------------------------------

ENV = bk.CPU_ALGORITHM_ENV
needs_cpu_kernel = pytest.mark.skipif(not fsc.backends.HAS_CPU_KERNELS,
                                      reason="needs the C++ CPU kernel")


def _static_problem(B=2, T=300, K=12, C=5, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(B, T, C), 0.5 * r(C, C), 0.5 * r(K, C), torch.full((B,), T)


def _direct(algorithm: str, inputs, monkeypatch, grad: bool = False):
    """log Z (and the score gradient) of the C++ kernel with the variable set by hand."""
    monkeypatch.setenv(ENV, algorithm)
    scores, transition, duration, lengths = inputs
    scores = scores.detach().requires_grad_(grad)
    z = fsc.log_partition(scores, transition, duration, lengths,
                          start_transition=bk.phantom_start(transition), backend="cpu")
    if grad:
        z.sum().backward()
        return z.detach(), scores.grad
    return z, None


@needs_cpu_kernel
def test_cpu_log_backend_runs_the_log_algorithm_and_restores_the_variable(monkeypatch):
    from bench.run import call

    inputs = _static_problem()
    cpu = torch.device("cpu")
    exp_b, log_b = bk.make("cpu", cpu), bk.make("cpu-log", cpu)
    assert (exp_b.env, log_b.env) == ({ENV: "exp"}, {ENV: "log"})
    # The kernel reads the variable on every call: a bad value is an error...
    monkeypatch.setenv(ENV, "bogus")
    with pytest.raises(RuntimeError, match=ENV):
        fsc.log_partition(*inputs, backend="cpu")
    # ... which the backends override for their call only, forward and backward.
    seen = []

    def spy(scores, *rest):  # cpu-log, noting the variable when its gradient arrives
        scores.register_hook(lambda g: seen.append(os.environ.get(ENV)))
        return log_b.fn(scores, *rest)

    spied = bk.Backend("cpu-log", log_b.kind, spy, env=log_b.env)
    z_log, grads_log = call(spied, inputs, "fwd+bwd")
    assert os.environ[ENV] == "bogus" and seen == ["log"]
    z_exp = exp_b(*inputs)
    assert os.environ[ENV] == "bogus"
    monkeypatch.delenv(ENV)
    log_b(*inputs)
    assert ENV not in os.environ
    # The same numbers as the kernel run by hand with each algorithm, bit for bit.
    direct_log, grad_log = _direct("log", inputs, monkeypatch, grad=True)
    direct_exp, _ = _direct("exp", inputs, monkeypatch)
    assert torch.equal(z_log, direct_log) and torch.equal(grads_log["scores"], grad_log)
    assert torch.equal(z_exp, direct_exp)
    # Two algorithms, one log Z: equal to rounding, but in float64 not bitwise
    # (float32 log Z rounds to the same value), so the comparisons above tell
    # them apart on this problem.
    torch.testing.assert_close(z_log, z_exp, rtol=1e-12, atol=0)
    assert not torch.equal(direct_log, direct_exp)


def test_environment_restores_after_an_exception(monkeypatch):
    monkeypatch.setenv(ENV, "exp")
    monkeypatch.delenv("FLASHSEMICRF_BENCH_UNSET", raising=False)
    with pytest.raises(ZeroDivisionError):
        with bk.environment({ENV: "log", "FLASHSEMICRF_BENCH_UNSET": "1"}):
            assert os.environ[ENV] == "log"
            1 / 0
    assert os.environ[ENV] == "exp" and "FLASHSEMICRF_BENCH_UNSET" not in os.environ


def test_cpu_exp_peak_measures_one_and_all_threads():
    threads = torch.get_num_threads()
    peak = measure.cpu_exp_peak(exps_per_timing=1 << 16, timings=2)
    assert torch.get_num_threads() == threads
    for key in ("exp_per_s", "single_thread_exp_per_s", "all_threads_exp_per_s"):
        assert peak[key] > 1e6, (key, peak)
    assert peak["exp_per_s"] == peak["single_thread_exp_per_s"]
    assert peak["threads"] == threads and "torch.exp" in peak["source"]
    # The best of every buffer size, one thread; all threads only above the
    # size torch.exp splits across threads.
    assert set(peak["per_size"]["1"]) == {str(n) for n in measure.EXP_PEAK_SIZES}
    assert peak["single_thread_exp_per_s"] == max(peak["per_size"]["1"].values())
    if threads > 1:
        assert set(peak["per_size"][str(threads)]) == {
            str(n) for n in measure.EXP_PEAK_SIZES if n >= measure.PARALLEL_GRAIN}


def test_exp_peak_for_counts_the_threads_a_backend_can_use():
    peak = {"exp_per_s": 2e9, "single_thread_exp_per_s": 2e9, "all_threads_exp_per_s": 7e9,
            "threads": 4}
    # The C++ kernel: one sequence per thread, so min(B, threads) threads.
    assert bk.exp_peak_for(peak, "cpu", 1) == 2e9
    assert bk.exp_peak_for(peak, "cpu-log", 3) == 6e9
    assert bk.exp_peak_for(peak, "cpu", 64) == 8e9
    assert bk.exp_peak_for(peak, "cpu-f64", 2) == 4e9
    # Anything else: the all-threads measurement. On a GPU: the device's peak.
    assert bk.exp_peak_for(peak, "torch", 1) == 7e9
    assert bk.exp_peak_for({"exp_per_s": 4e12, "source": "table"}, "cuda", 1) == 4e12


@needs_cpu_kernel
def test_runner_times_both_algorithms_against_their_fair_exp_peak(monkeypatch):
    # A value the kernel rejects: every call of the run, the float64 check's
    # too, must set its own algorithm, and leave this one in place.
    monkeypatch.setenv(ENV, "bogus")
    cpu = torch.device("cpu")
    names = ["cpu", "cpu-log"]
    peak = {"exp_per_s": 1e9, "single_thread_exp_per_s": 1e9, "all_threads_exp_per_s": 1.5e9,
            "threads": 2}
    settings = Settings(device=cpu, repeat=1, target_s=0.01, exp_per_s=1e9, exp_peak=peak)
    runner = Runner(settings, bk.prepare(names, cpu))
    rows = runner.run_case(Case("headline", "headline", B=3, T=40, K=6, C=4), names)
    assert sorted((r["backend"], r["pass"]) for r in rows) == sorted(
        (n, p) for n in names for p in ("fwd", "fwd+bwd"))
    for r in rows:
        assert r["status"] == "ok" and r["logz_rel_err"] <= 1e-5, r
        assert r["exp_peak_per_s"] == 2e9, r  # min(B = 3, 2 threads) × 1e9
        assert r["pct_exp_peak"] == pytest.approx(100 * r["lse_per_s"] / 2e9)
        # Random inputs: the exp-domain forward never needs its fallback.
        assert r["exp_fallbacks"] == 0 if r["backend"] == "cpu" else math.isnan(
            r["exp_fallbacks"]), r
    assert os.environ[ENV] == "bogus"


def _algorithm_rows() -> list[dict]:
    """Both algorithms at the three target sizes, plus a case off them."""
    rows = []
    sizes = [dict(regime="headline", B=4, T=2000, K=30, C=24),
             dict(regime="genomics", B=1, T=10_000, K=200, C=24),
             dict(regime="headline", B=1, T=2000, K=30, C=24, transition="duration"),
             dict(regime="ner", B=2, T=64, K=16, C=9)]
    for size in sizes:
        for pass_ in ("fwd", "fwd+bwd"):
            for name, ms in (("cpu", 10.0), ("cpu-log", 25.0)):
                rows.append(_row(name, "ok", pass_=pass_, ms=ms, lse_per_s=3e9 * 10 / ms,
                                 exp_peak_per_s=6e9, exp_fallbacks=0.0, **size))
    # The log-domain forward at the genomics size did not fit in the time.
    rows[3] = _row("cpu-log", "skipped", pass_="fwd+bwd",
                   note="skipped: run time limit reached (--max-minutes)", **sizes[0])
    return rows


def test_report_sets_the_two_algorithms_side_by_side(tmp_path):
    # Through a CSV and its JSON, as `python -m bench --markdown` reads them.
    rows = _algorithm_rows()
    csv_path = tmp_path / "cpu-20990101-000000.csv"
    report.write_csv(csv_path, rows)
    meta = {**META, "exp_peak": {"exp_per_s": 6e9, "single_thread_exp_per_s": 6e9,
                                 "all_threads_exp_per_s": 11e9, "threads": 2,
                                 "source": "measured"},
            "cpu_algorithms": {"cpu": "exp", "cpu-log": "log"}}
    report.write_json(csv_path.with_suffix(".json"), meta)
    text = cli.render_latest(csv_path, tmp_path)
    assert (tmp_path / "latest.md").read_text() == text + "\n"
    assert undefined(text) == []
    assert f"**{report.ALGORITHMS_TITLE}**" in text
    section = [(h, body) for h, body in _tables(text) if report.ALG_SPEEDUP in h]
    assert len(section) == 1
    header, body = section[0]
    col = {h: i for i, h in enumerate(header)}
    got = {(r[col["B"]], r[col["T"]], r[col["transition"]], r[col["pass"]]): r for r in body}
    # The target sizes only (the NER case is in its own table), in their order.
    assert list(got) == [("4", "2000", "static", "fwd"), ("4", "2000", "static", "fwd+bwd"),
                         ("1", "10000", "static", "fwd"), ("1", "10000", "static", "fwd+bwd"),
                         ("1", "2000", "duration", "fwd"), ("1", "2000", "duration", "fwd+bwd")]
    first = got[("4", "2000", "static", "fwd")]
    assert first[col[report.ALG_EXP]] == "10.0 ms · 0.250 MiB"
    assert first[col[report.ALG_LOG]] == "25.0 ms · 0.250 MiB"
    assert first[col[report.ALG_SPEEDUP]] == "2.50×"
    assert first[col[report.ALG_EXP_RATIO]] == "0.50×"  # 3e9 terms/s over 6e9 exp/s
    assert first[col[report.ALG_LOG_RATIO]] == "0.20×"
    assert first[col[report.ALG_PEAK]] == "6G/s (1 thread)"
    assert first[col[report.ALG_FALLBACKS]] == "0"
    skipped = got[("4", "2000", "static", "fwd+bwd")]
    assert skipped[col[report.ALG_LOG]] == "out of time"
    assert skipped[col[report.ALG_SPEEDUP]] == skipped[col[report.ALG_LOG_RATIO]] == ""
    # Small ratios keep two significant digits.
    assert report._ratio(0.0237) == "0.024×" and report._ratio(1.0) == "1.00×"
    # The (K, C, C) transition's exp-domain forward counts its fallbacks too.
    assert got[("1", "2000", "duration", "fwd")][col[report.ALG_FALLBACKS]] == "0"
    assert "FLASHSEMICRF_CPU_ALGORITHM=exp" in _legend(text)[report.LABELS["cpu"]]


def test_report_without_log_domain_rows_has_no_algorithm_section():
    # A run from before the cpu-log backend (like the committed CSV): no section,
    # and no claim about which algorithm its "cpu" rows ran.
    rows = [r for r in _algorithm_rows() if r["backend"] == "cpu"]
    text = report.markdown(rows, META)
    assert report.ALGORITHMS_TITLE not in text and undefined(text) == []
    assert "FLASHSEMICRF_CPU_ALGORITHM=exp" not in text


def test_plan_runs_both_algorithms_at_the_cpu_throughput_targets():
    cases = plan(torch.device("cpu"), full=False)
    for B, T, K, C, tr in report.ALGORITHM_SIZES:
        for pass_ in ("fwd", "fwd+bwd"):
            found = [c for c in cases if (c.B, c.T, c.K, c.C, c.transition) == (B, T, K, C, tr)
                     and pass_ in c.passes]
            assert any({"cpu", "cpu-log"} <= set(case_backends(c, list(bk.ALL)))
                       for c in found), (B, T, K, C, tr, pass_)


def test_viterbi_bench_finds_flash_semicrfs_path(tmp_path):
    """bench.viterbi maps the problem onto flash-semicrf's Viterbi (free first
    label = start_transition max over the previous label): the same best score
    (float32 against its float64) and as many segments; it writes its table."""
    pytest.importorskip("flash_semicrf")
    from bench import viterbi

    viterbi.main(["--lengths", "40,120", "--flash-max-T", "120", "--repeats", "1",
                  "--out", str(tmp_path / "v")])
    table = (tmp_path / "v.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| 40 |") or ln.startswith("| 120 |")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        diff, flash_segments = cells[6].split(", ")
        T = int(cells[0].replace(",", ""))
        assert float(diff) < 1e-3 * T  # float32 rounding of a sum over T positions
        assert flash_segments == f"{cells[3]} segments"


def test_forgetting_measures_what_the_chunked_forward_relies_on():
    """bench.forgetting: a scan started from a guess matches the true one
    (every log ratio within the thresholds) on a random problem within the
    chunked forward's warm-ups, never on labels in two groups that never
    transition into each other, and at once where the guess is the truth's
    own start state (tau = 1)."""
    from bench import forgetting

    g = torch.Generator().manual_seed(3)
    K, C, T = 4, 3, 400
    scores = torch.randn(T, C, generator=g, dtype=torch.float64)
    transition = 0.5 * torch.randn(C, C, generator=g, dtype=torch.float64)
    duration = 0.5 * torch.randn(K, C, generator=g, dtype=torch.float64)
    found = forgetting.steps_to_forget(scores, transition, duration, 50, 300)
    assert all(f is not None and K - 1 <= f <= w
               for f, w in zip(found, forgetting.warmups(K))), found
    apart = transition.clone()
    apart[:1, 1:] = -math.inf
    apart[1:, :1] = -math.inf
    assert forgetting.steps_to_forget(scores, apart, duration, 50, 300) == [None, None]
    assert forgetting.steps_to_forget(scores, transition, duration, 1, 10) == [1, 1]
