#!/usr/bin/env bash
# Incremental in-place build of earlytom_ext._C (ninja), serialised with a lock so that several
# builds started at once do not clobber each other. EARLYTOM_SKIP_CUDA=1 builds the CPU ops only.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
PY="${PYTHON:-python}"
exec flock /tmp/earlytom_build.lock "$PY" setup.py -q build_ext --inplace
