r"""Per-device adaptation: one vmapped, chunked call versus a per-device loop.

Both forms run the same jitted per-device update
(`lsc_jax.collab.adapt.make_device_update`: a few optimizer steps on the
device's recent windows, then scoring its candidate list). The loop calls it
once per device; the vmapped form runs a chunk of devices in one call. On a
CPU the arithmetic per device is the same either way, so the gain comes from
adapting a small subset and removing per-call overhead; on an accelerator
the vmapped form also fills the device.

  python -m benchmarks.adapt_bench                      # SASRec, Beauty
  python -m benchmarks.adapt_bench --srm=gru4rec --devices=512
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from lsc_jax import data
from lsc_jax.collab import adapt
from lsc_jax.models import registry
from lsc_jax.train import srm_steps

_SRM = flags.DEFINE_enum(
  'srm', 'sasrec', ['sasrec', 'gru4rec', 'din'], 'On-device model.'
)
_PRESET = flags.DEFINE_string('preset', 'cpu', 'SRM preset.')
_DEVICES = flags.DEFINE_integer('devices', 256, 'Devices (users) to adapt.')
_CHUNK = flags.DEFINE_integer('chunk_size', 256, 'Devices per vmapped call.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Optimizer steps per device.')
_CANDIDATES = flags.DEFINE_integer(
  'candidates', 50, 'Candidates each device scores.'
)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats (best kept).')


def _best_of(fn, repeats: int) -> float:
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main(argv):
  del argv
  dataset = data.load('beauty', verbose=False)
  split = data.positional_split(dataset)
  config = registry.get_srm_config(_SRM.value, _PRESET.value)
  model = registry.srm_from_config(_SRM.value, dataset.num_items, config)
  params = srm_steps.init_params(model, config.max_len, seed=0)

  test = split.test.select(np.arange(_DEVICES.value))
  rng = np.random.default_rng(0)
  candidates = rng.integers(
    1, dataset.num_items + 1, size=(len(test), _CANDIDATES.value)
  )
  device_data = adapt.build_device_data(
    dataset.sequences,
    split.device_recent,
    test,
    candidates,
    num_items=dataset.num_items,
    max_len=config.max_len,
    num_recent=split.device_window,
    num_negatives=4,
    seed=0,
  )
  adapt_config = adapt.AdaptConfig(
    num_steps=_STEPS.value, chunk_size=_CHUNK.value
  )
  subset = adapt.describe_subset(params, adapt_config.is_adapted)
  print(
    f'{_SRM.value} ({_PRESET.value}): {len(test)} devices, '
    f'{split.device_window} recent windows each, {_STEPS.value} steps, '
    f'{_CANDIDATES.value} candidates'
  )
  print(
    f'adapted subset: {subset["adapted_parameters"]:,} parameters '
    f'(frozen, shared: {subset["frozen_parameters"]:,})'
  )

  # Warm up both (compiles), then time.
  vmapped = adapt.adapt_and_score(model, params, device_data, adapt_config)
  looped = adapt.adapt_and_score_loop(model, params, device_data, adapt_config)
  diff = float(np.max(np.abs(vmapped.scores - looped)))
  t_vmap = _best_of(
    lambda: adapt.adapt_and_score(model, params, device_data, adapt_config),
    _REPEATS.value,
  )
  # The loop: the same per-device update, jitted and compiled once.
  adapted, frozen = adapt.partition_params(params, adapt_config.is_adapted)
  jitted = jax.jit(adapt.make_device_update(model, adapt_config))
  fields = (
    device_data.history,
    device_data.candidates,
    device_data.mask,
    device_data.eval_history,
    device_data.eval_candidates,
  )
  jax.block_until_ready(jitted(adapted, frozen, *(f[0] for f in fields)))

  def loop_precompiled():
    for i in range(len(device_data)):
      jax.block_until_ready(jitted(adapted, frozen, *(f[i] for f in fields)))

  t_loop_warm = _best_of(loop_precompiled, _REPEATS.value)

  n = len(device_data)
  print(f'max |vmapped - loop| score difference: {diff:.2e}')
  print(
    f'vmapped, chunked:            {n / t_vmap:9.1f} devices/s '
    f'({t_vmap:.2f} s, compiles included: {vmapped.num_compiles})'
  )
  print(
    f'python loop (compiled once): {n / t_loop_warm:9.1f} devices/s '
    f'({t_loop_warm:.2f} s)'
  )
  print(
    f'speed-up of vmapped over the compiled loop: {t_loop_warm / t_vmap:.1f}x'
  )
  print(
    f"memory of one device's copy: {vmapped.adapted_bytes / 1e3:.1f} kB "
    f'parameters, {vmapped.state_bytes / 1e3:.1f} kB with optimizer '
    f'state ({adapt_config.optimizer}); a chunk of {_CHUNK.value} '
    f'holds {_CHUNK.value * vmapped.state_bytes / 1e6:.1f} MB of copies'
  )
  everything = adapt.AdaptConfig(
    num_steps=_STEPS.value,
    chunk_size=_CHUNK.value,
    is_adapted=lambda path: True,
  )
  full = adapt.describe_subset(params, everything.is_adapted)
  print(
    f'for comparison, adapting every parameter would copy '
    f'{full["adapted_bytes"] / 1e6:.2f} MB per device (before '
    'optimizer state)'
  )


if __name__ == '__main__':
  app.run(main)
