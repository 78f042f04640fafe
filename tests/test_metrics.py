"""Tests of the tie-safe ranking metrics in `lsc_jax.metrics`."""

import itertools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from lsc_jax import metrics

KS = (1, 2, 3, 5)


def log2_discount(rank):
  return 1.0 / math.log2(rank + 1)


def brute_force_row(scores, labels, valid, ks):
  """Average each metric over every tie-breaking permutation of the row."""
  slots = [i for i in range(len(scores)) if valid[i]]
  positives = [i for i in slots if labels[i] == 1]
  out = {f'{m}@{k}': 0.0 for k in ks for m in metrics.METRIC_NAMES}
  if not positives:
    return out
  target = positives[0]
  perms = list(itertools.permutations(range(len(slots))))
  for perm in perms:
    priority = dict(zip(slots, perm, strict=True))
    rank = 1 + sum(
      1
      for j in slots
      if j != target
      and (
        scores[j] > scores[target]
        or (scores[j] == scores[target] and priority[j] < priority[target])
      )
    )
    for k in ks:
      if rank <= k:
        out[f'hr@{k}'] += 1 / len(perms)
        out[f'ndcg@{k}'] += log2_discount(rank) / len(perms)
        out[f'mrr@{k}'] += 1 / rank / len(perms)
  for k in ks:
    out[f'precision@{k}'] = out[f'hr@{k}'] / k
  return out


def test_hand_computed_tie_of_four_candidates():
  # Target (column 2) scores 2; one candidate scores 3 above it and one
  # ties it, so its rank is 2 or 3 with probability 1/2 each.
  scores = jnp.array([[3.0, 1.0, 2.0, 2.0]])
  labels = jnp.array([[0, 0, 1, 0]])
  result = metrics.ranking_metrics(scores, labels, ks=(1, 2, 3))
  expected = {
    'hr@1': 0.0,
    'hr@2': 0.5,
    'hr@3': 1.0,
    'ndcg@1': 0.0,
    'ndcg@2': 0.5 / math.log2(3),
    'ndcg@3': 0.5 / math.log2(3) + 0.5 / math.log2(4),
    'mrr@1': 0.0,
    'mrr@2': 0.25,
    'mrr@3': 0.5 * (1 / 2 + 1 / 3),
    'precision@1': 0.0,
    'precision@2': 0.25,
    'precision@3': 1 / 3,
  }
  for name, value in expected.items():
    assert result[name] == pytest.approx(value, abs=1e-6), name
  assert result.protocol == 'candidates@4'


def test_padded_slot_never_outranks_and_is_never_the_target():
  # Slot 1 is padding with the highest score and a positive label under
  # jit; the target (slot 0) ties with slot 3 only: rank 1 or 2.
  scores = jnp.array([[5.0, 9.0, 2.0, 5.0]])
  labels = jnp.array([[1, 0, 0, 0]])
  valid = jnp.array([[True, False, True, True]])
  result = metrics.ranking_metrics(scores, labels, ks=(1, 2), valid=valid)
  assert result['hr@1'] == pytest.approx(0.5)
  assert result['ndcg@2'] == pytest.approx(0.5 * (1 + 1 / math.log2(3)))
  assert result['mrr@2'] == pytest.approx(0.75)

  # A positive only on the padded slot: no target, a miss (under jit,
  # where it cannot raise) and counted.
  padded_label = jnp.array([[0, 1, 0, 0]])
  run = jax.jit(
    lambda s, y, v: metrics.ranking_metrics(s, y, (1, 2), v, reduce=False)
  )
  per_row = run(scores, padded_label, valid)
  assert float(per_row['hr@2'][0]) == 0.0
  assert float(per_row.counts['padded_positives'][0]) == 1.0
  assert float(per_row.counts['rows_without_target'][0]) == 1.0


@pytest.mark.parametrize('num_candidates', [2, 7, 13])
def test_all_equal_scores_give_the_expectation(num_candidates):
  scores = jnp.zeros((3, num_candidates))
  labels = jnp.zeros((3, num_candidates), jnp.int32).at[:, 1].set(1)
  ks = (1, 5, 20)
  result = metrics.ranking_metrics(scores, labels, ks=ks)
  n = num_candidates
  for k in ks:
    top = min(k, n)
    assert result[f'hr@{k}'] == pytest.approx(top / n)
    ndcg = sum(log2_discount(r) for r in range(1, top + 1)) / n
    assert result[f'ndcg@{k}'] == pytest.approx(ndcg, rel=1e-6)
    mrr = sum(1 / r for r in range(1, top + 1)) / n
    assert result[f'mrr@{k}'] == pytest.approx(mrr, rel=1e-6)
  assert result['hr@1'] < 1.0


