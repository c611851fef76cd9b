"""The Python side of the device check, bench/gpu_check.sh (README: "Device check").

    python -m bench.gpu_check SUBCOMMAND [--dry-run] ...

  pick-wheel DIR        the carried flashsemicrf wheel built for this Python and torch
  verify REPO           the flashsemicrf on the path: loads, has its kernels, and was
                        built from REPO's sources (exit 0 ok, 2 stale, 1 broken)
  env OUTDIR TAG        environment and build facts: printed, and TAG-env.json
  correctness OUTDIR TAG --seconds S
                        CUDA, then Triton, against a float64 reference and the C++
                        CPU kernel on a fixed grid; TAG-correctness.txt
  sanitize              the program bench/gpu_check.sh runs under compute-sanitizer:
                        forward, backward, Viterbi and filter at three sizes, with
                        the log-domain and the exp-domain kernels
  timings OUTDIR TAG --seconds S
                        the headline timings, in bench/results/'s CSV schema; TAG-timings.csv
  profile OUTDIR TAG --seconds S [--work DIR]
                        the forward chain at B = 1: microseconds a position for
                        each CUDA forward, then Nsight Compute on one blocked
                        exp-domain forward (stall samples a SASS instruction);
                        TAG-profile.txt, the report and its CSV pages in DIR
  chain                 the program ncu runs: one cuda-exp forward, B = 1
  summary OUTDIR TAG    the closing table, from the files the sections wrote

Only the public API of flashsemicrf is used. --dry-run runs the same code on the
CPU with tiny sizes: the C++ kernel stands in for CUDA, Triton runs in its
interpreter. Every section writes as it goes, so a run killed at any point
leaves what it did.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

OPTIONAL = ("start_transition", "end_transition", "start_scores", "end_scores")
SHARED = ("transition", "duration", "start_transition", "end_transition")  # sums over T
GPU_BACKENDS = ("cuda", "triton")
# The CUDA path again with the exp-domain kernels (bench.backends' switches),
# on the grid's static-transition cases: the (K, C, C) form runs the log
# domain whatever the switch says (and its forward is never chunked).
CUDA_VARIANTS = ("cuda-exp", "cuda-parallel", "cuda-chunks")
# The Triton path again with its chunked and its exp-domain forward, its
# span recomputes and its parallel sweeps (with the chunked forward), on the
# static cases (the recomputes apply to both forms; static only, to keep
# the section's budget).
TRITON_VARIANTS = ("triton-chunks", "triton-exp", "triton-spans", "triton-parallel")


def _say(line: str, log=None) -> None:
    print(line, flush=True)
    if log is not None:
        log.write(line + "\n")
        log.flush()


# -- the carried wheel ---------------------------------------------------------


def expected_local_tag() -> str:
    """The local version tag a wheel for the running torch carries (setup.py's rule)."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    cuda = torch.version.cuda
    return f"torch{major}.{minor}" + (f"cu{cuda.replace('.', '')}" if cuda else "cpu")


def pick_wheel(folder: Path) -> tuple[Path | None, str]:
    """(the newest flashsemicrf wheel for this interpreter and torch, why not)."""
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    tag = expected_local_tag()
    found = sorted(folder.glob("flashsemicrf-*.whl"), key=lambda p: p.stat().st_mtime)
    fits = []
    for w in found:
        parts = w.name[:-4].split("-")
        if len(parts) == 5 and parts[1].endswith("+" + tag) and parts[2] == py:
            fits.append(w)
    if fits:
        return fits[-1], ""
    names = ", ".join(w.name for w in found) or "none"
    return None, f"no wheel for {py} and +{tag} in {folder} (found: {names})"


def source_differences(repo: Path, recorded: dict) -> list[str]:
    """Files whose content differs between the checkout and the build's record."""
    now = {}
    for p in sorted([*repo.glob("csrc/**/*"), *repo.glob("flashsemicrf/**/*.py")]):
        if p.is_file() and p.name != "_build_info.py" and "__pycache__" not in p.parts:
            now[p.relative_to(repo).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))


def verify(repo: Path, dry_run: bool) -> int:
    try:
        import torch

        import flashsemicrf as fsc
    except ImportError as exc:
        print(f"verify: import flashsemicrf failed: {exc}")
        return 1
    info = fsc.build_info()
    print(f"verify: flashsemicrf from {Path(fsc.__file__).parent}")
    print(f"verify: build_info {json.dumps(info)}")
    if not info:
        print("verify: no build record: the compiled extension was never built here")
        return 1
    x = (torch.randn(2, 9, 3), torch.randn(3, 3), torch.randn(4, 3))
    checks = [("cpu", "cpu")] + ([] if dry_run else [("cuda", "cuda")])
    for backend, device in checks:
        try:
            z = fsc.log_partition(*(t.to(device) for t in x), backend=backend)
            assert torch.isfinite(z).all()
        except Exception as exc:  # noqa: BLE001 — reported as a broken install
            print(f"verify: backend {backend!r} does not run: {type(exc).__name__}: {exc}")
            return 1
        print(f"verify: backend {backend!r} runs")
    sources = fsc.build_info().get("sources")
    if not sources:
        print("verify: the build has no source record; cannot tell whether it is current")
        return 2
    stale = source_differences(repo, sources)
    if stale:
        print(f"verify: STALE: built from other sources than {repo}: {', '.join(stale[:12])}"
              + (" …" if len(stale) > 12 else ""))
        return 2
    print(f"verify: built from this checkout's sources ({len(sources)} files)")
    return 0


