"""Flags and start-up glue shared by the experiment binaries.

Importing this module defines the distributed and compile-check flags:

  --multihost            call jax.distributed.initialize() at start (TPU VM
                         slices, GPU clusters); every process runs the same
                         command
  --coordinator_address  host:port of process 0, --num_processes,
                         --process_id: only where jax cannot detect the
                         cluster itself (TPU VMs, SLURM and Open MPI need
                         none of them; a hand-started GPU cluster needs all
                         three)
  --mesh_devices         devices in the data-parallel mesh (default: all of
                         them, on every host)
  --shard_item_table     none | rows | columns: split the SRM item table and
                         its optimizer moments over the mesh
  --compile_only         compile the train steps for the mesh, print XLA's
                         memory and FLOP estimates, and exit

A binary calls, in order:

```
def main(argv):
  common.init_distributed()          # first, before anything touches jax
  mesh = common.make_mesh()
  common.log_topology(mesh)
  ...build the model, step and an example batch...
  if common.compile_only(
    'sasrec train step', step_fn, mesh, make_state, example_batch
  ):
    return
  ...train with sharding.shard_train_step(..., shard_rules=
     common.shard_rules())...
  if common.is_primary():
    ...write results.json...
```
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
from absl import flags

from lsc_jax import sharding

_MULTIHOST = flags.DEFINE_bool(
  'multihost',
  False,
  'Join the other processes of a multi-host run (jax.distributed).',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0, for clusters jax cannot detect (needs '
  '--multihost, --num_processes and --process_id).',
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', None, 'Processes in the run (with --coordinator_address).'
)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id', None, 'This process, 0-based (with --coordinator_address).'
)
_MESH_DEVICES = flags.DEFINE_integer(
  'mesh_devices', None, 'Devices in the data mesh (default: all).'
)
_SHARD_ITEM_TABLE = flags.DEFINE_enum(
  'shard_item_table',
  'none',
  ['none', 'rows', 'columns'],
  'Split the SRM item table over the mesh by rows (items) or columns.',
)
_COMPILE_ONLY = flags.DEFINE_bool(
  'compile_only',
  False,
  'Compile the train steps for the mesh, print memory and FLOPs, and exit.',
)


def init_distributed() -> None:
  """Starts `jax.distributed` when --multihost is set; call it first.

  Without --multihost nothing happens (one process). With it, TPU VM
  slices, SLURM and Open MPI jobs find their peers on their own; elsewhere
  pass --coordinator_address, --num_processes and --process_id.

  Raises:
    ValueError: coordinator flags without --multihost (they would be
      ignored), or only some of the three.
  """
  manual = {
    'coordinator_address': _COORDINATOR.value,
    'num_processes': _NUM_PROCESSES.value,
    'process_id': _PROCESS_ID.value,
  }
  given = sorted(name for name, value in manual.items() if value is not None)
  if not _MULTIHOST.value:
    if given:
      raise ValueError(f'--{", --".join(given)} need --multihost')
    return
  if given and len(given) != len(manual):
    missing = sorted(set(manual) - set(given))
    raise ValueError(
      f'--{", --".join(given)} given without --{", --".join(missing)}; '
      'give all three, or none to let jax detect the cluster'
    )
  jax.distributed.initialize(
    **{k: v for k, v in manual.items() if v is not None}
  )


def is_primary() -> bool:
  """True on process 0, the one that writes results and logs summaries."""
  return jax.process_index() == 0


def make_mesh() -> jax.sharding.Mesh:
  """The data mesh of --mesh_devices devices (default all)."""
  return sharding.make_mesh(_MESH_DEVICES.value)


def shard_rules() -> tuple[sharding.ShardRule, ...]:
  """The state shard rules that --shard_item_table asks for."""
  if _SHARD_ITEM_TABLE.value == 'none':
    return ()
  return sharding.item_table_rules(layout=_SHARD_ITEM_TABLE.value)


def log_topology(
  mesh: jax.sharding.Mesh | None = None,
  log: Callable[[str], None] = logging.info,
) -> str:
  """Logs (and returns) process index and count, devices and mesh shape."""
  devices = jax.devices()
  text = (
    f'process {jax.process_index()} of {jax.process_count()}; '
    f'{jax.local_device_count()} local of {len(devices)} devices '
    f'({devices[0].platform}: {devices[0].device_kind})'
  )
  if mesh is not None:
    text += f'; mesh {dict(mesh.shape)}'
  log(text)
  return text


def compile_only_requested() -> bool:
  """True when --compile_only is set."""
  return _COMPILE_ONLY.value


def compile_only(
  name: str,
  step_fn: Callable[[Any, Any], tuple[Any, Any]],
  mesh: jax.sharding.Mesh,
  make_state: Callable[[], Any],
  example_batch: Any,
  log: Callable[[str], None] = print,
) -> bool:
  """With --compile_only, compiles `step_fn` for the mesh and reports it.

  Args:
    name: what is compiled, e.g. 'sasrec train step'.
    step_fn: `step(state, batch) -> (state, metrics)`.
    mesh: the mesh.
    make_state: builds the train state; only traced (`jax.eval_shape`), so
      no parameters are allocated.
    example_batch: one batch (numpy arrays or `ShapeDtypeStruct`s) of the
      largest shape the run will use.
    log: where the report goes (process 0 only).

  Returns:
    True when --compile_only is set (the binary should stop after its
    reports), False otherwise (nothing is compiled).

  Raises:
    ValueError: a batch that does not split over the mesh, or a bad shard
      rule, with a message naming it.
  """
  if not _COMPILE_ONLY.value:
    return False
  report = sharding.compile_report(
    step_fn,
    mesh,
    jax.eval_shape(make_state),
    sharding.abstract(example_batch),
    shard_rules=shard_rules(),
    name=name,
  )
  if is_primary():
    log(report.text())
  return True
