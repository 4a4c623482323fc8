#!/usr/bin/env bash
# All GPU work of earlytom_ext in ONE run, from the repository root on a CUDA machine.
#
#   bash scripts/gpu_check.sh [--budget SECONDS] [--cpu] [stage ...]
#
# Stages (default: all, in this order):
#   env       GPU, driver, toolchain and Python package versions
#   build     python setup.py build_ext --inplace (CUDA kernels, TORCH_CUDA_ARCH_LIST=9.0)
#   test      pytest python_tests -n 8 (pytest-xdist; the CUDA == CPU == reference parity tests)
#   cuda      cmake + ctest of the standalone cuda_tests/test_*.cu programs
#   sanitize  compute-sanitizer memcheck on every cuda_tests program, then racecheck on as many
#             as the stage's time allows ("refused" where the GPU runtime refuses the sanitizer;
#             the stage is skipped where the toolkit has no compute-sanitizer)
#   bench     python -m bench.run --all (results <device>-<date>.{md,json,png})
# "test" and "bench" build the extension first when it is not importable with CUDA kernels
# (not after a build that failed earlier in the run);
# "sanitize" builds the cuda_tests first when they are missing.
#
# Time: the whole run fits in --budget / GPU_CHECK_BUDGET seconds (default 480 = 8 minutes).
# Each stage has a slice: at most its MAX seconds, and no more than leaves the stages after it
# their MIN (but at least its own MIN). A stage whose MIN no longer fits is not started: it is
# reported as "SKIPPED (budget)" in the summary (never silently), and so is a sanitizer run or a
# bench configuration that does not fit. A stage that overruns its slice is stopped and reported.
#
# --cpu: a dry run on a machine without a GPU (CPU-only build check, the CPU tests, the bench
# stage as the CPU smoke run; cuda and sanitize are reported as skipped).
#
# Output: everything is logged under a work folder; $OUT receives summary.md (stage table, what
# was skipped, the tail of each failing log), logs.tar.gz (all logs, junit xml, bench outputs)
# and the bench results <device>-<date>.md/.json/.png: at most 8 files. Both are rewritten after
# every stage, so a run stopped from outside still returns the finished stages. The script keeps
# going after a failing stage and exits 1 when any stage failed, 2 when none failed but a requested
# stage was skipped for lack of time (listed at the top of the summary), 0 when every stage passed.
#
# Environment: OUT (default: a temp folder), PYTHON (python3), CUDA_HOME (/usr/local/cuda or
# nvcc's), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0), CMAKE_CUDA_ARCHITECTURES (90),
# GPU_CHECK_BUDGET (480), STAGE_MAX_<STAGE> / STAGE_MIN_<STAGE> (seconds; override a slice),
# SANITIZE_TOOLS ("memcheck racecheck"), PYTEST_WORKERS (8), PYTEST_ARGS, BENCH_ARGS (extra
# arguments of bench.run).
set -u
set -o pipefail

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

BUDGET="${GPU_CHECK_BUDGET:-480}"
CPU_ONLY=0
STAGES=""
ALL_STAGES="env build test cuda sanitize bench"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --budget) BUDGET="${2:?--budget needs a number of seconds}"; shift 2 ;;
    --budget=*) BUDGET="${1#--budget=}"; shift ;;
    --cpu) CPU_ONLY=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$SELF"; exit 0 ;;
    -*) echo "unknown option '$1'" >&2; exit 2 ;;
    *)
      case " $ALL_STAGES " in
        *" $1 "*) STAGES="$STAGES $1" ;;
        *) echo "unknown stage '$1' (stages: $ALL_STAGES)" >&2; exit 2 ;;
      esac
      shift ;;
  esac
done
STAGES="${STAGES:-$ALL_STAGES}"
STAGES="$(echo $STAGES)"
case "$BUDGET" in
  ''|*[!0-9]*) echo "--budget / GPU_CHECK_BUDGET must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;;
esac

export PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
  else CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PATH="$PATH:$CUDA_HOME/bin"