# -- environment -------------------------------------------------------------------


def environment(out: Path, tag: str, dry_run: bool) -> None:
    import torch

    import flashsemicrf as fsc

    from . import measure

    device = torch.device("cpu" if dry_run else "cuda")
    env = measure.environment(device)
    env["dry_run"] = dry_run
    env["build_info"] = fsc.build_info()
    env["flashsemicrf_path"] = str(Path(fsc.__file__).parent)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_l2_mib"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1)
        env["gpu_smem_optin_bytes"] = getattr(props, "shared_memory_per_block_optin", None)
    (out / f"{tag}-env.json").write_text(json.dumps(env, indent=2, default=str) + "\n")
    for key in ("device_name", "gpu_sms", "gpu_capability", "gpu_memory_gib", "gpu_l2_mib",
                "gpu_smem_optin_bytes", "driver", "cuda_runtime", "torch", "triton",
                "flash_semicrf", "torch_struct", "pytorch_crf", "python", "cpu", "cpu_count",
                "flashsemicrf_path"):
        if key in env:
            print(f"{key:22s} {env[key]}")
    print(f"{'build_info':22s} {json.dumps(env['build_info'])}")


# -- correctness ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    K: int
    C: int
    dd: bool = False  # the (K, C, C) transition
    optional: tuple = OPTIONAL  # optional inputs given
    neg_inf: bool = False  # -inf entries in transition, duration, start/end
    dtype: str = "float32"
    lengths: tuple | None = None  # default: ragged, the first of length T
    dead: bool = False  # sequence 0 has no valid segmentation
    note: str = ""

    @property
    def id(self) -> str:
        opt = "".join(n[0] + n.split("_")[1][0] for n in self.optional) or "none"
        return (f"B{self.B}-T{self.T}-K{self.K}-C{self.C}-{'kcc' if self.dd else 'cc'}-{opt}"
                f"{'-neginf' if self.neg_inf else ''}{'-dead' if self.dead else ''}"
                f"-{'f64' if self.dtype == 'float64' else 'f32'}")


# C ∈ {1, 2, 24, 31, 33, 64, 128}, K ∈ {1, 2, 3, 30, 200, 1000}, T from 1 to 10^5;
# cheap cases first, so that a budget cut loses the expensive ones.
GRID = (
    Case(4, 1, 3, 2, lengths=(1, 1, 1, 1), note="T = 1 < K"),
    Case(3, 7, 1, 1, dd=True, note="C = 1, K = 1"),
    Case(3, 50, 2, 24, dd=True, neg_inf=True),
    Case(3, 200, 3, 31, optional=(), note="no optional input"),
    Case(3, 100, 5, 24, dead=True, note="sequence 0: log Z = -inf, zero gradients"),
    Case(2, 300, 30, 33, dd=True, dtype="float64"),
    Case(3, 1000, 200, 64, lengths=(1000, 150, 7), note="K > L for two sequences"),
    Case(2, 300, 1000, 128, lengths=(300, 290), note="rings in global memory"),
    Case(2, 400, 30, 128, dd=True, optional=("start_scores",)),
    Case(2, 2000, 1000, 2, neg_inf=True, dtype="float64", optional=("end_transition",)),
    Case(1, 100_000, 30, 31, dtype="float64", optional=("end_scores",)),
    Case(2, 100_000, 200, 24, optional=("start_transition", "end_transition")),
)
DRY_GRID = (
    Case(2, 1, 3, 2, lengths=(1, 1), note="T = 1 < K"),
    Case(2, 9, 3, 33, dd=True),
    Case(2, 12, 4, 3, neg_inf=True, dtype="float64"),
    Case(2, 8, 3, 2, dead=True),
)
SAMPLING = Case(2, 30, 5, 3, lengths=(30, 21))
# A float64 reference by the plain-PyTorch backend up to this length (obviously
# right, but a Python loop over T), by the C++ kernel in float64 beyond.
TORCH_REFERENCE_MAX_T = 400


def make_inputs(case: Case, seed: int = 0) -> dict:
    """float64 CPU tensors of a case."""
    import torch

    g = torch.Generator().manual_seed(seed)
    B, T, K, C = case.B, case.T, case.K, case.C

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def sprinkle(x, p=0.2):
        if not case.neg_inf:
            return x
        return x.masked_fill(torch.rand(x.shape, generator=g) < p, -math.inf)

    kw = {"scores": r(B, T, C), "transition": sprinkle(r(K, C, C) if case.dd else r(C, C)),
          "duration": sprinkle(r(K, C))}
    if case.lengths is not None:
        kw["lengths"] = torch.tensor(case.lengths)
    else:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        kw["lengths"] = lengths
    for name in case.optional:
        kw[name] = sprinkle(r(C)) if name.endswith("transition") else sprinkle(r(B, T, C), 0.1)
    if case.dead:
        start = kw.get("start_scores", torch.zeros(B, T, C, dtype=torch.float64)).clone()
        start[0, 0] = -math.inf  # nothing can start sequence 0
        kw["start_scores"] = start
    return kw