def test_row_without_positive_is_a_miss():
  scores = jnp.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
  labels = jnp.array([[0, 0, 0], [1, 0, 0]])
  result = metrics.ranking_metrics(scores, labels, ks=(1,))
  assert result['hr@1'] == pytest.approx(0.5)
  assert float(result.counts['rows_without_target']) == 1.0


def test_matches_brute_force_over_all_tie_permutations():
  rng = np.random.default_rng(3)
  batch, num_candidates = 11, 6
  scores = rng.integers(0, 3, (batch, num_candidates)).astype(np.float32)
  valid = rng.random((batch, num_candidates)) < 0.8
  labels = np.zeros((batch, num_candidates), np.int32)
  for row in range(batch - 2):  # The last two rows have no positive.
    choices = np.flatnonzero(valid[row])
    if choices.size:
      labels[row, rng.choice(choices)] = 1
  result = metrics.ranking_metrics(
    scores, labels, ks=KS, valid=valid, reduce=False
  )
  for row in range(batch):
    expected = brute_force_row(scores[row], labels[row], valid[row], KS)
    for name, value in expected.items():
      assert float(result[name][row]) == pytest.approx(value, abs=1e-6), (
        row,
        name,
      )


def test_float64_matches_brute_force_closely():
  rng = np.random.default_rng(5)
  scores = rng.integers(0, 2, (5, 5)).astype(np.float64)
  labels = np.zeros((5, 5), np.int32)
  labels[np.arange(5), rng.integers(0, 5, 5)] = 1
  with jax.enable_x64(True):
    result = metrics.ranking_metrics(scores, labels, ks=KS, reduce=False)
    assert result['ndcg@5'].dtype == jnp.float64
    for row in range(5):
      expected = brute_force_row(scores[row], labels[row], [True] * 5, KS)
      for name, value in expected.items():
        assert float(result[name][row]) == pytest.approx(value, abs=1e-12)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
  scores=hnp.arrays(np.float32, (5, 7), elements=st.integers(-2, 2)),
  target=hnp.arrays(np.int64, (5,), elements=st.integers(0, 6)),
  valid=hnp.arrays(np.bool_, (5, 7)),
)
def test_invariants(scores, target, valid):
  valid[np.arange(5), target] = True
  labels = np.zeros((5, 7), np.int32)
  labels[np.arange(5), target] = 1
  ks = (1, 2, 3, 5, 7)
  result = metrics.ranking_metrics(scores, labels, ks, valid, reduce=False)
  tol = 1e-6
  previous_hr = np.zeros(5)
  for k in ks:
    hr = np.asarray(result[f'hr@{k}'])
    ndcg = np.asarray(result[f'ndcg@{k}'])
    mrr = np.asarray(result[f'mrr@{k}'])
    precision = np.asarray(result[f'precision@{k}'])
    for value in (hr, ndcg, mrr, precision):
      assert np.all(value >= -tol) and np.all(value <= 1 + tol)
    assert np.all(hr >= previous_hr - tol)
    assert np.all(ndcg <= hr + tol)
    # 1/r <= 1/log2(r + 1) for every r >= 1, so MRR@k <= NDCG@k.
    assert np.all(mrr <= ndcg + tol)
    np.testing.assert_allclose(precision, hr / k, rtol=1e-6)
    previous_hr = hr
  # k at least the number of candidates: every target is found.
  np.testing.assert_allclose(np.asarray(result['hr@7']), 1.0, rtol=1e-6)


def test_row_weights_and_per_row_subsets():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(7, 13)).astype(np.float32)
  labels = np.zeros((7, 13), np.int32)
  labels[np.arange(7), rng.integers(0, 13, 7)] = 1
  keep = np.array([1, 1, 0, 1, 0, 1, 1], bool)
  per_row = metrics.ranking_metrics(scores, labels, reduce=False)
  averaged = metrics.ranking_metrics(scores, labels, row_weights=keep)
  for name in per_row.keys():
    assert float(averaged[name]) == pytest.approx(
      float(np.mean(np.asarray(per_row[name])[keep])), rel=1e-6
    )
  assert float(averaged.counts['rows']) == 5.0
  # Filler rows may hold anything, even NaN: host checks skip them.
  scores[2] = np.nan
  filled = metrics.ranking_metrics(scores, labels, row_weights=keep)
  assert float(filled['ndcg@10']) == pytest.approx(float(averaged['ndcg@10']))
  empty = metrics.reduce_rows(per_row, np.zeros(7, bool))
  assert np.isnan(float(empty['hr@1']))


