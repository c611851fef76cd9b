#!/usr/bin/env bash
# The device check: a GPU machine's first contact in one call (README: "Device check").
#
#   bash bench/gpu_check.sh [--dry-run] [--budget SECONDS] [OUTDIR]
#
# From the repository root. Sections, most valuable first; each writes to
# OUTDIR as it goes (a kill at any point keeps what was done) and runs under a
# time budget, skipped (saying so) when the run's budget cannot cover it:
#   1 environment   nvidia-smi, driver, clocks, torch / Triton / CUDA, SMs
#   2 install       the carried wheel (pip --no-index --no-deps --target), or a
#                   build with every core when none fits or it is stale; the
#                   carried flash-semicrf, torch-struct and pytorch-crf wheels
#   3 correctness   CUDA (log; exp-domain and span-parallel on the static cases)
#                   and Triton against a float64 reference and the C++ kernel
#     pytest        -m "(cuda or triton) and not slow", nvidia-smi -L on top
#   4 profile       the forward chain at B = 1: microseconds a position, then
#                   Nsight Compute's stall samples a SASS instruction of one
#                   blocked exp-domain forward
#   5 timings       fwd+bwd of the two targets, then the headline sizes'
#                   forwards, with CUDA events, bench/results/ CSV schema
#   6 sanitizer     compute-sanitizer memcheck, racecheck, synccheck, initcheck
#   7 summary       a short table, printed last
# --dry-run: every section on this CPU with tiny sizes and stand-ins (the C++
# kernel for CUDA, Triton's interpreter, no sanitizer, no ncu, pytest only
# collects).
# --budget: the whole run's seconds (default 450: 7.5 minutes, install included).
# --sections: which of correctness, pytest, profile, timings and sanitizer run
# (default all, in the order above), each NAME or NAME:SECONDS to change its
# cap, e.g. --sections profile,timings:240,sanitizer:200 (environment and
# install always run).
#
# OUTDIR: $OUT when set, else bench/results/gpu-check-<device>-<time>. It gets
# at most 8 files: summary.txt, <device>-env.json, <device>-correctness.txt,
# <device>-pytest.txt, <device>-profile.txt, <device>-sanitizer.txt,
# <device>-timings.csv and, last, <device>-gpu-check.tar.gz holding all of them
# plus the install log, one log per sanitizer tool (<device>-memcheck.txt, ...)
# and the profile's ncu report and its pages as CSV.
# Carried wheels: $FLASHSEMICRF_GPU_CHECK_WHEELS (default .gpu/ in the checkout);
# the interpreter: $PYTHON (default python3).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
DRY=0
BUDGET=450
OUTDIR=""
SECTIONS=correctness,pytest,profile,timings,sanitizer
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --sections) SECTIONS=$2; shift ;;
    -h|--help) sed -n '2,36p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) OUTDIR=$1 ;;
  esac
  shift
done

DEADLINE=$((SECONDS + BUDGET))
RESERVE=15  # the summary and the archive
WHEELS=${FLASHSEMICRF_GPU_CHECK_WHEELS:-$REPO/.gpu}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
DRYFLAG=()
if [ "$DRY" = 1 ]; then
  DRYFLAG=(--dry-run)
  TAG=cpu-dry-run
  export TRITON_INTERPRET=1
elif nvidia-smi -L >/dev/null 2>&1; then
  TAG=cuda-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z' 'a-z' \
    | sed -E 's/nvidia//; s/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
else
  echo "gpu_check.sh: nvidia-smi finds no GPU; use --dry-run on a machine without one" >&2
  exit 2
fi
if [ -z "$OUTDIR" ]; then
  OUTDIR=${OUT:-$REPO/bench/results/gpu-check-$TAG-$(date +%Y%m%d-%H%M%S)}
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
SUMMARY=$OUTDIR/summary.txt
INSTALL_LOG=$WORK/install.txt
SITE=$WORK/site
FAILED=0
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - SECONDS)); }
# Python with the installed flashsemicrf first on the path, bench/ from the
# checkout after it, and a working directory whose flashsemicrf/ cannot shadow it.
py() { (cd "$WORK" && PYTHONPATH="$SITE:$REPO" "$PYTHON" "$@"); }
py_timed() { local s=$1; shift; (cd "$WORK" && PYTHONPATH="$SITE:$REPO" timeout -k 5 "$s" "$PYTHON" "$@"); }

# run_section NAME CAP MIN FUNCTION: FUNCTION gets the section's seconds,
# min(CAP, what the run has left); skipped when that is under MIN.
run_section() {
  local name=$1 cap=$2 min=$3 fn=$4 budget rc t0
  budget=$(( $(left) - RESERVE ))
  [ "$budget" -gt "$cap" ] && budget=$cap
  if [ "$budget" -lt "$min" ]; then
    say "== section $name: SKIPPED: needs at least ${min} s, ${budget} s of the budget left"
    return
  fi
  echo "== $name (budget ${budget} s)"
  t0=$SECONDS
  "$fn" "$budget"
  rc=$?
  if [ $rc -eq 0 ]; then
    say "== section $name: ok ($((SECONDS - t0)) s of ${budget} s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    say "== section $name: TIMEOUT: cut at ${budget} s; see its log"
    FAILED=1
  else
    say "== section $name: FAILED (exit $rc, $((SECONDS - t0)) s)"
    FAILED=1
  fi
}

