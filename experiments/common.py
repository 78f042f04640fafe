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

Every binary (`lsc4rec`, `train_srm`, `train_llm`) defines them by
importing this module, and calls, in order:

```
def main(argv):
  common.init_distributed()          # first, before anything touches jax
  mesh = common.make_mesh()
  common.log_topology(mesh)
  ...load the data, build the config...
  if common.compile_only_srm('sasrec', srm_config, num_items, seed, mesh):
    return                           # --compile_only: report and stop
  run = srm_steps.train_srm(..., mesh=mesh, shard_rules=common.shard_rules(
    num_items=num_items, mesh=mesh))
  common.write_json(path, results)   # process 0 only
```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import flags

from lsc_jax import data, sharding
from lsc_jax.models import registry
from lsc_jax.train import srm_steps
from lsc_jax.train import state as state_lib

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


@dataclasses.dataclass(frozen=True)
class DataFlags:
  """The data flags of a single-model binary (`train_srm`, `train_llm`)."""

  dataset: flags.FlagHolder
  reindex: flags.FlagHolder
  seed: flags.FlagHolder
  workdir: flags.FlagHolder
  gap: flags.FlagHolder
  max_users: flags.FlagHolder

  def load(self):
    """The dataset (its first --max_users users) and its positional split."""
    dataset = data.load(
      self.dataset.value,
      reindex=self.reindex.value,
      seed=self.seed.value,
      log_fn=logging.info,
    )
    if self.max_users.value is not None:
      dataset = dataset.from_sequences(
        dataset.sequences[: self.max_users.value],
        num_items=dataset.num_items,
        name=dataset.name,
      )
    split = data.positional_split(dataset, gap=self.gap.value)
    logging.info('%s\n%s', dataset.summary(), split.summary_text())
    return dataset, split


def define_data_flags(workdir_help: str) -> DataFlags:
  """Defines --dataset, --reindex, --seed, --workdir, --gap, --max_users."""
  return DataFlags(
    dataset=flags.DEFINE_string(
      'dataset',
      'beauty',
      "Built-in name ('beauty', 'ml-latest-small') or path.",
    ),
    reindex=flags.DEFINE_enum(
      'reindex', 'random', ['random', 'keep'], 'Item id mapping.'
    ),
    seed=flags.DEFINE_integer('seed', 0, 'Seed of data order, init, dropout.'),
    workdir=flags.DEFINE_string('workdir', None, workdir_help),
    gap=flags.DEFINE_integer(
      'gap', 2, 'Staleness gap g of the split (and of the test history).'
    ),
    max_users=flags.DEFINE_integer(
      'max_users', None, 'Keep only the first N users (quick runs).'
    ),
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


def shard_rules(
  num_items: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
  log: Callable[[str], None] = logging.warning,
) -> tuple[sharding.ShardRule, ...]:
  """The SRM state shard rules that --shard_item_table asks for.

  Given the catalogue size and the mesh, 'rows' falls back to 'columns'
  when the table's num_items + 2 rows do not split over the mesh, and says
  so through `log` (see `sharding.item_table_rules`).
  """
  if _SHARD_ITEM_TABLE.value == 'none':
    return ()
  return sharding.item_table_rules(
    layout=_SHARD_ITEM_TABLE.value, num_items=num_items, mesh=mesh, log=log
  )


def write_json(path: str, value: Any) -> bool:
  """Writes `value` as JSON to `path` on process 0 only.

  Returns:
    True where the file was written (process 0).
  """
  if not is_primary():
    return False
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)
  return True


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
  rules: Sequence[sharding.ShardRule] | None = None,
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
    rules: state shard rules (None: those of --shard_item_table).

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
    shard_rules=shard_rules() if rules is None else rules,
    name=name,
  )
  if is_primary():
    log(report.text())
  return True


def compile_only_srm(
  name: str,
  config: registry.SRMConfig,
  num_items: int,
  seed: int,
  mesh: jax.sharding.Mesh,
  log: Callable[[str], None] = print,
) -> bool:
  """`compile_only` for the train step of SRM `name` under `config`, on
  its widest batch (`srm_steps.example_batch`), with the item table rules
  of --shard_item_table for this catalogue and mesh."""
  if not compile_only_requested():
    return False
  model = registry.srm_from_config(name, num_items, config)
  tx = state_lib.make_optimizer(config.learning_rate, config.weight_decay)

  def make_state():
    params = srm_steps.init_params(model, config.max_len, seed)
    return state_lib.create_train_state(model.apply, params, tx, seed)

  return compile_only(
    f'{name} train step',
    srm_steps.make_train_step(model, config, num_items),
    mesh,
    make_state,
    srm_steps.example_batch(config),
    log=log,
    rules=shard_rules(num_items=num_items, mesh=mesh, log=log),
  )


def compile_only_llm(
  llm: Any,
  config: Any,
  seed: int,
  mesh: jax.sharding.Mesh,
  name: str = 'LLM train step',
  log: Callable[[str], None] = print,
) -> bool:
  """`compile_only` for the LLM train step of `llm` (an
  `lsc_jax.models.llm.LLMScorer`) under `config` (an
  `llm_steps.LLMTrainConfig`) on its widest batch, state replicated."""
  if not compile_only_requested():
    return False
  # Imported here: it loads transformers, which the SRM binary never needs.
  from lsc_jax.train import llm_steps

  def make_state():
    # The schedule's length does not change any shape.
    tx = llm_steps.make_optimizer(config, total_steps=1000)
    return state_lib.create_train_state(llm.model.apply, llm.params, tx, seed)

  return compile_only(
    name,
    llm_steps.make_train_step(llm.model),
    mesh,
    make_state,
    llm_steps.example_batch(llm, config),
    log=log,
    rules=(),
  )
