"""Tests for per-device adaptation (vmapped, chunked) of an SRM."""

import jax
import numpy as np
import pytest

from lsc_jax.collab import adapt
from lsc_jax.data.splits import Windows
from lsc_jax.models import make_srm
from lsc_jax.train import srm_steps

NUM_ITEMS = 29
MAX_LEN = 7


def _toy_data(num_users=11, seed=0):
  rng = np.random.default_rng(seed)
  sequences = [
    rng.integers(1, NUM_ITEMS + 1, size=rng.integers(3, 13)).astype(np.int32)
    for _ in range(num_users)
  ]
  lengths = np.array([len(s) for s in sequences])
  users = np.arange(num_users)
  # Recent windows: the three targets before the last item (when present).
  recent_users, recent_positions = [], []
  for u, n in enumerate(lengths):
    for p in range(max(1, n - 4), n - 1):
      recent_users.append(u)
      recent_positions.append(p)
  recent = Windows(np.array(recent_users), np.array(recent_positions))
  test = Windows(users, lengths - 1)
  candidates = rng.integers(1, NUM_ITEMS + 1, size=(num_users, 13))
  return sequences, recent, test, candidates


@pytest.fixture(scope='module')
def model_and_params():
  model = make_srm(
    'sasrec',
    num_items=NUM_ITEMS,
    preset='smoke',
    max_len=MAX_LEN,
    dropout_rate=0.0,
  )
  params = srm_steps.init_params(model, MAX_LEN, seed=3)
  return model, params


def test_vmapped_chunks_equal_per_device_loop(model_and_params):
  model, params = model_and_params
  sequences, recent, test, candidates = _toy_data()
  data = adapt.build_device_data(
    sequences,
    recent,
    test,
    candidates,
    num_items=NUM_ITEMS,
    max_len=MAX_LEN,
    num_recent=3,
    num_negatives=4,
    seed=0,
  )
  # chunk 4 over 11 devices: the last chunk has filler rows.
  config = adapt.AdaptConfig(num_steps=3, learning_rate=0.1, chunk_size=4)
  result = adapt.adapt_and_score(model, params, data, config)
  looped = adapt.adapt_and_score_loop(model, params, data, config)
  assert result.scores.shape == (11, 13)
  np.testing.assert_allclose(result.scores, looped, rtol=2e-5, atol=2e-5)
  assert result.num_compiles == 1


def test_adaptation_lowers_each_devices_loss(model_and_params):
  model, params = model_and_params
  sequences, recent, test, candidates = _toy_data(seed=1)
  data = adapt.build_device_data(
    sequences,
    recent,
    test,
    candidates,
    num_items=NUM_ITEMS,
    max_len=MAX_LEN,
    num_recent=3,
    num_negatives=4,
    seed=0,
  )
  config = adapt.AdaptConfig(num_steps=8, learning_rate=0.2, chunk_size=8)
  result = adapt.adapt_and_score(model, params, data, config)
  has_recent = data.mask.sum(axis=1) > 0
  assert has_recent.sum() >= 5
  assert np.all(result.last_loss[has_recent] < result.first_loss[has_recent])


def test_device_without_recent_windows_keeps_shared_scores(model_and_params):
  model, params = model_and_params
  sequences, recent, test, candidates = _toy_data(seed=2)
  data = adapt.build_device_data(
    sequences,
    recent,
    test,
    candidates,
    num_items=NUM_ITEMS,
    max_len=MAX_LEN,
    num_recent=3,
    num_negatives=4,
    seed=0,
  )
  data = adapt.DeviceData(
    data.history,
    data.candidates,
    np.zeros_like(data.mask),
    data.eval_history,
    data.eval_candidates,
  )
  for optimizer in ('sgd', 'adam'):
    config = adapt.AdaptConfig(num_steps=3, optimizer=optimizer)
    result = adapt.adapt_and_score(model, params, data, config)
    shared = model.apply(params, data.eval_history, data.eval_candidates)
    np.testing.assert_allclose(result.scores, np.asarray(shared), atol=1e-6)


def test_item_table_is_frozen_and_subset_is_small(model_and_params):
  _, params = model_and_params
  adapted, frozen = adapt.partition_params(params, adapt.all_but_item_table)
  assert all('item_embedding' in '/'.join(k) for k in frozen)
  assert not any('item_embedding' in '/'.join(k) for k in adapted)
  merged = adapt.merge_params(adapted, frozen)
  leaves = jax.tree.leaves(
    jax.tree.map(lambda a, b: bool((a == b).all()), merged, params)
  )
  assert all(leaves)
  with pytest.raises(ValueError, match='adapted subset is empty'):
    adapt.partition_params(params, lambda path: False)


def test_device_data_uses_newest_recent_windows_and_masks_missing():
  sequences = [np.arange(1, 9, dtype=np.int32), np.array([3, 4], np.int32)]
  recent = Windows(np.array([0, 0, 0, 0]), np.array([3, 4, 5, 6]))
  test = Windows(np.array([0, 1]), np.array([7, 1]))
  data = adapt.build_device_data(
    sequences,
    recent,
    test,
    np.ones((2, 3), np.int32),
    num_items=20,
    max_len=4,
    num_recent=2,
    num_negatives=3,
    seed=0,
  )
  # User 0: the two newest recent targets are items at positions 6 and 5.
  np.testing.assert_array_equal(data.candidates[0, :, 0], [7, 6])
  np.testing.assert_array_equal(data.history[0, 0], [3, 4, 5, 6])
  np.testing.assert_array_equal(data.mask, [[1, 1], [0, 0]])
  # Negatives never repeat the target or the window's history.
  for slot in range(2):
    negatives = data.candidates[0, slot, 1:]
    forbidden = set(data.history[0, slot]) | {data.candidates[0, slot, 0], 0}
    assert not set(negatives) & forbidden
  np.testing.assert_array_equal(data.eval_history[1], [0, 0, 0, 3])
