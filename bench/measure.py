"""Timing, peak memory, the device's exp throughput, and what the run ran on.

Time: on a GPU, CUDA events around each call with the L2 cache flushed in
between; on the CPU, ``time.perf_counter``. Either way the median of several
calls after a warm-up call (which is also the call whose result is checked).

Peak memory, in MiB above what was allocated before the call (so the inputs
are excluded; outputs, gradients, saved tensors and workspaces count):

* GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
  tensor storage through PyTorch's allocator, which is where every contender
  allocates.
* CPU: the process's peak resident set size during the call (Linux
  ``VmHWM``, reset through ``/proc/self/clear_refs``) minus its resident size
  just before, after ``malloc_trim`` gave freed heap pages back to the kernel
  so that reusing them shows up again. Unlike a count of tensor storage this
  also sees a kernel's private scratch (``std::vector`` buffers) and Python
  objects, so no contender hides memory from it. Page granularity (4 KiB);
  a few hundred KiB of noise.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuPeak:
    """Context manager: ``.mib`` is the peak RSS growth during the block."""

    _libc = None

    @classmethod
    def supported(cls) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @classmethod
    def _trim(cls) -> None:
        if cls._libc is None:
            try:
                cls._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                cls._libc = False
        if cls._libc:
            cls._libc.malloc_trim(0)

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1))

    def __enter__(self):
        gc.collect()
        self._trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.base = self._status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.mib = max(0, self._status_kib("VmHWM") - self.base) / 1024
        return False


class GpuPeak:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        return False


class NoPeak:
    mib = float("nan")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def peak_meter(device: torch.device):
    if device.type == "cuda":
        return GpuPeak(device)
    return CpuPeak() if CpuPeak.supported() else NoPeak()


def wall(fn, device: torch.device) -> float:
    """Seconds for one call, synchronised."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


_FLUSH: dict = {}


def median_seconds(fn, device: torch.device, runs: int) -> float:
    """Median of ``runs`` calls (the caller has warmed up)."""
    times = []
    if device.type == "cuda":
        if device not in _FLUSH:
            # Large enough to evict the L2 (50 MiB on an H100) between calls.
            _FLUSH[device] = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
        flush = _FLUSH[device]
        for _ in range(runs):
            flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(runs):
            times.append(wall(fn, device))
    return statistics.median(times)


def oversubscribed(threads: int) -> tuple[bool, float, float]:
    """Whether ``threads`` OpenMP threads make parallel ops slower than one thread.

    On a machine busier than its cores, every parallel region waits at its
    barrier for a descheduled thread (a scheduler slice, ~10-20 ms), which
    would measure the scheduler rather than the code. Returns (verdict,
    seconds per op with ``threads``, with one).
    """
    if threads <= 1:
        return False, float("nan"), float("nan")
    x = torch.randn(1 << 18)  # above the intra-op grain size: runs in parallel
    y = torch.empty_like(x)

    def per_op(n: int) -> float:
        torch.set_num_threads(n)
        for _ in range(5):
            torch.exp(x, out=y)
        t0 = time.perf_counter()
        for _ in range(100):
            torch.exp(x, out=y)
        return (time.perf_counter() - t0) / 100

    try:
        one = per_op(1)
        many = per_op(threads)
    finally:
        torch.set_num_threads(threads)
    return many > 1.5 * one, many, one


# Buffer sizes (float32 elements per thread) for the CPU exp peak: 8, 32 and
# 128 KiB sit in L1 or L2 with their output, 512 KiB in a typical L2. Every
# size is preallocated and reused, so the peak measures the exp, not memory.
EXP_PEAK_SIZES = (1 << 11, 1 << 13, 1 << 15, 1 << 17)
# torch.exp splits a tensor across threads only above its grain size (32768
# elements); the all-threads peak uses the per-thread sizes at or above it.
PARALLEL_GRAIN = 1 << 15


