#!/usr/bin/env bash
# All GPU work of earlytom_ext in one script, run from the repository root on a CUDA machine.
#
#   bash scripts/gpu_check.sh [stage ...]
#
# Stages (default: all, in this order):
#   env       GPU, driver, toolchain and Python package versions
#   build     pip install --no-build-isolation -e . (CUDA kernels, TORCH_CUDA_ARCH_LIST=9.0)
#   test      pytest python_tests (the CUDA == CPU == reference parity tests run here)
#   cuda      cmake + ctest of the standalone cuda_tests/test_*.cu programs
#   sanitize  compute-sanitizer memcheck and racecheck on every cuda_tests program (each run
#             under its own time limit; "skipped" where the GPU runtime refuses the sanitizer,
#             as gVisor sandboxes do)
#   bench     python bench/run.py --all (results under bench/results/ and copied to $OUT)
# "test" and "bench" build the extension first when it is not importable with CUDA kernels;
# "sanitize" builds the cuda_tests first when they are missing.
#
# With at most 10 minutes per command, split the work into two calls made back to back (the
# machine stays warm only briefly between calls; "bench" rebuilds the extension if it has to):
#   bash scripts/gpu_check.sh env build test cuda sanitize
#   bash scripts/gpu_check.sh bench
# The summary and the log archive in $OUT are rewritten after every stage, so a call stopped by
# its time limit still returns the finished stages. Each stage's limit is also cut to what is left
# of CALL_BUDGET (585 s), so a slow stage is stopped, and reported, before the call's limit.
#
# Output: everything is logged under a work folder; at the end $OUT receives summary.md (stage
# table + the tail of each failing log), logs.tar.gz (all logs and all bench outputs) and the
# bench tables/plots (at most 8 files in all). The script keeps going after a failing stage and
# exits non-zero when any stage failed.
#
# Environment: OUT (default: a temp folder), PYTHON (default python3), CUDA_HOME
# (default /usr/local/cuda or nvcc's), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0),
# CMAKE_CUDA_ARCHITECTURES (90), SANITIZE_TOOLS ("memcheck racecheck"; add initcheck, synccheck),
# STAGE_TIMEOUT_<STAGE> seconds (per-stage limits), CALL_BUDGET (seconds for the whole call,
# default 585: lower it when the device grants less than 600 s), PYTEST_ARGS (extra pytest arguments),
# BENCH_TIME_BUDGET (seconds, default 480), BENCH_ARGS (extra arguments of bench/run.py).
set -u
set -o pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
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
# The package is importable from the repository root whether pip's editable install or the
# in-place fallback build provided it.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
CUDA_ARCHS="${CMAKE_CUDA_ARCHITECTURES:-90}"
SANITIZE_TOOLS="${SANITIZE_TOOLS:-memcheck racecheck}"
# Seconds the whole call may take (the device tool stops a command after 600 s).
CALL_BUDGET="${CALL_BUDGET:-585}"
OUT="${OUT:-${TMPDIR:-/tmp}/earlytom_gpu_check_out}"
WORK="${TMPDIR:-/tmp}/earlytom_gpu_check.$$"
CT_BUILD="$ROOT/cuda_tests/build"
mkdir -p "$OUT" "$WORK/logs"
SUMMARY="$WORK/summary.md"
STATUS_ROWS="$WORK/status.tsv"
: >"$STATUS_ROWS"
FAILED=0

ALL_STAGES="env build test cuda sanitize bench"
if [ "$#" -eq 0 ]; then
  STAGES="$ALL_STAGES"
else
  STAGES="$*"
  for s in $STAGES; do
    case " $ALL_STAGES " in
      *" $s "*) ;;
      *) echo "unknown stage '$s' (stages: $ALL_STAGES)" >&2; exit 2 ;;
    esac
  done
fi

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

# run_stage NAME DEFAULT_TIMEOUT_S FUNCTION: runs FUNCTION under a time limit, logs to
# $WORK/logs/NAME.log (and to stdout), records pass/fail/skip and the time taken.
run_stage() {
  local name="$1" default_limit="$2" fn="$3"
  local var="STAGE_TIMEOUT_$(echo "$name" | tr '[:lower:]' '[:upper:]')"
  local limit="${!var:-$default_limit}"
  local logf="$WORK/logs/$name.log"
  # The whole call must end inside CALL_BUDGET: a stage gets at most what is left of it (minus the
  # kill grace of `timeout` and the time finalize needs), and is not started with under 30 s.
  local left=$((CALL_BUDGET - SECONDS - 25))
  if [ "$left" -lt "$limit" ]; then limit="$left"; fi
  if [ "$limit" -lt 30 ]; then
    log "stage $name: NOT RUN (call budget of ${CALL_BUDGET}s used up after ${SECONDS}s)"
    printf '%s\t%s\t%s\n' "$name" "NOT RUN (call budget ${CALL_BUDGET}s used up)" 0 >>"$STATUS_ROWS"
    FAILED=1
    finalize
    return
  fi
  log "stage $name (limit ${limit}s) -> $logf"
  local t0=$SECONDS rc
  # Each stage runs in its own bash under `timeout` (which signals the stage's whole process
  # group), so a hanging stage cannot eat the next stages' time.
  STAGE_LIMIT="$limit" timeout -k 15 "$limit" bash -c "$fn" 2>&1 | tee "$logf"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0)) status
  if [ "$rc" -eq 0 ]; then status=pass
  elif [ "$rc" -eq 77 ]; then status=skipped
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="FAIL (timeout ${limit}s)"; FAILED=1
  else status="FAIL (rc $rc)"; FAILED=1
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >>"$STATUS_ROWS"
  log "stage $name: $status in ${dt}s"
  finalize
}

