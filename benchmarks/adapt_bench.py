r"""Per-device adaptation: one vmapped, chunked call versus a per-device loop.

Both forms run the same jitted per-device update
(`lsc_jax.collab.adapt.make_device_update`: a few optimizer steps on the
device's recent windows, then scoring its candidate list). The loop calls it
once per device; the vmapped form runs a chunk of devices in one call. On a
CPU the arithmetic per device is the same either way, so the gain comes from
adapting a small subset and removing per-call overhead; on an accelerator
the vmapped form also fills the device.

For each SRM and each adapted subset (`adapt.SUBSETS`) it prints devices/s
of both forms measured side by side, their ratio, the bytes of one device's
copy (parameters and optimizer state) and the mean recent-window loss before
-> after adaptation (devices with recent windows), so a reader sees that
the subset still learns.

  python -m benchmarks.adapt_bench                       # 3 SRMs x subsets
  python -m benchmarks.adapt_bench --srms=sasrec --subsets=output_head
  # Start from trained parameters (e.g. the main job's re-trained SRM; the
  # data must be prepared as that job did: same dataset, reindex, seed):
  python -m benchmarks.adapt_bench --srms=sasrec \
    --params_dir=workdir/lsc4rec_cpu/srm_retrained/params
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from lsc_jax import checkpoint, data
from lsc_jax.collab import adapt
from lsc_jax.models import registry, srm
from lsc_jax.train import srm_steps

_SRMS = flags.DEFINE_list(
  'srms', ['sasrec', 'gru4rec', 'din'], 'On-device models to measure.'
)
_SUBSETS = flags.DEFINE_list(
  'subsets',
  ['output_head', 'all_but_item_table'],
  f'Adapted subsets, names in {sorted(adapt.SUBSETS)}.',
)
_PRESET = flags.DEFINE_string('preset', 'cpu', 'SRM preset.')
_DEVICES = flags.DEFINE_integer('devices', 256, 'Devices (users) to adapt.')
_CHUNK = flags.DEFINE_integer(
  'chunk_size', adapt.AdaptConfig.chunk_size, 'Devices per vmapped call.'
)
_STEPS = flags.DEFINE_integer('steps', 5, 'Optimizer steps per device.')
_LEARNING_RATE = flags.DEFINE_float(
  'learning_rate', adapt.AdaptConfig.learning_rate, 'Per-device step size.'
)
_CANDIDATES = flags.DEFINE_integer(
  'candidates', 50, 'Candidates each device scores.'
)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats (best kept).')
_PARAMS_DIR = flags.DEFINE_string(
  'params_dir',
  None,
  'Checkpoint directory of trained SRM parameters to start from (one SRM '
  'only); default: freshly initialised parameters (seed 0).',
)
_REINDEX = flags.DEFINE_string(
  'reindex', 'random', "Item re-indexing of the data ('random' or 'keep')."
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the data re-indexing.')


def _best_of(fn, repeats: int) -> float:
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _load_average() -> str:
  return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def _measure(model, params, device_data, config: adapt.AdaptConfig):
  """Times both forms of one SRM and subset; returns a result row."""
  # Warm up both (compiles), then time them one after the other.
  vmapped = adapt.adapt_and_score(model, params, device_data, config)
  looped = adapt.adapt_and_score_loop(model, params, device_data, config)
  t_vmap = _best_of(
    lambda: adapt.adapt_and_score(model, params, device_data, config),
    _REPEATS.value,
  )
  t_loop = _best_of(
    lambda: adapt.adapt_and_score_loop(model, params, device_data, config),
    _REPEATS.value,
  )
  adapted, _ = adapt.split_params(model, params, config)
  trunk_once = adapt.runs_trunk_once(model, adapted)
  # Devices whose trunk runs on one history (causal SRMs, prefix windows).
  one_history = 0
  if trunk_once and isinstance(model, srm.SequenceScoring):
    one_history = int(adapt.prefix_windows(device_data).sum())
  has_recent = device_data.mask.sum(axis=1) > 0
  n = len(device_data)
  return {
    'adapted_parameters': int(sum(x.size for x in adapted.values())),
    'trunk_once': trunk_once,
    'one_history': one_history,
    'state_bytes': vmapped.state_bytes,
    'vmapped': n / t_vmap,
    'loop': n / t_loop,
    'ratio': t_loop / t_vmap,
    'loss_before': float(vmapped.first_loss[has_recent].mean()),
    'loss_after': float(vmapped.last_loss[has_recent].mean()),
    'max_difference': float(np.max(np.abs(vmapped.scores - looped))),
  }


def _trunk_text(row) -> str:
  if not row['trunk_once']:
    return 'no'
  return f'yes ({row["one_history"]} devices)'


def main(argv):
  del argv
  unknown = sorted(set(_SUBSETS.value) - set(adapt.SUBSETS))
  if unknown:
    raise app.UsageError(
      f'--subsets: unknown {unknown}; expected {sorted(adapt.SUBSETS)}'
    )
  if _PARAMS_DIR.value and len(_SRMS.value) != 1:
    raise app.UsageError('--params_dir needs exactly one model in --srms')

  print(f'load average at start (1, 5, 15 min): {_load_average()}')
  dataset = data.load(
    'beauty', reindex=_REINDEX.value, seed=_SEED.value, verbose=False
  )
  split = data.positional_split(dataset)
  test = split.test.select(np.arange(_DEVICES.value))
  rng = np.random.default_rng(0)
  candidates = rng.integers(
    1, dataset.num_items + 1, size=(len(test), _CANDIDATES.value)
  )
  print(
    f'{len(test)} devices, {split.device_window} recent windows each, '
    f'{_STEPS.value} SGD steps (learning rate {_LEARNING_RATE.value}), '
    f'{_CANDIDATES.value} candidates, chunks of {_CHUNK.value}, '
    f'preset {_PRESET.value}'
  )

  rows = []
  for name in _SRMS.value:
    srm_config = registry.get_srm_config(name, _PRESET.value)
    model = registry.srm_from_config(name, dataset.num_items, srm_config)
    params = srm_steps.init_params(model, srm_config.max_len, seed=0)
    if _PARAMS_DIR.value:
      restored = checkpoint.restore_latest(_PARAMS_DIR.value, params)
      if restored is None:
        raise app.UsageError(
          f'--params_dir: no checkpoint in {_PARAMS_DIR.value}'
        )
      params = restored[0]
    device_data = adapt.build_device_data(
      dataset.sequences,
      split.device_recent,
      test,
      candidates,
      num_items=dataset.num_items,
      max_len=srm_config.max_len,
      num_recent=split.device_window,
      num_negatives=4,
      seed=0,
    )
    for subset in _SUBSETS.value:
      config = adapt.AdaptConfig(
        num_steps=_STEPS.value,
        learning_rate=_LEARNING_RATE.value,
        chunk_size=_CHUNK.value,
        subset=subset,
      )
      row = _measure(model, params, device_data, config)
      row.update(srm=name, subset=subset)
      rows.append(row)
      print(
        f'{name:8s} {subset:19s} vmapped {row["vmapped"]:8.1f} devices/s, '
        f'loop {row["loop"]:8.1f} devices/s, {row["ratio"]:5.1f}x; '
        f'load {_load_average()}',
        flush=True,
      )
    full = adapt.describe_subset(params, lambda path: True)
    print(
      f'{name}: adapting every parameter would copy '
      f'{full["adapted_bytes"] / 1e6:.2f} MB per device (before optimizer '
      'state)'
    )

  print()
  print(
    '| SRM | subset | adapted parameters | kB per device copy | trunk once '
    '(one history) | vmapped devices/s | loop devices/s | vmapped / loop | '
    'recent-window loss before -> after | max abs score difference |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|')
  for row in rows:
    print(
      f'| {row["srm"]} | {row["subset"]} | {row["adapted_parameters"]:,} | '
      f'{row["state_bytes"] / 1e3:.1f} | {_trunk_text(row)} | '
      f'{row["vmapped"]:.1f} | {row["loop"]:.1f} | {row["ratio"]:.1f}x | '
      f'{row["loss_before"]:.4f} -> {row["loss_after"]:.4f} | '
      f'{row["max_difference"]:.1e} |'
    )
  print()
  print(
    'kB per device copy: adapted parameters plus SGD state. Trunk once: '
    'the frozen trunk runs once per device, not once per step; one '
    'history: devices whose trunk reads only their evaluation history. '
    'Loss: mean BCE over devices with recent windows, before the first '
    'step and after the last.'
  )
  print(f'load average at end (1, 5, 15 min): {_load_average()}')


if __name__ == '__main__':
  app.run(main)
