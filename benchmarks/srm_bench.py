r"""On-device model (SRM) benchmark: rerank cost, throughput, quality.

Prints three tables; nothing here is a test.

1. Rerank cost. Scoring 50 candidates per user by encoding each history once
   (this codebase) against re-encoding it once per candidate (the official
   LSC4Rec code repeats every history K times), timed side by side on the
   same batch; the ratio is the speed-up.
2. Training throughput: samples/s of one jitted train step per SRM on its
   preset's widest batch, model FLOPs per step from XLA's cost analysis, and
   the share of this CPU's peak measured in the same run by a large matmul.
3. Quality (with --quality): each SRM trained on built-in Beauty with its
   preset, early-stopped on validation, full ranking of every test user, for
   each --reindex mode. Published full-ranking SASRec on Beauty: HR@10 0.0605,
   NDCG@10 0.0318.

  python -m benchmarks.srm_bench                    # tables 1 and 2
  python -m benchmarks.srm_bench --quality --models=sasrec --reindex=random
  python -m benchmarks.srm_bench --nospeed --quality     # table 3 only
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lsc_jax import data
from lsc_jax.models import SRM_NAMES, get_srm_config, srm_from_config
from lsc_jax.train import srm_steps
from lsc_jax.train import state as state_lib

_MODELS = flags.DEFINE_list('models', list(SRM_NAMES), 'SRMs to measure.')
_PRESET = flags.DEFINE_string('preset', 'cpu', 'SRM preset.')
_USERS = flags.DEFINE_integer('users', 256, 'Users per rerank batch.')
_CANDIDATES = flags.DEFINE_integer('candidates', 50, 'Candidates per user.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats (median).')
_SPEED = flags.DEFINE_bool('speed', True, 'Print tables 1 and 2.')
_QUALITY = flags.DEFINE_bool('quality', False, 'Print table 3 (trains).')
_REINDEX = flags.DEFINE_list('reindex', ['random', 'keep'], 'Id mappings.')
_EPOCHS = flags.DEFINE_integer('epochs', None, 'Override preset epochs.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed.')

PUBLISHED_SASREC = {'hr@10': 0.0605, 'ndcg@10': 0.0318}


def _median_seconds(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def peak_flops(repeats: int) -> float:
  """FLOP/s of a large float32 matmul on this machine, now."""
  size = 2048
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  return 2 * size**3 / _median_seconds(matmul, a, b, repeats=repeats)


def _random_histories(rng, users, max_len, num_items):
  """Left-padded histories with Beauty-like lengths (median about 6)."""
  lengths = np.minimum(rng.geometric(0.12, size=users) + 2, max_len)
  history = np.zeros((users, max_len), np.int32)
  for r, n in enumerate(lengths):
    history[r, max_len - n :] = rng.integers(1, num_items + 1, size=n)
  return history


def rerank_table(num_items: int) -> None:
  """Table 1: encode once vs re-encode per candidate."""
  rng = np.random.default_rng(0)
  users, k = _USERS.value, _CANDIDATES.value
  print(
    f'\n1. Rerank {k} candidates for {users} users ({_PRESET.value} preset, '
    f'{num_items:,} items), median of {_REPEATS.value}'
  )
  print(
    f'   {"model":<8} {"once (ms)":>10} {"per cand. (ms)":>15} {"speed-up":>9}'
    f' {"max |diff|":>11}'
  )
  for name in _MODELS.value:
    config = get_srm_config(name, _PRESET.value)
    model = srm_from_config(name, num_items, config)
    params = srm_steps.init_params(model, config.max_len, 0)
    history = jnp.asarray(
      _random_histories(rng, users, config.max_len, num_items)
    )
    candidates = jnp.asarray(
      rng.integers(1, num_items + 1, size=(users, k)), jnp.int32
    )

    once = jax.jit(lambda p, h, c, m=model: m.apply(p, h, c))

    def per_candidate(p, h, c, m=model):
      # The official code's way: one (history, candidate) row per pair.
      rows = jnp.repeat(h, c.shape[1], axis=0)
      return m.apply(p, rows, c.reshape(-1, 1)).reshape(c.shape)

    per_candidate = jax.jit(per_candidate)
    diff = float(
      jnp.abs(
        once(params, history, candidates)
        - per_candidate(params, history, candidates)
      ).max()
    )
    # Interleave the two so both see the same machine load.
    t_once, t_per = [], []
    for _ in range(_REPEATS.value):
      t_once.append(
        _median_seconds(once, params, history, candidates, repeats=1)
      )
      t_per.append(
        _median_seconds(per_candidate, params, history, candidates, repeats=1)
      )
    a, b = np.median(t_once), np.median(t_per)
    print(
      f'   {name:<8} {1e3 * a:10.2f} {1e3 * b:15.2f} {b / a:8.1f}x {diff:11.2e}'
    )


def _train_batch(name, config, num_items, rng):
  batch_size, width = config.batch_size, config.max_len
  history = _random_histories(rng, batch_size, width, num_items)
  if config.objective == 'next_item':
    targets = np.where(
      history > 0, rng.integers(1, num_items + 1, size=history.shape), 0
    ).astype(np.int32)
    batch = {
      'history': history,
      'targets': targets,
      'mask': (targets > 0).astype(np.float32),
    }
    if config.loss != 'full_ce':
      batch['negatives'] = rng.integers(
        1, num_items + 1, size=(*history.shape, config.num_negatives)
      ).astype(np.int32)
    samples = int(batch['mask'].sum())
  else:
    batch = {
      'history': history,
      'target': rng.integers(1, num_items + 1, size=batch_size).astype(
        np.int32
      ),
      'mask': np.ones(batch_size, np.float32),
    }
    if config.loss != 'full_ce':
      batch['negatives'] = rng.integers(
        1, num_items + 1, size=(batch_size, config.num_negatives)
      ).astype(np.int32)
    samples = batch_size
  return batch, samples


def throughput_table(num_items: int) -> None:
  """Table 2: train-step samples/s and share of peak FLOP/s."""
  rng = np.random.default_rng(1)
  peak = peak_flops(_REPEATS.value)
  print(
    f'\n2. Train step on the widest bucket ({_PRESET.value} preset); peak of'
    f' a 2048^3 float32 matmul here: {peak / 1e9:.1f} GFLOP/s'
  )
  print(
    f'   {"model":<8} {"batch":>8} {"objective/loss":>26} {"ms/step":>8} '
    f'{"samples/s":>10} {"GFLOP/step":>11} {"GFLOP/s":>8} {"of peak":>8}'
  )
  for name in _MODELS.value:
    config = get_srm_config(name, _PRESET.value)
    model = srm_from_config(name, num_items, config)
    params = srm_steps.init_params(model, config.max_len, 0)
    tx = state_lib.make_optimizer(config.learning_rate)
    state = state_lib.create_train_state(model.apply, params, tx, 0)
    batch, samples = _train_batch(name, config, num_items, rng)
    step = jax.jit(srm_steps.make_train_step(model, config, num_items))
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    flops = float(cost.get('flops', float('nan')))

    def run(s, b, c=compiled):
      return c(s, b)[1]['loss']

    seconds = _median_seconds(run, state, batch, repeats=_REPEATS.value)
    shape = 'x'.join(str(d) for d in batch['history'].shape)
    loss = f'{config.objective}/{config.loss}'
    print(
      f'   {name:<8} {shape:>8} {loss:>26} {1e3 * seconds:8.1f} '
      f'{samples / seconds:10,.0f} {flops / 1e9:11.2f} '
      f'{flops / seconds / 1e9:8.1f} {flops / seconds / peak:8.1%}'
    )


def quality_table() -> None:
  """Table 3: full-ranking test metrics on built-in Beauty."""
  keys = [f'{m}@{k}' for m in ('hr', 'ndcg') for k in (5, 10, 20)]
  rows = []
  for reindex in _REINDEX.value:
    dataset = data.load(
      'beauty', reindex=reindex, seed=_SEED.value, verbose=False
    )
    split = data.positional_split(dataset, gap=2)
    for name in _MODELS.value:
      overrides = {} if _EPOCHS.value is None else {'epochs': _EPOCHS.value}
      config = get_srm_config(name, _PRESET.value, **overrides)
      run = srm_steps.train_srm(
        name,
        sequences=dataset.sequences,
        num_items=dataset.num_items,
        train_windows=split.srm_train,
        valid_windows=split.valid,
        test_windows=split.test,
        config=config,
        seed=_SEED.value,
        log=logging.info,
      )
      rows.append((name, reindex, run))
      print(
        f'   done: {name} ({reindex}) in {run.train_seconds / 60:.1f} min, '
        f'test hr@10 {run.test["hr@10"]:.4f}',
        flush=True,
      )
  print(
    f'\n3. Built-in Beauty, full ranking of every test user '
    f'({_PRESET.value} preset)'
  )
  print(
    f'   {"model":<8} {"ids":<7} {"epochs":>6} {"min":>5} '
    + ' '.join(f'{k:>8}' for k in keys)
  )
  for name, reindex, run in rows:
    print(
      f'   {name:<8} {reindex:<7} {run.loop.best_epoch:>3}/'
      f'{len(run.loop.history):<2} {run.train_seconds / 60:5.1f} '
      + ' '.join(f'{run.test[k]:8.4f}' for k in keys)
    )
  print(
    f'   published SASRec: hr@10 {PUBLISHED_SASREC["hr@10"]}, ndcg@10 '
    f'{PUBLISHED_SASREC["ndcg@10"]}'
  )
  for name, reindex, run in rows:
    if name == 'sasrec':
      met = all(run.test[k] >= v for k, v in PUBLISHED_SASREC.items())
      print(
        f'   sasrec ({reindex}): target hr@10 >= 0.060 and ndcg@10 >= '
        f'0.030 {"met" if met else "MISSED"}'
      )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  unknown = set(_MODELS.value) - set(SRM_NAMES)
  if unknown:
    raise app.UsageError(f'unknown models {sorted(unknown)}')
  num_items = data.load('beauty', verbose=False).num_items
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}')
  if _SPEED.value:
    rerank_table(num_items)
    throughput_table(num_items)
  if _QUALITY.value:
    quality_table()


if __name__ == '__main__':
  app.run(main)
