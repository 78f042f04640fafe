#!/usr/bin/env bash
# Usage: launch/gpu_check.sh [--skip-install] [--workdir DIR] [--help]
#
# A short end-to-end check of lsc_jax on a machine with NVIDIA GPUs, under
# 8 minutes: installs the project with CUDA jax, prints the devices, runs
# the LSC4Rec smoke pipeline and the benchmarks on the GPU, and ends with
# one line per step (ok, failed or timed out). Each step has a time limit;
# together they add up to 460 s.
#
#   --skip-install  use the python environment as it is (jax with CUDA
#                   already installed, e.g. on a machine without network)
#   --workdir DIR   where the smoke pipeline writes (default: a new
#                   temporary directory)
#
# Environment: PYTHON (default python3), JAX_CUDA_EXTRA (default: cuda13
# when the driver reports CUDA 13 or later, else cuda12).
#
#   launch/gpu_check.sh
#   launch/gpu_check.sh --skip-install --workdir /tmp/lsc_gpu_check
set -euo pipefail

usage() { sed -n '2,19p' "$0"; }

install=1
workdir=''
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --skip-install) install=0; shift ;;
    --workdir) workdir="${2:?--workdir needs a directory}"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
workdir="${workdir:-$(mktemp -d -t lsc_gpu_check.XXXXXX)}"
export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1

if ! command -v nvidia-smi >/dev/null; then
  echo "nvidia-smi not found: this script needs an NVIDIA GPU" >&2
  exit 1
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version \
  --format=csv,noheader
num_gpus=$(nvidia-smi --list-gpus | wc -l)

summary=()
# run_step NAME SECONDS COMMAND...: runs COMMAND with a time limit, records
# the outcome and carries on with the next step.
run_step() {
  local name="$1" seconds="$2"
  shift 2
  echo
  echo "=== ${name} (limit ${seconds} s) ==="
  local start=${SECONDS} status=0
  timeout --kill-after=10 "${seconds}" "$@" || status=$?
  local took=$((SECONDS - start))
  case "${status}" in
    0) summary+=("ok         ${took}s  ${name}") ;;
    124|137) summary+=("TIMED OUT  ${took}s  ${name}") ;;
    *) summary+=("FAILED(${status}) ${took}s  ${name}") ;;
  esac
}

if [[ "${install}" == 1 ]]; then
  cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p')
  if [[ -z "${JAX_CUDA_EXTRA:-}" ]]; then
    JAX_CUDA_EXTRA=cuda12
    if [[ "${cuda_major:-12}" -ge 13 ]]; then JAX_CUDA_EXTRA=cuda13; fi
  fi
  # The CUDA plugin must match the jax version that pyproject.toml pins.
  jax_version=$(sed -n 's/^ *"jax==\([^"]*\)",*$/\1/p' pyproject.toml)
  run_step "install (jax[${JAX_CUDA_EXTRA}]==${jax_version})" 150 \
    bash -c "'${python}' -m pip install --quiet -e '.[dev]' && \
      '${python}' -m pip install --quiet 'jax[${JAX_CUDA_EXTRA}]==${jax_version}'"
fi

run_step 'devices' 30 "${python}" -c '
import jax
print("jax", jax.__version__, "devices:", jax.devices())
assert jax.devices()[0].platform == "gpu", "jax does not see the GPU"'

counts=1
for n in 2 4 8; do
  if [[ "${num_gpus}" -ge "${n}" ]]; then counts="${counts},${n}"; fi
done

run_step 'smoke pipeline (experiments.lsc4rec --preset=smoke)' 120 \
  "${python}" -m experiments.lsc4rec --preset=smoke --workdir="${workdir}"
run_step 'srm_bench (sasrec)' 50 \
  "${python}" -m benchmarks.srm_bench --models=sasrec --repeats=3
run_step 'gate_bench' 30 "${python}" -m benchmarks.gate_bench --rounds=2
run_step 'adapt_bench' 30 \
  "${python}" -m benchmarks.adapt_bench --devices=256 --repeats=2
run_step "sharding_bench (devices ${counts})" 50 \
  "${python}" -m benchmarks.sharding_bench --platform=gpu \
  --device_counts="${counts}" --steps=10

echo
echo "=== summary (smoke pipeline output in ${workdir}) ==="
failed=0
for line in "${summary[@]}"; do
  echo "${line}"
  [[ "${line}" == ok* ]] || failed=1
done
exit "${failed}"