def _on(kw: dict, device, dtype) -> dict:
    return {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in kw.items()}


def log_z_and_grads(kw: dict, backend: str):
    """(log Z, {name: d Σ log Z / d name}) with −inf sequences contributing 0."""
    import torch

    import flashsemicrf as fsc

    leaves = {k: v.detach().clone().requires_grad_() if v.is_floating_point() else v
              for k, v in kw.items()}
    z = fsc.log_partition(**leaves, backend=backend)
    live = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    names = [k for k, v in leaves.items() if v.is_floating_point()]
    grads = torch.autograd.grad(live.sum(), [leaves[k] for k in names])
    return z.detach(), dict(zip(names, grads))


def max_error(got, want, relative: bool = False) -> float:
    """max |got − want| (over max(1, max |want|) if relative); inf when the
    infinities differ or got has a NaN that want has not."""
    import torch

    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    if got.shape != want.shape:
        return math.inf
    if (torch.isnan(got) & ~torch.isnan(want)).any():
        return math.inf
    inf_got, inf_want = torch.isinf(got), torch.isinf(want)
    if (inf_got != inf_want).any() or (got[inf_got] != want[inf_got]).any():
        return math.inf
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    err = float((got[finite] - want[finite]).abs().max())
    if relative:
        err /= max(1.0, float(want[finite].abs().max()))
    return err


def tolerances(dtype: str) -> dict:
    """log Z relative, per-position absolute, shared-parameter relative."""
    if dtype == "float64":
        return {"log_z": 1e-9, "position": 1e-8, "shared": 1e-9}
    return {"log_z": 1e-6, "position": 1e-4, "shared": 1e-5}


def bits(t):
    import torch

    t = t.detach().cpu()
    if t.is_floating_point():
        return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)
    return t


def check_case(case: Case, backend: str, device, reference: dict) -> tuple[bool, str]:
    """One case on one backend; (passed, the report line's details)."""
    import torch

    import flashsemicrf as fsc

    dtype = getattr(torch, case.dtype)
    tol = tolerances(case.dtype)
    kw64 = reference["inputs"]
    kw = _on(kw64, device, dtype)
    z, g = log_z_and_grads(kw, backend)
    problems, parts = [], []

    e = max_error(z, reference["log_z"], relative=True)
    parts.append(f"logZ {e:.1e}")
    if not e <= tol["log_z"]:
        problems.append(f"log Z {e:.2e}")
    worst = ("", 0.0)
    for name, ref in reference["grads"].items():
        shared = name in SHARED
        e = max_error(g[name], ref, relative=shared)
        if e > worst[1] or not worst[0]:
            worst = (name, e)
        if not e <= tol["shared" if shared else "position"]:
            problems.append(f"d/d {name} {e:.2e}")
    parts.append(f"grad {worst[1]:.1e} ({worst[0]})")
    cpu_z = reference.get("cpu_log_z")
    if cpu_z is not None:
        parts.append(f"vs cpu {max_error(z, cpu_z, relative=True):.1e}")

    best, segs = fsc.viterbi(**kw, backend=backend)
    e = max_error(best, reference["best"], relative=True)
    viterbi_problems = [] if e <= tol["log_z"] else [f"viterbi best {e:.2e}"]
    if case.dtype == "float64" and not torch.equal(segs.cpu(), reference["segments"]):
        viterbi_problems.append("viterbi segments differ from the C++ kernel's")
    if torch.isfinite(reference["best"]).all():
        # The path must score its claimed best (near-ties may pick another path).
        rescored = fsc.score(segs.cpu(), **kw64, backend="torch")
        e2 = max_error(rescored, reference["best"], relative=True)
        if not e2 <= tol["log_z"]:
            viterbi_problems.append(f"viterbi path scores {e2:.2e} off the best")
    parts.append(f"viterbi {'BAD' if viterbi_problems else 'ok'} ({e:.1e})")
    problems += viterbi_problems

    if "marginals" in reference:
        m = fsc.marginals(**kw, backend=backend)
        e = max(max_error(m.labels, reference["marginals"].labels),
                max_error(m.starts, reference["marginals"].starts))
        parts.append(f"marg {e:.1e}")
        if not e <= tol["position"]:
            problems.append(f"marginals {e:.2e}")

    z2, g2 = log_z_and_grads(kw, backend)
    b2, s2 = fsc.viterbi(**kw, backend=backend)
    same = torch.equal(bits(z), bits(z2)) and all(torch.equal(bits(g[k]), bits(g2[k])) for k in g)
    same = same and torch.equal(bits(best), bits(b2)) and torch.equal(segs.cpu(), s2.cpu())
    parts.append(f"det {'ok' if same else 'BAD'}")
    if not same:
        problems.append("not bitwise deterministic")
    if problems:
        parts.append("FAIL: " + "; ".join(problems))
    return not problems, "  ".join(parts)


