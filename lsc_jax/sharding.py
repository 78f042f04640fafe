"""Scale-out with `jax.sharding`: meshes, sharded steps, compile-only checks.

JAX's own SPMD machinery is the distributed engine: a `Mesh` over every
device (of every host once `jax.distributed` is initialised), `jax.jit` with
`NamedSharding`s, and `jax.shard_map` where each device must run the same
program on its own slice. There is no process orchestration here and no
`pmap`.

- `make_mesh`, `data_sharding`, `replicated`: a one-axis data mesh;
  `training_mesh` (None for a one-device run), `on_mesh`.
- `shard_batch` (each process passes its own rows) and `shard_global_batch`
  (every process holds the whole batch, as the project's batch iterators,
  pure functions of seed and epoch, give it) split a numpy batch's leading
  axis over the mesh; `to_host` brings results back to numpy on every
  process. `pad_rows` adds masked filler rows so that a batch splits
  evenly (evaluation).
- `item_table_rules`: split an SRM's item table by rows, or by columns
  where its num_items + 2 rows do not split over the mesh.
- `shard_train_step`: data-parallel training for any
  `step(state, batch) -> (state, metrics)` (the SRM steps of
  `lsc_jax.train.srm_steps`, the LLM step): the state is replicated, or its
  large tables are split over the mesh by `shard_rules`; the batch is split;
  the state is donated; the metrics come back replicated.
- `shard_map_batched`: runs a function on every device's slice of a batch,
  e.g. the LLM's constrained beam search over a batch of prompts;
  `mesh_llm` makes an LLM scorer's generation use it.
- `sharded_adapt_and_score`: per-device SRM adaptation
  (`lsc_jax.collab.adapt`) with the users of each chunk split over the mesh.
- `compile_report`: lowers and compiles a sharded train step on abstract
  shapes and reports XLA's memory and FLOP estimates, so shape, sharding and
  memory mistakes show on a CPU before accelerator time is spent.

A typical data-parallel run:

```
mesh = sharding.make_mesh()
step = sharding.shard_train_step(
  srm_steps.make_train_step(model, config, num_items), mesh, state, batch
)
state = step.place_state(state)
state, metrics = step(state, numpy_batch)   # or loop.train_loop(state, step...)
```

`srm_steps.train_srm(..., mesh=mesh)`, `llm_steps.train_llm(..., mesh=mesh)`
and `pipeline.run(config, log, mesh)` do all of this for a whole run.

Data parallelism does not change the mathematics: the loss is a mean over
the global batch wherever its rows live, and random bits
(`jax_threefry_partitionable`, on by default) do not depend on the sharding,
so a sharded run matches a single-device run up to the order of
floating-point reductions.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lsc_jax.collab import adapt
from lsc_jax.models import srm
from lsc_jax.train import loop

DATA_AXIS = 'data'
_LOG = logging.getLogger(__name__)

# A shard rule: (regular expression searched in a state leaf's '/'-joined
# path, PartitionSpec of that leaf). See `state_shardings`.
ShardRule = tuple[str, PartitionSpec]


# ---------------------------------------------------------------------------
# Meshes and basic shardings.


def make_mesh(num_devices: int | None = None, axis_name: str = DATA_AXIS):
  """A one-axis mesh of `num_devices` devices (default: all of them).

  The devices are `jax.devices()`: every device of every process once
  `jax.distributed.initialize()` has run. With several processes, a partial
  mesh takes the same number of devices, `num_devices / process_count`,
  from each process, so that every process keeps a share of the work.

  Args:
    num_devices: mesh size; None uses every device.
    axis_name: the mesh axis name.

  Returns:
    A `jax.sharding.Mesh` of shape `{axis_name: num_devices}` (auto axis
    type: `jit` in/out shardings place the data, XLA partitions the rest).

  Raises:
    ValueError: a size below 1, above the device count, or (several
      processes) not a multiple of the process count.
  """
  devices = jax.devices()
  if num_devices is None or num_devices == len(devices):
    return jax.make_mesh(
      (len(devices),),
      (axis_name,),
      axis_types=(AxisType.Auto,),
      devices=devices,
    )
  if not 1 <= num_devices <= len(devices):
    raise ValueError(
      f'make_mesh: num_devices must be in 1..{len(devices)} (the devices '
      f'jax sees: {devices[0].platform} x {len(devices)}), got {num_devices}'
    )
  processes = jax.process_count()
  if num_devices % processes:
    raise ValueError(
      f'make_mesh: with {processes} processes num_devices must be a '
      f'multiple of {processes} (an equal share per process), got '
      f'{num_devices}'
    )
  per_process = num_devices // processes
  chosen = []
  for process in range(processes):
    chosen += [d for d in devices if d.process_index == process][:per_process]
  return Mesh(np.asarray(chosen), (axis_name,), axis_types=(AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Splits an array's leading (batch) axis over every axis of `mesh`."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy of the array on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def put_global(tree: Any, shardings: Any) -> Any:
  """`jax.device_put` of values that every process holds in full.

  With one process this is `jax.device_put`. With several, `device_put`
  refuses a jax array that lives on one local device when the target spans
  other processes' devices, so such leaves (parameters fresh from
  `model.init`, a new train state) go through host memory, and each
  process places its own devices' part. Typed PRNG keys are moved as their
  key data.

  Args:
    tree: a pytree of numpy or jax arrays, the same on every process.
    shardings: one `Sharding` for every leaf, or a pytree of them with the
      structure of `tree`.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)  # already global: a resharding
    if _is_key(x):
      data = put(jax.random.key_data(x), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: put(x, shardings), tree)
  return jax.tree.map(put, tree, shardings)


