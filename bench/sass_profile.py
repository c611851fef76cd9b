"""What the CUDA kernels compile to, loop by loop: the static half of the GPU
forecast (bench/results/gpu-forecast.md), which costs no device time.

Compiles csrc/cuda/semicrf_cuda.cu for sm_90 with the real build's nvcc flags
(read from the in-place build's build.ninja, as tests/test_cuda_launch_limits.py
does; the build keeps -lineinfo), disassembles it with nvdisasm (the CUDA
toolkit's or the copy Triton ships) with source lines, and reports for each
kernel its loops — a backward branch closes one — with the instructions of
each loop body by class and the source lines they come from:

    python -m bench.sass_profile                      # every kernel, markdown
    python -m bench.sass_profile --kernel 'forward_kernel<float, false>'
    python -m bench.sass_profile --kernel 'exp_blocked_kernel<float, true>' \
        --by-function csrc/cuda/exp_blocked_kernel.cuh

--by-function attributes a kernel's instructions to the __device__
functions of one source file, through nvdisasm's inlining records: an
instruction belongs to the outermost function of that file whose body
holds a location of its inline chain (so a function counts the callees
inlined into it), else to "(rest)". Out-of-line helpers (64-bit division, the
non-converged paths of warp collectives) are placed after the kernel's
code and fall into "(rest)".

Counts are static: an instruction inside a loop counts once per iteration of
the innermost loop holding it, whatever branches inside the body skip. The
compiler rotates and duplicates the outer loops, whose bodies then overlap
without nesting; the innermost loops (the per-term work) are what the
forecast reads.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Instruction classes, first match wins (the opcode before the first '.').
CLASSES = (
    ("barrier", {"BAR", "BSYNC_BAR"}),
    ("shuffle", {"SHFL"}),
    ("vote/match", {"VOTE", "VOTEU", "MATCH", "REDUX"}),
    ("load generic", {"LD"}),
    ("load global", {"LDG"}),
    ("load shared", {"LDS", "LDSM"}),
    ("load local", {"LDL"}),
    ("load const", {"LDC", "ULDC"}),
    ("store generic", {"ST"}),
    ("store global", {"STG"}),
    ("store shared", {"STS"}),
    ("store local", {"STL"}),
    ("atomic", {"ATOM", "ATOMG", "ATOMS", "RED", "REDG"}),
    ("mufu (exp/log/rcp)", {"MUFU"}),
    ("fp32", {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSET", "FSEL", "FCHK", "FRND", "FSWZADD"}),
    ("fp64", {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX"}),
    ("convert", {"F2F", "F2I", "I2F", "F2IP", "I2FP", "FRND"}),
    ("call", {"CALL", "RET"}),
    ("branch/sync", {"BRA", "BRX", "JMP", "BSSY", "BSYNC", "EXIT", "WARPSYNC", "BMOV", "YIELD",
                     "NANOSLEEP"}),
)
OPCODE_CLASS = {op: name for name, ops in CLASSES for op in ops}


def opcode_class(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base in OPCODE_CLASS:
        return OPCODE_CLASS[base]
    if base.startswith("U"):
        return "uniform"
    return "integer/move/predicate"


@dataclasses.dataclass
class Instruction:
    addr: int
    opcode: str  # with modifiers, e.g. LDG.E.64
    text: str
    source: str  # "file:line" of the line-info record before it
    target: str | None  # branch target label
    # The inline chain of that record, innermost first: (file path, line).
    chain: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass
class Loop:
    first: int  # index of the first instruction of the body
    last: int  # index of the backward branch
    depth: int = 0
    innermost: bool = True

    def __len__(self):
        return self.last - self.first + 1


@dataclasses.dataclass
class Kernel:
    name: str
    instructions: list[Instruction]
    labels: dict[str, int]  # label -> instruction index

    def loops(self) -> list[Loop]:
        """One loop per header: its body runs to the last backward branch to
        it (a loop with several back edges, e.g. `continue`, is one loop)."""
        ends: dict[int, int] = {}
        for i, ins in enumerate(self.instructions):
            if ins.target is not None and ins.target in self.labels:
                j = self.labels[ins.target]
                if j <= i:
                    ends[j] = max(ends.get(j, i), i)
        found = sorted((Loop(j, i) for j, i in ends.items()), key=lambda lp: (lp.first, -lp.last))
        for a in found:
            for b in found:
                if a is not b and a.first <= b.first and b.last <= a.last and len(b) < len(a):
                    a.innermost = False
                    b.depth += 1
        return found

    def counts(self, lo: int = 0, hi: int | None = None) -> collections.Counter:
        hi = len(self.instructions) - 1 if hi is None else hi
        return collections.Counter(opcode_class(ins.opcode)
                                   for ins in self.instructions[lo:hi + 1])

    def sources(self, lo: int, hi: int, top: int = 3) -> list[tuple[str, int]]:
        c = collections.Counter(ins.source for ins in self.instructions[lo:hi + 1])
        return c.most_common(top)

    def by_function(self, path: str, ranges: list[tuple[int, int, str]]) -> dict[str, collections.Counter]:
        """Instructions by class for each function of `ranges` (first line,
        last line, name) of the file whose path ends with `path`: the
        outermost location of the chain inside one of them decides."""
        out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for ins in self.instructions:
            owner = "(rest)"
            for f, line in reversed(ins.chain):
                if f.endswith(path):
                    inside = [(b - a, n) for a, b, n in ranges if a <= line <= b]
                    if inside:
                        owner = min(inside)[1]
                        break
            out[owner][opcode_class(ins.opcode)] += 1
        return dict(out)

    def calls(self) -> collections.Counter:
        return collections.Counter(
            re.sub(r"\$__internal_\d+_\$", "", ins.target or ins.text.split()[-1])
            for ins in self.instructions if ins.opcode.startswith("CALL"))


def demangle(mangled: str) -> str:
    """_ZN12flashsemicrf4cuda15backward_kernelIdLb1EE... -> backward_kernel<double, true>
    (the kernels' own template arguments: dtype, then bools)."""
    m = re.match(r"_ZN12flashsemicrf4cuda(\d+)", mangled)
    if not m:
        return mangled
    n = int(m.group(1))
    name = mangled[m.end():m.end() + n]
    rest = mangled[m.end() + n:]
    args = []
    a = re.match(r"I([fd])", rest)
    if a:
        args.append({"f": "float", "d": "double"}[a.group(1)])
        args += ["true" if b == "1" else "false" for b in re.findall(r"Lb([01])E", rest)]
    return f"{name}<{', '.join(args)}>" if args else name


LINE_INFO = re.compile(r'//## File "([^"]+)", line (\d+)')
LOCATION = re.compile(r'"([^"]+)", line (\d+)')
FUNCTION = re.compile(r"^(\s*)(?:__device__|HOST_DEVICE)\b.*?\b(\w+)\(")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
SECTION = re.compile(r"^\.text\.(\S+):")


def parse(disassembly: str) -> dict[str, Kernel]:
    kernels: dict[str, Kernel] = {}
    current: Kernel | None = None
    source = "?"
    chain: tuple[tuple[str, int], ...] = ()
    after_info = False
    pending_labels: list[str] = []
    for line in disassembly.splitlines():
        m = SECTION.match(line)
        if m:
            current = Kernel(demangle(m.group(1)), [], {})
            kernels[current.name] = current
            source, chain, pending_labels = "?", (), []
            continue
        if current is None:
            continue
        m = LINE_INFO.search(line)
        if m:
            # With inlining records (nvdisasm -gi) one location is a run of
            # records, innermost first, each "… inlined at" the next.
            here = tuple((f, int(n)) for f, n in LOCATION.findall(line))
            if after_info:
                chain += here
            else:
                chain = here
                source = f"{Path(m.group(1)).name}:{m.group(2)}"
            after_info = True
            continue
        after_info = False
        m = LABEL.match(line)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = INSTRUCTION.search(line)
        if m:
            for label in pending_labels:
                current.labels[label] = len(current.instructions)
            pending_labels = []
            t = re.search(r"`\((\.L_x_\d+)\)", m.group(3))
            callee = re.search(r"`\(([^)]+)\)", m.group(3)) if m.group(2).startswith("CALL") else None
            current.instructions.append(Instruction(
                int(m.group(1), 16), m.group(2), m.group(0), source,
                t.group(1) if t else (callee.group(1) if callee else None), chain))
    return kernels


def disassemble() -> str:
    """nvdisasm --print-line-info of the kernels compiled for sm_90 with the build's flags."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_cuda_launch_limits import build_ninja, ptxas_command
    from toolchain import cuda_tool

    nvdisasm = cuda_tool("nvdisasm")
    if nvdisasm is None:
        raise SystemExit("nvdisasm not found (CUDA toolkit, or Triton's copy)")

    ninja = build_ninja()
    if not ninja.is_file():
        raise SystemExit(f"needs the in-place build's {ninja} (make build)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernels.cubin"
        cmd = [c for c in ptxas_command(ninja, cubin) if c != "-v"]
        cmd.remove("-Xptxas")
        if "-lineinfo" not in cmd:
            cmd.insert(1, "-lineinfo")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"nvcc failed:\n{proc.stderr[-4000:]}")
        return subprocess.run([nvdisasm, "--print-line-info-inline", str(cubin)],
                              capture_output=True, text=True, check=True).stdout


def function_ranges(source: str) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of each __device__ function defined in
    a source file's text: from its signature to the closing brace at the
    signature's indentation (the project's format)."""
    lines = source.splitlines()
    out = []
    for i, text in enumerate(lines):
        m = FUNCTION.match(text)
        if not m or text.rstrip().endswith(";"):
            continue
        close = m.group(1) + "}"
        for j in range(i + 1, len(lines)):
            if lines[j].rstrip() in (close, close + ";"):
                out.append((i + 1, j + 1, m.group(2)))
                break
    return out


def function_report(kernel: Kernel, path: Path) -> str:
    rows = kernel.by_function(path.name, function_ranges(path.read_text()))
    out = [f"## {kernel.name} by function of {path.name}\n",
           "| function | instructions | " + " | ".join(SHOWN) + " |",
           "|---" * (len(SHOWN) + 2) + "|"]
    for name, c in sorted(rows.items(), key=lambda kv: -sum(kv[1].values())):
        out.append(f"| {name} | {sum(c.values())} | " + " | ".join(str(c[s] or "") for s in SHOWN)
                   + " |")
    return "\n".join(out) + "\n"


SHOWN = ("load generic", "load shared", "load global", "load local", "store generic",
         "store shared", "store global", "store local", "shuffle", "vote/match", "barrier",
         "mufu (exp/log/rcp)", "fp32", "fp64", "call")


def report(kernels: dict[str, Kernel], only: str | None, min_loop: int) -> str:
    out = []
    for name in sorted(kernels):
        if only and name != only:
            continue
        k = kernels[name]
        total = k.counts()
        out.append(f"## {name}\n")
        out.append(f"{len(k.instructions)} instructions; "
                   + ", ".join(f"{c} {total[c]}" for c in SHOWN if total[c]))
        calls = k.calls()
        if calls:
            out.append("calls: " + ", ".join(f"{n} ×{v}" for n, v in calls.most_common()))
        out.append("")
        out.append("| loop (instructions) | innermost | " + " | ".join(SHOWN)
                   + " | main source lines |")
        out.append("|---" * (len(SHOWN) + 3) + "|")
        for lp in k.loops():
            if len(lp) < min_loop:
                continue
            c = k.counts(lp.first, lp.last)
            lines = ", ".join(f"{s} ({n})" for s, n in k.sources(lp.first, lp.last))
            addr = k.instructions[lp.first].addr
            out.append(f"| 0x{addr:04x} ({len(lp)}) | {'yes' if lp.innermost else ''}"
                       f" | " + " | ".join(str(c[s] or "") for s in SHOWN) + f" | {lines} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", help="one kernel, e.g. 'backward_kernel<float, false>'")
    ap.add_argument("--min-loop", type=int, default=8, help="hide loops shorter than this")
    ap.add_argument("--sass", type=Path, help="read this nvdisasm output instead of compiling")
    ap.add_argument("--by-function", type=Path, metavar="SOURCE",
                    help="with --kernel: its instructions by __device__ function of SOURCE")
    args = ap.parse_args(argv)
    if args.by_function and not args.kernel:
        ap.error("--by-function needs --kernel")
    text = args.sass.read_text() if args.sass else disassemble()
    kernels = parse(text)
    if args.by_function:
        if args.kernel not in kernels:
            ap.error(f"--kernel {args.kernel!r} is not in the disassembly")
        print(function_report(kernels[args.kernel], args.by_function))
        return
    print(report(kernels, args.kernel, args.min_loop))


if __name__ == "__main__":
    main()
