"""Tests for `lsc_jax.data.splits`: positional and time device-cloud splits."""

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from lsc_jax import data
from lsc_jax.data import splits


def _by_user(windows, num_users):
  """{user: sorted list of positions} (every user present)."""
  out = {u: [] for u in range(num_users)}
  for u, p in zip(
    windows.users.tolist(), windows.positions.tolist(), strict=True
  ):
    out[u].append(p)
  return out


def _counting_dataset(lengths, timestamps=None):
  """User u's sequence is 1..n, so a target's id is its 1-based index."""
  return data.Dataset.from_sequences(
    [np.arange(1, n + 1) for n in lengths],
    num_items=max(max(lengths, default=1), 1),
    timestamps=timestamps,
  )


def test_documented_windows_for_n_3_5_7():
  ds = _counting_dataset([3, 5, 7])
  split = data.positional_split(ds)  # gap 2, device window 3, min history 1

  def targets(kind):
    w = split.windows(kind)
    t = w.targets(ds.sequences).tolist()
    return {
      u: [x for x, v in zip(t, w.users, strict=True) if v == u]
      for u in range(3)
    }

  # 1-based targets i_k, listed per user n = 3, 5, 7.
  assert targets('test') == {0: [3], 1: [5], 2: [7]}
  assert targets('valid') == {0: [2], 1: [4], 2: [6]}
  assert targets('srm_train') == {0: [], 1: [2, 3], 2: [2, 3, 4, 5]}
  assert targets('device_recent') == {0: [], 1: [2, 3], 2: [3, 4, 5]}
  assert targets('llm_train') == {0: [], 1: [], 2: [2]}
  # Stale cloud views end g = 2 items before the target.
  assert split.stale_positions(split.test).tolist() == [0, 2, 4]
  assert split.stale_positions(split.valid).tolist() == [0, 1, 3]
  s = split.summary()
  assert s['llm_train_users_without'] == 2
  assert s['srm_train_users_without'] == 1
  assert s['test_empty_stale'] == 1 and s['valid_empty_stale'] == 1
  assert 'llm_train' in split.summary_text()


def test_short_users_get_no_window_instead_of_an_error():
  ds = _counting_dataset([0, 1, 2])
  split = data.positional_split(ds)
  assert split.test.users.tolist() == [2]
  assert len(split.valid) == len(split.srm_train) == len(split.llm_train) == 0
  assert split.summary()['test_users_without'] == 2


def _reference_positional(n, gap, w, h):
  """1-based ranges of the positional split, returned as 0-based positions."""
  del gap
  test = [n] if n >= 2 else []
  valid = [n - 1] if n >= 3 else []
  srm = list(range(h + 1, n - 1))  # i_{h+1} .. i_{n-2}
  device = [k for k in srm if k >= n - 1 - w]  # i_{n-1-w} .. i_{n-2}
  llm = [k for k in srm if k <= n - 2 - w]  # .. i_{n-2-w}
  return {
    'test': [k - 1 for k in test],
    'valid': [k - 1 for k in valid],
    'srm_train': [k - 1 for k in srm],
    'device_recent': [k - 1 for k in device],
    'llm_train': [k - 1 for k in llm],
  }


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(
  lengths=st.lists(st.integers(0, 14), min_size=1, max_size=11),
  gap=st.integers(0, 4),
  device_window=st.integers(0, 5),
  min_history=st.integers(0, 3),
)
def test_positional_split_properties(lengths, gap, device_window, min_history):
  ds = _counting_dataset(lengths)
  split = data.positional_split(
    ds, gap=gap, device_window=device_window, min_history=min_history
  )
  per_kind = {k: _by_user(split.windows(k), len(lengths)) for k in splits.KINDS}
  for kind in splits.KINDS:
    w = split.windows(kind)
    order = np.lexsort((w.positions, w.users))
    np.testing.assert_array_equal(order, np.arange(len(w)))  # sorted
  for u, n in enumerate(lengths):
    ref = _reference_positional(n, gap, device_window, min_history)
    got = {k: per_kind[k][u] for k in splits.KINDS}
    assert got == ref
    llm, dev, srm = got['llm_train'], got['device_recent'], got['srm_train']
    if llm and dev:
      assert max(llm) < min(dev)
    assert set(dev) <= set(srm) and set(llm) <= set(srm)
    evaluation = got['valid'] + got['test']
    training = llm + srm + dev
    for p_eval in evaluation:
      # Never a training target, never inside a training input [:p].
      assert all(p_eval > p for p in training)
    if got['valid']:
      assert got['valid'][0] < got['test'][0]
    for p in training:
      assert p >= min_history
  stale = split.stale_positions(split.test)
  np.testing.assert_array_equal(
    stale, np.maximum(split.test.positions - gap, 0)
  )
  summary = split.summary()
  assert summary['test_windows'] == sum(n >= 2 for n in lengths)
  assert summary['test_users_without'] == sum(n < 2 for n in lengths)
  assert summary['srm_train_windows'] == sum(
    max(n - 2 - min_history, 0) for n in lengths
  )


