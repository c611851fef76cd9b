"""Registers and spills of the Triton kernels for sm_90, without a GPU.

Triton's real compiler (TTIR … PTX) runs behind a stand-in driver that reports
an sm_90 device and refuses to launch; each compiled kernel's PTX then goes
through ptxas -v (the CUDA toolkit's, or Triton's copy). The kernels
specialise on the label padding, the duration tile and the dtype, so the
problems below pick those; T is a runtime argument and does not matter.

    TRITON_INTERPRET=0 python -m bench.triton_registers

Must run in a process of its own: the stand-in driver replaces the real one.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

import torch

# (dtype, (K, C, C) transition, K, C): the forecast's shapes and the large-C cases.
SHAPES = (
    (torch.float32, False, 200, 24),
    (torch.float64, False, 200, 24),
    (torch.float32, True, 30, 24),
    (torch.float32, False, 30, 128),
    (torch.float32, True, 16, 64),
)


class NoLaunch(Exception):
    """Raised where the stand-in driver would launch a compiled kernel."""


def install_compile_only_driver() -> None:
    """Make Triton compile for sm_90 and stop before launching (no GPU needed).
    Call before importing the kernels."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def launcher_cls(self, *args, **kwargs):
            raise NoLaunch()

    driver.set_active(CompileOnlyDriver())


@contextlib.contextmanager
def compiled_not_launched(*kernels):
    """Launches of these kernels compile them and return without running, so
    that an op that launches another kernel after them gets that one
    compiled too (the stand-in driver refuses the first launch otherwise)."""
    runs = [k.run for k in kernels]
    for kernel, run in zip(kernels, runs):
        kernel.run = lambda *a, _run=run, grid, warmup, **kw: _run(*a, grid=grid, warmup=True,
                                                                   **kw)
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run  # the class's method again


def _ptxas() -> str:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "ptxas"), os.X_OK):
            return os.path.join(root, "bin", "ptxas")
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of one kernel's PTX."""
    target = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), f"-arch={target}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"ptxas -v said:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET=0: the interpreter compiles nothing")
    install_compile_only_driver()
    from flashsemicrf.backends.triton import kernels, launchers  # noqa: F401 (defines the ops)

    ops = torch.ops.flashsemicrf_triton
    # What each call compiles: (label, kernel), in the order it compiles them
    # (a kernel listed twice compiles two variants).
    named = {"forward": [("forward", kernels._forward_kernel)],
             "backward": [("backward", kernels._backward_kernel)],
             "viterbi": [("viterbi", kernels._viterbi_kernel)],
             "exp forward": [("exp forward", kernels._exp_forward_kernel)],
             "span recompute": [("span recompute", kernels._recompute_kernel),
                                ("backward, recomputed", kernels._backward_kernel)],
             "parallel sweeps": [("backward, parallel", kernels._backward_kernel),
                                 ("backward, redo", kernels._backward_kernel)]}
    seen: set[int] = set()
    print("| dtype | transition | K | C | kernel | warps | registers | spill stores (B) "
          "| spill loads (B) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, dd, K, C in SHAPES:
        B, T = 1, 50
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
        args = (r(B, T, C), r(K, C, C) if dd else r(C, C), r(K, C), torch.full((B,), T),
                r(C), r(C), None, None)
        S = 2 * K if dd else K
        # One checkpoint (interval T): the kernels compile the same for any.
        calls = {
            "forward": lambda: ops.forward(*args, T),
            "backward": lambda: ops.backward(r(B), *args, r(B), r(B, 1, S, C),
                                             torch.zeros(B, 1, dtype=torch.float64), T, True),
            "viterbi": lambda: ops.viterbi(*args),
        }
        if not dd:  # FLASHSEMICRF_TRITON_ALGORITHM=exp: static transition only
            calls["exp forward"] = lambda: ops.forward(*args, T)
        # FLASHSEMICRF_TRITON_RECOMPUTE=spans: the recompute kernel, then the
        # backward that only sweeps.
        calls["span recompute"] = calls["backward"]
        if not dd:  # FLASHSEMICRF_TRITON_SWEEP=parallel: two spans or more
            calls["parallel sweeps"] = lambda: ops.backward(
                r(B), *args, r(B), r(B, 2, S, C), torch.zeros(B, 2, dtype=torch.float64),
                T // 2, True)
        for name, call in calls.items():
            os.environ["FLASHSEMICRF_TRITON_ALGORITHM"] = "exp" if name == "exp forward" else "log"
            os.environ["FLASHSEMICRF_TRITON_RECOMPUTE"] = (
                "spans" if name == "span recompute" else "sweep")
            os.environ["FLASHSEMICRF_TRITON_SWEEP"] = (
                "parallel" if name == "parallel sweeps" else "serial")
            # The parallel sweeps launch three kernels: each compiles, none runs.
            launched = (kernels._recompute_kernel, kernels._backward_kernel) \
                if name == "parallel sweeps" else (kernels._recompute_kernel,)
            with compiled_not_launched(*launched):
                try:
                    call()
                except NoLaunch:
                    pass
            fresh = {}  # kernel -> its variants this call compiled, in order
            for _, kernel in named[name]:
                for cache in kernel.device_caches.values():
                    for compiled in cache[0].values():
                        if id(compiled) not in seen:
                            seen.add(id(compiled))
                            fresh.setdefault(id(kernel), []).append(compiled)
            listed = named[name]
            for k, (label, kernel) in enumerate(listed):
                variants = fresh.get(id(kernel), [])
                again = any(other is kernel for _, other in listed[k + 1:])
                take, fresh[id(kernel)] = (variants[:1], variants[1:]) if again else (variants, [])
                for compiled in take:
                    regs, st, ld = ptxas_usage(compiled.asm["ptx"])
                    print(f"| {str(dtype)[6:]} | {'(K, C, C)' if dd else '(C, C)'} | {K} "
                          f"| {C} | {label} | {compiled.metadata.num_warps} | {regs} | {st} "
                          f"| {ld} |")


if __name__ == "__main__":
    main()
