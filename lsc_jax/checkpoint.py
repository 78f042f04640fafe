"""Checkpoints of any pytree with Orbax, plus a small JSON metadata file.

Layout under a checkpoint directory:

```
<directory>/step_00000012/tree/           Orbax StandardCheckpointer output
<directory>/step_00000012/metadata.json   e.g. epoch, best metric, config
<directory>/step_00000012/manifest.json   size and SHA-256 of every file
```

A checkpoint is written under a temporary name and renamed into place once
complete, so a crash mid-save leaves no `step_*` directory. The manifest is
checked on restore, so a truncated or altered file is caught before Orbax
reads it. `restore_latest` tries the newest checkpoint first; when one is
unreadable it logs a warning naming the step directory and the error, and
falls back to the next older one. Only the newest `keep` checkpoints are
kept.

Typed PRNG key arrays (`jax.random.key`) are stored as their raw key data and
re-wrapped on restore, following the restore target. Arrays are restored
with the sharding of the restore target's arrays (a state laid out over a
mesh comes back laid out the same way); numpy leaves of the target come
back on this process's first local device.

Several processes (`jax.distributed`): every process calls `save` and
`restore` with the same arguments, and the directory must be one that
every process sees (a shared file system, or one host). Orbax itself
coordinates the tree: each array shard is written once, by the process
that holds its first replica (numpy leaves by process 0), and Orbax's own
barriers and atomic rename finish the `tree/` directory. The bookkeeping
around it (the temporary step directory, `metadata.json`, the manifest,
the rename into place and the removal of old steps) is done by process 0
alone, between barriers (`multihost_utils.sync_global_devices`): no
process starts writing before the temporary directory exists, and none
returns from `save`, or reads a step, before the step is complete. Arrays
that live on one process's devices only (not global arrays) are taken to
be equal copies on every process and saved from process 0. With one
process nothing waits and the behaviour is that of a single host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_STEP_DIR = re.compile(r'^step_(\d{8,})$')
_TMP_PREFIX = '.tmp_step_'
_LOG = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored."""


def step_dir(directory: str, step: int) -> str:
  """Path of the checkpoint of `step` under `directory`."""
  return os.path.join(directory, f'step_{step:08d}')


def list_steps(directory: str) -> list[int]:
  """Steps of the complete checkpoints under `directory`, ascending."""
  if not os.path.isdir(directory):
    return []
  steps = []
  for name in os.listdir(directory):
    match = _STEP_DIR.match(name)
    if match and os.path.isdir(os.path.join(directory, name)):
      steps.append(int(match.group(1)))
  return sorted(steps)


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
    x.dtype, jax.dtypes.prng_key
  )


def _keys_to_data(tree: Any) -> Any:
  return jax.tree.map(
    lambda x: jax.random.key_data(x) if _is_key(x) else x, tree
  )


def _data_to_keys(restored: Any, target: Any) -> Any:
  def wrap(data, like):
    if _is_key(like):
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(like))
    return data

  return jax.tree.map(wrap, restored, target)


def _is_primary() -> bool:
  return jax.process_index() == 0


def _barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (several
  processes only; every process must pass the same names in the same
  order)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'lsc_jax.checkpoint: {name}')


def _restore_target(leaf: Any) -> jax.ShapeDtypeStruct:
  """Shape, dtype and sharding of one restored array.

  A jax array of the target keeps its sharding (e.g. a state replicated or
  split over a mesh); a numpy leaf is restored to this process's first
  local device, as Orbax needs a sharding for every array.
  """
  if isinstance(leaf, jax.Array):
    sharding = leaf.sharding
  elif isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
    sharding = leaf.sharding
  else:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


def _to_save(tree: Any) -> Any:
  """The tree as Orbax should save it from this process.

  With several processes, an array that lives on this process's devices
  alone (e.g. parameters that every process computed for itself) is not a
  global array; Orbax would have every process write it as a whole. Such
  arrays are saved as numpy, which Orbax writes from process 0 only: the
  processes are taken to hold equal copies.
  """
  tree = _keys_to_data(tree)
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(
    lambda x: (
      np.asarray(x)
      if isinstance(x, jax.Array) and x.is_fully_addressable
      else x
    ),
    tree,
  )


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _manifest(root: str) -> dict[str, dict[str, Any]]:
  files = {}
  for parent, _, names in os.walk(root):
    for name in names:
      path = os.path.join(parent, name)
      rel = os.path.relpath(path, root)
      if rel == 'manifest.json':
        continue
      files[rel] = {
        'bytes': os.path.getsize(path),
        'sha256': _file_digest(path),
      }
  return dict(sorted(files.items()))


