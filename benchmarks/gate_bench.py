"""Kendall tau-b gate: jitted JAX versus a loop of scipy.stats.kendalltau.

Builds one test-time sized problem (22,363 users x 50 candidates, the size
of the Beauty test split with K = 50), with ties in both score lists and
padded slots, and times three ways of computing tau-b per user in one run:

- scipy: `scipy.stats.kendalltau` (variant 'b') per user over the valid
  slots, a Python loop;
- jax gate: `lsc_jax.collab.gate.kendall_tau` (jitted, column-blocked);
- jax all-pairs: a plain `[batch, K, K]` jitted version, for reference.

It checks that the values agree (max abs difference; rows where scipy is
undefined must hold the gate's documented 1.0) and prints each time and its
ratio to scipy. Rounds alternate the methods so that load from other
processes hits all of them alike.

  python -m benchmarks.gate_bench [--users 22363] [--candidates 50]
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from absl import app, flags

from lsc_jax.collab import gate

_USERS = flags.DEFINE_integer('users', 22363, 'number of users')
_CANDIDATES = flags.DEFINE_integer('candidates', 50, 'candidates per user')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'timed rounds (scipy runs once)')
_SEED = flags.DEFINE_integer('seed', 0, 'random seed for the scores')


def make_problem(users, candidates, seed):
  """LLM beam-like scores, SRM logits, some ties, some padded slots."""
  rng = np.random.default_rng(seed)
  llm = -np.sort(rng.exponential(size=(users, candidates)), axis=1)
  llm = np.round(llm, 1).astype(np.float32)  # Rounding makes ties.
  srm = rng.normal(size=(users, candidates)).astype(np.float32)
  srm[:, ::5] = np.round(srm[:, ::5])  # More ties in the SRM list.
  lengths = np.where(
    rng.random(users) < 0.9, candidates, rng.integers(0, candidates, users)
  )
  valid = np.arange(candidates)[None, :] < lengths[:, None]
  return llm, srm, valid


def scipy_loop(llm, srm, valid):
  out = np.empty(llm.shape[0])
  for row in range(llm.shape[0]):
    keep = valid[row]
    if keep.sum() < 2:
      out[row] = np.nan
      continue
    out[row] = scipy.stats.kendalltau(llm[row, keep], srm[row, keep]).statistic
  return out


@jax.jit
def all_pairs(x, y, valid):
  """The plain all-pairs tau-b: builds [batch, K, K] pair tensors."""
  sx = jnp.sign(x[:, :, None] - x[:, None, :])
  sy = jnp.sign(y[:, :, None] - y[:, None, :])
  pair = valid[:, :, None] & valid[:, None, :]
  score = jnp.sum(jnp.where(pair, sx * sy, 0), axis=(1, 2)) / 2
  x_tied = jnp.sum(pair & (sx == 0), axis=(1, 2))
  y_tied = jnp.sum(pair & (sy == 0), axis=(1, 2))
  n = jnp.sum(valid, axis=1)
  pairs = n * (n - 1) / 2
  denominator = (pairs - (x_tied - n) / 2) * (pairs - (y_tied - n) / 2)
  return jnp.where(denominator > 0, score / jnp.sqrt(denominator), 1.0)


def best_time(fn, *args, repeats=5):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  users, candidates = _USERS.value, _CANDIDATES.value
  llm, srm, valid = make_problem(users, candidates, _SEED.value)
  print(
    f'{users} users x {candidates} candidates, '
    f'{int((~valid).sum())} padded slots, '
    f'{jax.devices()[0].platform} backend, jax {jax.__version__}'
  )
  inputs = tuple(jnp.asarray(a) for a in (llm, srm, valid))

  start = time.perf_counter()
  ours = np.asarray(gate.kendall_tau(*inputs))
  print(f'jax gate compile + first run: {time.perf_counter() - start:.2f} s')
  start = time.perf_counter()
  pairs = np.asarray(all_pairs(*inputs))
  print(f'all-pairs compile + first run: {time.perf_counter() - start:.2f} s')

  scipy_times, gate_times, pair_times = [], [], []
  for round_index in range(_ROUNDS.value):
    start = time.perf_counter()
    reference = scipy_loop(llm, srm, valid)
    scipy_times.append(time.perf_counter() - start)
    gate_times.append(best_time(gate.kendall_tau, *inputs))
    pair_times.append(best_time(all_pairs, *inputs))
    print(
      f'round {round_index}: scipy {scipy_times[-1]:.3f} s, '
      f'jax gate {gate_times[-1] * 1e3:.1f} ms '
      f'({scipy_times[-1] / gate_times[-1]:.0f}x), '
      f'all-pairs {pair_times[-1] * 1e3:.1f} ms '
      f'({scipy_times[-1] / pair_times[-1]:.0f}x)'
    )

  undefined = np.isnan(reference)
  diff_gate = np.abs(ours[~undefined] - reference[~undefined]).max()
  diff_pairs = np.abs(pairs[~undefined] - reference[~undefined]).max()
  print(
    f'max |jax gate - scipy| = {diff_gate:.2e}, '
    f'max |all-pairs - scipy| = {diff_pairs:.2e} '
    f'over {int((~undefined).sum())} users'
  )
  print(
    f'{int(undefined.sum())} users undefined in scipy (NaN); gate gives '
    f'{sorted(set(ours[undefined].tolist()))}'
  )
  scipy_median = statistics.median(scipy_times)
  print(
    f'median: scipy {scipy_median:.3f} s | jax gate '
    f'{statistics.median(gate_times) * 1e3:.1f} ms, '
    f'{scipy_median / statistics.median(gate_times):.0f}x | all-pairs '
    f'{statistics.median(pair_times) * 1e3:.1f} ms, '
    f'{scipy_median / statistics.median(pair_times):.0f}x'
  )
  if diff_gate > 1e-5 or not np.all(ours[undefined] == 1.0):
    raise SystemExit('jax gate disagrees with scipy')


if __name__ == '__main__':
  app.run(main)
