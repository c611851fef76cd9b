"""How many instructions warp 0 issues a step of the blocked exp-domain
forward, without a GPU: the dynamic half of the GPU forecast
(bench/results/gpu-forecast.md), the static half being bench.sass_profile.

    python -m bench.chain_count [--T 640] [--C 32] [--kernel 'exp_blocked_kernel<float, true>']

The CUDA emulator (tests/cuda_emulator) is built with gcc --coverage and runs
the blocked forward on one random sequence (K = 200, float32; certified, no
hand-over). gcov then says how often each line of
csrc/cuda/exp_blocked_kernel.cuh ran. Each basic block of the kernel's SASS
(bench.sass_profile's disassembly, split at labels and after branches) is
taken to run as often as the most-run line it holds, in lane-executions a
step divided by the lanes (C: every lane holds a label, so the warp runs a
block whenever its lanes do; C = 32 by default so that no lane idles). A
block of an inlined helper (power_of_two, ghost_of_alpha, ...) counts at its
call site's rate times the fraction of the helper's calls, over all its
call sites, that reached it. A branch only a few lanes take counts as the
fraction of lanes, so the figures lean low there.

Prints, for each __device__ function of the chain (ends, starts, advance),
its SASS instructions and how many of them a step issues outside inner
loops, then each inner loop's lines with their runs a step and static
instructions. bench/results/gpu-forecast.md multiplies the loops out and
sets the sum against the measured time a position.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import sass_profile

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "exp_blocked_kernel.cuh"
CHAIN = ("ends", "starts", "advance")
BRANCHES = {"BRA", "BRX", "JMP", "EXIT", "RET", "CALL"}


def basic_blocks(kernel: sass_profile.Kernel) -> list[list[sass_profile.Instruction]]:
    """The kernel's instructions cut at every label and after every branch."""
    starts = set(kernel.labels.values())
    out: list[list[sass_profile.Instruction]] = []
    block: list[sass_profile.Instruction] = []
    for i, ins in enumerate(kernel.instructions):
        if i in starts and block:
            out.append(block)
            block = []
        block.append(ins)
        if ins.opcode.split(".")[0] in BRANCHES:
            out.append(block)
            block = []
    if block:
        out.append(block)
    return out


def site(ins: sass_profile.Instruction, name: str,
         ranges: list[tuple[int, int, str]]) -> tuple[int, str] | None:
    """(line, function): the outermost location of the instruction's inline
    chain in file `name` that lies inside one of `ranges` (a call inside
    the function, or the function's own line)."""
    found = None
    chain = ins.chain or ()
    if not chain:
        m = re.match(rf"{re.escape(name)}:(\d+)$", ins.source)
        chain = ((name, int(m.group(1))),) if m else ()
    for f, n in chain:
        if Path(f).name != name:
            continue
        fn = next((fn for lo, hi, fn in ranges if lo <= n <= hi), None)
        if fn is not None:
            found = (n, fn)
    return found


def per_step(kernel: sass_profile.Kernel, counts: dict[str, dict[int, float]], name: str,
             ranges: dict[str, list[tuple[int, int, str]]], functions=CHAIN):
    """({function: (static instructions, instructions a step outside inner
    loops)}, {line: (function, runs a step, static instructions)} for the
    lines of inner loops).

    counts: gcov's line counts by file name, divided by steps × lanes;
    ranges: each file's __device__ / HOST_DEVICE functions. A block runs as
    often as its most-run line of `name` inside `functions` (gcov counts a
    statement spread over two lines at both, so up to 2.5 a step is
    straight-line code run once). A block whose lines run more than that is
    an inner loop's body, unrolled: its instructions a step need the unroll
    factor, which the line counts do not give, so they are listed apart. An
    inlined helper's instructions in a block run, at each call, the
    fraction of the helper's calls that reached the block's most-run line
    of it (its entry line's count against that line's, over all its call
    sites)."""
    static: collections.Counter = collections.Counter()
    dynamic: collections.Counter = collections.Counter()
    loops: dict[int, list] = {}
    chain_ranges = [r for r in ranges.get(name, []) if r[2] in functions]
    own = counts.get(name, {})
    for block in basic_blocks(kernel):
        sites = [site(ins, name, chain_ranges) for ins in block]
        freq = max((own.get(s[0], 0.0) for s in sites if s is not None), default=0.0)
        # The helpers inlined here: (file, entry line) -> the largest share of
        # the helper's calls that reached one of this block's lines of it.
        reached: dict[tuple[str, int], float] = {}
        helper_of = []
        for ins, s in zip(block, sites):
            h = helper(ins, s, ranges, counts)
            helper_of.append(h)
            if h is not None:
                key, entry, line_count = h
                reached[key] = max(reached.get(key, 0.0), line_count / entry if entry else 1.0)
        for s, h in zip(sites, helper_of):
            if s is None:
                continue
            static[s[1]] += 1
            if freq <= 2.5:
                dynamic[s[1]] += min(freq, 1.0) * (min(reached[h[0]], 1.0) if h else 1.0)
            else:
                entry = loops.setdefault(s[0], [s[1], own.get(s[0], 0.0), 0])
                entry[2] += 1
    return ({f: (static[f], dynamic[f]) for f in functions},
            {n: tuple(v) for n, v in sorted(loops.items())})


