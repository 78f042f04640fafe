"""Tests of `lsc_jax.sharding`: meshes, data-parallel steps, compile checks.

The pytest process has started jax with one CPU device, so the multi-device
checks run in fresh processes (`tests/sharding_worker.py`) with XLA forced
to split the CPU into host devices: one process with 8 devices, and a pair
of processes with 4 devices each joined by `jax.distributed` on localhost
(a two-host run in miniature). Each worker computes the single-device
reference and the sharded result; the tests here compare them.

Why sharded and single-device results are close but not bit-identical:
the data-parallel gradient is a sum of per-device partial sums, a
different order of floating-point additions than one device's sum. The
tolerances below (rtol 1e-5, atol 1e-6) are a few float32 roundings.
"""

import json
import os
import socket
import subprocess
import sys
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
LEARNING_RATE = 3e-3  # the SASRec smoke preset's
NUM_STEPS = 4


def _env(num_devices: int) -> dict:
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = (
    f'--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}'
  )
  return env


def _wait(name, process):
  try:
    _, stderr = process.communicate(timeout=300)
  except subprocess.TimeoutExpired:
    process.kill()
    process.communicate()
    pytest.fail(f'{name} did not finish within 300 s')
  if process.returncode != 0:
    pytest.fail(f'{name} exited with {process.returncode}:\n{stderr[-4000:]}')


def _load(out, stem):
  with open(out / f'{stem}.json') as f:
    return json.load(f), dict(np.load(out / f'{stem}.npz'))


@pytest.fixture(scope='module')
def worker_runs(tmp_path_factory):
  """Runs the 8-device worker and the two-process pair side by side."""
  out = tmp_path_factory.mktemp('sharding')
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]

  def start(args, num_devices):
    return subprocess.Popen(
      [sys.executable, str(WORKER), *args],
      env=_env(num_devices),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )

  processes = {
    'mesh worker': start(['mesh', str(out)], 8),
    **{
      f'multihost process {pid}': start(
        ['multihost', str(out), str(pid), str(port)], 4
      )
      for pid in range(2)
    },
  }
  try:
    for name, process in processes.items():
      _wait(name, process)
  finally:
    for process in processes.values():
      if process.poll() is None:
        process.kill()
        process.communicate()
  return {
    'mesh': _load(out, 'mesh'),
    'multihost': [_load(out, f'multihost_{pid}') for pid in range(2)],
  }


@pytest.fixture(scope='module')
def mesh_run(worker_runs):
  return worker_runs['mesh']


@pytest.fixture(scope='module')
def multihost_run(worker_runs):
  return worker_runs['multihost']


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