def compute_reference(case: Case) -> dict:
    """float64 results on the CPU (the plain-PyTorch backend for short
    sequences, the C++ kernel beyond), and log Z of the C++ kernel in the case's
    dtype."""
    import torch

    import flashsemicrf as fsc

    kw64 = make_inputs(case)
    ref_backend = "torch" if case.T <= TORCH_REFERENCE_MAX_T else "cpu"
    z, g = log_z_and_grads(kw64, ref_backend)
    best, _ = fsc.viterbi(**kw64, backend=ref_backend)
    _, segments = fsc.viterbi(**kw64, backend="cpu")
    out = {"inputs": kw64, "log_z": z, "grads": g, "best": best, "segments": segments,
           "backend": ref_backend}
    if case.T <= 2000:
        out["marginals"] = fsc.marginals(**kw64, backend=ref_backend)
    if case.dtype != "float64":
        out["cpu_log_z"] = fsc.log_partition(**_on(kw64, "cpu", getattr(torch, case.dtype)),
                                             backend="cpu")
    return out


def sampling_check(backend: str, device, n: int) -> tuple[bool, str]:
    """Empirical label and start frequencies of n samples against the marginals."""
    import torch

    import flashsemicrf as fsc

    kw64 = make_inputs(SAMPLING, seed=5)
    kw = _on(kw64, device, torch.float32)
    m = fsc.marginals(**kw64, backend="torch")
    gen = torch.Generator(device=device).manual_seed(1)
    rows = fsc.sample(**kw, backend=backend, num_samples=n, generator=gen).cpu()
    B, T, C = SAMPLING.B, SAMPLING.T, SAMPLING.C
    flat = torch.stack([rows[:, 0] * B + rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]], 1)
    labels = fsc.segments_to_labels(flat, n * B, T).view(n, B, T)
    freq = torch.stack([(labels == c).double().mean(0) for c in range(C)], -1)
    starts = torch.zeros(n * B, T, dtype=torch.float64)
    starts[flat[:, 0], flat[:, 1]] = 1.0
    start_freq = starts.view(n, B, T).mean(0)
    worst = 0.0
    for emp, p in ((freq, m.labels), (start_freq, m.starts)):
        sd = (p * (1 - p) / n).sqrt() + 1.0 / n
        worst = max(worst, float(((emp - p).abs() / sd).max()))
    ok = worst <= 6.0
    return ok, f"{n} samples: max |freq - marginal| = {worst:.2f} sd{'' if ok else '  FAIL'}"


def correctness(out: Path, tag: str, seconds: float, dry_run: bool) -> int:
    import torch

    from . import backends as bk

    deadline = time.monotonic() + seconds
    device = torch.device("cpu" if dry_run else "cuda")
    grid = DRY_GRID if dry_run else GRID
    path = out / f"{tag}-correctness.txt"
    failures, ran, skipped = 0, 0, 0
    with open(path, "a") as log:
        _say(f"# correctness on {device}, budget {seconds:.0f} s"
             + (" (dry run: 'cuda' and its variants are the C++ kernel, Triton interpreted)"
                if dry_run else ""),
             log)
        references: dict[Case, dict] = {}
        # cuda, its variants, then Triton and its variant: a budget cut loses
        # Triton first.
        for backend in (GPU_BACKENDS[0], *CUDA_VARIANTS, *GPU_BACKENDS[1:], *TRITON_VARIANTS):
            variant = backend in CUDA_VARIANTS or backend in TRITON_VARIANTS
            run_as = "cpu" if dry_run and backend.startswith("cuda") else (
                "cuda" if backend in CUDA_VARIANTS else
                "triton" if backend in TRITON_VARIANTS else backend)
            switches = ({**bk.CUDA_ENV, **bk.TRITON_ENV}[backend] if variant else {})
            for case in grid:
                if variant and case.dd:
                    continue
                if time.monotonic() > deadline:
                    _say(f"{backend:13s} {case.id:42s} SKIPPED: out of budget", log)
                    skipped += 1
                    continue
                t0 = time.monotonic()
                try:
                    if case not in references:
                        references[case] = compute_reference(case)
                    with bk.environment(switches):
                        ok, detail = check_case(case, run_as, device, references[case])
                except Exception as exc:  # noqa: BLE001 — a failing backend is a result
                    ok, detail = False, f"ERROR {type(exc).__name__}: {str(exc)[:300]}"
                ran += 1
                failures += not ok
                ref = references.get(case, {}).get("backend", "?")
                _say(f"{backend:13s} {case.id:42s} {'PASS' if ok else 'FAIL'}  {detail}  "
                     f"[ref {ref} f64, {time.monotonic() - t0:.1f} s]"
                     + (f"  ({case.note})" if case.note else ""), log)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if variant:
                continue  # sampling runs the filter kernel: log domain whatever the switch
            if time.monotonic() > deadline:
                _say(f"{backend:13s} sampling SKIPPED: out of budget", log)
                skipped += 1
                continue
            try:
                ok, detail = sampling_check(run_as, device, 300 if dry_run else 4000)
            except Exception as exc:  # noqa: BLE001
                ok, detail = False, f"ERROR {type(exc).__name__}: {str(exc)[:300]}"
            ran += 1
            failures += not ok
            _say(f"{backend:13s} {'sampling ' + SAMPLING.id:42s} {'PASS' if ok else 'FAIL'}  "
                 f"{detail}", log)
        _say(f"correctness: {ran - failures}/{ran} passed, {failures} failed, "
             f"{skipped} skipped", log)
    return 1 if failures else 0