def _exp_rate(per_thread: int, threads: int, exps_per_timing: int, timings: int) -> float:
    """Exps per second of torch.exp into a preallocated float32 buffer of
    ``per_thread`` elements per thread: the best of ``timings`` timings, each
    of enough back-to-back calls to do ``exps_per_timing`` exps (so Python's
    per-call overhead is amortised over many cache-resident calls)."""
    n = per_thread * threads
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    y = torch.empty_like(x)
    calls = max(1, exps_per_timing // n)
    for _ in range(3):
        torch.exp(x, out=y)
    best = float("inf")
    for _ in range(timings):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.exp(x, out=y)
        best = min(best, time.perf_counter() - t0)
    return calls * n / best


def cpu_exp_peak(exps_per_timing: int = 1 << 24, timings: int = 7) -> dict:
    """The CPU's exp throughput, measured: torch.exp on float32 into a
    preallocated, cache-resident buffer, the best over ``EXP_PEAK_SIZES``.

    ``single_thread_exp_per_s`` with one thread, ``all_threads_exp_per_s`` with
    the threads the benchmark uses (each thread its own cache-sized share).
    ``exp_per_s`` is the single-thread peak: the unit the throughput ratios
    are built from (``backends.exp_peak_for`` scales it to the threads a
    backend can use on a given batch)."""
    threads = torch.get_num_threads()
    per_size: dict[str, dict[str, float]] = {"1": {}, str(threads): {}}
    try:
        torch.set_num_threads(1)
        for n in EXP_PEAK_SIZES:
            per_size["1"][str(n)] = _exp_rate(n, 1, exps_per_timing, timings)
        if threads > 1:
            torch.set_num_threads(threads)
            for n in EXP_PEAK_SIZES:
                if n >= PARALLEL_GRAIN:
                    per_size[str(threads)][str(n)] = _exp_rate(n, threads, exps_per_timing,
                                                               timings)
    finally:
        torch.set_num_threads(threads)
    single = max(per_size["1"].values())
    every = max(per_size[str(threads)].values()) if threads > 1 else single
    sizes = ", ".join(f"2^{n.bit_length() - 1}" for n in EXP_PEAK_SIZES)
    return {
        "exp_per_s": single,
        "single_thread_exp_per_s": single,
        "all_threads_exp_per_s": every,
        "threads": threads,
        "per_size": per_size,  # {threads: {elements per thread: exp/s}}
        "source": f"measured: torch.exp into a preallocated cache-resident float32 buffer, "
                  f"best of {sizes} elements per thread; {_si_rate(single)}/s on 1 thread"
                  + (f", {_si_rate(every)}/s on {threads}" if threads > 1 else ""),
    }


def _si_rate(x: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


# FP32 exp throughput of known GPUs: the SFU (MUFU.EX2) issues 16 results per
# clock per SM on compute capability 8.x/9.0 (CUDA C++ Programming Guide,
# arithmetic instruction throughput table); the boost clock from the data sheet.
# exp/s = SMs × 16 × clock. The SM count is read from the device, so a MIG slice
# or a cut-down part scales; the clock comes from this table.
GPU_CLOCK_GHZ = (
    ("H200", 1.98),
    ("H100 PCIe", 1.755),
    ("H100 NVL", 1.785),
    ("H100", 1.98),  # SXM5: 132 SMs × 16 × 1.98 GHz ≈ 4.18e12 exp/s
    ("A100", 1.41),  # SXM4: 108 SMs × 16 × 1.41 GHz ≈ 2.44e12 exp/s
    ("L40S", 2.52),
    ("A10", 1.695),
)
SFU_PER_SM_PER_CLOCK = 16
ASSUMED_CLOCK_GHZ = 1.5


def gpu_exp_peak(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    name = props.name
    clock, known = ASSUMED_CLOCK_GHZ, False
    for key, ghz in GPU_CLOCK_GHZ:
        if key in name:
            clock, known = ghz, True
            break
    sms = props.multi_processor_count
    rate = sms * SFU_PER_SM_PER_CLOCK * clock * 1e9
    how = "table" if known else f"unknown GPU: assumed {ASSUMED_CLOCK_GHZ} GHz"
    return {
        "exp_per_s": rate,
        "source": f"{sms} SMs × {SFU_PER_SM_PER_CLOCK} SFU exp/clk/SM × {clock} GHz ({how})",
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """The device, driver and library versions, and the source commit."""
    import flashsemicrf
    from flashsemicrf import backends

    env = {
        "device_type": device.type,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "flashsemicrf": flashsemicrf.__version__,
        "flashsemicrf_cpu_kernels": backends.HAS_CPU_KERNELS,
        "flashsemicrf_cuda_kernels": backends.HAS_CUDA_KERNELS,
        "flash_semicrf": _version("flash-semicrf"),
        "torch_struct": _version("torch-struct"),
        "pytorch_crf": _version("pytorch-crf"),
        "cuda_runtime": torch.version.cuda,
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
        "load_average_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            gpu_sms=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
            .splitlines()[:1],
        )
        env["driver"] = env["driver"][0] if env["driver"] else ""
    else:
        env["device_name"] = env["cpu"]
    return env


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024
    except (OSError, AttributeError):
        return 8 * 2**30
