"""Tests of SRM losses, batches, steps, evaluation and a short real run."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit, logsumexp

from lsc_jax import data
from lsc_jax.models import get_srm_config, make_srm
from lsc_jax.train import loop, losses, srm_steps
from lsc_jax.train import state as state_lib

# ---------------------------------------------------------------------------
# Losses against numpy / scipy.


def test_bce_with_negatives_matches_numpy():
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(3, 5)).astype(np.float32)
  neg = rng.normal(size=(3, 5, 7)).astype(np.float32)
  mask = (rng.random((3, 5)) < 0.6).astype(np.float32)
  mask[0, 0] = 1.0
  per_target = (-np.log(expit(pos)) - np.log(1 - expit(neg)).sum(-1)) / 8.0
  expected = (per_target * mask).sum() / mask.sum()
  got = losses.bce_with_negatives(pos, neg, mask)
  np.testing.assert_allclose(got, expected, rtol=1e-5)

  # A negative equal to its target is left out of its row.
  hits = np.zeros(neg.shape, bool)
  hits[0, 0, :3] = True
  row = -np.log(expit(pos[0, 0])) - np.log(1 - expit(neg[0, 0, 3:])).sum()
  per_target[0, 0] = row / 5.0
  expected = (per_target * mask).sum() / mask.sum()
  got = losses.bce_with_negatives(pos, neg, mask, hits)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_sampled_softmax_matches_scipy_and_drops_hits():
  rng = np.random.default_rng(1)
  pos = rng.normal(size=(7,)).astype(np.float32)
  neg = rng.normal(size=(7, 11)).astype(np.float32)
  mask = np.ones(7, np.float32)
  mask[3] = 0.0
  hits = np.zeros((7, 11), bool)
  hits[2, [0, 5]] = True
  logits = np.concatenate([pos[:, None], neg], 1)
  per = logsumexp(logits, axis=1) - pos
  per[2] = logsumexp(np.r_[pos[2], np.delete(neg[2], [0, 5])]) - pos[2]
  expected = (per * mask).sum() / mask.sum()
  got = losses.sampled_softmax(pos, neg, mask, hits)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_full_cross_entropy_matches_scipy_and_ignores_masked_rows():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(5, 13)).astype(np.float32)
  logits[:, 0] = -np.inf
  targets = rng.integers(1, 13, size=5).astype(np.int32)
  mask = np.array([1, 1, 0, 1, 1], np.float32)
  # A masked row may hold garbage: a padding target and NaN logits.
  targets[2] = 0
  logits[2] = np.nan
  keep = mask > 0
  per = logsumexp(logits[keep], axis=1) - logits[keep, targets[keep]]
  got = losses.full_cross_entropy(
    jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)
  )
  np.testing.assert_allclose(got, per.mean(), rtol=1e-5)
  assert float(losses.full_cross_entropy(logits, targets, mask * 0)) == 0.0


# ---------------------------------------------------------------------------
# Next-item examples and batches.


def _windows(pairs):
  users, positions = zip(*pairs, strict=True)
  return data.Windows(np.array(users), np.array(positions))


def test_next_item_examples_hand_example():
  sequences = [np.array([5, 6, 7, 8, 9, 10], np.int32)]
  windows = _windows([(0, 1), (0, 2), (0, 3)])

  whole = srm_steps.next_item_examples(sequences, windows, max_len=3)
  np.testing.assert_array_equal(whole.history, [[5, 6, 7]])
  np.testing.assert_array_equal(whole.targets, [[6, 7, 8]])
  np.testing.assert_array_equal(whole.mask, [[1, 1, 1]])

  cut = srm_steps.next_item_examples(sequences, windows, max_len=2)
  np.testing.assert_array_equal(cut.history, [[6, 7], [0, 5]])
  np.testing.assert_array_equal(cut.targets, [[7, 8], [0, 6]])
  np.testing.assert_array_equal(cut.mask, [[1, 1], [0, 1]])
  np.testing.assert_array_equal(cut.lengths, [2, 1])

  # A target that is not a window (position 2) is context, not trained on.
  gappy = srm_steps.next_item_examples(
    sequences, _windows([(0, 1), (0, 3)]), max_len=4
  )
  np.testing.assert_array_equal(gappy.history, [[0, 5, 6, 7]])
  np.testing.assert_array_equal(gappy.mask, [[0, 1, 0, 1]])

  with pytest.raises(ValueError, match='position 0'):
    srm_steps.next_item_examples(sequences, _windows([(0, 0)]), max_len=3)
  with pytest.raises(ValueError, match='length 6'):
    srm_steps.next_item_examples(sequences, _windows([(0, 6)]), max_len=3)


def _random_sequences(seed, num_users=23, num_items=29, longest=31):
  rng = np.random.default_rng(seed)
  return [
    rng.integers(1, num_items + 1, size=rng.integers(3, longest)).astype(
      np.int32
    )
    for _ in range(num_users)
  ]


def test_next_item_examples_cover_every_window_once():
  sequences = _random_sequences(3)
  rng = np.random.default_rng(4)
  pairs = [
    (u, p)
    for u, s in enumerate(sequences)
    for p in range(1, len(s))
    if rng.random() < 0.7
  ]
  examples = srm_steps.next_item_examples(sequences, _windows(pairs), 7)
  assert examples.num_targets == len(pairs)
  found = []
  for r in range(len(examples)):
    user = examples.users[r]
    seq = sequences[user]
    length = examples.lengths[r]
    real_history = examples.history[r, 7 - length :]
    for j in np.flatnonzero(examples.mask[r]):
      # The column's target follows its input in the user's sequence.
      offset = j - (7 - length)
      start = len(seq) - 1 - len(seq)  # placeholder, replaced below
      matches = [
        s
        for s in range(len(seq) - length)
        if np.array_equal(seq[s : s + length], real_history)
        and np.array_equal(
          seq[s + 1 : s + length + 1], examples.targets[r, 7 - length :]
        )
      ]
      assert matches, f'example {r} is not a slice of user {user}'
      start = matches[-1]
      found.append((int(user), int(start + offset + 1)))
  assert sorted(found) == sorted(pairs)


def test_next_item_batches_are_a_function_of_seed_and_epoch():
  sequences = _random_sequences(5, num_users=37)
  pairs = [(u, p) for u, s in enumerate(sequences) for p in range(1, len(s))]
  examples = srm_steps.next_item_examples(sequences, _windows(pairs), 11)
  kwargs = dict(batch_size=5, bucket_edges=(3, 7, 11), seed=0)

  def batches(epoch, **extra):
    return list(
      srm_steps.iterate_next_item_batches(
        examples, epoch=epoch, **kwargs, **extra
      )
    )

  first, again, other = batches(0), batches(0), batches(1)
  assert len(first) == srm_steps.count_next_item_batches(
    examples, 5, (3, 7, 11)
  )
  for a, b in zip(first, again, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any(
    not np.array_equal(a['history'], b['history'])
    for a, b in zip(first, other, strict=True)
  )
  total = sum(b['mask'].sum() for b in first)
  assert total == examples.num_targets
  widths = {b['history'].shape[1] for b in first}
  assert widths <= {3, 7, 11}
  for b in first:
    assert b['history'].shape == b['targets'].shape == b['mask'].shape
    assert b['history'].shape[0] == 5
    # Filler rows and padding columns carry no target.
    assert np.all(b['mask'][b['targets'] == 0] == 0)

  with_negatives = batches(0, num_negatives=3, num_items=29)
  assert with_negatives[0]['negatives'].shape == (
    5,
    with_negatives[0]['history'].shape[1],
    3,
  )
  assert with_negatives[0]['negatives'].min() >= 1
  assert with_negatives[0]['negatives'].max() <= 29
  shared = batches(0, num_negatives=3, num_items=29, shared_negatives=True)
  assert shared[0]['negatives'].shape == (3,)


def test_check_batch_ids_counts_and_masks_oov_targets():
  batch = {
    'history': np.array([[0, 3, -4], [1, 2, 99]], np.int32),
    'target': np.array([5, 14], np.int32),
    'negatives': np.array([[1, 2], [3, 0]], np.int32),
    'mask': np.array([1.0, 1.0], np.float32),
  }
  checked, count = srm_steps.check_batch_ids(batch, num_items=13)
  np.testing.assert_array_equal(checked['history'], [[0, 3, 14], [1, 2, 14]])
  np.testing.assert_array_equal(checked['target'], [5, 14])
  np.testing.assert_array_equal(checked['mask'], [1.0, 0.0])
  assert (count.ids, count.dropped_targets) == (3, 1)


# ---------------------------------------------------------------------------
# Steps.


def _state(name, num_items, **overrides):
  config = get_srm_config(name, 'smoke', **overrides)
  model = make_srm(name, num_items=num_items, preset='smoke', **overrides)
  params = srm_steps.init_params(model, config.max_len, 0)
  tx = state_lib.make_optimizer(config.learning_rate)
  return model, config, state_lib.create_train_state(model.apply, params, tx, 0)


@pytest.mark.parametrize(
  'name,overrides',
  [
    ('sasrec', dict(loss='sampled_softmax', num_negatives=5)),
    (
      'sasrec',
      dict(loss='sampled_softmax', num_negatives=5, shared_negatives=True),
    ),
    ('gru4rec', dict(objective='last_item', loss='bce', num_negatives=4)),
    ('din', dict(loss='full_ce')),
  ],
)
def test_step_is_a_pure_function_of_state_and_batch(name, overrides):
  model, config, state = _state(name, 13, **overrides)
  rng = np.random.default_rng(0)
  history = np.zeros((3, 7), np.int32)
  history[:, 2:] = rng.integers(1, 14, size=(3, 5))
  if config.objective == 'next_item':
    targets = np.zeros((3, 7), np.int32)
    targets[:, 2:] = rng.integers(1, 14, size=(3, 5))
    batch = {
      'history': history,
      'targets': targets,
      'mask': (targets > 0).astype(np.float32),
      'negatives': rng.integers(1, 14, size=(3, 7, 5)).astype(np.int32),
    }
    if config.shared_negatives:
      batch['negatives'] = batch['negatives'][0, 0]
  else:
    batch = {
      'history': history,
      'target': rng.integers(1, 14, size=3).astype(np.int32),
      'mask': np.ones(3, np.float32),
      'negatives': rng.integers(1, 14, size=(3, 4)).astype(np.int32),
    }
  step = jax.jit(srm_steps.make_train_step(model, config, 13))
  copy = functools.partial(jax.tree.map, jnp.copy)
  a, metrics_a = step(copy(state), batch)
  b, metrics_b = step(copy(state), batch)
  assert np.isfinite(metrics_a['loss'])
  assert float(metrics_a['loss']) == float(metrics_b['loss'])
  for x, y in zip(
    jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True
  ):
    np.testing.assert_array_equal(x, y)
  assert int(a.step) == 1
  changed = [
    float(jnp.abs(x - y).max())
    for x, y in zip(
      jax.tree.leaves(a.params), jax.tree.leaves(state.params), strict=True
    )
  ]
  assert max(changed) > 0


def test_non_finite_loss_names_the_step():
  sequences = _random_sequences(6, num_users=17, num_items=13)
  pairs = [(u, p) for u, s in enumerate(sequences) for p in range(1, len(s))]
  model, config, state = _state('sasrec', 13)
  state = state.replace(tx=state_lib.make_optimizer(float('nan')))
  state = state.replace(opt_state=state.tx.init(state.params))
  examples = srm_steps.next_item_examples(sequences, _windows(pairs), 12)
  step = loop.CompiledStep(srm_steps.make_train_step(model, config, 13), 'step')
  with pytest.raises(loop.NonFiniteLossError, match='at step 2 '):
    loop.train_loop(
      state,
      step,
      lambda epoch: srm_steps.iterate_next_item_batches(
        examples, batch_size=4, bucket_edges=(6, 12), seed=0, epoch=epoch
      ),
      srm_steps.count_next_item_batches(examples, 4, (6, 12)),
      loop.LoopConfig(epochs=1),
    )


# ---------------------------------------------------------------------------
# Full-ranking evaluation against a brute-force ranking.


def _brute_force_metrics(scores, targets, ks):
  out = {f'{m}@{k}': [] for k in ks for m in ('hr', 'ndcg', 'mrr')}
  for row, target in zip(scores, targets, strict=True):
    others = np.delete(row[1:], target - 1)
    greater = int((others > row[target]).sum())
    ties = int((others == row[target]).sum())
    ranks = np.arange(greater + 1, greater + ties + 2)
    for k in ks:
      inside = ranks <= k
      out[f'hr@{k}'].append(inside.mean())
      out[f'ndcg@{k}'].append((inside / np.log2(ranks + 1)).mean())
      out[f'mrr@{k}'].append((inside / ranks).mean())
  return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize('exclude_history', [False, True])
def test_full_ranking_evaluator_matches_brute_force(exclude_history):
  num_items = 13
  sequences = _random_sequences(7, num_users=31, num_items=num_items)
  test = data.Windows(np.arange(31), np.array([len(s) - 1 for s in sequences]))
  model, config, state = _state('sasrec', num_items)
  params = state.params
  # Items 1..5 get a zero embedding, so they score exactly 0 in any
  # summation order: exact ties, some of them with the target.
  table = params['params']['item_embedding']['embedding']
  params['params']['item_embedding']['embedding'] = table.at[1:6].set(0.0)
  evaluator = srm_steps.FullRankingEvaluator(
    model,
    sequences,
    test,
    num_items=num_items,
    max_len=config.max_len,
    batch_size=5,
    bucket_edges=config.bucket_edges,
    ks=(1, 5, 10),
    exclude_history=exclude_history,
  )
  got = evaluator(params)

  history = data.histories(sequences, test.users, test.positions, 12)
  scores = np.array(model.apply(params, history, method='score_all'))
  targets = test.targets(sequences)
  if exclude_history:
    # The model's input history: the last max_len items before the target.
    for r, (u, p) in enumerate(zip(test.users, test.positions, strict=True)):
      seen = set(sequences[u][:p][-12:].tolist()) - {targets[r]}
      scores[r, sorted(seen)] = -np.inf
  expected = _brute_force_metrics(scores, targets, (1, 5, 10))
  assert got['count'] == 31
  for key, value in expected.items():
    assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-7), key
  assert sum(1 <= t <= 5 for t in targets) >= 3, 'targets should tie'


# ---------------------------------------------------------------------------
# A short real run on a slice of the built-in Beauty data.


@functools.lru_cache
def _beauty_slice(num_users=200):
  dataset = data.load('beauty', reindex='random', seed=0)
  split = data.positional_split(dataset, gap=2)

  def head(windows):
    return windows.select(windows.users < num_users)

  return dataset, head(split.srm_train), head(split.valid), head(split.test)


@pytest.mark.parametrize('name', ['sasrec', 'din'])
def test_short_beauty_run_loss_falls(name):
  dataset, train, valid, test = _beauty_slice()
  lines = []
  run = srm_steps.train_srm(
    name,
    sequences=dataset.sequences,
    num_items=dataset.num_items,
    train_windows=train,
    valid_windows=valid,
    test_windows=test,
    config=get_srm_config(
      name, 'smoke', epochs=3, learning_rate=1e-2, patience=5
    ),
    seed=0,
    log=lines.append,
  )
  history = run.loop.history
  assert len(history) == 3
  assert history[-1]['train/loss'] < 0.9 * history[0]['train/loss']
  assert run.test['count'] == len(test)
  assert 0.0 <= run.test['hr@20'] <= 1.0
  assert any('compiling' in line for line in lines)
  # One compile per bucket shape, not per batch.
  compiles = [
    line
    for line in lines
    if line.startswith('compiling') and 'train step' in line
  ]
  assert len(compiles) <= 2
