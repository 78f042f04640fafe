#!/usr/bin/env bash
# Usage: launch/gpu.sh [EXPERIMENT] [FLAGS...]
#
# Runs an lsc_jax experiment binary on the GPUs of one host. All visible
# GPUs form one mesh (data parallel); restrict them with CUDA_VISIBLE_DEVICES.
# Needs jax with CUDA support: pip install -U "jax[cuda12]" (or the CUDA
# version your driver supports) after installing the project.
#
#   launch/gpu.sh lsc4rec --preset=paper --workdir=/tmp/lsc_gpu
#   CUDA_VISIBLE_DEVICES=0,1 launch/gpu.sh train_srm --model=sasrec
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,11p' "$0"
  exit 0
fi

experiment="${1:-lsc4rec}"
shift || true
cd "$(dirname "$0")/.."

export JAX_PLATFORMS=cuda
# Let XLA grow its GPU memory pool instead of taking 75% at start, so that
# several experiment processes can share one GPU while debugging.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
python -c 'import jax; print("devices:", jax.devices())'
exec python -m "experiments.${experiment}" "$@"