def test_host_checks_raise_with_row():
  scores = np.array([[1.0, 2.0], [np.nan, 1.0]], np.float32)
  labels = np.array([[1, 0], [0, 1]])
  with pytest.raises(ValueError, match='NaN score.*first at row 1'):
    metrics.ranking_metrics(scores, labels)
  with pytest.raises(ValueError, match='more than one positive'):
    metrics.ranking_metrics(np.ones((2, 2)), np.array([[1, 1], [0, 1]]))
  with pytest.raises(ValueError, match='0 or 1'):
    metrics.ranking_metrics(np.ones((1, 2)), np.array([[2, 0]]))
  with pytest.raises(ValueError, match='padded slot'):
    metrics.ranking_metrics(
      np.ones((1, 2)), np.array([[0, 1]]), valid=np.array([[True, False]])
    )
  with pytest.raises(ValueError, match='same shape'):
    metrics.ranking_metrics(np.ones((1, 2)), np.ones((1, 3)))
  with pytest.raises(ValueError, match='ks must be'):
    metrics.ranking_metrics(np.ones((1, 2)), np.ones((1, 2)), ks=(0,))


def test_nan_and_extra_positives_under_jit_are_counted():
  scores = jnp.array([[np.nan, 1.0, 0.0], [2.0, 1.0, 0.0]])
  labels = jnp.array([[0, 0, 1], [0, 1, 1]])
  run = jax.jit(lambda s, y: metrics.ranking_metrics(s, y, (1, 3)))
  result = run(scores, labels)
  # Row 0: NaN ranks as -inf, the target (0.0) is second of three.
  # Row 1: the first positive (score 1.0) is the target: rank 2.
  assert float(result['hr@1']) == 0.0
  assert float(result['mrr@3']) == pytest.approx(0.5)
  assert float(result.counts['nan_scores']) == 1.0
  assert float(result.counts['extra_positives']) == 1.0


def test_full_ranking_hand_values_and_exclude():
  # Items 1..6; item 0 is padding with the highest score, never ranked.
  scores = jnp.array([[99.0, 0.5, 0.9, 0.7, 0.7, 0.1, 0.9]])
  targets = jnp.array([3])
  result = metrics.full_ranking_metrics(scores, targets, ks=(1, 3, 4))
  # Above the target: items 2 and 6; tied: item 4. Rank 3 or 4.
  assert result.protocol == 'full'
  assert float(result['hr@3']) == pytest.approx(0.5)
  assert float(result['hr@4']) == pytest.approx(1.0)
  assert float(result['ndcg@4']) == pytest.approx(
    0.5 * (1 / math.log2(4) + 1 / math.log2(5))
  )
  exclude = jnp.zeros((1, 7), bool).at[0, jnp.array([2, 3, 6])].set(True)
  result = metrics.full_ranking_metrics(
    scores, targets, exclude=exclude, ks=(1, 2)
  )
  # Items 2 and 6 are removed; the target stays although excluded.
  assert float(result['hr@1']) == pytest.approx(0.5)
  assert float(result['hr@2']) == pytest.approx(1.0)
  assert float(result.counts['excluded_targets']) == 1.0


@pytest.mark.parametrize('num_items', [29, 4357])
def test_full_ranking_equals_candidate_ranking(num_items):
  # 4358 columns span two full blocks of the count loop and a tail.
  rng = np.random.default_rng(num_items)
  batch = 7
  scores = rng.integers(0, 5, (batch, num_items + 1)).astype(np.float32)
  scores[rng.random(scores.shape) < 0.05] = np.nan  # Rank as -inf.
  targets = rng.integers(1, num_items + 1, batch)
  scores[0, targets[0]] = np.nan
  exclude = rng.random((batch, num_items + 1)) < 0.3
  full = jax.jit(
    lambda s, t, e: metrics.full_ranking_metrics(
      s, t, exclude=e, ks=KS, reduce=False
    )
  )(scores, targets, exclude)
  columns = np.arange(num_items + 1)[None, :]
  is_target = columns == targets[:, None]
  valid = ((columns > 0) & ~exclude) | is_target
  ranked = jax.jit(
    lambda s, y, v: metrics.ranking_metrics(s, y, KS, v, reduce=False)
  )(scores, is_target.astype(np.int32), valid)
  for name in full.keys():
    np.testing.assert_allclose(full[name], ranked[name], rtol=1e-6)
  np.testing.assert_array_equal(
    full.counts['nan_scores'], ranked.counts['nan_scores']
  )
  assert float(full.counts['nan_scores'][0]) >= 1


