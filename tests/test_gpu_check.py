"""The device check's plumbing, on this CPU: `bash bench/gpu_check.sh --dry-run`
runs every section with tiny sizes and stand-ins (the C++ kernel for CUDA,
Triton's interpreter, no sanitizer), installing a carried wheel the way the
GPU run does; a short budget skips sections, saying so."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from toolchain import ROOT, build_wheel

sys.path.append(str(ROOT))  # bench/, after the flashsemicrf already imported
from bench import gpu_check  # noqa: E402
from bench.report import COLUMNS  # noqa: E402

SCRIPT = ROOT / "bench" / "gpu_check.sh"
TAG = "cpu-dry-run"
SECTIONS = ("environment", "install", "correctness", "pytest", "profile", "timings", "sanitizer")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or not SCRIPT.is_file(),
                                reason="needs bash and the checkout's bench/gpu_check.sh")


def dry_run(out: Path, wheels: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, FLASHSEMICRF_GPU_CHECK_WHEELS=str(wheels))
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
    return proc


@pytest.fixture(scope="module")
def carried(tmp_path_factory) -> Path:
    """A folder like .gpu/ with our wheel (flash-semicrf and torch-struct come
    from the environment here)."""
    folder = tmp_path_factory.mktemp("wheels")
    build_wheel(folder)
    return folder


def test_dry_run_runs_every_section(carried, tmp_path):
    out = tmp_path / "out"
    proc = dry_run(out, carried)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = (out / "summary.txt").read_text()
    for name in SECTIONS:
        assert re.search(rf"^== section {name}: ok ", summary, re.M), f"{name} not ok:\n{summary}"
    installed = re.search(r"^install: (\S+\.whl)$", summary, re.M)
    assert installed and Path(installed[1]).parent == carried, summary
    assert "verify: built from this checkout's sources" in summary

    # At most 8 files, none in a subfolder: what comes back from the device.
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.txt", f"{TAG}-env.json",
                            f"{TAG}-correctness.txt", f"{TAG}-pytest.txt",
                            f"{TAG}-profile.txt", f"{TAG}-sanitizer.txt",
                            f"{TAG}-timings.csv", f"{TAG}-gpu-check.tar.gz"]), files

    corr = (out / f"{TAG}-correctness.txt").read_text()
    static = [c for c in gpu_check.DRY_GRID if not c.dd]
    variants = (*gpu_check.CUDA_VARIANTS, *gpu_check.TRITON_VARIANTS)
    for backend in (*gpu_check.GPU_BACKENDS, *variants):
        lines = [ln for ln in corr.splitlines() if ln.split(" ", 1)[0] == backend]
        # + sampling for cuda and triton; their variants: static cases only
        want = len(static) if backend in variants else len(gpu_check.DRY_GRID) + 1
        assert len(lines) == want, lines
        assert all(" PASS " in ln for ln in lines), lines
    n = 2 * (len(gpu_check.DRY_GRID) + 1) + len(variants) * len(static)
    assert f"correctness: {n}/{n} passed, 0 failed, 0 skipped" in corr

    pytest_log = (out / f"{TAG}-pytest.txt").read_text()
    assert re.search(r"\d+/\d+ tests collected \(\d+ deselected\)", pytest_log), pytest_log[-500:]
    sanitizer = (out / f"{TAG}-sanitizer.txt").read_text()
    assert sum(ln.startswith("sanitize ") for ln in sanitizer.splitlines()) == len(
        gpu_check.SANITIZE_CASES), sanitizer

    with open(out / f"{TAG}-timings.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert {r["backend"] for r in rows} == {"cpu", "torch"}
    # Our kernel's rows must time; the PyTorch reference may be estimated
    # past its budget on a loaded machine (then skipped, saying why), but
    # not everywhere.
    timed = [r for r in rows if r["status"] == "ok"]
    assert all(float(r["ms"]) > 0 for r in timed), rows
    assert all(r["status"] == "ok" for r in rows if r["backend"] == "cpu"), rows
    assert all(r["status"] == "ok" or (r["status"] == "skipped" and "too slow" in r["note"])
               for r in rows if r["backend"] == "torch"), rows
    assert any(r["backend"] == "torch" for r in timed), rows

    profile = (out / f"{TAG}-profile.txt").read_text()
    chain = [ln for ln in profile.splitlines() if ln.startswith("chain ")]
    assert len(chain) == 2 and all("µs a position" in ln for ln in chain), profile
    assert "ncu: not run (dry run)" in profile

    with tarfile.open(out / f"{TAG}-gpu-check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f for f in files if not f.endswith(".tar.gz")} | {"install.txt"} <= names, names
    # The closing table is the output's tail.
    lines = proc.stdout.strip().splitlines()
    tail = lines[max(i for i, ln in enumerate(lines) if ln.startswith("== summary")):]
    assert len(tail) <= 30, tail
    for name in SECTIONS:
        assert any(re.match(rf"{name} +ok ", ln) for ln in tail), (name, tail)
    assert tail[-1].startswith("gpu_check: "), tail


def test_short_budget_skips_sections_and_says_so(tmp_path):
    out = tmp_path / "out"
    proc = dry_run(out, tmp_path / "no-wheels", "--budget", "45")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^== section install: ok ", summary, re.M), summary
    assert "using the checkout's in-place build" in summary
    for name in SECTIONS[2:]:
        assert re.search(rf"^== section {name}: SKIPPED: needs at least \d+ s, -?\d+ s of the "
                         "budget left$", summary, re.M), f"{name}:\n{summary}"
    assert any(ln.startswith("correctness  SKIPPED") for ln in proc.stdout.splitlines())


def test_correctness_stops_at_its_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what --dry-run sets; undone after the test
    rc = gpu_check.main(["correctness", str(tmp_path), TAG, "--seconds", "0", "--dry-run"])
    text = (tmp_path / f"{TAG}-correctness.txt").read_text()
    assert rc == 0
    static = [c for c in gpu_check.DRY_GRID if not c.dd]
    variants = (*gpu_check.CUDA_VARIANTS, *gpu_check.TRITON_VARIANTS)
    assert text.count("SKIPPED: out of budget") == 2 * (len(gpu_check.DRY_GRID) + 1) + len(
        variants) * len(static), text
    assert "0/0 passed" in text


def test_pick_wheel_takes_the_one_for_this_python_and_torch(tmp_path, monkeypatch):
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    monkeypatch.setattr(gpu_check, "expected_local_tag", lambda: "torch2.11cu130")
    assert gpu_check.pick_wheel(tmp_path)[0] is None
    for name in (f"flashsemicrf-0.1.0+torch2.14cu130-{py}-{py}-linux_x86_64.whl",
                 f"flashsemicrf-0.1.0+torch2.11cu130-cp39-cp39-linux_x86_64.whl",
                 f"flashsemicrf-0.1.0+torch2.11cu130-{py}-{py}-linux_x86_64.whl",
                 "flash_semicrf-0.2.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    wheel, why = gpu_check.pick_wheel(tmp_path)
    assert wheel is not None and wheel.name.startswith("flashsemicrf-0.1.0+torch2.11cu130-" + py)
    monkeypatch.setattr(gpu_check, "expected_local_tag", lambda: "torch2.12cu130")
    wheel, why = gpu_check.pick_wheel(tmp_path)
    assert wheel is None and "+torch2.12cu130" in why and "torch2.14cu130" in why


def test_stale_build_is_told_by_its_sources(tmp_path):
    for rel, text in (("csrc/a.cu", "kernel"), ("flashsemicrf/x.py", "x = 1\n")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    recorded = {rel: gpu_check.hashlib.sha256(text.encode()).hexdigest()
                for rel, text in (("csrc/a.cu", "kernel"), ("flashsemicrf/x.py", "x = 1\n"))}
    assert gpu_check.source_differences(tmp_path, recorded) == []
    (tmp_path / "csrc/a.cu").write_text("kernel v2")
    (tmp_path / "flashsemicrf/new.py").write_text("")
    assert gpu_check.source_differences(tmp_path, recorded) == ["csrc/a.cu", "flashsemicrf/new.py"]


def test_sections_choose_what_runs_and_their_caps(tmp_path):
    out = tmp_path / "out"
    proc = dry_run(out, tmp_path / "no-wheels", "--sections", "profile:45,nonsense")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1, summary  # the unknown name is a failure of the check
    assert re.search(r"^== section profile: ok \(\d+ s of 45 s\)$", summary, re.M), summary
    assert "== section nonsense: UNKNOWN" in summary
    for name in ("correctness", "pytest", "timings", "sanitizer"):
        assert f"== section {name}:" not in summary, summary


def test_stall_table_ranks_instructions_by_their_samples():
    page = "\n".join([
        '"Address","Source","Warp Stall Sampling (All Samples)",'
        '"Warp Stall Sampling (Not-issued Samples)","Instructions Executed"',
        '"0x10","LDS R1, [R2]","30","25","1,000"',
        '"0x20","FFMA R3, R1, R4, R3","60","50","1,000"',
        '"0x30","EXIT","10","0","1"',
    ])
    lines = gpu_check.stall_table(page, top=2)
    assert lines[0].startswith("stall table: 3 instructions, 100 samples; the top 2"), lines
    assert len(lines) == 3
    assert "FFMA" in lines[1] and lines[1].split()[:2] == ["60.00%", "60.0%"], lines
    assert "LDS" in lines[2] and lines[2].split()[:2] == ["30.00%", "90.0%"], lines
    assert "1000" in lines[1]  # the executed count, thousands separator read
    assert gpu_check.stall_table("no,header\n1,2")[0].startswith("stall table: no header")