# -- the program compute-sanitizer runs -----------------------------------------

# (name, case, the CUDA algorithm switches set around it). The exp-domain
# cases run the blocked forward (C = 7), the per-step one (C = 33), the
# exp-domain backward sweep with either recompute mode, and its hand-over
# to the log-domain kernels; "small-par" the span-parallel backward (the
# mirror image's exp-domain forward, in the forward op beside the forward on
# a second stream, then one CTA a span: T = 40, K = 5 gives 3 spans, and the
# sequences of length 3 and 17 leave some empty).
# The small ones come first, so that a tool that runs out of time has
# still seen every kernel.
EXP = {"FLASHSEMICRF_CUDA_ALGORITHM": "exp"}
SANITIZE_CASES = (
    ("small", Case(3, 40, 5, 7, lengths=(40, 3, 17), note="C = 7, K > L for one sequence"), {}),
    ("small-exp", Case(3, 40, 5, 7, lengths=(40, 3, 17), note="exp-domain, spans first"),
     {**EXP, "FLASHSEMICRF_CUDA_RECOMPUTE": "spans"}),
    ("small-par", Case(3, 40, 5, 7, lengths=(40, 3, 17), note="exp-domain, span-parallel sweeps"),
     {**EXP, "FLASHSEMICRF_CUDA_SWEEP": "parallel"}),
    ("small-chunks", Case(3, 400, 5, 7, lengths=(400, 3, 170),
                          note="chunked forward and mirror, span-parallel sweeps"),
     {"FLASHSEMICRF_CUDA_FORWARD": "chunks", "FLASHSEMICRF_CUDA_SWEEP": "parallel"}),
    ("small-kcc", Case(3, 40, 5, 7, dd=True, lengths=(40, 3, 17)), {}),
    ("medium", Case(4, 600, 64, 33, lengths=(600, 31, 444, 600), note="C = 33, K > L once"), {}),
    ("medium-exp", Case(4, 600, 64, 33, lengths=(600, 31, 444, 600), note="exp-domain"), EXP),
    ("ring", Case(2, 200, 1000, 64, lengths=(200, 150), optional=(),
                  note="rings in global memory, K > T"), {}),
)


def sanitize(dry_run: bool) -> int:
    """forward, backward, Viterbi and filter (through sample) of the "cuda"
    backend, with each case's algorithm switches set around it (and the
    previous values put back)."""
    import torch

    import flashsemicrf as fsc

    from .backends import environment

    device, backend = ("cpu", "cpu") if dry_run else ("cuda", "cuda")
    for name, case, switches in SANITIZE_CASES:
        with environment(switches):
            kw = _on(make_inputs(case, seed=3), device, torch.float32)
            t0 = time.monotonic()
            z, _ = log_z_and_grads(kw, backend)
            if name == "small-exp":
                # Mass at risk at one position of sequence 0: the exp-domain
                # sweep hands it to the log-domain one.
                kw["scores"] = kw["scores"].clone()
                kw["scores"][0, 12, 1] = -720.0
                if kw.get("start_scores") is not None:
                    kw["start_scores"] = kw["start_scores"].clone()
                    kw["start_scores"][0, 12, 1] = 700.0
                log_z_and_grads(kw, backend)
            fsc.viterbi(**kw, backend=backend)
            # Sampling runs the filter kernel, then a Python loop over T:
            # short T (the same K and C, so the same working-memory placement).
            short = replace(case, T=min(case.T, 40),
                            lengths=tuple(min(n, 40) for n in case.lengths))
            gen = torch.Generator(device=device).manual_seed(0)
            fsc.sample(**_on(make_inputs(short, seed=4), device, torch.float32), backend=backend,
                       num_samples=2, generator=gen)
            if device == "cuda":
                torch.cuda.synchronize()
        switched = " ".join(f"{k}={v}" for k, v in switches.items())
        print(f"sanitize {name:10s} {case.id}: forward, backward, viterbi, filter ran "
              f"({time.monotonic() - t0:.1f} s; log Z {[round(v, 3) for v in z.tolist()]})"
              + (f" with {switched}" if switched else ""), flush=True)
    return 0


# -- timings ---------------------------------------------------------------------------


