"""Tests for `lsc_jax.data.batching`: histories, negatives, batches."""

import collections

import numpy as np
import pytest
import scipy.stats

from lsc_jax import data


def _random_sequences(seed, num_users=13, max_length=23, num_items=31):
  rng = np.random.default_rng(seed)
  return [
    rng.integers(1, num_items + 1, size=rng.integers(0, max_length)).astype(
      np.int32
    )
    for _ in range(num_users)
  ]


def _reference_history(seq, position, max_len, gap):
  """Plain Python: last max_len items of seq[:position - gap], left-padded."""
  end = max(position - gap, 0)
  kept = list(seq[:end])[-max_len:]
  return [0] * (max_len - len(kept)) + kept


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('gap', [0, 2])
@pytest.mark.parametrize('max_len', [1, 7, 29])
def test_histories_match_python_reference(seed, gap, max_len):
  sequences = _random_sequences(seed)
  rng = np.random.default_rng(seed + 10)
  users = rng.integers(0, len(sequences), size=37)
  positions = np.array([rng.integers(0, len(sequences[u]) + 1) for u in users])
  for seqs in (sequences, data.flatten(sequences)):
    got = data.histories(seqs, users, positions, max_len, gap=gap)
    assert got.dtype == np.int32 and got.shape == (37, max_len)
    expected = [
      _reference_history(sequences[u], p, max_len, gap)
      for u, p in zip(users, positions, strict=True)
    ]
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.int32))


def test_histories_reject_out_of_range_windows():
  sequences = [np.array([1, 2, 3], np.int32)]
  with pytest.raises(ValueError, match='position 4 outside 0..3'):
    data.histories(sequences, [0], [4], 5)
  with pytest.raises(ValueError, match='user 1 outside'):
    data.histories(sequences, [1], [0], 5)
  with pytest.raises(ValueError, match='max_len'):
    data.histories(sequences, [0], [0], 0)


def _check_negatives(negatives, positives, exclude, num_items):
  assert negatives.dtype == np.int32
  assert negatives.min() >= 1 and negatives.max() <= num_items
  for row, positive, banned in zip(negatives, positives, exclude, strict=True):
    assert positive not in row
    assert not set(row.tolist()) & set(np.asarray(banned).tolist())


def test_negatives_avoid_padding_positive_and_exclude():
  rng = np.random.default_rng(0)
  num_items, n = 19, 41
  positives = rng.integers(1, num_items + 1, size=n)
  exclude = [
    rng.integers(1, num_items + 1, size=rng.integers(0, 15)) for _ in range(n)
  ]
  negatives = data.sample_negatives(
    5, positives, 11, num_items, exclude=exclude
  )
  assert negatives.shape == (n, 11)
  _check_negatives(negatives, positives, exclude, num_items)
  # The same exclusion as a 0-padded matrix gives the same draws.
  width = max(len(e) for e in exclude)
  padded = np.zeros((n, width), np.int64)
  for r, e in enumerate(exclude):
    padded[r, : len(e)] = e
  again = data.sample_negatives(5, positives, 11, num_items, exclude=padded)
  np.testing.assert_array_equal(negatives, again)


def test_negatives_deterministic_given_seed():
  positives = np.arange(1, 18)
  a = data.sample_negatives(np.random.default_rng(3), positives, 7, 101)
  b = data.sample_negatives(np.random.default_rng(3), positives, 7, 101)
  c = data.sample_negatives(np.random.default_rng(4), positives, 7, 101)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_negatives_distinct_and_nearly_full_rows():
  # Row 0 may use only items {3, 5}: two distinct negatives must be 3 and 5
  # (this needs the exact fallback when rejection keeps missing).
  num_items = 997
  banned = [i for i in range(1, num_items + 1) if i not in (1, 3, 5)]
  negatives = data.sample_negatives(
    0, [1, 2], 2, num_items, exclude=[banned, []], distinct=True
  )
  assert sorted(negatives[0].tolist()) == [3, 5]
  assert negatives[1, 0] != negatives[1, 1]
  _check_negatives(negatives, [1, 2], [banned, []], num_items)


def test_negatives_impossible_row_raises():
  with pytest.raises(ValueError, match='row 1: only 0 of 3 items'):
    data.sample_negatives(0, [1, 1], 1, 3, exclude=[[], [2, 3]])
  with pytest.raises(ValueError, match='distinct'):
    data.sample_negatives(0, [1], 3, 3, distinct=True)
  with pytest.raises(ValueError, match='outside 1..3'):
    data.sample_negatives(0, [4], 1, 3)
  with pytest.raises(ValueError, match='outside 0..3'):
    data.sample_negatives(0, [1], 1, 3, exclude=[[7]])


