"""The benchmark's user-facing parts on this CPU: latest.md names and explains
every column and every cell entry, pytorch-crf maps onto our K = 1 problem (an
oracle test: its log-likelihood and log Z equal ours), and the plan holds a
K = 1 case that pytorch-crf joins and no other."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch

from toolchain import ROOT

sys.path.append(str(ROOT))  # bench/, after the flashsemicrf already imported
import flashsemicrf as fsc  # noqa: E402
from bench import backends as bk  # noqa: E402
from bench import cli  # noqa: E402
from bench import report  # noqa: E402
from bench.cases import REGIME_TITLES, REGIMES, Case, plan  # noqa: E402
from bench.run import Runner, Settings, case_backends  # noqa: E402

LATEST = ROOT / "bench" / "results" / "latest.md"
TIME_CELL = re.compile(r"^\d[\d.]* ms( · (<0\.01|\d[\d.]*) MiB)?( ‡)?$")
THROUGHPUT_CELL = re.compile(r"^\d[\d.]*[kMGT]? \(\d[\d.]*%, (C\+\+|CUDA|Triton|PyTorch ref\.)\)$")


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
    backends = {n: bk.make(n, cpu) for n in names}
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