def test_positional_split_is_pure():
  ds = _counting_dataset([4, 9, 2, 13])
  a, b = data.positional_split(ds), data.positional_split(ds)
  for kind in splits.KINDS:
    np.testing.assert_array_equal(a.windows(kind).users, b.windows(kind).users)
    np.testing.assert_array_equal(
      a.windows(kind).positions, b.windows(kind).positions
    )


def test_positional_split_rejects_bad_parameters():
  ds = _counting_dataset([4])
  with pytest.raises(ValueError, match='gap'):
    data.positional_split(ds, gap=-1)
  with pytest.raises(ValueError, match='device_window'):
    data.positional_split(ds, device_window=1.5)


@st.composite
def _timed_lengths(draw):
  lengths = draw(st.lists(st.integers(0, 12), min_size=1, max_size=9))
  stamps = [
    sorted(draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)))
    for n in lengths
  ]
  return lengths, stamps


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(
  timed=_timed_lengths(),
  valid_time=st.integers(0, 31),
  test_delta=st.integers(0, 10),
  device_window=st.integers(0, 4),
  min_history=st.integers(0, 3),
  eval_windows=st.sampled_from(['all', 'first']),
)
def test_time_split_properties(
  timed, valid_time, test_delta, device_window, min_history, eval_windows
):
  lengths, stamps = timed
  test_time = valid_time + test_delta
  ds = _counting_dataset(lengths, timestamps=stamps)
  split = data.time_split(
    ds,
    valid_time=valid_time,
    test_time=test_time,
    device_window=device_window,
    min_history=min_history,
    eval_windows=eval_windows,
  )
  per_kind = {k: _by_user(split.windows(k), len(lengths)) for k in splits.KINDS}
  for u, ts in enumerate(stamps):
    test = [p for p, t in enumerate(ts) if t >= test_time and p >= 1]
    valid = [
      p for p, t in enumerate(ts) if valid_time <= t < test_time and p >= 1
    ]
    if eval_windows == 'first':
      test, valid = test[:1], valid[:1]
    train = [p for p, t in enumerate(ts) if t < valid_time and p >= min_history]
    device = train[max(len(train) - device_window, 0) :]
    llm = [p for p in train if p not in device]
    assert per_kind['test'][u] == test
    assert per_kind['valid'][u] == valid
    assert per_kind['srm_train'][u] == train
    assert per_kind['device_recent'][u] == device
    assert per_kind['llm_train'][u] == llm
    for p_eval in valid + test:
      assert all(p_eval > p for p in train)
    if valid and test:
      assert max(valid) < min(test)


def test_time_split_needs_timestamps_and_ordered_cuts():
  ds = _counting_dataset([3])
  with pytest.raises(ValueError, match='no timestamps'):
    data.time_split(ds, valid_time=0, test_time=1)
  ds = _counting_dataset([3], timestamps=[[1, 2, 3]])
  with pytest.raises(ValueError, match='valid_time <= test_time'):
    data.time_split(ds, valid_time=2, test_time=1)


def test_time_cuts_from_quantiles():
  ds = _counting_dataset(
    [4, 3, 3], timestamps=[[1, 2, 3, 4], [5, 6, 7], [8, 9, 10]]
  )
  # 10 timestamps 1..10: at least 80% are <= 8, at least 90% are <= 9.
  assert data.time_cuts_from_quantiles(ds, 0.8, 0.9) == (8, 9)
  assert data.time_cuts_from_quantiles(ds, 0.5, 0.5) == (5, 5)
  with pytest.raises(ValueError, match='quantile'):
    data.time_cuts_from_quantiles(ds, 0.9, 0.8)


def test_windows_validation():
  with pytest.raises(ValueError, match='1-D integer'):
    data.Windows(np.zeros(3, np.float32), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match='same shape'):
    data.Windows(np.zeros(3, np.int32), np.zeros(2, np.int32))
  w = data.Windows(np.array([1, 0]), np.array([2, 1]))
  assert w.users.dtype == np.int32 and len(w) == 2
  assert w.select(np.array([False, True])).users.tolist() == [0]


def test_windows_targets_accept_lists_datasets_and_flat():
  ds = _counting_dataset([4, 2])
  w = data.Windows(np.array([1, 0, 0]), np.array([1, 3, 0]))
  for source in (ds.sequences, ds, ds.flat):
    assert w.targets(source).tolist() == [2, 4, 1]
  with pytest.raises(ValueError, match='no target at position 2 for user 1'):
    data.Windows(np.array([1]), np.array([2])).targets(ds)