def training_mesh(mesh: Mesh | None) -> Mesh | None:
  """`mesh`, or None when there is nothing to split over.

  A mesh of one device in a one-process run is plain single-device
  training: the library's training functions then take their unsharded
  path, so the numbers are those of a run without a mesh.
  """
  if mesh is None or (mesh.size == 1 and jax.process_count() == 1):
    return None
  return mesh


def check_batch_size(batch_size: int, mesh: Mesh | None, where: str) -> None:
  """Raises before training when `batch_size` does not split over `mesh`.

  Every training batch has exactly `batch_size` rows, so the data axis
  needs it to be a multiple of the device count.

  Raises:
    ValueError: naming `where`, the batch size, the mesh and a fitting size.
  """
  if mesh is None or batch_size % mesh.size == 0:
    return
  raise ValueError(
    f'{where}: batch_size {batch_size} does not split over the '
    f'{mesh.size} devices of the mesh {dict(mesh.shape)}; every training '
    f'batch has exactly batch_size rows, so use a multiple of {mesh.size} '
    f'(e.g. {mesh.size * -(-batch_size // mesh.size)}) or a mesh size that '
    'divides it'
  )


def serial_dispatch(mesh: Mesh) -> bool:
  """Whether programs on `mesh` should run one at a time (CPU meshes).

  NOTE: XLA's CPU runtime can deadlock when many multi-device programs
  with collectives are queued at once: seen with 8 forced host devices on
  2 cores, where a queued train step's all-reduce waited for device threads
  that never ran, until XLA aborted the process. On a CPU mesh of several
  devices the sharded step and the sharded evaluation therefore wait for
  each call to finish before the next is queued (CPU devices share the
  same cores, so little overlap is lost); accelerators queue as usual.
  """
  return mesh.size > 1 and mesh.devices.flat[0].platform == 'cpu'


def on_mesh(tree: Any, mesh: Mesh) -> Any:
  """`tree` with every leaf on the devices of `mesh`: leaves already there
  (replicated or split) are kept as they are, others are replicated."""
  devices = set(mesh.devices.flat)
  leaves = jax.tree.leaves(tree)
  if all(
    isinstance(x, jax.Array) and x.sharding.device_set == devices
    for x in leaves
  ):
    return tree
  return put_global(tree, replicated(mesh))


def pad_rows(
  batch: dict[str, np.ndarray], multiple: int, mask_key: str = 'mask'
) -> tuple[dict[str, np.ndarray], int]:
  """Pads a numpy batch's rows to a multiple of `multiple`.

  Filler rows repeat the batch's first row with `batch[mask_key]` set to 0,
  the project's convention for rows that count for nothing (the batch
  iterators fill their last batch the same way), so every model input stays
  a real one and no metric or loss sees the filler.

  Args:
    batch: dict of arrays that all have the same leading (row) axis, one of
      them the row weights `mask_key` (`[rows]` or `[rows, ...]`).
    multiple: e.g. the mesh size.
    mask_key: the row weights.

  Returns:
    (padded batch, number of filler rows added).

  Raises:
    ValueError: a batch without `mask_key` or with leaves of different row
      counts.
  """
  if mask_key not in batch:
    raise ValueError(
      f'pad_rows: the batch has no {mask_key!r} leaf to mark filler rows '
      f'(leaves: {sorted(batch)})'
    )
  rows = len(batch[mask_key])
  uneven = {k: np.shape(v) for k, v in batch.items() if len(v) != rows}
  if uneven:
    raise ValueError(
      f'pad_rows: every leaf needs the {rows} rows of {mask_key!r}; got '
      f'{uneven}'
    )
  extra = -rows % multiple
  if not extra or not rows:
    return batch, 0
  index = np.r_[np.arange(rows), np.zeros(extra, np.int64)]
  out = {k: np.asarray(v)[index] for k, v in batch.items()}
  mask = np.array(out[mask_key])
  mask[rows:] = 0
  out[mask_key] = mask
  return out, extra


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/') or '<root>'