# The in-place build makes the package importable from the repository root.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
CUDA_ARCHS="${CMAKE_CUDA_ARCHITECTURES:-90}"
SANITIZE_TOOLS="${SANITIZE_TOOLS:-memcheck racecheck}"
PYTEST_WORKERS="${PYTEST_WORKERS:-8}"
OUT="${OUT:-${TMPDIR:-/tmp}/earlytom_gpu_check_out}"
WORK="${TMPDIR:-/tmp}/earlytom_gpu_check.$$"
CT_BUILD="$WORK/cuda_tests_build"
mkdir -p "$OUT" "$WORK/logs" "$WORK/bench"
SUMMARY="$WORK/summary.md"
STATUS_ROWS="$WORK/status.tsv"
NOTES="$WORK/notes.txt"  # skipped pieces inside stages (sanitizer runs, ...)
: >"$STATUS_ROWS"
: >"$NOTES"
FAILED=0
SKIPPED_STAGE=0
FINAL_RESERVE=15  # seconds kept for the summary and the archive

# Slices: "MAX MIN" seconds per stage (see the header).
slice_max() { local v="STAGE_MAX_$(echo "$1" | tr '[:lower:]' '[:upper:]')"; local d
  case "$1" in env) d=30 ;; build) d=150 ;; test) d=150 ;; cuda) d=90 ;; sanitize) d=90 ;; bench) d=400 ;; esac
  echo "${!v:-$d}"; }
slice_min() { local v="STAGE_MIN_$(echo "$1" | tr '[:lower:]' '[:upper:]')"; local d
  case "$1" in env) d=15 ;; build) d=40 ;; test) d=45 ;; cuda) d=20 ;; sanitize) d=20 ;; bench) d=90 ;; esac
  echo "${!v:-$d}"; }

log() { echo "[gpu_check $(date -u +%H:%M:%S) ${SECONDS}s] $*"; }

# run_stage NAME FUNCTION REMAINING_STAGES...: runs FUNCTION under its slice, logs to
# $WORK/logs/NAME.log (and stdout), records pass / fail / skipped and the time taken.
run_stage() {
  local name="$1" fn="$2"; shift 2
  local later_min=0 s
  for s in "$@"; do later_min=$((later_min + $(slice_min "$s"))); done
  local left=$((BUDGET - SECONDS - FINAL_RESERVE))
  local need; need=$(slice_min "$name")
  local limit; limit=$(slice_max "$name")
  # The stages after this one keep their minimums where possible; when the budget cannot cover
  # every minimum, the stages run in order (an earlier stage still gets its own minimum).
  [ $((left - later_min)) -lt "$limit" ] && limit=$((left - later_min))
  [ "$limit" -lt "$need" ] && limit="$need"
  if [ "$left" -lt "$need" ]; then
    log "stage $name: SKIPPED (budget: ${left}s left of ${BUDGET}s, needs ${need}s)"
    printf '%s\t%s\t%s\n' "$name" "SKIPPED (budget: ${left}s left of ${BUDGET}s, needs ${need}s)" 0 >>"$STATUS_ROWS"
    SKIPPED_STAGE=1
    finalize
    return
  fi
  local logf="$WORK/logs/$name.log"
  log "stage $name (slice ${limit}s) -> $logf"
  local t0=$SECONDS rc
  # Each stage runs in its own bash under `timeout`, so a hanging stage cannot eat the next
  # stages' time.
  STAGE_NAME="$name" STAGE_LIMIT="$limit" timeout -k 10 "$limit" bash -c "$fn" 2>&1 | tee "$logf"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0)) status
  if [ "$rc" -eq 0 ]; then status=pass
  elif [ "$rc" -eq 77 ]; then status="skipped ($(tail -n 1 "$logf" | cut -c1-120))"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="FAIL (stopped at its ${limit}s slice)"; FAILED=1
  else status="FAIL (rc $rc)"; FAILED=1
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >>"$STATUS_ROWS"
  log "stage $name: $status in ${dt}s"
  finalize
}

ext_ready() {
  "$PY" - "$CPU_ONLY" <<'EOF' >/dev/null 2>&1
import sys, torch
from earlytom_ext import _ext
cpu_only = sys.argv[1] == "1"
ok = _ext.available() and (cpu_only or (_ext.has_cuda_kernels() and torch.cuda.is_available()))
sys.exit(0 if ok else 1)
EOF
}

ensure_ext() {
  if ext_ready; then return 0; fi
  if [ -f "$WORK/build_failed" ]; then
    echo "earlytom_ext did not build earlier in this run (see $(cat "$WORK/build_failed").log): not retried"
    return 1
  fi
  echo "earlytom_ext is not importable with its kernels yet: building it first"
  stage_build
}

