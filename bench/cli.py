"""``python -m bench``: the head-to-head benchmark (see bench/README.md)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import backends as bk
from . import measure, report
from .cases import REGIMES, plan
from .run import Runner, Settings, slots

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Per-call time budgets (s): a call estimated to take longer is skipped.
BUDGET = {("cpu", False): 6.0, ("cpu", True): 120.0, ("cuda", False): 10.0, ("cuda", True): 60.0}
QUICK_MAX_MINUTES = 9.0


def _csv_list(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Forward and forward+backward time, peak memory and log-sum-exp throughput "
        "of flashsemicrf's backends against flash-semicrf 0.2.0, torch-struct 0.5 and (at "
        "K = 1) pytorch-crf 0.7.2. "
        "Without --full: a quick set that takes under 10 minutes on a 2-core CPU.",
    )
    p.add_argument("--full", action="store_true", help="the full sweeps (hours on a CPU)")
    p.add_argument("--regime", action="append", metavar="NAME",
                   type=lambda v: _csv_list(v, REGIMES, "regime"),
                   help=f"only these regimes ({', '.join(REGIMES)}); repeat or comma-separate")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:i] (default: cuda when a GPU is present, else cpu)")
    p.add_argument("--backends", type=lambda v: _csv_list(v, bk.ALL, "backend"), default=None,
                   help=f"comma-separated subset of: {', '.join(bk.ALL)}")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed calls per measurement, at most (median reported; default 5)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--budget", type=float, default=None,
                   help="skip calls estimated to take longer than this many seconds "
                   "(default: 6 quick / 120 full on CPU, 10 / 60 on GPU)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help=f"skip what is left after this long (default {QUICK_MAX_MINUTES:g} "
                   "for the quick set, none with --full)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--markdown", nargs="?", const="latest", metavar="CSV",
                   help="only render a results CSV (default: the newest in --out) to "
                   "latest.md and print it")
    args = p.parse_args(argv)
    args.regime = [r for group in args.regime for r in group] if args.regime else list(REGIMES)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def pick_device(spec: str | None) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("python -m bench: --device cuda, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        sys.exit(f"python -m bench: unsupported device {spec!r} (cpu or cuda)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_tag(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# A head-to-head run's files are named <device tag>-<YYYYmmdd-HHMMSS>; other
# CSVs in the folder (bench.exp_domain's) are not runs of this benchmark.
_RUN_NAME = re.compile(r"^(?:cpu|cuda-[a-z0-9-]+)-(\d{8}-\d{6})\.csv$")


def newest_csv(folder: Path) -> Path | None:
    """The newest head-to-head run's CSV, by the time in its name (a clone's
    file times say nothing)."""
    runs = [p for p in folder.glob("*.csv") if _RUN_NAME.match(p.name)]
    found = sorted(runs, key=lambda p: _RUN_NAME.match(p.name).group(1))
    return found[-1] if found else None


def render_latest(csv_path: Path | None = None, folder: Path = RESULTS) -> str:
    """Render a results CSV (default: the newest under ``folder``) as Markdown,
    write it to ``folder/latest.md`` and return it: the table for the README."""
    csv_path = csv_path or newest_csv(folder)
    if csv_path is None:
        raise FileNotFoundError(f"no results CSV under {folder}")
    rows = report.read_csv(csv_path)
    sidecar = csv_path.with_suffix(".json")
    meta = {}
    if sidecar.exists():
        import json

        meta = json.loads(sidecar.read_text())
    meta.setdefault("headline", report.headline(rows))
    text = report.markdown(rows, meta)
    (folder / "latest.md").write_text(text + "\n")
    return text


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="row", dynamic_ncols=True, file=sys.stderr,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.markdown is not None:
        csv_path = None if args.markdown == "latest" else Path(args.markdown)
        print(render_latest(csv_path, args.out))
        return 0

    device = pick_device(args.device)
    threads_note = "set by --threads" if args.threads else "all"
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and not args.list:
        busy, many, one = measure.oversubscribed(torch.get_num_threads())
        if busy:
            threads_note = (f"1: the machine is oversubscribed ({torch.get_num_threads()} "
                            f"threads took {many * 1e3:.3g} ms per parallel op, 1 thread "
                            f"{one * 1e3:.3g} ms)")
            print(f"warning: using one thread; {threads_note[3:]}. Pass --threads to override.",
                  flush=True)
            torch.set_num_threads(1)
    names = args.backends or list(bk.ALL)
    cases = plan(device, args.full, args.regime)
    if args.list:
        for c in cases:
            print(f"{c.label:42s} sweep={c.sweep:10s} passes={','.join(c.passes)}"
                  + (f" backends={','.join(c.backends)}" if c.backends else ""))
        return 0

    started = time.monotonic()
    max_minutes = args.max_minutes if args.max_minutes is not None else (
        None if args.full else QUICK_MAX_MINUTES)
    env = measure.environment(device)
    env["threads_policy"] = threads_note
    print(f"device: {env['device_name']} ({device}); torch {env['torch']}, "
          f"triton {env['triton']}, flash-semicrf {env['flash_semicrf']}, "
          f"torch-struct {env['torch_struct']}, flashsemicrf {env['flashsemicrf']} "
          f"(commit {env['git_commit']}{', dirty' if env['git_dirty'] else ''})", flush=True)
    load = env["load_average_start"][0]
    if device.type == "cpu" and load > 0.75 * (env["cpu_count"] or 1):
        print(f"warning: the machine is busy (load average {load:.1f} on {env['cpu_count']} "
              "cores): CPU timings will be noisy and slow", flush=True)
    peak = measure.cpu_exp_peak() if device.type == "cpu" else measure.gpu_exp_peak(device)
    print(f"exp throughput: {report._si(peak['exp_per_s'])}/s ({peak['source']})", flush=True)

    backends = bk.prepare(names, device)

    budget = args.budget if args.budget is not None else BUDGET[(device.type, args.full)]
    settings = Settings(
        device=device, dtype=DTYPES[args.dtype], repeat=args.repeat, budget_s=budget,
        headline_budget_s=max(budget, 300.0),
        deadline=None if max_minutes is None else started + 60 * max_minutes,
        dense_limit_bytes=int(min(4 * 2**30, 0.3 * measure.available_memory_bytes(device))
                              if device.type == "cpu"
                              else 0.8 * measure.available_memory_bytes(device)),
        exp_per_s=peak["exp_per_s"], exp_peak=peak,
        target_s=2.0 if device.type == "cpu" else 1.0,
    )
    progress = _progress(slots(cases, names))
    runner = Runner(settings, backends, progress)
    runner.calibrate()
    interrupted = False
    try:
        for case in cases:
            runner.run_case(case, names)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if progress is not None:
            progress.close()

    elapsed = time.monotonic() - started
    rows = runner.rows
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = args.out / f"{device_tag(device)}-{stamp}"
    meta = {
        "command": "python -m bench" + ("" if argv is None and len(sys.argv) <= 1
                                         else " " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": round(elapsed, 1),
        "interrupted": interrupted,
        "load_average_end": list(os.getloadavg()),
        "settings": {"full": args.full, "regimes": args.regime, "backends": names,
                     "repeat": args.repeat, "budget_s": budget, "max_minutes": max_minutes,
                     "dtype": args.dtype, "device": str(device)},
        "environment": env,
        "exp_peak": peak,
        "backends": {n: (b.why or "ready") for n, b in backends.items()},
        # What FLASHSEMICRF_CPU_ALGORITHM each C++ kernel backend ran with.
        "cpu_algorithms": {n: a for n, a in bk.CPU_ALGORITHM.items() if n in names},
        "headline": report.headline(rows),
    }
    report.write_csv(stem.with_suffix(".csv"), rows)
    report.write_json(stem.with_suffix(".json"), meta)
    written = [stem.with_suffix(".csv"), stem.with_suffix(".json")]
    if not args.no_plots:
        written += report.plots(rows, stem, peak["exp_per_s"])
    (args.out / "latest.md").write_text(report.markdown(rows, meta) + "\n")
    written.append(args.out / "latest.md")

    print()
    print(report.table(rows))
    print()
    for line in report.headline_lines(meta["headline"]):
        print(line)
    print(f"\n{len(rows)} rows in {elapsed / 60:.1f} min"
          + (" (interrupted)" if interrupted else "") + "; wrote:")
    for path in written:
        print(f"  {path}")
    bad = [r for r in rows if r["status"] in ("mismatch", "error")]
    if bad:
        print(f"{len(bad)} rows disagree with the reference or failed: see the status column")
    return 130 if interrupted else 0