def check_batch_divisible(batch: Any, divisor: int, where: str) -> None:
  """Raises unless every leaf of `batch` has a multiple of `divisor` rows.

  Args:
    batch: a pytree of arrays or `jax.ShapeDtypeStruct`s.
    divisor: devices that the leading axis is split over.
    where: named in the error (e.g. 'shard_train_step batch').

  Raises:
    ValueError: naming the first bad leaf, its shape and the divisor.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
    shape = tuple(np.shape(leaf))
    if not shape:
      raise ValueError(
        f'{where}: leaf {_leaf_name(path)!r} is a scalar; every batch leaf '
        'needs a leading batch axis to split over the mesh'
      )
    if shape[0] % divisor:
      raise ValueError(
        f'{where}: leaf {_leaf_name(path)!r} has {shape[0]} rows (shape '
        f'{list(shape)}), but the batch is split over {divisor} devices, so '
        f'its batch size must be a multiple of {divisor}; pick a batch size '
        f'such as {divisor * max(1, round(shape[0] / divisor))} or a mesh '
        'size that divides it'
      )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a numpy batch with its leading axis split over `mesh`.

  Each process passes its *own* rows: with P processes the global batch has
  P times the rows of `batch`, and process p's rows land on its devices
  (`jax.make_array_from_process_local_data`). With one process the batch is
  the global batch.

  Args:
    batch: a pytree of arrays `[local_batch, ...]`.
    mesh: the mesh.

  Returns:
    The same pytree of global `jax.Array`s `[global_batch, ...]`.

  Raises:
    ValueError: a leaf whose rows do not split evenly over this process's
      devices of the mesh.
  """
  sharding = data_sharding(mesh)
  if jax.process_count() == 1:
    check_batch_divisible(batch, mesh.size, 'shard_batch')
    return jax.device_put(batch, sharding)
  check_batch_divisible(
    batch, len(mesh.local_devices), 'shard_batch (this process)'
  )
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    batch,
  )


def shard_global_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a numpy batch that every process holds whole, rows split.

  Use it when every process computes the same global batch (the project's
  batch iterators are pure functions of seed and epoch): each process
  transfers only the rows of its own devices.

  Raises:
    ValueError: a leaf whose rows do not split evenly over the mesh.
  """
  check_batch_divisible(batch, mesh.size, 'shard_global_batch')
  return put_global(batch, data_sharding(mesh))


def to_host(tree: Any) -> Any:
  """Numpy copies of a pytree of (possibly sharded) arrays, on every process.

  With several processes, arrays split over devices of other processes are
  gathered first (`multihost_utils.process_allgather`, one collective for
  all of them, so every process must pass the same tree); numpy arrays and
  arrays on this process's devices are copied as they are.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  leaves, treedef = jax.tree.flatten(tree)
  remote = [
    i
    for i, x in enumerate(leaves)
    if isinstance(x, jax.Array) and not x.is_fully_addressable
  ]
  skip = set(remote)
  out = [None if i in skip else jax.device_get(x) for i, x in enumerate(leaves)]
  if remote:
    gathered = multihost_utils.process_allgather(
      [leaves[i] for i in remote], tiled=True
    )
    for i, value in zip(remote, gathered, strict=True):
      out[i] = value
  return jax.tree.unflatten(treedef, out)


