"""Registers, stack and spills of every CUDA kernel for sm_90, against the
checked-in table csrc/cuda/ptxas_sm90.txt.

ptxas -v runs on csrc/cuda/semicrf_cuda.cu with the nvcc flags of the real
build (read from the build's own build.ninja), device code only (about 20 s).
Its register counts are checked against the built library's cubin
(cuobjdump), so the table describes the code that ships. Any difference from
the table fails: a kernel edit that adds spills (local-memory traffic in the
hot loop) or registers must update the table in the same commit, where a
reviewer sees it. Regenerate with

    python tests/test_cuda_launch_limits.py --write

The launch limits themselves (threads, grid, dynamic shared memory and its
attribute) are enforced by the emulator on every emulated launch:
tests/test_cuda_emulated.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

import flashsemicrf
from toolchain import cuobjdump

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "semicrf_cuda.cu"
TABLE = ROOT / "csrc" / "cuda" / "ptxas_sm90.txt"
ARCH = "sm_90"
COLUMNS = ("registers", "stack_bytes", "spill_store_bytes", "spill_load_bytes", "static_smem_bytes")


def build_ninja() -> Path:
    """The build.ninja of the in-place build (setup.py's build_temp)."""
    plat = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    return ROOT / "build" / f"temp.{plat}" / "build.ninja"


def _ninja_var(text: str, name: str) -> str:
    m = re.search(rf"^{name} = (.*)$", text, re.M)
    return m.group(1) if m else ""


def ptxas_command(ninja: Path, cubin: Path) -> list[str]:
    """The build's nvcc command for the .cu file, for sm_90 device code only."""
    text = ninja.read_text()
    nvcc = _ninja_var(text, "nvcc")
    flags = shlex.split(_ninja_var(text, "cuda_cflags")) + shlex.split(
        _ninja_var(text, "cuda_post_cflags"))
    keep, skip = [], False
    for f in flags:
        if skip:
            skip = False
            continue
        if f in ("--compiler-options", "-Xcompiler"):  # host compiler flags: no host pass
            skip = True
            continue
        if f == "-c" or f.startswith(("-gencode", "--generate-code", "-arch", "--gpu-architecture")):
            continue
        keep.append(f)
    return [nvcc, *keep, f"-arch={ARCH}", "--cubin", "-Xptxas", "-v", str(SOURCE), "-o", str(cubin)]


def kernel_name(mangled: str) -> str:
    """_ZN12flashsemicrf4cuda15backward_kernelIdLb1EE... -> backward_kernel<double, true>;
    a third bool (the shared-memory placement) -> backward_kernel<double, true, true>;
    no bool -> junction_kernel<double>."""
    m = re.match(r"_ZN12flashsemicrf4cuda(\d+)", mangled)
    if m:
        n = int(m.group(1))
        name = mangled[m.end():m.end() + n]
        args = re.match(r"I([fd])((?:Lb[01]E)*)E", mangled[m.end() + n:])
        if args:
            dtype = {"f": "float", "d": "double"}[args.group(1)]
            flags = ["true" if f == "1" else "false" for f in re.findall(r"Lb([01])E", args.group(2))]
            return f"{name}<{', '.join([dtype, *flags])}>"
    return mangled


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """{kernel: {column: value}} from ptxas -v output."""
    rows: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = kernel_name(m.group(1))
            rows[current] = dict.fromkeys(COLUMNS, 0)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            rows[current].update(stack_bytes=int(m[1]), spill_store_bytes=int(m[2]),
                                 spill_load_bytes=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[current]["registers"] = int(m[1])
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            rows[current]["static_smem_bytes"] = int(m[1])
    return rows


def nvcc_release(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def measure() -> tuple[dict, str, str]:
    """(rows, nvcc release, ptxas log) of the current sources."""
    ninja = build_ninja()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ptxas_command(ninja, Path(tmp) / "kernels.cubin")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({shlex.join(cmd)}):\n{log[-4000:]}")
    return parse_ptxas(log), nvcc_release(cmd[0]), log


def format_table(rows: dict, release: str) -> str:
    width = max(len(k) for k in rows)
    lines = [
        f"# Registers and local memory per CUDA kernel: ptxas -v of csrc/cuda/semicrf_cuda.cu",
        f"# for {ARCH} with the flags of the real build (nvcc below). Checked by",
        "# tests/test_cuda_launch_limits.py; after a kernel change, regenerate with",
        "#   python tests/test_cuda_launch_limits.py --write",
        "# and commit it with the change: spills are local-memory traffic in the hot loop.",
        f"# nvcc {release}",
        "kernel".ljust(width) + "".join(f"  {c}" for c in COLUMNS),
    ]
    for name in sorted(rows):
        lines.append(name.ljust(width) + "".join(
            f"  {rows[name][c]:>{len(c)}}" for c in COLUMNS))
    return "\n".join(lines) + "\n"


def read_table(text: str) -> tuple[dict, str]:
    release = re.search(r"^# nvcc (\S+)$", text, re.M).group(1)
    rows = {}
    body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")][1:]
    for line in body:
        m = re.match(r"(.*\S)\s+" + r"\s+".join([r"(\d+)"] * len(COLUMNS)) + r"$", line)
        rows[m.group(1)] = dict(zip(COLUMNS, map(int, m.groups()[1:])))
    return rows, release


def library_registers(lib: Path, tool: str) -> dict[str, int]:
    """{kernel: registers} of the sm_90 cubin in the built library."""
    out = subprocess.run([tool, "--dump-resource-usage", str(lib)], capture_output=True,
                         text=True, check=True).stdout
    regs, arch = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*arch = (\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\w+):", line)
        if m and arch == ARCH:
            name = kernel_name(m.group(1))
        m = re.match(r"\s*REG:(\d+)", line)
        if m and arch == ARCH:
            regs[name] = int(m.group(1))
    return regs




@pytest.fixture(scope="module")
def measured():
    info = flashsemicrf.build_info()
    if not info.get("cuda_kernels"):
        pytest.skip("the extension was built without CUDA kernels (no nvcc)")
    if not build_ninja().is_file():
        pytest.skip(f"needs the in-place build's {build_ninja().relative_to(ROOT)} (make build)")
    rows, release, log = measure()
    print(log)
    return rows, release


def test_kernels_have_no_static_shared_memory(measured):
    """The host plans dynamic shared memory up to the device's whole opt-in
    limit; static shared memory would make those launches fail."""
    rows, _ = measured
    assert rows, "ptxas reported no kernels"
    assert {k: r["static_smem_bytes"] for k, r in rows.items() if r["static_smem_bytes"]} == {}


def test_ptxas_table_is_current(measured):
    rows, release = measured
    table, table_release = read_table(TABLE.read_text())
    if release != table_release:
        pytest.skip(f"the table is for nvcc {table_release}, this is nvcc {release}: register "
                    "counts differ between compiler releases")
    changed = {k: (table.get(k), rows.get(k)) for k in sorted(set(table) | set(rows))
               if table.get(k) != rows.get(k)}
    assert not changed, (
        "registers/spills differ from csrc/cuda/ptxas_sm90.txt (table, now): "
        + "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        + ". If intended, run `python tests/test_cuda_launch_limits.py --write` and commit "
        "the table with the change."
    )


def test_table_describes_the_built_library(measured):
    """The recompile reproduces the build: same registers as the library's cubin."""
    rows, _ = measured
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's copy)")
    if ARCH not in flashsemicrf.build_info().get("cuda_archs", []):
        pytest.skip(f"the library holds no {ARCH} code")
    lib = next(Path(flashsemicrf.__file__).parent.glob("_C.*.so"))
    regs = library_registers(lib, tool)
    assert regs == {k: r["registers"] for k, r in rows.items()}, (
        "the built library differs from the sources (rebuild: make build)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_cuda_launch_limits.py --write")
    rows, release, _ = measure()
    TABLE.write_text(format_table(rows, release))
    print(TABLE.read_text(), end="")
