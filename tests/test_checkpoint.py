"""Tests of `lsc_jax.checkpoint` and exact resume of the training loop."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsc_jax import checkpoint, data
from lsc_jax.models import get_srm_config
from lsc_jax.train import srm_steps


def _tree(value):
  return {
    'weights': jnp.full((3, 5), value, jnp.float32),
    'step': jnp.asarray(int(value), jnp.int32),
    'key': jax.random.key(int(value)),
    'nested': [jnp.arange(7) * value],
  }


def _assert_trees_equal(a, b):
  a = jax.tree.map(
    lambda x: (
      jax.random.key_data(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      else x
    ),
    a,
  )
  b = jax.tree.map(
    lambda x: (
      jax.random.key_data(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      else x
    ),
    b,
  )
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def test_round_trip_keeps_last_and_restores_typed_keys(tmp_path):
  directory = str(tmp_path / 'ckpt')
  for step in (1, 2, 3):
    checkpoint.save(directory, step, _tree(step), {'epoch': step}, keep=2)
  assert checkpoint.list_steps(directory) == [2, 3]

  tree, metadata, step = checkpoint.restore_latest(directory, _tree(0))
  assert (step, metadata) == (3, {'epoch': 3})
  _assert_trees_equal(tree, _tree(3))
  assert jax.dtypes.issubdtype(tree['key'].dtype, jax.dtypes.prng_key)

  older, metadata = checkpoint.restore(directory, 2, _tree(0))
  _assert_trees_equal(older, _tree(2))
  assert checkpoint.restore_latest(str(tmp_path / 'empty'), _tree(0)) is None


def _truncate_largest_file(step_dir):
  files = []
  for parent, _, names in os.walk(os.path.join(step_dir, 'tree')):
    files += [os.path.join(parent, n) for n in names]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def test_corrupt_latest_falls_back_with_a_clear_message(tmp_path):
  directory = str(tmp_path / 'ckpt')
  checkpoint.save(directory, 1, _tree(1), {'epoch': 1})
  checkpoint.save(directory, 2, _tree(2), {'epoch': 2})
  truncated = _truncate_largest_file(checkpoint.step_dir(directory, 2))

  warnings = []
  tree, metadata, step = checkpoint.restore_latest(
    directory, _tree(0), warn=warnings.append
  )
  assert step == 1 and metadata == {'epoch': 1}
  _assert_trees_equal(tree, _tree(1))
  assert len(warnings) == 1
  message = warnings[0]
  assert checkpoint.step_dir(directory, 2) in message
  assert os.path.relpath(truncated, checkpoint.step_dir(directory, 2)) in (
    message
  )
  assert 'truncated' in message and 'falling back' in message

  # With every checkpoint unreadable, the error lists each one.
  _truncate_largest_file(checkpoint.step_dir(directory, 1))
  with pytest.raises(checkpoint.CheckpointError, match='step_00000001'):
    checkpoint.restore_latest(directory, _tree(0), warn=lambda _: None)


def test_incomplete_save_is_ignored(tmp_path):
  directory = str(tmp_path / 'ckpt')
  checkpoint.save(directory, 1, _tree(1), {'epoch': 1})
  # A crash mid-save leaves only a temporary directory behind.
  os.makedirs(os.path.join(directory, '.tmp_step_00000002', 'tree'))
  assert checkpoint.list_steps(directory) == [1]
  _, _, step = checkpoint.restore_latest(directory, _tree(0))
  assert step == 1


# ---------------------------------------------------------------------------
# Resume: 2 epochs straight == 1 epoch, restore, 1 more.


def _synthetic(num_users=37, num_items=97):
  rng = np.random.default_rng(0)
  sequences = [
    rng.integers(1, num_items + 1, size=rng.integers(4, 19)).astype(np.int32)
    for _ in range(num_users)
  ]
  lengths = np.array([len(s) for s in sequences])
  users = np.repeat(np.arange(num_users), lengths - 3)
  positions = np.concatenate([np.arange(1, n - 2) for n in lengths])
  train = data.Windows(users, positions)
  valid = data.Windows(np.arange(num_users), lengths - 2)
  return sequences, num_items, train, valid


def _train(sequences, num_items, train, valid, workdir, epochs, lines=None):
  config = get_srm_config(
    'sasrec',
    'smoke',
    epochs=epochs,
    patience=5,
    batch_size=8,
    bucket_edges=(12,),
  )
  return srm_steps.train_srm(
    'sasrec',
    sequences=sequences,
    num_items=num_items,
    train_windows=train,
    valid_windows=valid,
    config=config,
    seed=3,
    workdir=workdir,
    log=(lines.append if lines is not None else lambda _: None),
  )


def _without_timing(history):
  return [
    {k: v for k, v in record.items() if 'second' not in k} for record in history
  ]


def test_resume_matches_an_uninterrupted_run(tmp_path):
  task = _synthetic()
  straight = _train(*task, str(tmp_path / 'a'), epochs=2)

  workdir = str(tmp_path / 'b')
  first = _train(*task, workdir, epochs=1)
  assert first.loop.resumed_from_epoch == 0
  # A fresh start: new model, new jit caches, state only from disk.
  jax.clear_caches()
  lines = []
  resumed = _train(*task, workdir, epochs=2, lines=lines)
  assert resumed.loop.resumed_from_epoch == 1
  assert any('resumed from' in line for line in lines)

  _assert_trees_equal(straight.loop.state.params, resumed.loop.state.params)
  _assert_trees_equal(straight.params, resumed.params)
  assert int(straight.loop.state.step) == int(resumed.loop.state.step)
  assert _without_timing(straight.loop.history) == _without_timing(
    resumed.loop.history
  )
  assert straight.valid == resumed.valid

  # The metrics file has one line per epoch, as in the straight run.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert len(f.readlines()) == 2

  # Corrupting the newest checkpoint: a rerun warns, names the step
  # directory and resumes from the previous epoch's checkpoint.
  steps = checkpoint.list_steps(os.path.join(workdir, 'checkpoints'))
  assert len(steps) == 2
  newest = checkpoint.step_dir(os.path.join(workdir, 'checkpoints'), steps[-1])
  _truncate_largest_file(newest)
  lines = []
  again = _train(*task, workdir, epochs=2, lines=lines)
  warning = [line for line in lines if 'unreadable' in line]
  assert len(warning) == 1 and newest in warning[0]
  assert again.loop.resumed_from_epoch == 1
  _assert_trees_equal(straight.loop.state.params, again.loop.state.params)


def test_relative_directory_round_trips(tmp_path, monkeypatch):
  # Orbax itself accepts only absolute paths; a relative workdir (the
  # experiments' default) must work all the same.
  monkeypatch.chdir(tmp_path)
  tree = {'w': jnp.arange(5.0)}
  checkpoint.save('relative/checkpoints', 7, tree, {'epoch': 1})
  restored, metadata, step = checkpoint.restore_latest(
    'relative/checkpoints', {'w': jnp.zeros(5)}
  )
  assert step == 7 and metadata == {'epoch': 1}
  np.testing.assert_array_equal(restored['w'], np.arange(5.0))


def test_numpy_tree_restores_onto_the_local_device(tmp_path):
  # Trained parameters come back from a mesh run as numpy copies; they are
  # saved and restored like any tree, onto this process's first device.
  directory = str(tmp_path / 'numpy')
  tree = {'w': np.arange(6.0, dtype=np.float32).reshape(2, 3), 'n': np.int32(4)}
  checkpoint.save(directory, 0, tree, keep=1)
  restored, _ = checkpoint.restore(
    directory, 0, jax.tree.map(np.zeros_like, tree)
  )
  np.testing.assert_array_equal(restored['w'], tree['w'])
  assert int(restored['n']) == 4
  assert restored['w'].devices() == {jax.local_devices()[0]}