def test_negatives_are_uniform_over_allowed_items():
  num_items = 23
  positives = np.full(4000, 5)
  exclude = np.tile([7, 11, 0], (4000, 1))
  negatives = data.sample_negatives(1, positives, 3, num_items, exclude=exclude)
  allowed = [i for i in range(1, num_items + 1) if i not in (5, 7, 11)]
  counts = collections.Counter(negatives.ravel().tolist())
  assert set(counts) == set(allowed)
  observed = [counts[i] for i in allowed]
  assert scipy.stats.chisquare(observed).pvalue > 1e-3


def _windows(sequences, min_position=1):
  users, positions = [], []
  for u, seq in enumerate(sequences):
    for p in range(min_position, len(seq)):
      users.append(u)
      positions.append(p)
  return data.Windows(np.array(users), np.array(positions))


def _epoch(sequences, windows, **kwargs):
  defaults = dict(batch_size=7, max_len=11, seed=3, epoch=0)
  defaults.update(kwargs)
  return list(data.iterate_batches(sequences, windows, **defaults))


@pytest.mark.parametrize('edges', [None, (2, 5)])
@pytest.mark.parametrize('gap', [0, 2])
def test_batches_cover_every_window_once(edges, gap):
  sequences = _random_sequences(0, num_users=17, max_length=19)
  windows = _windows(sequences)
  batches = _epoch(
    sequences,
    windows,
    bucket_edges=edges,
    gap=gap,
    num_negatives=3,
    num_items=31,
  )
  assert len(batches) == data.count_batches(
    sequences, windows, batch_size=7, max_len=11, bucket_edges=edges, gap=gap
  )
  seen = collections.Counter()
  allowed_lengths = {11} if edges is None else {2, 5, 11}
  for b in batches:
    width = b['history'].shape[1]
    assert width in allowed_lengths
    assert b['history'].shape == (7, width) and b['history'].dtype == np.int32
    assert b['negatives'].shape == (7, 3)
    for key in ('target', 'user', 'position', 'mask'):
      assert b[key].shape == (7,)
    assert b['mask'].dtype == np.float32
    expected = data.histories(
      sequences, b['user'], b['position'], width, gap=gap
    )
    np.testing.assert_array_equal(b['history'], expected)
    lengths = np.minimum(np.maximum(b['position'] - gap, 0), 11)
    assert lengths.max() <= width
    if edges is not None:
      # The smallest edge that fits: every row is longer than the edge below.
      below = {2: -1, 5: 2, 11: 5}[width]
      assert (lengths > below).all()
    for r in range(7):
      u, p = int(b['user'][r]), int(b['position'][r])
      assert b['target'][r] == sequences[u][p]
      assert b['target'][r] not in b['negatives'][r]
      assert not set(b['negatives'][r].tolist()) & set(
        sequences[u][:p].tolist()
      )
      if b['mask'][r]:
        seen[(u, p)] += 1
  expected_windows = collections.Counter(
    zip(windows.users.tolist(), windows.positions.tolist(), strict=True)
  )
  assert seen == expected_windows
  assert sum(b['mask'].sum() for b in batches) == len(windows)


def test_batches_deterministic_given_seed_and_epoch():
  sequences = _random_sequences(1, num_users=17, max_length=19)
  windows = _windows(sequences)
  kwargs = dict(bucket_edges=(3,), num_negatives=2, num_items=31)
  a = _epoch(sequences, windows, **kwargs)
  b = _epoch(sequences, windows, **kwargs)
  c = _epoch(sequences, windows, epoch=1, **kwargs)
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(
    not np.array_equal(x['user'], y['user']) for x, y in zip(a, c, strict=False)
  )


def test_batches_without_shuffle_keep_window_order():
  sequences = _random_sequences(2, num_users=11, max_length=13)
  windows = _windows(sequences)
  batches = _epoch(sequences, windows, shuffle=False)
  users = np.concatenate([b['user'][b['mask'] > 0] for b in batches])
  positions = np.concatenate([b['position'][b['mask'] > 0] for b in batches])
  np.testing.assert_array_equal(users, windows.users)
  np.testing.assert_array_equal(positions, windows.positions)


def test_batches_reject_bad_arguments():
  sequences = [np.array([1, 2, 3], np.int32)]
  windows = data.Windows(np.array([0]), np.array([3]))  # no target at 3
  with pytest.raises(ValueError, match='position 3 outside 0..2'):
    _epoch(sequences, windows)
  ok = data.Windows(np.array([0]), np.array([2]))
  with pytest.raises(ValueError, match='bucket_edges'):
    _epoch(sequences, ok, bucket_edges=(5, 3))
  with pytest.raises(ValueError, match='num_items'):
    _epoch(sequences, ok, num_negatives=2)