def abstract(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct` of every leaf (numpy or jax arrays)."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree
  )


# ---------------------------------------------------------------------------
# State shardings.


def item_table_rules(
  axis_name: str = DATA_AXIS,
  layout: str = 'rows',
  *,
  num_items: int | None = None,
  mesh: Mesh | None = None,
  log: Callable[[str], None] | None = None,
) -> tuple[ShardRule, ...]:
  """Shard rules that split an SRM's item embedding table over the mesh.

  They match the table (`item_embedding/embedding`) in the parameters and in
  the optimizer state (Adam's moments have the same paths).

  The table has `num_items + 2` rows (padding, the items, the OOV row),
  rarely a multiple of the device count (Beauty: 12,103 rows). Given
  `num_items` and `mesh`, a 'rows' layout whose rows do not split evenly
  falls back to 'columns' and says why through `log`. (Padding the table
  instead would change the models' parameter shapes and every checkpoint.)

  Args:
    axis_name: the mesh axis to split over.
    layout: 'rows' splits items (full-catalogue scores come out split by
      item, their softmax needs only per-row reductions across devices); the
      row count must be a multiple of the mesh size. 'columns' splits the
      embedding width (any item count; every score then needs a sum across
      devices).
    num_items: the SRM's catalogue size, to check the row count (None: no
      check; `state_shardings` raises if the rows do not split).
    mesh: the mesh the rules are for (None: no check).
    log: receives the fallback line (default `logging.warning`).

  Returns:
    One (pattern, PartitionSpec) rule.
  """
  specs = {
    'rows': PartitionSpec(axis_name, None),
    'columns': PartitionSpec(None, axis_name),
  }
  if layout not in specs:
    raise ValueError(
      f"item_table_rules: layout must be 'rows' or 'columns', got {layout!r}"
    )
  if layout == 'rows' and num_items is not None and mesh is not None:
    rows, devices = num_items + 2, mesh.shape[axis_name]
    if rows % devices:
      (log or _LOG.warning)(
        f'item_table_rules: the SRM item table has {rows:,} rows '
        f'(num_items + 2), not a multiple of the {devices} devices of mesh '
        f'axis {axis_name!r}; splitting its columns (the embedding width) '
        'instead'
      )
      layout = 'columns'
  return ((r'item_embedding/embedding$', specs[layout]),)


def _spec_divisor(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return int(np.prod([mesh.shape[name] for name in names]))


def state_shardings(
  state: Any, mesh: Mesh, shard_rules: Sequence[ShardRule] = ()
) -> Any:
  """A `NamedSharding` for every leaf of a train state.

  Leaves are replicated unless a rule matches: the first rule whose regular
  expression is found (`re.search`) in the leaf's '/'-joined path (e.g.
  `params/params/item_embedding/embedding`,
  `opt_state/0/mu/params/item_embedding/embedding`) gives its
  `PartitionSpec`.

  Args:
    state: a pytree of arrays or `jax.ShapeDtypeStruct`s.
    mesh: the mesh.
    shard_rules: (pattern, PartitionSpec) pairs, e.g. `item_table_rules()`.

  Returns:
    A pytree of `NamedSharding`s with the structure of `state`.

  Raises:
    ValueError: a rule that matches no leaf (a typo would otherwise leave a
      table silently replicated), a spec with more entries than the leaf
      has axes, or a split axis whose size is not a multiple of the devices
      it is split over.
  """
  rules = [(re.compile(pattern), spec) for pattern, spec in shard_rules]
  used = [False] * len(rules)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  out = []
  for path, leaf in leaves:
    name = _leaf_name(path)
    spec = PartitionSpec()
    for i, (pattern, rule_spec) in enumerate(rules):
      if pattern.search(name):
        used[i], spec = True, rule_spec
        break
    shape = tuple(np.shape(leaf))
    if len(spec) > len(shape):
      raise ValueError(
        f'shard rule {spec} for {name!r}: the leaf has shape {list(shape)}, '
        f'fewer axes than the spec has entries'
      )
    for axis, entry in enumerate(spec):
      divisor = _spec_divisor(mesh, entry)
      if shape[axis] % divisor:
        hint = ''
        if 'item_embedding' in name:
          hint = (
            '. An SRM item table has num_items + 2 rows; split its columns '
            "instead (item_table_rules(layout='columns'))"
          )
        raise ValueError(
          f'shard rule {spec} for {name!r} (shape {list(shape)}): axis '
          f'{axis} has size {shape[axis]}, not a multiple of the '
          f'{divisor} devices it would be split over{hint}'
        )
    out.append(NamedSharding(mesh, spec))
  unused = [shard_rules[i][0] for i, hit in enumerate(used) if not hit]
  if unused:
    names = [_leaf_name(path) for path, _ in leaves]
    raise ValueError(
      f'shard rules {unused} match no state leaf; leaf paths look like '
      f'{names[:6]}'
    )
  return jax.tree_util.tree_unflatten(treedef, out)


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes of `tree` held by the most loaded device under `shardings`."""
  totals: dict[Any, int] = {}
  for leaf, sharding in zip(
    jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True
  ):
    shape = sharding.shard_shape(tuple(np.shape(leaf)))
    size = int(np.prod(shape)) * leaf.dtype.itemsize
    for device in sharding.device_set:
      totals[device] = totals.get(device, 0) + size
  return max(totals.values(), default=0)


# ---------------------------------------------------------------------------
# Sharded train steps.


class ShardedStep:
  """A data-parallel `step(state, batch) -> (state, metrics)`.

  `jitted` is the `jax.jit` of the step with its `NamedSharding`s: state in
  and out by `state_shardings` (replicated unless shard rules split a
  leaf), batch leaves split on their leading axis, metrics replicated (so
  every process can read them), state donated. Calling the object places a
  host batch first (`shard_global_batch`, or `shard_batch` when each
  process passes its own rows; a batch of jax arrays placed by the caller
  is used as it is) and compiles once per batch shape, logging
  the compile (`lsc_jax.train.loop.CompiledStep`). It is a drop-in
  `train_step` for `loop.train_loop`. On a CPU mesh each call waits for
  its step to finish (`serial_dispatch`).

  Attributes:
    mesh: the mesh.
    state_shardings: pytree of `NamedSharding`s of the state.
    jitted: the sharded `jax.jit`.
  """

  def __init__(
    self,
    step_fn: Callable[[Any, Any], tuple[Any, Any]],
    mesh: Mesh,
    state_shardings: Any,
    *,
    batch_is_global: bool = True,
    name: str = 'sharded train step',
    log: Callable[[str], None] | None = None,
  ):
    self.mesh = mesh
    self.state_shardings = state_shardings
    self._place_batch = shard_global_batch if batch_is_global else shard_batch
    self.jitted = jax.jit(
      step_fn,
      in_shardings=(state_shardings, data_sharding(mesh)),
      out_shardings=(state_shardings, replicated(mesh)),
      donate_argnums=(0,),
    )
    # CompiledStep jits `jitted` again; the outer jit inlines the inner one,
    # keeps its shardings and adds the per-shape compile log.
    self._compiled = loop.CompiledStep(self.jitted, name, log=log)
    self._wait_each_call = serial_dispatch(mesh)

  @property
  def num_compiles(self) -> int:
    return self._compiled.num_compiles

  def place_state(self, state: Any) -> Any:
    """The state on the mesh, laid out as the step expects (cheap no-op
    when it already is).

    Raises:
      ValueError: a state whose tree structure, static fields included
        (`apply_fn`, the optimizer `tx`), differs from the state the step
        was built for.
    """
    expected = jax.tree.structure(self.state_shardings)
    if jax.tree.structure(state) != expected:
      raise ValueError(
        'ShardedStep.place_state: the state does not have the structure the '
        'step was built for (a different optimizer or apply function object '
        'also counts); build the step from this state, or build both states '
        'from the same `tx` and model'
      )
    return put_global(state, self.state_shardings)

  def place_batch(self, batch: Any) -> Any:
    """A host (numpy) batch on the mesh, rows split; a batch of jax arrays
    (e.g. from `shard_batch`) is passed through as it is."""
    if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
      return batch
    return self._place_batch(batch, self.mesh)

  def lower(self, state: Any, batch: Any):
    """`jitted.lower(state, batch)`; abstract inputs allowed."""
    check_batch_divisible(batch, self.mesh.size, 'ShardedStep.lower batch')
    return self.jitted.lower(state, batch)

  def __call__(self, state: Any, batch: Any) -> tuple[Any, Any]:
    state, metrics = self._compiled(state, self.place_batch(batch))
    if self._wait_each_call:
      jax.block_until_ready(metrics)
    return state, metrics


def shard_train_step(
  step_fn: Callable[[Any, Any], tuple[Any, Any]],
  mesh: Mesh,
  state: Any,
  batch_example: Any,
  *,
  shard_rules: Sequence[ShardRule] = (),
  batch_is_global: bool = True,
  name: str = 'sharded train step',
  log: Callable[[str], None] | None = None,
) -> ShardedStep:
  """Data-parallel version of any `step(state, batch) -> (state, metrics)`.

  Args:
    step_fn: the pure step (e.g. `srm_steps.make_train_step(...)`); its
      metrics are small (scalars) and come back replicated.
    mesh: the mesh (`make_mesh`).
    state: the train state, concrete or abstract (`jax.eval_shape`); only
      its structure and shapes are used here (call `place_state` on the
      concrete one).
    batch_example: a batch of the run (arrays or `ShapeDtypeStruct`s); its
      leading axis must split evenly over the mesh.
    shard_rules: split large state leaves over the mesh instead of
      replicating them (see `state_shardings`, `item_table_rules`).
    batch_is_global: True when every process passes the whole global batch
      (the default; always so with one process); False when each passes
      only its own rows.
    name: named in the compile log.
    log: receives the compile log lines (default `logging.info`).

  Returns:
    A `ShardedStep`.

  Raises:
    ValueError: a batch that does not split over the mesh, or a bad rule.
  """
  check_batch_divisible(
    batch_example, mesh.size, 'shard_train_step batch_example'
  )
  shardings = state_shardings(state, mesh, shard_rules)
  return ShardedStep(
    step_fn,
    mesh,
    shardings,
    batch_is_global=batch_is_global,
    name=name,
    log=log,
  )


# ---------------------------------------------------------------------------
# Batched functions mapped over the mesh (generation, per-device adaptation).


class BatchedFunction:
  """`fn` run by every device of a mesh on its own slice of a batch.

  Built by `shard_map_batched`; call it like `fn`. Batched arguments and
  all outputs are split on their leading axis; shared arguments are
  replicated. Each device runs `fn` on its slice with no communication, so
  the result is `fn` applied to the whole batch whenever `fn` treats rows
  independently (beam search over prompts, vmapped per-user updates).
  """

  def __init__(self, fn: Callable[..., Any], mesh: Mesh, shared: frozenset):
    self.mesh = mesh
    self._shared = shared
    self._jitted: dict[int, Any] = {}
    self.num_traces = 0

    def counted(*args):
      self.num_traces += 1  # once per trace: per compile or `lower`
      return fn(*args)

    self._fn = counted

  def _for(self, args: tuple) -> Any:
    batched = [a for i, a in enumerate(args) if i not in self._shared]
    check_batch_divisible(batched, self.mesh.size, 'shard_map_batched argument')
    count = len(args)
    if count not in self._jitted:
      split = PartitionSpec(self.mesh.axis_names)
      specs = tuple(
        PartitionSpec() if i in self._shared else split for i in range(count)
      )
      # check_vma is off: `fn` may carry replicated values (e.g. shared
      # starting parameters) into loops together with per-device values.
      mapped = jax.shard_map(
        self._fn,
        mesh=self.mesh,
        in_specs=specs,
        out_specs=split,
        check_vma=False,
      )
      self._jitted[count] = jax.jit(
        mapped,
        in_shardings=tuple(NamedSharding(self.mesh, s) for s in specs),
        out_shardings=NamedSharding(self.mesh, split),
      )
    return self._jitted[count]

  def _place(self, args: tuple) -> tuple:
    # Placed here: with several processes `jit` refuses host inputs with
    # split shardings, and every process holds the whole arguments.
    split, whole = data_sharding(self.mesh), replicated(self.mesh)
    return tuple(
      put_global(a, whole if i in self._shared else split)
      for i, a in enumerate(args)
    )

  def lower(self, *args):
    """Lowers for these arguments (concrete or `ShapeDtypeStruct`s)."""
    return self._for(args).lower(*args)

  def __call__(self, *args):
    return self._for(args)(*self._place(args))


def shard_map_batched(
  fn: Callable[..., Any], mesh: Mesh, *, shared_argnums: Sequence[int] = (0,)
) -> BatchedFunction:
  """Splits a batched function over the mesh with `jax.shard_map`.

  Example (the LLM's candidate generation, prompts split over devices):

  ```
  search = llm.searcher(beam_size=50, num_candidates=50)
  sharded = sharding.shard_map_batched(search, mesh)   # params shared
  params = sharding.put_global(llm.params, sharding.replicated(mesh))
  items, log_probs = sharding.to_host(sharded(params, ids, mask))
  ```

  Shared arguments not yet on the mesh are copied to every device on each
  call; place them once (`put_global(..., replicated(mesh))`, as above)
  when the function is called many times.

  Args:
    fn: `fn(*args) -> pytree of [batch, ...] arrays`, treating rows
      independently.
    mesh: the mesh; every batched argument's leading axis is split over all
      its devices, so the batch must be a multiple of `mesh.size`.
    shared_argnums: positions of arguments every device gets whole (e.g.
      parameters).

  Returns:
    A `BatchedFunction` (callable; `.lower(...)` for compile checks).
  """
  return BatchedFunction(fn, mesh, frozenset(shared_argnums))


def mesh_llm(llm, mesh: Mesh):
  """A copy of an `LLMScorer` whose beam searches split prompts over `mesh`.

  `lsc_jax.models.llm.generate_for_windows(mesh_llm(llm, mesh), ...)` then
  generates each batch with its prompts split over the devices
  (`shard_map_batched`) and gathers the lists on every process; the
  parameters are replicated once. The batch size of the generation must be
  a multiple of `mesh.size` (its filler prompts are dropped as usual).

  Args:
    llm: an `lsc_jax.models.llm.LLMScorer`.
    mesh: the mesh.

  Returns:
    A new `LLMScorer` sharing `llm`'s model, tokenizer and identifiers.
  """
  return dataclasses.replace(llm, params=on_mesh(llm.params, mesh), mesh=mesh)


@functools.lru_cache(maxsize=16)
def _sharded_chunk_function(model, config, mesh: Mesh) -> BatchedFunction:
  """The vmapped per-device update over a chunk, split over `mesh` (cached,
  so repeated calls with the same shapes compile once)."""
  update = jax.vmap(
    adapt.make_device_update(model, config),
    in_axes=(None, None, 0, 0, 0, 0, 0),
  )
  return shard_map_batched(update, mesh, shared_argnums=(0, 1))


def sharded_adapt_and_score(
  model,
  params,
  data: adapt.DeviceData,
  config: adapt.AdaptConfig,
  mesh: Mesh,
  *,
  log: Callable[[str], None] | None = None,
) -> adapt.AdaptResult:
  """`adapt.adapt_and_score` with each chunk's users split over the mesh.

  Every accelerator device fine-tunes the copies of its share of a chunk
  (`adapt.make_device_update`, vmapped) with no communication; the shared
  starting point of the adapted parameters and the frozen parameters are
  replicated. A chunk holds `config.chunk_size` users, or
  fewer when there are fewer users: then the user count rounded up to a
  multiple of the mesh size. Filler rows repeat the chunk's first user and
  are dropped from the result.

  Args:
    model, params, data, config: as for `adapt.adapt_and_score`;
      `config.chunk_size` must be a multiple of `mesh.size`.
    mesh: the mesh.
    log: one progress line per chunk (None: quiet).

  Returns:
    An `adapt.AdaptResult`, equal to the unsharded one up to floating-point
    reduction order.

  Raises:
    ValueError: a chunk size that does not split over the mesh, or ids
      outside the model's catalogue.
  """
  if config.chunk_size % mesh.size:
    raise ValueError(
      f'sharded_adapt_and_score: AdaptConfig.chunk_size ({config.chunk_size}'
      f') must be a multiple of the mesh size ({mesh.size})'
    )
  # The order of `adapt.make_device_update`'s per-device arguments.
  fields = (
    data.history,
    data.candidates,
    data.mask,
    data.eval_history,
    data.eval_candidates,
  )
  for name in ('history', 'candidates', 'eval_candidates'):
    _, num_oov = srm.check_item_ids(getattr(data, name), model.num_items)
    if num_oov:
      raise ValueError(
        f'sharded_adapt_and_score: {num_oov} {name} ids outside '
        f'0..{model.num_items}'
      )

  adapted, frozen = adapt.split_params(model, params, config)
  # Copied to every device once, not once per chunk.
  adapted, frozen = put_global((adapted, frozen), replicated(mesh))
  run_chunk = _sharded_chunk_function(model, config, mesh)
  traces_before = run_chunk.num_traces

  num_devices = len(data)
  size = min(
    config.chunk_size, -(-max(num_devices, 1) // mesh.size) * mesh.size
  )
  scores, first, last = [], [], []
  for start in range(0, num_devices, size):
    stop = min(start + size, num_devices)
    index = np.arange(start, start + size)
    index = np.where(index < stop, index, start)
    chunk = [np.asarray(f)[index] for f in fields]
    chunk_scores, chunk_losses = to_host(run_chunk(adapted, frozen, *chunk))
    n = stop - start
    scores.append(chunk_scores[:n])
    first.append(chunk_losses[:n, 0])
    last.append(chunk_losses[:n, -1])
    if log is not None:
      log(f'sharded per-device adaptation: {stop:,}/{num_devices:,} devices')

  optimizer = config.make_optimizer()
  k = data.eval_candidates.shape[1]
  return adapt.AdaptResult(
    scores=np.concatenate(scores) if scores else np.zeros((0, k), np.float32),
    first_loss=np.concatenate(first) if first else np.zeros(0, np.float32),
    last_loss=np.concatenate(last) if last else np.zeros(0, np.float32),
    adapted_bytes=adapt.tree_bytes(adapted),
    state_bytes=adapt.tree_bytes(adapted)
    + adapt.tree_bytes(optimizer.init(adapted)),
    num_compiles=run_chunk.num_traces - traces_before,
  )


# ---------------------------------------------------------------------------
# Compile-only checks.


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """XLA's estimates for one compiled sharded program.

  Every figure is per device: XLA compiles one partitioned (SPMD) program
  that each device runs, and `memory_analysis()` and `cost_analysis()`
  describe that program. On a mesh of 8 a data-parallel step has about an
  eighth of the single-device FLOPs, plus the replicated optimizer update.

  Attributes:
    name: what was compiled.
    mesh_shape: `{axis_name: size}`.
    argument_bytes, output_bytes, alias_bytes, temp_bytes,
      generated_code_bytes: from `memory_analysis()`; alias bytes are
      outputs that reuse donated inputs.
    peak_bytes: XLA's peak estimate where it gives one (0 otherwise).
    flops: `cost_analysis()['flops']`, one call on one device (None where
      the backend gives no estimate).
    state_bytes: bytes of the whole state (all shards together).
    state_bytes_per_device: bytes of state on the most loaded device.
    compile_seconds: XLA compilation time (lowering excluded).
  """

  name: str
  mesh_shape: dict[str, int]
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  generated_code_bytes: int
  peak_bytes: int
  flops: float | None
  state_bytes: int
  state_bytes_per_device: int
  compile_seconds: float

  def text(self) -> str:
    """A few readable lines."""
    mib = lambda n: f'{n / 2**20:,.2f} MiB'
    flops = 'n/a' if self.flops is None else f'{self.flops / 1e9:,.3f} GFLOP'
    mesh = ' x '.join(f'{k}={v}' for k, v in self.mesh_shape.items())
    return (
      f'{self.name}: compiled for mesh {mesh} in '
      f'{self.compile_seconds:.1f} s\n'
      f'  per device: arguments {mib(self.argument_bytes)}, outputs '
      f'{mib(self.output_bytes)} (aliased to donated inputs '
      f'{mib(self.alias_bytes)}), temporaries {mib(self.temp_bytes)}, '
      f'generated code {mib(self.generated_code_bytes)}, peak '
      f'{mib(self.peak_bytes)}\n'
      f'  state {mib(self.state_bytes)} in all, '
      f'{mib(self.state_bytes_per_device)} on the most loaded device; '
      f'{flops} per device per call'
    )


def _flops(compiled) -> float | None:
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):
    costs = costs[0] if costs else None
  if not costs or 'flops' not in costs:
    return None
  return float(costs['flops'])


def report_compiled(
  name: str, mesh: Mesh, lowered, state: Any = None, shardings: Any = None
) -> CompileReport:
  """Compiles a `jax.stages.Lowered` and builds its `CompileReport`.

  Args:
    name: what is compiled.
    mesh: its mesh.
    lowered: e.g. `BatchedFunction.lower(...)` or `jax.jit(f).lower(...)`.
    state, shardings: the state (or parameters) and their shardings, for
      the state byte counts (None: reported as 0).
  """
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  state_bytes = per_device = 0
  if state is not None:
    state_bytes = sum(
      int(np.prod(np.shape(x))) * x.dtype.itemsize
      for x in jax.tree.leaves(state)
    )
    per_device = bytes_per_device(state, shardings)
  return CompileReport(
    name=name,
    mesh_shape=dict(mesh.shape),
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    generated_code_bytes=int(memory.generated_code_size_in_bytes),
    peak_bytes=int(getattr(memory, 'peak_memory_in_bytes', 0) or 0),
    flops=_flops(compiled),
    state_bytes=state_bytes,
    state_bytes_per_device=per_device,
    compile_seconds=seconds,
  )


def compile_report(
  step_fn: Callable[[Any, Any], tuple[Any, Any]],
  mesh: Mesh,
  abstract_state: Any,
  abstract_batch: Any,
  *,
  shard_rules: Sequence[ShardRule] = (),
  name: str = 'train step',
  log: Callable[[str], None] | None = None,
) -> CompileReport:
  """Lowers and compiles a sharded train step without running it.

  Nothing is allocated on the devices: the state and batch are shapes
  only, so this runs on a CPU for a mesh of any size (e.g. 8 forced host
  devices standing in for 8 GPUs) and shows shape, sharding and memory
  mistakes before accelerator time is spent.

  Args:
    step_fn: `step(state, batch) -> (state, metrics)`.
    mesh: the mesh to compile for.
    abstract_state: the state as `jax.ShapeDtypeStruct`s, e.g.
      `jax.eval_shape(lambda: create_train_state(...))`.
    abstract_batch: one batch as `ShapeDtypeStruct`s (see `abstract`).
    shard_rules: as for `shard_train_step`.
    name: named in the report.
    log: receives the report's text (None: not logged).

  Returns:
    A `CompileReport`.

  Raises:
    ValueError: a batch size that does not split over the mesh, or a bad
      shard rule, before anything reaches XLA.
  """
  step = shard_train_step(
    step_fn,
    mesh,
    abstract_state,
    abstract_batch,
    shard_rules=shard_rules,
    name=name,
  )
  report = report_compiled(
    name,
    mesh,
    step.lower(abstract_state, abstract_batch),
    abstract_state,
    step.state_shardings,
  )
  if log is not None:
    log(report.text())
  return report
