#!/usr/bin/env bash
# Usage: launch/local_cpu.sh [EXPERIMENT] [FLAGS...]
#
# Runs an lsc_jax experiment binary on this machine's CPU. EXPERIMENT is a
# module under experiments/ (default: lsc4rec, the whole LSC4Rec pipeline);
# FLAGS go to it unchanged. Set LSC_HOST_DEVICES=N to split the CPU into N
# XLA host devices, so that the sharded code paths run without accelerators.
#
#   launch/local_cpu.sh lsc4rec --preset=smoke --workdir=/tmp/lsc_smoke
#   LSC_HOST_DEVICES=8 launch/local_cpu.sh train_srm --compile_only
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,11p' "$0"
  exit 0
fi

experiment="${1:-lsc4rec}"
shift || true
cd "$(dirname "$0")/.."

export JAX_PLATFORMS=cpu
if [[ -n "${LSC_HOST_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${LSC_HOST_DEVICES}"
fi
exec python -m "experiments.${experiment}" "$@"