# ------------------------------------------------------------------------------------------
stage_env() {
  echo "## date"; date -u
  echo "## nvidia-smi"; nvidia-smi || echo "nvidia-smi: not available"
  nvidia-smi -q -d CLOCK,MEMORY,PERFORMANCE 2>/dev/null | head -60
  echo "## nvcc"; nvcc --version 2>/dev/null | tail -2 || echo "nvcc: not available"
  echo "## compute-sanitizer"; if cs="$(sanitizer_bin)"; then "$cs" --version | head -2; else echo "not found"; fi
  echo "## cmake"; cmake --version 2>/dev/null | head -1 || echo "cmake: not available"
  echo "## python"; "$PY" - <<'EOF'
import sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "numpy", "pytest", "xdist", "matplotlib", "pynvml", "ninja", "setuptools"):
    try:
        mod = __import__(name)
        print(f"{name:14s}", getattr(mod, "__version__", "?"))
    except Exception as e:
        print(f"{name:14s} missing ({type(e).__name__})")
import torch
print("torch.cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"cc {p.major}.{p.minor}", f"{p.total_memory/2**30:.1f} GiB", f"SMs {p.multi_processor_count}")
EOF
  echo "## cpu"; nproc; free -g 2>/dev/null | head -2
}

stage_build() {
  if [ "$CPU_ONLY" = 1 ]; then export EARLYTOM_SKIP_CUDA=1; else export EARLYTOM_FORCE_CUDA=1; fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME cpu_only=$CPU_ONLY"
  # A failed build is not retried by the later stages (it would fail again, on their time); one
  # stopped at its slice is (ninja goes on where it stopped).
  "$PY" setup.py build_ext --inplace || { echo "${STAGE_NAME:-build}" >"$WORK/build_failed"; return 1; }
  "$PY" - "$CPU_ONLY" <<'EOF' || { echo "${STAGE_NAME:-build}" >"$WORK/build_failed"; return 1; }
import sys, torch, earlytom_ext
from earlytom_ext import _ext
print("earlytom_ext", earlytom_ext.__version__, earlytom_ext.__file__)
print("compiled ops available:", _ext.available(), "CUDA kernels:", _ext.has_cuda_kernels())
assert _ext.available(), "the compiled extension does not import"
if sys.argv[1] != "1":
    assert _ext.has_cuda_kernels(), "the build has no CUDA kernels"
    assert torch.cuda.is_available(), "torch sees no GPU"
EOF
}

stage_test() {
  ensure_ext || return 1
  # -v: a run stopped at its slice still shows which tests passed and failed; -rfEs: the failures
  # and errors are listed at the end too (a bare -rs would drop them from the short summary).
  local args=(python_tests -v -rfEs -p no:cacheprovider --junitxml="$WORK/logs/pytest.xml" --durations=10)
  # (pytest-benchmark, when installed, warns once per xdist worker that it is disabled: off.)
  if "$PY" -c "import xdist" >/dev/null 2>&1; then args+=(-n "$PYTEST_WORKERS" -p no:benchmark); else
    echo "pytest-xdist is missing: the tests run in one process"; fi
  if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then args+=(--timeout 240); fi
  local rc
  # shellcheck disable=SC2086
  "$PY" -m pytest "${args[@]}" ${PYTEST_ARGS:-}
  rc=$?
  if [ "$rc" -eq 3 ]; then
    echo "pytest stopped with an internal error (with -n: usually a worker that crashed, e.g. a segfault;"
    echo "the 'Fatal Python error' traceback above names the test); the tests after it did not run"
  fi
  return "$rc"
}

build_cuda_tests() {
  cmake -S . -B "$CT_BUILD" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" >/dev/null || return 1
  cmake --build "$CT_BUILD" -j "$MAX_JOBS"
}

stage_cuda() {
  if [ "$CPU_ONLY" = 1 ]; then echo "no GPU (--cpu): cuda_tests not built"; return 77; fi
  build_cuda_tests || return 1
  ctest --test-dir "$CT_BUILD" --output-on-failure --no-tests=error --timeout 120
}