def _verify_manifest(root: str) -> None:
  """Raises a ValueError describing the first file that does not match."""
  manifest_path = os.path.join(root, 'manifest.json')
  if not os.path.exists(manifest_path):
    raise ValueError('manifest.json is missing (incomplete checkpoint)')
  with open(manifest_path) as f:
    expected = json.load(f)
  for rel, info in expected.items():
    path = os.path.join(root, rel)
    if not os.path.exists(path):
      raise ValueError(f'file {rel!r} is missing')
    size = os.path.getsize(path)
    if size != info['bytes']:
      raise ValueError(
        f'file {rel!r} has {size} bytes, expected {info["bytes"]} '
        '(truncated or overwritten)'
      )
    if _file_digest(path) != info['sha256']:
      raise ValueError(f'file {rel!r} does not match its SHA-256 (corrupt)')


def save(
  directory: str,
  step: int,
  tree: Any,
  metadata: dict[str, Any] | None = None,
  keep: int = 3,
) -> str:
  """Saves `tree` and `metadata` as the checkpoint of `step`.

  Args:
    directory: checkpoint directory (created if missing).
    step: non-negative step number; an existing checkpoint of the same step
      is replaced.
    tree: pytree of arrays (e.g. a train state); typed PRNG keys allowed.
    metadata: JSON-serialisable dict (epoch, best metric, config, ...).
    keep: number of newest checkpoints to keep (older ones are deleted).

  Returns:
    The path of the new step directory.
  """
  # Orbax accepts only absolute paths.
  directory = os.path.abspath(directory)
  if step < 0:
    raise ValueError(f'checkpoint step must be >= 0, got {step}')
  if keep < 1:
    raise ValueError(f'keep must be >= 1, got {keep}')
  metadata_text = json.dumps(metadata or {}, indent=2, sort_keys=True)
  final = step_dir(directory, step)
  tmp = os.path.join(directory, f'{_TMP_PREFIX}{step:08d}')

  # Process 0 prepares the temporary directory; the others wait for it.
  if _is_primary():
    os.makedirs(directory, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  _barrier(f'prepared step {step} in {directory}')

  # Every process takes part in the Orbax save: each writes its own shards
  # and Orbax synchronises and finalises `tree/` itself.
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(tmp, 'tree'), _to_save(tree))
    checkpointer.wait_until_finished()
  _barrier(f'wrote the tree of step {step} in {directory}')

  if _is_primary():
    with open(os.path.join(tmp, 'metadata.json'), 'w') as f:
      f.write(metadata_text)
    with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
      json.dump(_manifest(tmp), f, indent=1)
    if os.path.exists(final):
      shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_steps(directory)[:-keep]:
      shutil.rmtree(step_dir(directory, old), ignore_errors=True)
  # Nobody returns (and reads the directory) before the step is in place.
  _barrier(f'finished step {step} in {directory}')
  return final


def restore(directory: str, step: int, target: Any):
  """Restores the checkpoint of `step` into the structure of `target`.

  Args:
    directory: checkpoint directory.
    step: the step to restore.
    target: a pytree with the structure, shapes and dtypes to restore
      (concrete arrays or `jax.ShapeDtypeStruct`s; typed keys as keys).

  Returns:
    (tree, metadata dict).

  Raises:
    ValueError or an Orbax error: if the checkpoint is incomplete, corrupt
    or does not match `target`.
  """
  root = step_dir(os.path.abspath(directory), step)
  _verify_manifest(root)
  with open(os.path.join(root, 'metadata.json')) as f:
    metadata = json.load(f)
  abstract = jax.tree.map(_restore_target, _keys_to_data(target))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.join(root, 'tree'), abstract)
  return _data_to_keys(restored, target), metadata


def restore_latest(
  directory: str,
  target: Any,
  warn: Callable[[str], None] | None = None,
):
  """Restores the newest readable checkpoint under `directory`.

  Args:
    directory: checkpoint directory.
    target: restore target, as for `restore`.
    warn: called with a message for every unreadable checkpoint skipped
      (default: `logging.warning`).

  Returns:
    (tree, metadata, step), or None when `directory` holds no checkpoint.

  Raises:
    CheckpointError: if checkpoints exist but none can be restored; the
      message lists each step directory and its error.
  """
  warn = warn or _LOG.warning
  errors = []
  for step in reversed(list_steps(directory)):
    try:
      tree, metadata = restore(directory, step, target)
    except Exception as error:  # noqa: BLE001 - any failure means fall back
      path = step_dir(directory, step)
      message = f'{type(error).__name__}: {error}'
      errors.append(f'{path}: {message}')
      warn(
        f'checkpoint {path} is unreadable ({message}); falling back to the '
        'previous checkpoint'
      )
      continue
    return tree, metadata, step
  if errors:
    raise CheckpointError(
      'no checkpoint could be restored:\n' + '\n'.join(errors)
    )
  return None