section_env() {
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET} s, dry run: $DRY"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')"
    if [ "$DRY" = 1 ]; then
      echo "gpu: none (dry run)"
    else
      nvidia-smi -L
      nvidia-smi --query-gpu=name,driver_version,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,memory.total --format=csv
    fi
    echo "nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"
    echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not found')"
    echo "cores: $(nproc)"
    timeout "$1" "$PYTHON" - <<'EOF'
import importlib.util, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
if importlib.util.find_spec("triton"):
    import triton
    print(f"triton {triton.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2**30:.0f} GiB")
EOF
  } 2>&1 | tee -a "$SUMMARY"
}

install_wheels() {  # the given wheels into a fresh $WORK/site, which becomes $SITE
  SITE=$WORK/site
  rm -rf "$SITE" && mkdir -p "$SITE"
  "$PYTHON" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$SITE" "$@" >> "$INSTALL_LOG" 2>&1
}

section_install() {
  local budget=$1 started=$SECONDS wheel extras=() rc cap t0
  # All three are pure Python (py3-none-any): one wheel serves any interpreter.
  for w in "$WHEELS"/flash_semicrf-0.2.0-*.whl "$WHEELS"/torch_struct-0.5-*.whl \
      "$WHEELS"/pytorch_crf-0.7.2-*.whl; do
    [ -f "$w" ] && extras+=("$w")
  done
  say "install: carried comparison wheels: ${extras[*]:-none (flash-semicrf, torch-struct and pytorch-crf as installed, if at all)}"
  wheel=$(cd "$WORK" && PYTHONPATH="$REPO" "$PYTHON" -m bench.gpu_check pick-wheel "$WHEELS" 2>>"$INSTALL_LOG")
  rc=1
  if [ -n "$wheel" ]; then
    say "install: $wheel"
    install_wheels "$wheel" "${extras[@]}" && { py -m bench.gpu_check verify "$REPO" "${DRYFLAG[@]}" 2>&1 | tee -a "$INSTALL_LOG" "$SUMMARY"; rc=${PIPESTATUS[0]}; }
  else
    say "install: $(tail -n 1 "$INSTALL_LOG")"
  fi
  if [ "$rc" -ne 0 ] && [ "$DRY" = 1 ]; then
    say "install: dry run: no usable wheel, and no build here (a GPU run builds one with every core); using the checkout's in-place build"
    SITE=$REPO
    [ ${#extras[@]} -gt 0 ] && "$PYTHON" -m pip install --no-index --no-deps --no-compile \
      --target "$WORK/extras" "${extras[@]}" >> "$INSTALL_LOG" 2>&1
    py -m bench.gpu_check verify "$REPO" --dry-run 2>&1 | tee -a "$INSTALL_LOG" "$SUMMARY"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 2 ] && rc=0  # an in-place build may predate its own source record
  elif [ "$rc" -ne 0 ]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
    # What `make wheel WHEEL_ARCHS=$cap WHEEL_CPU_ARCH=native` runs, without needing make.
    local seconds=$((budget - (SECONDS - started) - 20))
    if [ "$seconds" -lt 30 ]; then
      say "install: no time left to build a wheel (${seconds} s)"
      return 1
    fi
    say "install: building a wheel here for $cap with $(nproc) jobs"
    t0=$SECONDS
    (cd "$REPO" && FLASHSEMICRF_CUDA_ARCH_LIST="$cap" FLASHSEMICRF_CPU_ARCH=native \
      FLASHSEMICRF_FORCE_CUDA=1 MAX_JOBS="$(nproc)" \
      timeout -k 5 "$seconds" "$PYTHON" -m pip wheel \
      --no-build-isolation --no-deps -v -w "$WORK/dist" .) >> "$INSTALL_LOG" 2>&1
    rc=$?
    say "install: the build took $((SECONDS - t0)) s (exit $rc)"
    [ $rc -ne 0 ] && return $rc
    install_wheels "$WORK"/dist/flashsemicrf-*.whl "${extras[@]}" || return 1
    py -m bench.gpu_check verify "$REPO" 2>&1 | tee -a "$INSTALL_LOG" "$SUMMARY"
    rc=${PIPESTATUS[0]}
  fi
  [ "$SITE" = "$REPO" ] && [ -d "$WORK/extras" ] && SITE="$REPO:$WORK/extras"
  [ "$rc" -eq 0 ] && py -m bench.gpu_check env "$OUTDIR" "$TAG" "${DRYFLAG[@]}" 2>&1 \
    | tee -a "$SUMMARY"
  return "$rc"
}

# The Python sections stop starting new work 15 s before their hard timeout.
section_correctness() {
  py_timed "$1" -m bench.gpu_check correctness "$OUTDIR" "$TAG" --seconds $(($1 - 15)) "${DRYFLAG[@]}"
}

section_pytest() {
  local log=$OUTDIR/$TAG-pytest.txt extra=()
  [ "$DRY" = 1 ] && extra=(--collect-only)
  {
    if [ "$DRY" = 1 ]; then echo "dry run: no GPU; pytest only collects"; else nvidia-smi -L; fi
    echo "\$ pytest -m '(cuda or triton) and not slow' ${extra[*]}"
  } > "$log"
  # SIGINT at the budget: pytest then stops and still prints its summary line.
  (cd "$REPO" && PYTHONPATH="$SITE:$REPO" timeout -s INT -k 10 "$1" "$PYTHON" -P -m pytest -q -rs \
    -p no:cacheprovider --continue-on-collection-errors -m "(cuda or triton) and not slow" \
    "${extra[@]}" tests) >> "$log" 2>&1
  local rc=$?
  tail -n 3 "$log"
  [ "$rc" -eq 5 ] && rc=0  # nothing selected: not a failure of the check
  return $rc
}

section_sanitizer() {
  local budget=$1 tools=(memcheck racecheck synccheck initcheck) n=4 each t0 rc log
  local out=$OUTDIR/$TAG-sanitizer.txt
  if [ "$DRY" = 1 ]; then
    echo "#### dry run: compute-sanitizer not run; the program it runs, run plainly:" >> "$out"
    py_timed "$budget" -m bench.gpu_check sanitize --dry-run >> "$out" 2>&1
    rc=$?
    tail -n 4 "$out"
    return $rc
  fi
  local tool_bin
  tool_bin=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  local start=$SECONDS
  for tool in "${tools[@]}"; do
    each=$(( (budget - (SECONDS - start)) / n ))
    n=$((n - 1))
    log=$WORK/$TAG-$tool.txt
    if [ "$each" -lt 10 ]; then
      echo "#### $tool SKIPPED: ${each} s left for it" | tee -a "$out"
      continue
    fi
    t0=$SECONDS
    (cd "$WORK" && PYTHONPATH="$SITE:$REPO" timeout -s INT -k 5 "$each" "$tool_bin" --tool "$tool" \
      --print-limit 20 "$PYTHON" -m bench.gpu_check sanitize) > "$log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      echo "TIMEOUT after ${each} s: no ERROR SUMMARY" >> "$log"
    fi
    { echo "#### $tool (exit $rc, $((SECONDS - t0)) s)"; cat "$log"; } >> "$out"
    echo "$tool: $(grep -h 'ERROR SUMMARY' "$log" | tail -n 1 || true) (exit $rc, $((SECONDS - t0)) s)"
  done
  ! grep -q "ERROR SUMMARY: [1-9]" "$out"
}

section_profile() {
  py_timed "$1" -m bench.gpu_check profile "$OUTDIR" "$TAG" --seconds $(($1 - 15)) \
    --work "$WORK" "${DRYFLAG[@]}"
}

section_timings() {
  py_timed "$1" -m bench.gpu_check timings "$OUTDIR" "$TAG" --seconds $(($1 - 15)) "${DRYFLAG[@]}"
}

: > "$SUMMARY"
say "gpu_check: $TAG, budget ${BUDGET} s, out: $OUTDIR, work: $WORK"
run_section environment 30 10 section_env
run_section install 300 20 section_install
if grep -q "== section install: ok" "$SUMMARY"; then
  for item in ${SECTIONS//,/ }; do
    name=${item%%:*}
    case "$name" in
      correctness) cap=150 ;;
      pytest) cap=90 ;;
      profile) cap=90 ;;
      timings) cap=120 ;;
      sanitizer) cap=100 ;;
      *) say "== section $name: UNKNOWN: --sections takes correctness, pytest, profile, timings, sanitizer"
         FAILED=1; continue ;;
    esac
    [ "$item" != "$name" ] && cap=${item#*:}
    run_section "$name" "$cap" 30 "section_$name"
  done
else
  say "== section correctness: SKIPPED: nothing installed to check"
fi

# As a script, not through the bench package: the table needs no torch.
"$PYTHON" "$REPO/bench/gpu_check.py" summary "$OUTDIR" "$TAG" > "$WORK/summary-table.txt" 2>&1
cat "$WORK/summary-table.txt" >> "$SUMMARY"
files=()
for f in "$OUTDIR/summary.txt" "$INSTALL_LOG" \
         "$OUTDIR/$TAG"-{env.json,correctness.txt,pytest.txt,profile.txt,sanitizer.txt,timings.csv} \
         "$WORK/$TAG"-{memcheck,racecheck,synccheck,initcheck}.txt \
         "$WORK/$TAG"-chain.ncu-rep "$WORK/$TAG"-chain-{sass,cuda}.csv; do
  [ -f "$f" ] && files+=("$f")
done
tar czf "$OUTDIR/$TAG-gpu-check.tar.gz" --transform 's,^.*/,,' "${files[@]}" 2>/dev/null
echo
cat "$WORK/summary-table.txt"
echo "gpu_check: $((SECONDS)) s in all; results in $OUTDIR"
exit $FAILED