ext_ready() {
  "$PY" - <<'EOF' >/dev/null 2>&1
import sys, torch
from earlytom_ext import _ext
sys.exit(0 if (_ext.available() and _ext.has_cuda_kernels() and torch.cuda.is_available()) else 1)
EOF
}

ensure_ext() {
  if ext_ready; then return 0; fi
  echo "earlytom_ext with CUDA kernels is not importable yet: building it first"
  stage_build
}

# ------------------------------------------------------------------------------------------
stage_env() {
  echo "## date"; date -u
  echo "## nvidia-smi"; nvidia-smi || echo "nvidia-smi failed"
  echo "## nvidia-smi -q (clocks, memory)"; nvidia-smi -q -d CLOCK,MEMORY,PERFORMANCE 2>/dev/null | head -80
  echo "## nvcc"; nvcc --version || echo "no nvcc"
  echo "## compute-sanitizer"; sanitizer_bin && "$(sanitizer_bin)" --version || echo "no compute-sanitizer"
  echo "## cmake"; cmake --version | head -1 || echo "no cmake"
  echo "## python"; "$PY" - <<'EOF'
import sys, platform
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "numpy", "pytest", "matplotlib", "pynvml", "ninja", "setuptools"):
    try:
        mod = __import__(name)
        print(f"{name:14s}", getattr(mod, "__version__", "?"))
    except Exception as e:
        print(f"{name:14s} MISSING ({e})")
import torch
print("torch.cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"cc {p.major}.{p.minor}", f"{p.total_memory/2**30:.1f} GiB", f"SMs {p.multi_processor_count}")
EOF
  echo "## cpu"; nproc; free -g 2>/dev/null | head -2
}

stage_build() {
  export EARLYTOM_FORCE_CUDA=1
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME"
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . ; then
    echo "pip install -e . failed; falling back to an in-place build (setup.py build_ext --inplace)"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" - <<'EOF'
import torch, earlytom_ext
from earlytom_ext import _ext
print("earlytom_ext", earlytom_ext.__version__, earlytom_ext.__file__)
print("compiled ops available:", _ext.available(), "CUDA kernels:", _ext.has_cuda_kernels())
assert _ext.available(), "the compiled extension does not import"
assert _ext.has_cuda_kernels(), "the build has no CUDA kernels"
assert torch.cuda.is_available(), "torch sees no GPU"
EOF
}

stage_test() {
  ensure_ext || return 1
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
  local extra=()
  if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then extra+=(--timeout 240); fi
  # shellcheck disable=SC2086
  "$PY" -m pytest python_tests -q -rs -p no:cacheprovider --junitxml="$WORK/logs/pytest.xml" \
    --durations=15 "${extra[@]}" ${PYTEST_ARGS:-}
}