def timing_cases(dry_run: bool):
    from .cases import Case as BenchCase

    if dry_run:
        ours = ("cpu", "torch")
        return ours, [
            BenchCase("headline", "headline", B=2, T=400, K=20, C=6, backends=ours, force=ours),
            # Small enough that the PyTorch reference's loop over T fits its
            # budget on a loaded 2-core CI machine (T = 2000 did not).
            BenchCase("genomics", "T", B=1, T=600, K=20, C=6, backends=ours, force=ours),
        ]
    gpu = ("cuda", "cuda-exp", "cuda-spans", "cuda-parallel", "cuda-chunks", "triton",
           "triton-chunks", "triton-exp", "flash-semicrf-triton")
    tagging = ("cuda", "triton", "pytorch-crf")
    # fwd+bwd of ours first: the two targets are fwd+bwd. (flash-semicrf 0.2.0's
    # Triton fwd+bwd took 301 s at B = 8, T = 10^5 on an H200, more than a
    # device call can spare: its forward is timed below.)
    fwd_bwd = ("cuda-chunks", "cuda-parallel", "cuda-exp", "cuda", "triton-parallel", "triton",
               "triton-spans")
    # B = 1: the chunked and span-parallel kernels, CUDA's and Triton's, then
    # the exp-domain serial one (≈ 14 s a call: ten times its 1.44 s at B = 8,
    # T = 10^5 on the H200), last, so that the budget goes first to the
    # kernels not yet timed on a GPU.
    fwd_bwd_1 = ("cuda-chunks", "cuda-parallel", "triton-parallel", "cuda-exp")
    # triton-spans and triton-parallel differ from triton and triton-chunks
    # in the backward only: fwd+bwd alone.
    return gpu + ("triton-spans", "triton-parallel", "pytorch-crf"), [
        BenchCase("headline", "headline", B=8, T=100_000, K=200, C=24, backends=fwd_bwd,
                  force=fwd_bwd, passes=("fwd+bwd",)),
        BenchCase("genomics", "T", B=1, T=1_000_000, K=200, C=24, backends=fwd_bwd_1,
                  force=fwd_bwd_1, passes=("fwd+bwd",)),
        BenchCase("headline", "headline", B=8, T=100_000, K=200, C=24, backends=gpu, force=gpu,
                  passes=("fwd",)),
        BenchCase("genomics", "T", B=1, T=1_000_000, K=200, C=24, backends=gpu, force=gpu,
                  passes=("fwd",)),
        # The memory headline: memory above the inputs at T = 10^6, K = 1000.
        BenchCase("headline", "headline", B=1, T=1_000_000, K=1000, C=24, backends=gpu,
                  force=gpu),
        # K = 1 against pytorch-crf's GPU path (a Python loop over T: seconds, not minutes).
        BenchCase("tagging", "T", B=32, T=4096, K=1, C=9, backends=tagging),
    ]


def timings(out: Path, tag: str, seconds: float, dry_run: bool) -> int:
    import torch

    from . import backends as bk
    from . import measure, report
    from .run import Runner, Settings

    started = time.monotonic()
    device = torch.device("cpu" if dry_run else "cuda")
    names, cases = timing_cases(dry_run)
    path = out / f"{tag}-timings.csv"
    peak = measure.cpu_exp_peak() if dry_run else measure.gpu_exp_peak(device)
    backends = bk.prepare(names, device)
    settings = Settings(
        device=device, dtype=torch.float32, repeat=5, budget_s=seconds / 3,
        headline_budget_s=seconds / 3, ref_budget_s=15.0, once_s=3.0,
        target_s=0.5 if dry_run else 1.0, deadline=started + seconds,
        dense_limit_bytes=2**30, exp_per_s=peak["exp_per_s"], exp_peak=peak,
    )
    runner = Runner(settings, backends)
    runner.calibrate()
    for case in cases:
        if time.monotonic() > started + seconds:
            print(f"timings: {case.label} SKIPPED: out of budget", flush=True)
            continue
        for row in runner.run_case(case, names):
            ms = f"{row['ms']:.3f} ms" if row["ms"] == row["ms"] else "-"
            mib = f"{row['peak_mib']:.1f} MiB" if row["peak_mib"] == row["peak_mib"] else ""
            print(f"timings: {case.label:32s} {row['pass']:8s} {row['backend']:21s} "
                  f"{row['status']:9s} {ms:>12s} {mib:>12s} {row['note']}", flush=True)
        report.write_csv(path, runner.rows)  # after every case: a kill keeps the rest
    report.write_csv(path, runner.rows)
    return 0


# -- the forward chain, profiled ------------------------------------------------

# One sequence: the forward is one CTA's chain (warp 0's steps), the case the
# B = 1, T = 10^6 target turns on. Float32, C = 24, K = 200, static transition.
CHAIN = dict(K=200, C=24)
CHAIN_T = 200_000  # timed: about 0.6 s a forward at 3 µs a position
CHAIN_T_PROFILED = 20_000  # under ncu, which replays the kernel for its passes
CHAIN_KERNEL = "exp_blocked_kernel"


