r"""Data-parallel SRM training throughput on 1, 2, 4 and 8 devices.

SASRec with the `cpu` preset's sizes (embedding 64, history 50, two blocks,
full softmax over Beauty's 12,101 items, batch 128) trains for a fixed
number of steps through `lsc_jax.sharding.shard_train_step` on a mesh of
the first N devices, for each N, side by side in one run, and one table
shows the rates. Batches are random item ids of Beauty's catalogue size at
the full history width (one compiled shape; the rate of a step does not
depend on which ids it sees). Nothing here is a test.

On a CPU each N runs in its own process with XLA splitting the CPU into 8
host devices (the flag must be set before jax starts). Host devices share
the machine's cores, so on a 2-core machine the rate cannot grow with N:
the table then measures the overhead of partitioning and of the gradient
all-reduce, not a speed-up. On accelerators (--platform=gpu or tpu) the
real devices are used and counts above the device count are skipped.

  python -m benchmarks.sharding_bench
  python -m benchmarks.sharding_bench --steps=5 --device_counts=1,8
  python -m benchmarks.sharding_bench --platform=gpu --device_counts=1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from lsc_jax import sharding
from lsc_jax.models import get_srm_config, srm_from_config
from lsc_jax.train import srm_steps
from lsc_jax.train import state as state_lib

_DEVICE_COUNTS = flags.DEFINE_list(
  'device_counts', ['1', '2', '4', '8'], 'Mesh sizes to measure.'
)
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per mesh size.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps after compiling.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
_PLATFORM = flags.DEFINE_enum(
  'platform', 'cpu', ['cpu', 'gpu', 'tpu'], 'Where to run.'
)
_HOST_DEVICES = flags.DEFINE_integer(
  'host_devices', 8, 'CPU host devices XLA splits the machine into.'
)
_CHILD_DEVICES = flags.DEFINE_integer(
  'child_devices', None, 'Internal: measure one mesh size in this process.'
)

NUM_ITEMS = 12101  # Beauty's catalogue
RESULT_PREFIX = 'SHARDING_BENCH_RESULT '


def measure(num_devices: int) -> dict:
  """Trains `steps` steps on a mesh of the first `num_devices` devices."""
  if num_devices > jax.device_count():
    return {
      'devices': num_devices,
      'skipped': True,
      'available': jax.device_count(),
    }
  config = get_srm_config('sasrec', 'cpu', batch_size=_BATCH_SIZE.value)
  model = srm_from_config('sasrec', NUM_ITEMS, config)
  width = config.max_len
  rng = np.random.default_rng(0)

  def batch(step):
    del step  # every batch has the same shape; fresh ids each step
    shape = (config.batch_size, width)
    return {
      'history': rng.integers(1, NUM_ITEMS + 1, shape).astype(np.int32),
      'targets': rng.integers(1, NUM_ITEMS + 1, shape).astype(np.int32),
      'mask': np.ones(shape, np.float32),
    }

  params = srm_steps.init_params(model, width, seed=0)
  tx = state_lib.make_optimizer(config.learning_rate)
  state = state_lib.create_train_state(model.apply, params, tx, seed=0)
  mesh = sharding.make_mesh(num_devices)
  batches = [batch(i) for i in range(_WARMUP.value + _STEPS.value + 1)]
  step = sharding.shard_train_step(
    srm_steps.make_train_step(model, config, NUM_ITEMS),
    mesh,
    state,
    batches[0],
    log=lambda _: None,
  )
  state = step.place_state(state)

  start = time.perf_counter()
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics['loss'])
  first_call = time.perf_counter() - start
  for b in batches[1 : 1 + _WARMUP.value]:
    state, metrics = step(state, b)
  jax.block_until_ready(metrics['loss'])

  # Batches are placed inside the timed loop: host-to-device transfer is
  # part of a real step.
  start = time.perf_counter()
  for b in batches[1 + _WARMUP.value :]:
    state, metrics = step(state, b)
  jax.block_until_ready((state, metrics['loss']))
  seconds = time.perf_counter() - start
  targets = _STEPS.value * config.batch_size * width
  return {
    'devices': num_devices,
    'skipped': False,
    'platform': jax.devices()[0].platform,
    'per_device_batch': config.batch_size // num_devices,
    'step_ms': 1000 * seconds / _STEPS.value,
    'sequences_per_second': _STEPS.value * config.batch_size / seconds,
    'targets_per_second': targets / seconds,
    'first_call_seconds': first_call,
  }


def run_child(num_devices: int) -> dict:
  """Measures one mesh size in a fresh process and returns its result."""
  env = dict(os.environ)
  if _PLATFORM.value == 'cpu':
    env['JAX_PLATFORMS'] = 'cpu'
    env['XLA_FLAGS'] = (
      f'{env.get("XLA_FLAGS", "")} '
      f'--xla_force_host_platform_device_count={_HOST_DEVICES.value}'
    ).strip()
  else:
    env['JAX_PLATFORMS'] = 'cuda' if _PLATFORM.value == 'gpu' else 'tpu'
  command = [
    sys.executable,
    '-m',
    'benchmarks.sharding_bench',
    f'--child_devices={num_devices}',
    f'--steps={_STEPS.value}',
    f'--warmup={_WARMUP.value}',
    f'--batch_size={_BATCH_SIZE.value}',
  ]
  done = subprocess.run(command, env=env, capture_output=True, text=True)
  if done.returncode != 0:
    raise RuntimeError(
      f'mesh size {num_devices} failed (exit {done.returncode}):\n'
      f'{done.stderr[-3000:]}'
    )
  for line in done.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX) :])
  raise RuntimeError(f'mesh size {num_devices} printed no result')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CHILD_DEVICES.value is not None:
    print(RESULT_PREFIX + json.dumps(measure(_CHILD_DEVICES.value)))
    return
  counts = [int(c) for c in _DEVICE_COUNTS.value]
  if _BATCH_SIZE.value % max(counts):
    raise app.UsageError(
      f'--batch_size={_BATCH_SIZE.value} must split over every mesh size '
      f'{counts}'
    )
  print(
    f'SASRec (cpu preset, {NUM_ITEMS:,} items, full softmax) data-parallel '
    f'training, global batch {_BATCH_SIZE.value} x 50, {_STEPS.value} '
    f'timed steps per mesh size, platform {_PLATFORM.value}'
  )
  results = [run_child(n) for n in counts]
  measured = [r for r in results if not r['skipped']]
  base = measured[0]['targets_per_second'] if measured else 1.0
  print(
    f'{"devices":>7} {"batch/device":>12} {"step ms":>9} '
    f'{"sequences/s":>12} {"targets/s":>11} {"vs first":>8} '
    f'{"1st call s":>10}'
  )
  for r in results:
    if r['skipped']:
      print(f'{r["devices"]:>7}  skipped: only {r["available"]} devices')
      continue
    print(
      f'{r["devices"]:>7} {r["per_device_batch"]:>12} {r["step_ms"]:>9.1f} '
      f'{r["sequences_per_second"]:>12,.0f} {r["targets_per_second"]:>11,.0f}'
      f' {r["targets_per_second"] / base:>7.2f}x '
      f'{r["first_call_seconds"]:>10.1f}'
    )
  if _PLATFORM.value == 'cpu':
    print(
      f'(CPU: {_HOST_DEVICES.value} host devices share {os.cpu_count()} '
      'cores; more devices cannot raise the rate here, the ratios show the '
      'cost of partitioning and of the gradient all-reduce)'
    )


if __name__ == '__main__':
  app.run(main)
