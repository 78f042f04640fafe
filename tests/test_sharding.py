"""Tests of `lsc_jax.sharding`: meshes, data-parallel steps, compile checks.

The pytest process has started jax with one CPU device, so the multi-device
checks run in fresh processes (`tests/sharding_worker.py`) with XLA forced
to split the CPU into host devices: two processes with 8 devices (the
sharding pieces; `train_srm` and `train_llm` with a mesh), a pair of
processes with 4 devices each joined by `jax.distributed` on localhost (a
two-host run in miniature, sharing one checkpoint directory), and the
`train_srm` and `train_llm` binaries with --compile_only. Each worker
computes the single-device reference and the sharded result; the tests
here compare them.

Why sharded and single-device results are close but not bit-identical:
the data-parallel gradient is a sum of per-device partial sums, a
different order of floating-point additions than one device's sum. The
tolerances below (rtol 1e-5, atol 1e-6) are a few float32 roundings.
Over whole training runs Adam adds one effect: a gradient entry that is
pure rounding noise (a sum that cancels to about zero) is rescaled to an
update of the size of the learning rate whose sign depends on the
summation order. `_assert_trained_params_close` therefore allows a few
entries per array (0.1%, and at least 4 in a small array) to differ by up
to one learning rate. Which entries flip depends on the CPU's vector
width, so a 1,024-entry attention kernel can show 2 on one machine and
none on another.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from experiments import common
from lsc_jax import sharding
from lsc_jax.models import registry
from lsc_jax.train import srm_steps
from lsc_jax.train import state as state_lib

WORKER = Path(__file__).with_name('sharding_worker.py')
# Cheaper XLA CPU code generation: the checks compare two programs compiled
# the same way, and compile time dominates these tiny runs.
FAST_COMPILE = (
  '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
)
RTOL, ATOL = 1e-5, 1e-6
# Entries of one trained array allowed to differ by up to a learning rate.
MIN_FLIPPED = 4
LEARNING_RATE = 3e-3  # the SASRec smoke preset's
NUM_STEPS = 4


def _env(num_devices: int) -> dict:
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = (
    f'--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}'
  )
  return env


TIMEOUT = 420  # seconds for all the subprocesses together (2 loaded cores)
ROOT = Path(__file__).resolve().parents[1]


def _wait(name, process, logs, deadline):
  try:
    process.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    pytest.fail(f'{name} did not finish within {TIMEOUT} s')
  if process.returncode != 0:
    stderr = logs.with_suffix('.err').read_text()
    pytest.fail(f'{name} exited with {process.returncode}:\n{stderr[-4000:]}')


def _load(out, stem):
  with open(out / f'{stem}.json') as f:
    return json.load(f), dict(np.load(out / f'{stem}.npz'))


@pytest.fixture(scope='module')
def worker_runs(tmp_path_factory):
  """Runs the workers, the two-process pair and the binaries side by side.

  Output goes to files, not pipes: a pipe nobody reads could fill and
  stall a process that its partner waits for.
  """
  out = tmp_path_factory.mktemp('sharding')
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  files = []

  def start(name, command, num_devices):
    stem = out / name.replace(' ', '_')
    stdout, stderr = (
      open(stem.with_suffix('.out'), 'w'),
      open(stem.with_suffix('.err'), 'w'),
    )
    files.extend([stdout, stderr])
    process = subprocess.Popen(
      command,
      cwd=ROOT,
      env=_env(num_devices),
      stdout=stdout,
      stderr=stderr,
      text=True,
    )
    return process, stem

  worker = [sys.executable, str(WORKER)]
  binary = [sys.executable, '-m']
  processes = {
    'mesh worker': start('mesh worker', [*worker, 'mesh', str(out)], 8),
    'train worker': start('train worker', [*worker, 'train', str(out)], 8),
    **{
      f'multihost process {pid}': start(
        f'multihost process {pid}',
        [*worker, 'multihost', str(out), str(pid), str(port)],
        4,
      )
      for pid in range(2)
    },
    'train_srm binary': start(
      'train_srm binary',
      [
        *binary,
        'experiments.train_srm',
        '--preset=smoke',
        '--compile_only',
        '--shard_item_table=rows',
      ],
      8,
    ),
    'train_llm binary': start(
      'train_llm binary',
      [
        *binary,
        'experiments.train_llm',
        '--size=smoke',
        '--max_users=300',
        '--compile_only',
      ],
      8,
    ),
  }
  deadline = time.monotonic() + TIMEOUT
  try:
    for name, (process, stem) in processes.items():
      _wait(name, process, stem, deadline)
  finally:
    for process, _ in processes.values():
      if process.poll() is None:
        process.kill()
        process.wait()
    for f in files:
      f.close()

  def logs(name):
    stem = processes[name][1]
    return stem.with_suffix('.out').read_text(), stem.with_suffix(
      '.err'
    ).read_text()

  return {
    'mesh': _load(out, 'mesh'),
    'train': _load(out, 'train'),
    'multihost': [_load(out, f'multihost_{pid}') for pid in range(2)],
    'multihost_dir': out,
    'binaries': {
      name: logs(f'{name} binary') for name in ('train_srm', 'train_llm')
    },
  }


@pytest.fixture(scope='module')
def mesh_run(worker_runs):
  return worker_runs['mesh']


@pytest.fixture(scope='module')
def multihost_run(worker_runs):
  return worker_runs['multihost']


@pytest.fixture(scope='module')
def train_run(worker_runs):
  return worker_runs['train']


def _param_names(arrays):
  return sorted(
    k[len('reference/') :] for k in arrays if k.startswith('reference/')
  )


def _assert_params_close(arrays, label, reference_arrays=None):
  """Compares `label/<param>` with `reference/<param>`.

  The attention key bias is left out: it has no effect on the model
  (softmax ignores a shift common to all of a query's logits), so its
  gradient is zero up to rounding, and Adam, which divides by the gradient's
  running magnitude, turns that rounding noise into updates of order
  `LEARNING_RATE` whose sign depends on the summation order.
  """
  reference_arrays = reference_arrays or arrays
  names = _param_names(reference_arrays)
  assert len(names) > 10
  for name in names:
    expected = reference_arrays[f'reference/{name}']
    actual = arrays[f'{label}/{name}']
    if name.endswith('attention/key/bias'):
      assert np.abs(actual).max() <= NUM_STEPS * LEARNING_RATE * 1.01
      continue
    np.testing.assert_allclose(
      actual, expected, rtol=RTOL, atol=ATOL, err_msg=f'{label}: {name}'
    )


def _assert_trained_params_close(arrays, label, reference, learning_rate):
  """`arrays['<label>/<param>']` against `reference['<param>']` after whole
  training runs: within RTOL/ATOL except at most 0.1% of each array's
  entries (at least `MIN_FLIPPED` entries), and every entry within one
  learning rate (see the module docstring). The attention key bias,
  whose whole gradient is noise, only gets the learning-rate bound."""
  assert len(reference) > 10
  for name, expected in reference.items():
    actual = arrays[f'{label}/{name}']
    assert actual.shape == expected.shape, name
    difference = np.abs(actual - expected)
    assert difference.max() <= learning_rate, (label, name)
    if name.endswith('attention/key/bias'):
      continue
    outside = difference > ATOL + RTOL * np.abs(expected)
    allowed = max(1e-3 * outside.size, MIN_FLIPPED)
    assert outside.sum() <= allowed, (label, name, int(outside.sum()))


def _prefixed(arrays, prefix):
  return {
    k[len(prefix) + 1 :]: v
    for k, v in arrays.items()
    if k.startswith(f'{prefix}/')
  }


def _assert_metrics_close(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key in expected:
    np.testing.assert_allclose(
      actual[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key
    )


# ---------------------------------------------------------------------------
# One process, 8 devices.


@pytest.mark.parametrize('label', ['replicated', 'rows'])
def test_sharded_training_matches_single_device(mesh_run, label):
  results, arrays = mesh_run
  assert results['mesh_shape'] == {'data': 8}
  np.testing.assert_allclose(
    arrays[f'{label}_losses'],
    arrays['reference_losses'],
    rtol=RTOL,
    atol=ATOL,
  )
  _assert_params_close(arrays, label)
  assert results[f'{label}_step'] == NUM_STEPS
  assert results[f'{label}_num_compiles'] == 1


def test_item_table_rules_split_the_table_rows(mesh_run):
  results, _ = mesh_run
  # 46 items -> 48 embedding rows, 6 per device; width 16 kept whole.
  assert results['rows_table_spec'] == "P('data',)"
  assert results['rows_table_shard_shape'] == [6, 16]
  assert results['replicated_table_spec'] == 'P()'
  assert results['replicated_table_shard_shape'] == [48, 16]


def test_shard_batch_puts_consecutive_rows_on_consecutive_devices(mesh_run):
  results, _ = mesh_run
  assert results['batch_placed_equal']
  expected = [[d, 4 * d, 4 * d + 4] for d in range(8)]
  assert results['batch_rows_by_device'] == expected


def test_sharded_adaptation_equals_adapt_and_score(mesh_run):
  results, arrays = mesh_run
  # 19 users in chunks of 16 over 8 devices: the second chunk has filler.
  assert arrays['adapt_sharded_scores'].shape == (19, 13)
  for field in ('scores', 'first_loss', 'last_loss'):
    np.testing.assert_allclose(
      arrays[f'adapt_sharded_{field}'],
      arrays[f'adapt_plain_{field}'],
      rtol=RTOL,
      atol=ATOL,
      err_msg=field,
    )
  assert results['adapt_sharded_num_compiles'] == 1
  assert results['adapt_bytes_equal']
  assert (
    'chunk_size (12) must be a multiple of the mesh size (8)'
    in (results['adapt_bad_chunk_error'])
  )


def test_compile_report_for_a_mesh_of_8(mesh_run):
  results, _ = mesh_run
  replicated, rows = results['report_replicated'], results['report_rows']
  for report in (replicated, rows):
    assert report['mesh_shape'] == {'data': 8}
    for key in (
      'argument_bytes',
      'output_bytes',
      'temp_bytes',
      'state_bytes',
      'state_bytes_per_device',
    ):
      assert report[key] > 0, key
    assert report['flops'] > 0
    assert 'compiled for mesh data=8' in report['text']
  # The state (params + Adam's two moments) is donated and aliased.
  assert replicated['alias_bytes'] == replicated['state_bytes']
  assert replicated['state_bytes_per_device'] == replicated['state_bytes']
  # Splitting the 48 x 16 float32 table and its two Adam moments over 8
  # devices leaves 1/8 of each: 3 * 48 * 16 * 4 * 7 / 8 bytes fewer.
  saved = 3 * 48 * 16 * 4 * 7 // 8
  assert rows['state_bytes'] == replicated['state_bytes']
  assert rows['state_bytes_per_device'] == replicated['state_bytes'] - saved
  assert rows['argument_bytes'] == replicated['argument_bytes'] - saved


def test_compile_report_rejects_a_batch_the_mesh_cannot_split(mesh_run):
  results, _ = mesh_run
  message = results['bad_batch_error']
  assert message is not None
  assert "leaf 'history' has 30 rows" in message
  assert 'multiple of 8' in message


def test_shard_rule_matching_nothing_is_an_error(mesh_run):
  results, _ = mesh_run
  assert (
    "shard rules ['item_embeding'] match no state leaf"
    in (results['bad_rule_error'])
  )


def test_sharded_generation_equals_per_device_generation(mesh_run):
  results, arrays = mesh_run
  assert results['generate_out_spec'] == "P('data',)"
  items = arrays['generate_sharded_items']
  assert items.shape == (16, 6)
  np.testing.assert_array_equal(items, arrays['generate_slice_items'])
  np.testing.assert_allclose(
    arrays['generate_sharded_scores'],
    arrays['generate_slice_scores'],
    rtol=RTOL,
    atol=ATOL,
  )
  for row in items:
    assert len(set(row.tolist())) == 6 and row.min() >= 1
  assert "leaf '0' has 12 rows" in results['generate_bad_batch_error']


# ---------------------------------------------------------------------------
# train_srm, train_llm and the binaries on 8 devices.

SRM_LEARNING_RATE = LEARNING_RATE


def test_train_srm_on_a_mesh_matches_single_device(train_run):
  results, arrays = train_run
  steps = results['srm_reference_steps']
  assert steps > 5 and results['srm_sharded_steps'] == steps
  _assert_trained_params_close(
    arrays,
    'srm_sharded',
    _prefixed(arrays, 'srm_reference'),
    SRM_LEARNING_RATE,
  )
  # Validation (early stopping) and test metrics over 300 Beauty users.
  assert results['srm_reference_valid']['count'] == 300
  _assert_metrics_close(
    results['srm_sharded_valid'], results['srm_reference_valid']
  )
  _assert_metrics_close(
    results['srm_sharded_test'], results['srm_reference_test']
  )
  for reference, sharded in zip(
    results['srm_reference_history'],
    results['srm_sharded_history'],
    strict=True,
  ):
    _assert_metrics_close(sharded, reference)
  # The sharded run hands back host copies of its parameters.
  assert results['srm_sharded_params_type'] == 'ndarray'
  lines = results['srm_sharded_lines']
  assert "data-parallel over mesh {'data': 8}" in lines[0]
  assert '4 rows per device per step' in lines[0]
  # 300 windows in batches of 60: five batches of 4 filler rows each.
  assert 'padded with 20 filler rows (mask 0)' in lines[1]


def test_beauty_item_table_falls_back_to_columns(train_run):
  results, _ = train_run
  assert results['num_items'] == 12101
  (line,) = results['fallback_log']
  assert 'has 12,103 rows (num_items + 2)' in line
  assert 'not a multiple of the 8 devices' in line
  assert 'splitting its columns' in line
  # Columns of the 16-wide table: 2 per device, every row on each.
  assert results['srm_table_spec'] == "P(None, 'data')"
  assert results['srm_table_shard_shape'] == [12103, 2]


def test_train_srm_rejects_a_batch_the_mesh_cannot_split(train_run):
  results, _ = train_run
  message = results['srm_bad_batch_error']
  assert message.startswith('train_srm: batch_size 30 does not split over')
  assert 'the 8 devices' in message and 'e.g. 32' in message


def test_train_llm_on_a_mesh_matches_single_device(train_run):
  results, arrays = train_run
  assert results['llm_reference_steps'] == 6  # 96 windows, batches of 16
  assert results['llm_sharded_steps'] == 6
  np.testing.assert_allclose(
    arrays['llm_sharded_loss'],
    arrays['llm_reference_loss'],
    rtol=RTOL,
    atol=ATOL,
  )
  # The smoke preset's peak learning rate.
  _assert_trained_params_close(
    arrays, 'llm_sharded', _prefixed(arrays, 'llm_reference'), 3e-3
  )


def test_mesh_llm_generation_matches_per_device_batches(train_run):
  _, arrays = train_run
  items = arrays['generate_mesh_items']
  assert items.shape == (32, 5)
  np.testing.assert_array_equal(items, arrays['generate_plain_items'])
  np.testing.assert_allclose(
    arrays['generate_mesh_scores'],
    arrays['generate_plain_scores'],
    rtol=RTOL,
    atol=ATOL,
  )
  for row in items:
    assert len(set(row.tolist())) == 5 and row.min() >= 1


@pytest.mark.parametrize('name', ['train_srm', 'train_llm'])
def test_compile_only_binaries_report_for_8_devices(worker_runs, name):
  stdout, stderr = worker_runs['binaries'][name]
  assert "mesh {'data': 8}" in stderr  # the topology line
  assert 'process 0 of 1; 8 local of 8 devices' in stderr
  assert 'compiled for mesh data=8' in stdout
  assert 'per device: arguments' in stdout
  assert 'GFLOP per device per call' in stdout
  if name == 'train_srm':
    # --shard_item_table=rows on Beauty's 12,103 rows: columns instead.
    assert 'splitting its columns' in stderr + stdout


# ---------------------------------------------------------------------------
# Two processes with 4 devices each.


def test_two_processes_form_one_mesh(multihost_run):
  for pid, (results, _) in enumerate(multihost_run):
    assert results['process_count'] == 2, pid
    assert results['device_count'] == 8
    assert results['local_device_count'] == 4
    # A 4-device mesh takes 2 devices from each process.
    assert results['partial_mesh_processes'] == [0, 0, 1, 1]
    # Global and process-local batches run the same compiled step.
    assert results['train_num_compiles'] == 1


@pytest.mark.parametrize('label', ['global', 'local'])
def test_multihost_training_matches_single_device(
  mesh_run, multihost_run, label
):
  _, reference = mesh_run
  for _, arrays in multihost_run:
    np.testing.assert_allclose(
      arrays[f'{label}_losses'],
      reference['reference_losses'],
      rtol=RTOL,
      atol=ATOL,
    )
    _assert_params_close(arrays, label, reference)


def test_multihost_adaptation_equals_adapt_and_score(mesh_run, multihost_run):
  _, reference = mesh_run
  for _, arrays in multihost_run:
    np.testing.assert_allclose(
      arrays['adapt_scores'],
      reference['adapt_plain_scores'],
      rtol=RTOL,
      atol=ATOL,
    )


def test_two_processes_save_and_restore_one_checkpoint(multihost_run):
  saved = _prefixed(multihost_run[0][1], 'checkpoint_saved')
  assert len(saved) > 10
  for pid, (results, arrays) in enumerate(multihost_run):
    # keep=1: process 0 removed step 1 after step 2 was in place.
    assert results['checkpoint_steps'] == [2], pid
    assert results['checkpoint_step'] == 2
    assert results['checkpoint_metadata'] == {'epoch': 2}
    assert results['checkpoint_state_step'] == NUM_STEPS
    # Restored with the target's layout: table rows split over 8 devices.
    assert results['checkpoint_table_spec'] == "P('data', None)"
    assert results['checkpoint_table_shard_shape'] == [6, 16]
    assert results['checkpoint_opt_state_and_key_equal']
    # Both processes read back exactly what was saved.
    for name, value in saved.items():
      np.testing.assert_array_equal(
        arrays[f'checkpoint_restored/{name}'], value, err_msg=name
      )
      np.testing.assert_array_equal(
        arrays[f'checkpoint_saved/{name}'], value, err_msg=name
      )
    np.testing.assert_array_equal(arrays['checkpoint_local'], np.arange(11.0))


def test_train_srm_over_two_processes(worker_runs, train_run):
  results, arrays = train_run
  reference = _prefixed(arrays, 'synthetic')
  for pid, (mh_results, mh_arrays) in enumerate(worker_runs['multihost']):
    _assert_trained_params_close(
      mh_arrays, 'synthetic', reference, SRM_LEARNING_RATE
    )
    _assert_metrics_close(
      mh_results['synthetic_valid'], results['synthetic_valid']
    )
    assert mh_results['synthetic_steps'] == results['synthetic_steps'], pid
  workdir = worker_runs['multihost_dir'] / 'train_srm'
  # One epoch: one line, from process 0 only; one checkpoint.
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 1
  steps = worker_runs['multihost'][0][0]['synthetic_steps']
  assert sorted(os.listdir(workdir / 'checkpoints')) == [f'step_{steps:08d}']


def test_train_llm_over_two_processes(worker_runs, train_run):
  _, arrays = train_run
  reference = _prefixed(arrays, 'llm_reference')
  for _, mh_arrays in worker_runs['multihost']:
    np.testing.assert_allclose(
      mh_arrays['llm_loss'], arrays['llm_reference_loss'], rtol=RTOL
    )
    _assert_trained_params_close(mh_arrays, 'llm', reference, 3e-3)
  # Process 1 used the tokenizer process 0 saved, so both trained the same
  # model; one metrics line; one checkpoint.
  process_0 = worker_runs['multihost'][0][1]
  for name in reference:
    np.testing.assert_array_equal(
      worker_runs['multihost'][1][1][f'llm/{name}'], process_0[f'llm/{name}']
    )
  workdir = worker_runs['multihost_dir'] / 'train_llm'
  assert (workdir / 'tokenizer' / 'tokenizer.json').exists()
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 1
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['step_00000006']


# ---------------------------------------------------------------------------
# In this process (one device).


def test_make_mesh_sizes():
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {'data': jax.device_count()}
  assert mesh.axis_types == (AxisType.Auto,)
  with pytest.raises(ValueError, match='num_devices must be in 1..'):
    sharding.make_mesh(jax.device_count() + 1)
  with pytest.raises(ValueError, match='num_devices must be in 1..'):
    sharding.make_mesh(0)


def test_check_batch_divisible():
  batch = {'history': np.zeros((14, 3)), 'mask': np.zeros((14,))}
  sharding.check_batch_divisible(batch, 7, 'test')
  with pytest.raises(ValueError, match="leaf 'history' has 14 rows"):
    sharding.check_batch_divisible(batch, 4, 'test')
  with pytest.raises(ValueError, match="leaf 'step' is a scalar"):
    sharding.check_batch_divisible({'step': np.int32(3)}, 1, 'test')


def test_state_shardings_checks_rules_against_shapes():
  mesh = AbstractMesh((8,), ('data',), axis_types=(AxisType.Auto,))
  state = {
    'params': {
      'item_embedding': {'embedding': np.zeros((13, 16))},
      'dense': {'kernel': np.zeros((16, 16))},
    },
  }
  columns = sharding.state_shardings(
    state, mesh, sharding.item_table_rules(layout='columns')
  )
  assert columns['params']['item_embedding']['embedding'].spec == (
    PartitionSpec(None, 'data')
  )
  assert columns['params']['dense']['kernel'].spec == PartitionSpec()
  with pytest.raises(ValueError, match='axis 0 has size 13, not a multiple'):
    sharding.state_shardings(state, mesh, sharding.item_table_rules())
  with pytest.raises(ValueError, match='fewer axes than the spec'):
    sharding.state_shardings(
      state, mesh, [('kernel', PartitionSpec(None, None, 'data'))]
    )
  with pytest.raises(ValueError, match="layout must be 'rows' or 'columns'"):
    sharding.item_table_rules(layout='diagonal')


def test_bytes_per_device_and_abstract_on_one_device():
  mesh = sharding.make_mesh()
  tree = {'a': np.zeros((5, 3), np.float32), 'key': jax.random.key(0)}
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), tree)
  # 5 * 3 float32 + one threefry key (2 uint32 words).
  assert sharding.bytes_per_device(tree, shardings) == 5 * 3 * 4 + 8
  shapes = sharding.abstract(tree)
  assert shapes['a'] == jax.ShapeDtypeStruct((5, 3), np.float32)
  host = sharding.to_host(sharding.shard_global_batch({'a': tree['a']}, mesh))
  np.testing.assert_array_equal(host['a'], tree['a'])


def test_item_table_rules_fall_back_only_when_rows_do_not_split():
  mesh = AbstractMesh((8,), ('data',), axis_types=(AxisType.Auto,))
  lines = []
  rows = sharding.item_table_rules(num_items=46, mesh=mesh, log=lines.append)
  assert rows == ((r'item_embedding/embedding$', PartitionSpec('data', None)),)
  assert lines == []
  # 12,101 items (Beauty): 12,103 rows, 7 left over on 8 devices.
  columns = sharding.item_table_rules(
    num_items=12101, mesh=mesh, log=lines.append
  )
  assert columns == sharding.item_table_rules(layout='columns')
  assert len(lines) == 1 and '12,103 rows' in lines[0]
  # Without the catalogue size the rule is not checked here.
  assert sharding.item_table_rules(mesh=mesh) == rows


def test_pad_rows_repeats_the_first_row_with_mask_zero():
  batch = {
    'history': np.arange(15).reshape(5, 3),
    'target': np.array([7, 8, 9, 10, 11]),
    'mask': np.ones(5, np.float32),
  }
  padded, filler = sharding.pad_rows(batch, 4)
  assert filler == 3
  np.testing.assert_array_equal(
    padded['history'], np.r_[batch['history'], np.tile([[0, 1, 2]], (3, 1))]
  )
  np.testing.assert_array_equal(padded['target'], [7, 8, 9, 10, 11, 7, 7, 7])
  np.testing.assert_array_equal(padded['mask'], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch['mask'], np.ones(5))  # not modified
  same, filler = sharding.pad_rows(batch, 5)
  assert filler == 0 and same is batch
  with pytest.raises(ValueError, match="no 'mask' leaf"):
    sharding.pad_rows({'history': batch['history']}, 4)
  with pytest.raises(ValueError, match="needs the 5 rows of 'mask'"):
    sharding.pad_rows({**batch, 'target': np.zeros(4)}, 4)


def test_training_mesh_and_on_mesh_on_one_device():
  mesh = sharding.make_mesh()
  assert sharding.training_mesh(None) is None
  assert sharding.training_mesh(mesh) is None  # one device, one process
  tree = {'w': np.arange(3.0)}
  placed = sharding.on_mesh(tree, mesh)
  assert isinstance(placed['w'], jax.Array)
  assert sharding.on_mesh(placed, mesh) is placed  # already there
  np.testing.assert_array_equal(sharding.to_host(placed)['w'], tree['w'])


# ---------------------------------------------------------------------------
# experiments/common.py glue.


@pytest.fixture
def parsed_flags():
  # `experiments.common` is imported at the top: flags defined inside a
  # flagsaver block would be removed when it exits.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver():
    yield flags.FLAGS


def test_init_distributed_checks_its_flags(parsed_flags):
  common.init_distributed()  # no --multihost: nothing happens
  assert jax.process_count() == 1
  parsed_flags.coordinator_address = 'localhost:1234'
  with pytest.raises(ValueError, match='need --multihost'):
    common.init_distributed()
  parsed_flags.multihost = True
  parsed_flags.num_processes = 2
  with pytest.raises(ValueError, match='without --process_id'):
    common.init_distributed()


def test_common_mesh_rules_topology_and_primary(parsed_flags):
  assert common.shard_rules() == ()
  parsed_flags.shard_item_table = 'columns'
  assert common.shard_rules() == sharding.item_table_rules(layout='columns')
  parsed_flags.shard_item_table = 'rows'
  abstract_mesh = AbstractMesh((8,), ('data',), axis_types=(AxisType.Auto,))
  fallback = []
  assert common.shard_rules(
    num_items=12101, mesh=abstract_mesh, log=fallback.append
  ) == sharding.item_table_rules(layout='columns')
  assert len(fallback) == 1
  parsed_flags.mesh_devices = 1
  mesh = common.make_mesh()
  lines = []
  text = common.log_topology(mesh, log=lines.append)
  assert lines == [text]
  assert text.startswith('process 0 of 1; 1 local of ')
  assert text.endswith("mesh {'data': 1}")
  assert common.is_primary()


def test_compile_only_reports_and_says_stop(parsed_flags):
  config = registry.get_srm_config('sasrec', 'smoke', batch_size=8)
  model = registry.srm_from_config('sasrec', 31, config)
  tx = state_lib.make_optimizer(config.learning_rate)

  def make_state():
    params = srm_steps.init_params(model, config.max_len, 0)
    return state_lib.create_train_state(model.apply, params, tx, 0)

  batch = {
    'history': np.ones((8, 12), np.int32),
    'targets': np.ones((8, 12), np.int32),
    'mask': np.ones((8, 12), np.float32),
  }
  step_fn = srm_steps.make_train_step(model, config, 31)
  mesh = sharding.make_mesh()
  lines = []
  assert not common.compile_only(
    's', step_fn, mesh, make_state, batch, log=lines.append
  )
  assert lines == []
  parsed_flags.compile_only = True
  assert common.compile_only(
    'sasrec step', step_fn, mesh, make_state, batch, log=lines.append
  )
  assert len(lines) == 1 and lines[0].startswith('sasrec step: compiled')


def test_write_json_on_process_zero(tmp_path):
  path = tmp_path / 'out' / 'results.json'
  assert common.write_json(str(path), {'hr@10': 0.5})
  assert json.loads(path.read_text()) == {'hr@10': 0.5}