sanitizer_bin() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "$CUDA_HOME/bin/compute-sanitizer" \
           "$CUDA_HOME/compute-sanitizer/compute-sanitizer"; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

stage_sanitize() {
  if [ "$CPU_ONLY" = 1 ]; then echo "no GPU (--cpu): sanitizer not run"; return 77; fi
  local t_end=$((SECONDS + ${STAGE_LIMIT:-90} - 5))
  local cs
  cs="$(sanitizer_bin)" || { echo "compute-sanitizer not found (a toolkit without it): not run"; return 77; }
  if ! ls "$CT_BUILD"/test_* >/dev/null 2>&1; then
    echo "cuda_tests not built yet: building them first (no ctest run here)"
    build_cuda_tests || return 1
  fi
  local bins=() b
  for b in "$CT_BUILD"/test_*; do [ -f "$b" ] && [ -x "$b" ] && bins+=("$b"); done
  if [ "${#bins[@]}" -eq 0 ]; then echo "no cuda_tests programs to check"; return 1; fi
  local fails=0 refused=0 clean=0 notrun=0 tool rc limit out t0 name
  out="$(mktemp)"
  declare -A took
  # memcheck on every program first (it must finish: a timeout is a failure); then the other
  # tools on as many programs as fit, quickest memcheck first, each predicted to take twice its
  # memcheck run (one that runs out of the slice is reported as unfinished, not as a finding).
  for tool in $SANITIZE_TOOLS; do
    local extra=()
    [ "$tool" = racecheck ] && extra=(--racecheck-report all)
    if [ "$tool" != memcheck ] && [ "${#took[@]}" -gt 0 ]; then
      mapfile -t bins < <(for b in "${bins[@]}"; do echo "${took[$(basename "$b")]:-999} $b"; done | sort -n | cut -d' ' -f2-)
    fi
    local i=0
    for b in "${bins[@]}"; do
      name="$(basename "$b")"
      local left=$((t_end - SECONDS)) runs_after=$(( ${#bins[@]} - i - 1 ))
      i=$((i + 1))
      if [ "$tool" = memcheck ]; then
        limit=$(( left / (runs_after + 1) ))
      else
        local want=$(( 2 * ${took[$name]:-20} + 5 ))
        if [ "$left" -lt "$want" ]; then
          echo "--> $tool $name: not run (needs ~${want}s, ${left}s left in the stage's slice)"
          echo "sanitize: $tool $name not run (time)" >>"$NOTES"
          notrun=$((notrun + 1)); continue
        fi
        limit=$left
      fi
      if [ "$limit" -lt 5 ]; then
        echo "--> $tool $name: not run (slice used up)"; echo "sanitize: $tool $name not run (time)" >>"$NOTES"
        notrun=$((notrun + 1)); [ "$tool" = memcheck ] && fails=$((fails + 1)); continue
      fi
      echo "=== compute-sanitizer --tool $tool $name (limit ${limit}s)"
      t0=$SECONDS
      timeout -k 5 "$limit" "$cs" --tool "$tool" "${extra[@]}" --error-exitcode 99 --print-limit 50 "$b" 2>&1 \
        | tee "$out"
      rc=${PIPESTATUS[0]}
      [ "$tool" = memcheck ] && took[$name]=$((SECONDS - t0))
      if grep -q "Device not supported" "$out"; then
        echo "--> $tool $name: refused by this GPU runtime"; refused=$((refused + 1))
      elif [ "$rc" -eq 0 ]; then echo "--> $tool $name: clean"; clean=$((clean + 1))
      elif { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$tool" != memcheck ]; then
        echo "--> $tool $name: unfinished after ${limit}s (the stage's slice ran out; not verified)"
        echo "sanitize: $tool $name unfinished (time, ${limit}s)" >>"$NOTES"; notrun=$((notrun + 1))
      elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "--> $tool $name: TIMEOUT after ${limit}s (not verified)"; fails=$((fails + 1))
      else echo "--> $tool $name: FAILED (rc $rc)"; fails=$((fails + 1))
      fi
    done
  done
  rm -f "$out"
  echo "sanitizer runs: $clean clean, $fails failed, $notrun not run or unfinished (time), $refused refused"
  [ "$fails" -eq 0 ] || return 1
  if [ "$clean" -eq 0 ]; then echo "compute-sanitizer refused by this runtime"; return 77; fi
}

stage_bench() {
  local t0=$SECONDS
  ensure_ext || return 1
  # The benchmark's own budget: what is left of the slice minus 45 s for the configuration that
  # is running when it ends (a point runs to its end), the imports, the report and the figure.
  local budget=$(( ${STAGE_LIMIT:-400} - (SECONDS - t0) - 45 ))
  [ "$budget" -lt 30 ] && budget=30
  local dev=(--device cuda)
  [ "$CPU_ONLY" = 1 ] && dev=(--device cpu --quick --model micro --frames 4 --iters 1 --warmup 0)
  echo "bench time budget: ${budget}s"
  # shellcheck disable=SC2086
  "$PY" -m bench.run --all "${dev[@]}" --out "$WORK/bench" --time-budget "$budget" \
    --manifest "$WORK/bench_files.txt" ${BENCH_ARGS:-}
  local rc=$?
  # Pieces of the benchmark that were skipped go to the summary.
  "$PY" - "$WORK/bench_files.txt" >>"$NOTES" 2>/dev/null <<'EOF'
import json, sys
files = [p for p in open(sys.argv[1]).read().split() if p.endswith(".json")]
for s in json.load(open(files[0])).get("skipped", []):
    print(f"bench: {s}")
EOF
  return $rc
}

# ------------------------------------------------------------------------------------------
# Summary + log archive + bench results into $OUT (at most 8 files); called after every stage.
finalize() {
  {
    echo "# earlytom_ext gpu_check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    local skipped
    skipped="$(awk -F'\t' '$2 ~ /^SKIPPED/ {print $1}' "$STATUS_ROWS" | tr '\n' ' ')"
    if [ -n "$skipped" ]; then echo "**incomplete: stages skipped for time: $skipped**"; echo; fi
    echo "stages asked: $STAGES; budget ${BUDGET}s, ${SECONDS}s used; cpu-only: $CPU_ONLY"
    echo
    echo "| stage | status | seconds |"
    echo "|---|---|---|"
    while IFS=$'\t' read -r n st dt; do echo "| $n | $st | $dt |"; done <"$STATUS_ROWS"
    echo
    if [ -s "$NOTES" ]; then
      echo "## Skipped inside stages"; echo
      sed 's/^/- /' "$NOTES"; echo
    fi
    # The benchmark's goal lines (speed-ups, op share, throughput), so the summary answers first.
    local bench_md
    bench_md="$(grep -s '\.md$' "$WORK/bench_files.txt" | head -n 1)"
    if [ -n "$bench_md" ] && [ -f "$bench_md" ]; then
      echo "## Benchmark goals ($(basename "$bench_md"))"; echo
      awk '/^## Goals/ {on = 1; next} on && /^## / {exit} on && NF' "$bench_md"; echo
    fi
    while IFS=$'\t' read -r n st dt; do
      case "$st" in
        FAIL*)
          echo "## $n: last 60 lines of its log"
          echo '```'
          tail -n 60 "$WORK/logs/$n.log"
          echo '```'
          ;;
      esac
    done <"$STATUS_ROWS"
  } >"$SUMMARY"
  cp "$SUMMARY" "$OUT/summary.md"
  tar czf "$OUT/logs.tar.gz.tmp" -C "$WORK" logs bench summary.md 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  if [ -f "$WORK/bench_files.txt" ]; then
    local f n=2
    while read -r f; do
      [ -f "$f" ] || continue
      [ "$n" -ge 8 ] && break
      cp "$f" "$OUT/" && n=$((n + 1))
    done <"$WORK/bench_files.txt"
  fi
}

# ------------------------------------------------------------------------------------------
# The stages run in child shells: export what they use (every function, so a helper that a
# stage calls cannot be missing there).
export PY ROOT WORK CT_BUILD CUDA_ARCHS SANITIZE_TOOLS PYTEST_WORKERS CPU_ONLY NOTES
while read -r _ _ f; do export -f "$f"; done < <(declare -F)

set -- $STAGES
while [ "$#" -gt 0 ]; do
  s="$1"; shift
  run_stage "$s" "stage_$s" "$@"
done

echo
cat "$SUMMARY"
echo
echo "outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
[ "$FAILED" -ne 0 ] && exit 1
[ "$SKIPPED_STAGE" -ne 0 ] && exit 2
exit 0