def test_full_ranking_checks():
  with pytest.raises(ValueError, match='target out of range'):
    metrics.full_ranking_metrics(jnp.ones((1, 4)), jnp.array([0]))
  with pytest.raises(ValueError, match='NaN score'):
    metrics.full_ranking_metrics(
      jnp.array([[0.0, np.nan, 1.0]]), jnp.array([2])
    )
  # A NaN on an excluded item or the padding column is never ranked.
  result = metrics.full_ranking_metrics(
    jnp.array([[np.nan, np.nan, 1.0]]),
    jnp.array([2]),
    exclude=jnp.array([[False, True, False]]),
    ks=(1,),
  )
  assert float(result['hr@1']) == 1.0
  run = jax.jit(lambda s, t: metrics.full_ranking_metrics(s, t, ks=(1,)))
  result = run(jnp.array([[0.0, 2.0, 1.0]]), jnp.array([5]))
  assert float(result['hr@1']) == 0.0
  assert float(result.counts['invalid_targets']) == 1.0


def test_sample_negatives_fixed_per_user_and_seed():
  users = np.array([4, 11, 7])
  targets = np.array([3, 5, 1])
  history = [np.array([1, 2]), np.array([], np.int64), np.array([9])]
  negatives = metrics.sample_negatives(
    users, targets, 37, 13, seed=2, exclude=history
  )
  assert negatives.shape == (3, 13) and negatives.dtype == np.int32
  for row in range(3):
    assert len(set(negatives[row].tolist())) == 13
    assert targets[row] not in negatives[row]
    assert not set(history[row].tolist()) & set(negatives[row].tolist())
    assert negatives[row].min() >= 1 and negatives[row].max() <= 37
  # Same user and seed, other batch order: same negatives.
  again = metrics.sample_negatives(
    users[::-1], targets[::-1], 37, 13, seed=2, exclude=history[::-1]
  )
  np.testing.assert_array_equal(again[::-1], negatives)
  other = metrics.sample_negatives(
    users, targets, 37, 13, seed=3, exclude=history
  )
  assert not np.array_equal(other, negatives)
  with pytest.raises(ValueError, match='only 2 items'):
    metrics.sample_negatives([0], [1], 3, 5, seed=0)


def test_sampled_metrics_protocol_and_values():
  candidate_scores = jnp.array([[0.5, 0.9, 0.5, 0.1], [0.8, 0.2, 0.3, 0.1]])
  result = metrics.sampled_metrics(candidate_scores, ks=(1, 2))
  assert result.protocol == 'sampled@3'
  # Row 0: one above, one tie: rank 2 or 3. Row 1: rank 1.
  assert float(result['hr@1']) == pytest.approx(0.5)
  assert float(result['hr@2']) == pytest.approx(0.75)
  keys = result.to_dict()
  assert 'sampled@3/ndcg@2' in keys and 'sampled@3/rows' in keys
  candidates = metrics.sampled_candidates(
    np.array([5, 6]), np.array([[1, 2], [3, 4]])
  )
  np.testing.assert_array_equal(candidates, [[5, 1, 2], [6, 3, 4]])


def test_to_dict_requires_averaged_values():
  per_row = metrics.ranking_metrics(
    jnp.ones((2, 3)), jnp.eye(2, 3), reduce=False
  )
  with pytest.raises(ValueError, match='reduce_rows'):
    per_row.to_dict()
  averaged = metrics.reduce_rows(per_row)
  assert averaged.to_dict()['candidates@3/hr@1'] == pytest.approx(1 / 3)


def test_jit_matches_eager_with_prime_shapes():
  rng = np.random.default_rng(7)
  scores = rng.normal(size=(11, 17)).astype(np.float32)
  labels = np.zeros((11, 17), np.int32)
  labels[np.arange(11), rng.integers(0, 17, 11)] = 1
  valid = rng.random((11, 17)) < 0.9
  valid[labels == 1] = True
  eager = metrics.ranking_metrics(scores, labels, valid=valid)
  jitted = jax.jit(lambda s, y, v: metrics.ranking_metrics(s, y, valid=v))(
    scores, labels, valid
  )
  for name in eager.keys():
    assert float(jitted[name]) == pytest.approx(float(eager[name]), rel=1e-6)
  assert set(eager.keys()) == set(metrics.metric_keys(metrics.DEFAULT_KS))
