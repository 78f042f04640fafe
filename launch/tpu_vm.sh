#!/usr/bin/env bash
# Usage: launch/tpu_vm.sh [EXPERIMENT] [FLAGS...]
#
# Runs an lsc_jax experiment on a Cloud TPU VM slice. Run the SAME command on
# every host of the slice (for example with
# `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...`); each
# host calls jax.distributed.initialize(), which finds its peers from the TPU
# metadata, and all chips form one mesh. Only process 0 writes results.
# Needs jax with TPU support: pip install -U "jax[tpu]".
#
#   launch/tpu_vm.sh lsc4rec --preset=paper --workdir=/mnt/shared/lsc
#   (a path every host sees; gs:// paths are not supported)
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,12p' "$0"
  exit 0
fi

experiment="${1:-lsc4rec}"
shift || true
cd "$(dirname "$0")/.."

export JAX_PLATFORMS=tpu
exec python -m "experiments.${experiment}" --multihost "$@"