def chain_inputs(T: int, device, seed: int = 0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    K, C = CHAIN["K"], CHAIN["C"]
    return (torch.randn(1, T, C, device=device, generator=g),
            torch.randn(C, C, device=device, generator=g),
            torch.randn(K, C, device=device, generator=g),
            torch.full((1,), T, dtype=torch.long, device=device))


def chain_run(dry_run: bool) -> int:
    """One exp-domain forward at B = 1 (what ncu profiles), after a warm-up
    at T = 64 whose launch ncu skips (-s 1)."""
    import torch

    from . import backends as bk

    device = torch.device("cpu" if dry_run else "cuda")
    b = bk.make("cpu" if dry_run else "cuda-exp", device)
    with bk.environment(b.env):
        b.fn(*chain_inputs(64, device))
        z = b.fn(*chain_inputs(CHAIN_T_PROFILED // (100 if dry_run else 1), device))
    print(f"chain: log Z {float(z[0]):.3f}", flush=True)
    return 0


def chain_times(log, dry_run: bool, deadline: float) -> None:
    """Microseconds a position of each CUDA forward at B = 1 (bench.measure's
    median of two, CUDA events on a GPU, after a call that warms up and gives
    log Z)."""
    import torch

    from . import backends as bk
    from . import measure

    device = torch.device("cpu" if dry_run else "cuda")
    names = ("cpu", "cpu-log") if dry_run else ("cuda-exp", "cuda", "cuda-chunks")
    T = CHAIN_T // (100 if dry_run else 1)
    args = chain_inputs(T, device)
    for name in names:
        if time.monotonic() > deadline:
            _say(f"chain {name:11s} SKIPPED: out of budget", log)
            continue
        b = bk.make(name, device)
        with bk.environment(b.env), torch.no_grad():
            z = b.fn(*args)
            seconds = measure.median_seconds(lambda: b.fn(*args), device, 2)
        _say(f"chain {name:11s} B1 T{T} K{CHAIN['K']} C{CHAIN['C']} forward: "
             f"{seconds * 1e3:.1f} ms, {seconds / T * 1e6:.3f} µs a position "
             f"(log Z {float(z[0]):.3f})", log)


def find_ncu() -> str | None:
    import glob
    import shutil

    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def _column(header: list[str], *words: str) -> int | None:
    for i, name in enumerate(header):
        if all(w.lower() in name.lower() for w in words):
            return i
    return None


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def stall_table(csv_text: str, top: int = 40) -> list[str]:
    """The instructions with the most warp-stall samples, from ncu's source
    page as CSV (--page source --print-source sass --csv): their share of
    all samples, the instruction, and what else the page gives for it."""
    rows = list(csv.reader(line for line in csv_text.splitlines() if line.strip()))
    start = next((i for i, r in enumerate(rows) if _column(r, "source") is not None
                  and _column(r, "sampl") is not None), None)
    if start is None:
        return ["stall table: no header with 'Source' and a samples column in the source "
                "page; its first lines: " + " | ".join(",".join(r)[:200] for r in rows[:3])]
    header, body = rows[start], rows[start + 1:]
    src = _column(header, "source")
    address = _column(header, "address")
    samples = _column(header, "sampling", "all") or _column(header, "sampl")
    not_issued = _column(header, "sampling", "not")
    executed = _column(header, "instructions executed")
    total = sum(_number(r[samples]) for r in body if len(r) > samples) or 1.0
    body.sort(key=lambda r: -_number(r[samples]) if len(r) > samples else 0.0)
    lines = [f"stall table: {len(body)} instructions, {total:.0f} samples; the top {top} "
             f"(columns: {header[samples]!r}"
             + (f", {header[not_issued]!r}" if not_issued is not None else "")
             + (f", {header[executed]!r}" if executed is not None else "") + ")"]
    cum = 0.0
    for r in body[:top]:
        if len(r) <= max(samples, src):
            continue
        n = _number(r[samples])
        cum += n
        extra = (f" {_number(r[not_issued]):8.0f}" if not_issued is not None else "") + (
            f" {_number(r[executed]):12.0f}" if executed is not None else "")
        where = r[address] if address is not None else "?"
        lines.append(f"{100 * n / total:6.2f}% {100 * cum / total:6.1f}% {n:8.0f}{extra} "
                     f"{where:>8s}  {r[src].strip()[:110]}")
    return lines


def profile(out: Path, tag: str, seconds: float, dry_run: bool, work: Path) -> int:
    import subprocess

    deadline = time.monotonic() + seconds
    path = out / f"{tag}-profile.txt"
    with open(path, "a") as log:
        _say(f"# the forward chain at B = 1, budget {seconds:.0f} s"
             + (" (dry run: the C++ kernel's two algorithms, no ncu)" if dry_run else ""), log)
        # ncu gets the rest, at least half or a minute.
        chain_times(log, dry_run, deadline - (0.0 if dry_run else min(60.0, seconds / 2)))
        ncu = None if dry_run else find_ncu()
        if ncu is None:
            _say("ncu: not run (" + ("dry run" if dry_run else "not found") + ")", log)
            return 0
        report = work / f"{tag}-chain"
        cmd = [ncu, "--clock-control", "none", "--target-processes", "all",
               "-k", f"regex:{CHAIN_KERNEL}", "-s", "1", "-c", "1",
               "--section", "SourceCounters", "--section", "WarpStateStats",
               "--section", "SchedulerStats", "--section", "LaunchStats",
               "--section", "Occupancy", "--section", "SpeedOfLight",
               "--import-source", "yes", "-f", "-o", str(report),
               sys.executable, "-m", "bench.gpu_check", "chain"]
        left = deadline - time.monotonic() - 20
        if left < 20:
            _say(f"ncu: SKIPPED: {left:.0f} s left", log)
            return 0
        _say("$ " + " ".join(cmd), log)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            log.write(proc.stdout[-4000:] + proc.stderr[-4000:] + "\n")
            _say(f"ncu: exit {proc.returncode} ({time.monotonic() - t0:.0f} s)", log)
        except subprocess.TimeoutExpired:
            _say(f"ncu: TIMEOUT after {left:.0f} s", log)
            return 1
        rep = report.with_suffix(".ncu-rep")
        if not rep.exists():
            return 1
        pages = (("details", ["--page", "details"], None),
                 ("sass", ["--page", "source", "--print-source", "sass", "--csv"], "sass.csv"),
                 ("cuda", ["--page", "source", "--print-source", "cuda", "--csv"], "cuda.csv"))
        for name, args, save in pages:
            try:
                proc = subprocess.run([ncu, "-i", str(rep), *args], capture_output=True,
                                      text=True, timeout=max(10.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"ncu page {name}: TIMEOUT", log)
                continue
            _say(f"ncu page {name}: exit {proc.returncode}, {len(proc.stdout)} characters", log)
            if save is None:
                log.write(proc.stdout[:60_000] + proc.stderr[-2000:] + "\n")
                continue
            (work / f"{tag}-chain-{save}").write_text(proc.stdout)
            for line in stall_table(proc.stdout, 40 if name == "sass" else 25):
                _say(line, log)
    return 0


# -- the closing table ---------------------------------------------------------------


def summary(out: Path, tag: str) -> int:
    lines = [f"== summary ({tag})"]
    status = out / "summary.txt"
    if status.exists():
        for line in status.read_text().splitlines():
            m = re.match(r"== section (\S+): (.*)$", line)
            if m:
                lines.append(f"{m[1]:12s} {m[2]}")
    corr = out / f"{tag}-correctness.txt"
    if corr.exists():
        text = corr.read_text()
        for line in text.splitlines():
            if line.startswith("correctness:"):
                lines.append(f"{'':12s} {line}")
        for line in text.splitlines():
            if " FAIL" in line and not line.startswith("#"):
                lines.append(f"{'':12s} {line[:150]}")
    pytest_log = out / f"{tag}-pytest.txt"
    if pytest_log.exists():
        tail = [ln for ln in pytest_log.read_text().splitlines()
                if re.search(r"\d+ (passed|failed|error|skipped|deselected|tests? collected)", ln)]
        if tail:
            lines.append(f"{'pytest':12s} {tail[-1].strip('= ')}")
    prof = out / f"{tag}-profile.txt"
    if prof.exists():
        for line in prof.read_text().splitlines():
            if line.startswith(("chain ", "ncu: ")):
                lines.append(f"{'profile':12s} {line[:150]}")
    san = out / f"{tag}-sanitizer.txt"
    if san.exists():
        tool = None
        for line in san.read_text().splitlines():
            m = re.match(r"#### (\w+)", line)
            if m:
                tool = m[1]
            m = re.search(r"ERROR SUMMARY: (.*)$", line)
            if m and tool:
                lines.append(f"{'sanitizer':12s} {tool:10s} {m[1]}")
    csv_path = out / f"{tag}-timings.csv"
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            for r in csv.DictReader(f):
                ms = f"{float(r['ms']):.2f} ms" if r["ms"] else r["status"]
                mib = f"{float(r['peak_mib']):.0f} MiB" if r["peak_mib"] else ""
                lines.append(f"{'timing':12s} B{r['B']} T{r['T']} K{r['K']} C{r['C']} "
                             f"{r['pass']:7s} {r['backend']:21s} {ms:>12s} {mib:>9s}")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check")
    p.add_argument("command", choices=("pick-wheel", "verify", "env", "correctness", "sanitize",
                                       "timings", "profile", "chain", "summary"))
    p.add_argument("args", nargs="*")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--work", type=Path, default=None, help="profile: where the ncu report goes")
    a = p.parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if a.command == "pick-wheel":
        wheel, why = pick_wheel(Path(a.args[0]))
        print(wheel if wheel else why, file=sys.stdout if wheel else sys.stderr)
        return 0 if wheel else 1
    if a.command == "verify":
        return verify(Path(a.args[0]).resolve(), a.dry_run)
    if a.command == "sanitize":
        return sanitize(a.dry_run)
    if a.command == "chain":
        return chain_run(a.dry_run)
    out, tag = Path(a.args[0]), a.args[1]
    if a.command == "env":
        environment(out, tag, a.dry_run)
        return 0
    if a.command == "correctness":
        return correctness(out, tag, a.seconds, a.dry_run)
    if a.command == "timings":
        return timings(out, tag, a.seconds, a.dry_run)
    if a.command == "profile":
        return profile(out, tag, a.seconds, a.dry_run, a.work or out)
    return summary(out, tag)


if __name__ == "__main__":
    sys.exit(main())