stage_cuda() {
  cmake -S . -B "$CT_BUILD" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" || return 1
  cmake --build "$CT_BUILD" -j "$MAX_JOBS" || return 1
  ctest --test-dir "$CT_BUILD" --output-on-failure --no-tests=error --timeout 300
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
  local t_end=$((SECONDS + ${STAGE_LIMIT:-420} - 10))
  local cs
  cs="$(sanitizer_bin)" || { echo "compute-sanitizer not found"; return 1; }
  if ! ls "$CT_BUILD"/test_* >/dev/null 2>&1; then
    echo "cuda_tests not built yet: building them first"
    stage_cuda || true
  fi
  local bins=() b
  for b in "$CT_BUILD"/test_*; do
    [ -f "$b" ] && [ -x "$b" ] && bins+=("$b")
  done
  if [ "${#bins[@]}" -eq 0 ]; then echo "no cuda_tests programs to check"; return 77; fi
  local tools=($SANITIZE_TOOLS)
  local runs_left=$(( ${#bins[@]} * ${#tools[@]} ))
  local fails=0 unsupported=0 ran=0 tool rc limit out
  out="$(mktemp)"
  # Every program under the first tool, then under the next one. A run may use the stage's time
  # left minus 30 s for each run still to come (at least an equal share), so a slow run can finish
  # and a hanging one cannot take the others' time.
  for tool in "${tools[@]}"; do
    local extra=()
    case "$tool" in
      racecheck) extra=(--racecheck-report all) ;;
    esac
    for b in "${bins[@]}"; do
      local share=$(( (t_end - SECONDS) / runs_left ))
      limit=$(( t_end - SECONDS - 30 * (runs_left - 1) ))
      [ "$limit" -lt "$share" ] && limit="$share"
      runs_left=$((runs_left - 1))
      if [ "$limit" -lt 10 ]; then
        echo "--> $tool $(basename "$b"): NOT RUN (stage time used up)"; fails=$((fails + 1)); continue
      fi
      echo "=== compute-sanitizer --tool $tool $(basename "$b") (limit ${limit}s)"
      timeout -k 5 "$limit" "$cs" --tool "$tool" "${extra[@]}" --error-exitcode 99 --print-limit 50 "$b" 2>&1 \
        | tee "$out"
      rc=${PIPESTATUS[0]}
      if grep -q "Device not supported" "$out"; then
        # Some sandboxed GPU runtimes refuse the sanitizer outright; that is no finding.
        echo "--> $tool $(basename "$b"): compute-sanitizer does not support this device/runtime"
        unsupported=$((unsupported + 1))
      elif [ "$rc" -eq 0 ]; then echo "--> $tool $(basename "$b"): clean"; ran=$((ran + 1))
      elif [ "$rc" -eq 77 ]; then echo "--> $tool $(basename "$b"): skipped (no GPU)"
      elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "--> $tool $(basename "$b"): TIMEOUT after ${limit}s (not verified)"; fails=$((fails + 1))
      else echo "--> $tool $(basename "$b"): FAILED (rc $rc)"; fails=$((fails + 1))
      fi
    done
  done
  rm -f "$out"
  echo "sanitizer runs: $ran clean, $fails failed or not finished, $unsupported refused by the runtime"
  [ "$fails" -eq 0 ] || return 1
  # Nothing checked at all (sanitizer refused everywhere, or no GPU): report the stage as skipped.
  [ "$ran" -gt 0 ] || return 77
}

stage_bench() {
  local t0=$SECONDS
  ensure_ext || return 1
  # The benchmark's own budget: BENCH_TIME_BUDGET, or less when a build used part of the stage's
  # time limit (70 s kept for the last configuration, the plots and the report).
  local budget="${BENCH_TIME_BUDGET:-480}"
  local left=$(( ${STAGE_LIMIT:-570} - (SECONDS - t0) - 70 ))
  [ "$left" -lt "$budget" ] && budget="$left"
  [ "$budget" -lt 60 ] && budget=60
  echo "bench time budget: ${budget}s"
  # shellcheck disable=SC2086
  "$PY" bench/run.py --all --out "$ROOT/bench/results" --time-budget "$budget" \
    --manifest "$WORK/bench_files.txt" ${BENCH_ARGS:-}
}

# ------------------------------------------------------------------------------------------
# Summary + log archive (+ bench outputs) into $OUT; called after every stage.
finalize() {
  {
    echo "# earlytom_ext gpu_check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    echo "stages asked: $STAGES"
    echo
    echo "| stage | status | seconds |"
    echo "|---|---|---|"
    while IFS=$'\t' read -r n st dt; do echo "| $n | $st | $dt |"; done <"$STATUS_ROWS"
    echo
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
  # Bench outputs (the run writes the list of its files) go into the archive and, as far as the
  # 8-file limit of $OUT allows, next to it.
  if [ -f "$WORK/bench_files.txt" ]; then
    mkdir -p "$WORK/bench"
    while read -r f; do [ -f "$f" ] && cp "$f" "$WORK/bench/"; done <"$WORK/bench_files.txt"
  fi
  cp "$SUMMARY" "$OUT/summary.md"
  tar czf "$OUT/logs.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  local n_out=2 f
  if [ -d "$WORK/bench" ]; then
    for f in "$WORK"/bench/*.md "$WORK"/bench/*.json "$WORK"/bench/*.png; do
      [ -f "$f" ] || continue
      [ "$n_out" -ge 8 ] && break
      cp "$f" "$OUT/" && n_out=$((n_out + 1))
    done
  fi
}

# ------------------------------------------------------------------------------------------
# The stages run in child shells: export what they use.
export PY ROOT WORK CT_BUILD CUDA_ARCHS SANITIZE_TOOLS
export -f log ext_ready ensure_ext sanitizer_bin stage_env stage_build stage_test stage_cuda \
  stage_sanitize stage_bench

for s in $STAGES; do
  case "$s" in
    env) run_stage env 120 stage_env ;;
    build) run_stage build 420 stage_build ;;
    test) run_stage test 420 stage_test ;;
    cuda) run_stage cuda 300 stage_cuda ;;
    sanitize) run_stage sanitize 420 stage_sanitize ;;
    bench) run_stage bench 570 stage_bench ;;
  esac
done

echo
cat "$SUMMARY"
echo
echo "outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
exit "$FAILED"