def helper(ins: sass_profile.Instruction, at: tuple[int, str] | None,
           ranges: dict[str, list[tuple[int, int, str]]], counts: dict[str, dict[int, float]]):
    """((file, entry line), entry count, count of the instruction's own line)
    for an instruction inlined from a helper function (its innermost
    location, inside another function than the chain's, in a file gcov
    counted), else None."""
    if at is None or not ins.chain:
        return None
    f, n = Path(ins.chain[0][0]).name, ins.chain[0][1]
    holding = [r for r in ranges.get(f, []) if r[0] <= n <= r[1]]
    if not holding or f not in counts:
        return None
    lo, _, fn = max(holding)  # the innermost function holding the line
    if fn == at[1] and lo <= at[0]:
        return None  # the chain function's own code
    return (f, lo), counts[f].get(lo, 0.0), counts[f].get(n, 0.0)


def gcov_counts(gcov_text: str) -> dict[int, int]:
    """{line: executions} from a gcov report (lines never run are left out)."""
    out = {}
    for line in gcov_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0].strip().isdigit():
            out[int(parts[1])] = int(parts[0].strip())
    return out


def run_emulator(T: int, C: int, build: Path) -> None:
    """One blocked forward in the emulator's coverage build (its line counts
    are written when the process exits)."""
    import torch
    from torch.utils import cpp_extension

    here = ROOT / "tests" / "cuda_emulator"
    build.mkdir(parents=True, exist_ok=True)
    for stale in build.glob("*.gcda"):
        stale.unlink()
    os.environ.setdefault("MAX_JOBS", "2")
    emu = cpp_extension.load(
        name="flashsemicrf_cuda_emulator_coverage", sources=[str(here / "emu_ext.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(here)],
        extra_cflags=["-O0", "--coverage"], extra_ldflags=["--coverage"],
        build_directory=str(build), verbose=False)
    g = torch.Generator().manual_seed(0)
    K = 200
    scores, trans, dur = (torch.randn(1, T, C, generator=g), torch.randn(C, C, generator=g),
                          torch.randn(K, C, generator=g))
    st, et = torch.randn(C, generator=g), torch.randn(C, generator=g)
    lengths = torch.full((1,), T, dtype=torch.long)
    out = emu.forward_exp(scores, trans, dur, lengths, st, et, None, None, 0, 0, 0, 227 * 1024,
                          True)
    if int(out[-1][0]) != 0:
        raise SystemExit("the blocked forward handed this sequence over: pick another seed")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.chain_count", description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=640)
    p.add_argument("--C", type=int, default=32)
    p.add_argument("--kernel", default="exp_blocked_kernel<float, true>")
    p.add_argument("--sass", type=Path, help="read this nvdisasm output instead of compiling")
    p.add_argument("--build", type=Path, default=ROOT / "build" / "chain_count")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:  # the forward, in a process whose exit writes the coverage data
        run_emulator(a.T, a.C, a.build)
        return
    subprocess.run([sys.executable, "-m", "bench.chain_count", "--child", "--T", str(a.T),
                    "--C", str(a.C), "--build", str(a.build)], check=True, cwd=ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["gcov", "-o", str(a.build), "-r", "-s", str(ROOT),
                        str(a.build / "emu_ext.o")], cwd=tmp, check=True, capture_output=True)
        lanes_steps = a.T * a.C
        counts = {}
        for report in Path(tmp).glob("*.gcov"):
            source = report.name[:-len(".gcov")]
            counts[source] = {n: c / lanes_steps for n, c in gcov_counts(report.read_text()).items()}
    ranges = {}
    for path in [*(ROOT / "csrc").glob("*.h"), *(ROOT / "csrc" / "cuda").glob("*.cuh")]:
        ranges[path.name] = sass_profile.function_ranges(path.read_text())
    text = a.sass.read_text() if a.sass else sass_profile.disassemble()
    kernel = sass_profile.parse(text)[a.kernel]
    rows, loops = per_step(kernel, counts, SOURCE.name, ranges)
    print(f"{a.kernel}: warp 0's instructions a step, B = 1, T = {a.T}, K = 200, C = {a.C}")
    print(f"{'function':10s} {'static':>7s} {'a step, outside inner loops':>28s}")
    for f, (st, dyn) in rows.items():
        print(f"{f:10s} {st:7d} {dyn:28.0f}")
    print(f"{'sum':10s} {sum(s for s, _ in rows.values()):7d} "
          f"{sum(d for _, d in rows.values()):28.0f}")
    print("inner loops (their lines: runs a step, static instructions in the loop bodies):")
    source = SOURCE.read_text().splitlines()
    for n, (f, runs, st) in loops.items():
        print(f"  {SOURCE.name}:{n} ({f}) {runs:6.2f} runs a step, {st:4d} instructions: "
              f"{source[n - 1].strip()[:70]}")

if __name__ == "__main__":
    main()
