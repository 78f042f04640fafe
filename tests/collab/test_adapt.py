"""Tests for per-device adaptation (vmapped, chunked) of an SRM.

Toy sizes are primes where they can be (11 devices, 13 candidates, 29
items, history width 7); chunk sizes leave filler rows.
"""

import flax.traverse_util
import jax
import numpy as np
import pytest

from lsc_jax import data as data_lib
from lsc_jax.collab import adapt
from lsc_jax.data.splits import Windows
from lsc_jax.models import SRM_NAMES, make_srm
from lsc_jax.train import srm_steps

NUM_ITEMS = 29
MAX_LEN = 7

# The output head of each SRM (smoke preset: one SASRec block, one DIN
# hidden width, so DIN's MLP is its first layer and the output layer),
# written out by hand from the model definitions.
HEAD_MODULES = {
  'sasrec': {
    ('blocks_0', 'feed_forward_norm'),
    ('blocks_0', 'feed_forward_in'),
    ('blocks_0', 'feed_forward_out'),
    ('final_norm',),
  },
  'gru4rec': {('output_projection',)},
  'din': {('candidate_in',), ('history_in',), ('output',)},
}


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
  return adapt.build_device_data(
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


def _model_and_params(name, seed=3):
  model = make_srm(
    name,
    num_items=NUM_ITEMS,
    preset='smoke',
    max_len=MAX_LEN,
    dropout_rate=0.0,
  )
  params = srm_steps.init_params(model, MAX_LEN, seed=seed)
  # Perturb every parameter so zero biases and unit LayerNorm scales
  # cannot hide a path mix-up.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [
    x + 0.1 * jax.random.normal(k, x.shape)
    for x, k in zip(leaves, keys, strict=True)
  ]
  return model, jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope='module')
def sasrec():
  return _model_and_params('sasrec')


def test_default_subset_is_the_output_head():
  assert adapt.AdaptConfig().subset == 'output_head'
  assert set(adapt.SUBSETS) >= {'output_head', 'all_but_item_table'}
  with pytest.raises(ValueError, match='AdaptConfig.subset: expected one of'):
    adapt.AdaptConfig(subset='head')
  with pytest.raises(ValueError, match='history_widths: expected increasing'):
    adapt.AdaptConfig(history_widths=(8, 4))


@pytest.mark.parametrize('name', SRM_NAMES)
def test_trunk_once_equals_generic_recompute(name):
  """The head-only path (trunk once) matches re-running the whole model."""
  model, params = _model_and_params(name)
  # 9 of the 11 devices have recent windows that are prefixes of their
  # evaluation history: in chunks of 4, SASRec and GRU4Rec encode one
  # history per device in two chunks and four histories in the third.
  data = _toy_data(seed=1)
  assert adapt.prefix_windows(data).sum() == 9
  # Uncut histories: one compile per path.
  config = adapt.AdaptConfig(
    num_steps=3, learning_rate=0.1, chunk_size=4, history_widths=()
  )
  adapted, _ = adapt.split_params(model, params, config)
  assert adapt.runs_trunk_once(model, adapted)

  fast = adapt.adapt_and_score(model, params, data, config)
  generic = adapt.adapt_and_score(model, params, data, config, trunk_once=False)
  for field in ('scores', 'first_loss', 'last_loss'):
    np.testing.assert_allclose(
      getattr(fast, field),
      getattr(generic, field),
      rtol=1e-5,
      atol=1e-5,
      err_msg=field,
    )
  # The adaptation moved the scores away from the shared model's.
  shared = model.apply(params, data.eval_history, data.eval_candidates)
  assert np.abs(fast.scores - np.asarray(shared)).max() > 1e-3


def test_vmapped_chunks_equal_per_device_loop(sasrec):
  model, params = sasrec
  data = _toy_data(seed=1)
  # chunk 4 over 11 devices: the last chunk has filler rows. (A config no
  # other test uses, so nothing is compiled yet.)
  config = adapt.AdaptConfig(num_steps=4, learning_rate=0.1, chunk_size=4)
  result = adapt.adapt_and_score(model, params, data, config)
  looped = adapt.adapt_and_score_loop(model, params, data, config)
  assert result.scores.shape == (11, 13)
  np.testing.assert_allclose(result.scores, looped, rtol=2e-5, atol=2e-5)
  # One per history width and form, at most.
  assert 1 <= result.num_compiles <= 2 * (len(config.history_widths) + 1)
  again = adapt.adapt_and_score(model, params, data, config)
  assert again.num_compiles == 0
  np.testing.assert_array_equal(again.scores, result.scores)


def test_cut_histories_equal_uncut(sasrec):
  model, params = sasrec
  data = _toy_data(seed=5)
  cut = adapt.AdaptConfig(num_steps=2, chunk_size=4, history_widths=(4,))
  uncut = adapt.AdaptConfig(num_steps=2, chunk_size=4, history_widths=())
  a = adapt.adapt_and_score(model, params, data, cut)
  b = adapt.adapt_and_score(model, params, data, uncut)
  # Some chunk ran at width 4: a shape the uncut run never compiled.
  assert a.num_compiles > b.num_compiles
  np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a.last_loss, b.last_loss, rtol=1e-5, atol=1e-6)


def test_history_spans_cover_every_real_item():
  history = np.zeros((2, 3, 7), np.int32)
  history[0, 0, -2:] = [4, 5]
  history[0, 2, -5:] = [1, 2, 3, 4, 5]
  eval_history = np.zeros((2, 7), np.int32)
  eval_history[0, -3:] = [1, 2, 3]
  eval_history[1, -1] = 9
  data = adapt.DeviceData(
    history,
    np.zeros((2, 3, 5), np.int32),
    np.ones((2, 3), np.float32),
    eval_history,
    np.ones((2, 11), np.int32),
  )
  np.testing.assert_array_equal(adapt.history_spans(data), [5, 1])


def test_prefix_windows_by_hand():
  eval_history = np.array(
    [[0, 0, 3, 4, 5, 6], [0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]], np.int32
  )
  history = np.zeros((3, 2, 6), np.int32)
  history[0, 0, -3:] = [3, 4, 5]  # the eval history without its newest
  history[0, 1, -1:] = [3]
  history[1, 0, -3:] = [3, 4, 5]
  history[1, 1, -2:] = [4, 5]  # not the oldest item: not a prefix
  history[2, 0, -6:] = [9, 1, 2, 3, 4, 5]  # truncated in the eval history
  history[2, 1, -2:] = [7, 7]
  mask = np.array([[1, 1], [1, 1], [1, 0]], np.float32)
  data = adapt.DeviceData(
    history,
    np.ones((3, 2, 5), np.int32),
    mask,
    eval_history,
    np.ones((3, 11), np.int32),
  )
  np.testing.assert_array_equal(adapt.prefix_windows(data), [1, 0, 0])
  # A masked window does not count.
  history[2, 0] = [0, 1, 2, 3, 4, 5]
  np.testing.assert_array_equal(adapt.prefix_windows(data), [1, 0, 1])


@pytest.mark.parametrize('name', SRM_NAMES)
def test_output_head_changes_only_the_named_parameters(name):
  model, params = _model_and_params(name)
  data = _toy_data(seed=5)
  device = int(np.argmax(data.mask.sum(axis=1)))
  config = adapt.AdaptConfig(num_steps=2, learning_rate=0.1)
  tuned, _, step_losses = adapt.adapt_device(
    model, params, data, device, config
  )
  before = flax.traverse_util.flatten_dict(params)
  after = flax.traverse_util.flatten_dict(tuned)
  assert set(before) == set(after)
  changed = {
    path[1:-1]
    for path in before
    if not np.array_equal(before[path], after[path])
  }
  # Every head module moved; nothing else did.
  assert changed == HEAD_MODULES[name]
  assert step_losses[-1] < step_losses[0]

  # The earlier subset leaves the item table alone and moves the rest.
  config = adapt.AdaptConfig(num_steps=2, subset='all_but_item_table')
  tuned, _, _ = adapt.adapt_device(model, params, data, device, config)
  after = flax.traverse_util.flatten_dict(tuned)
  table = ('params', 'item_embedding', 'embedding')
  np.testing.assert_array_equal(before[table], after[table])
  assert any(
    not np.array_equal(before[p], after[p]) for p in before if p != table
  )


def test_default_lowers_recent_window_loss_on_beauty_slice():
  """On 41 real Beauty users, every SRM's default adaptation learns.

  Default subset, steps, optimizer and learning rate; one chunk of uncut
  histories (which changes no result) to compile once per model.
  """
  config = adapt.AdaptConfig(chunk_size=41, history_widths=())
  dataset = data_lib.load('beauty', verbose=False)
  split = data_lib.positional_split(dataset)
  test = split.test.select(np.arange(41))
  candidates = np.random.default_rng(0).integers(
    1, dataset.num_items + 1, size=(41, 7)
  )
  for name in SRM_NAMES:
    model = make_srm(name, num_items=dataset.num_items, preset='smoke')
    params = srm_steps.init_params(model, model.max_len, seed=0)
    data = adapt.build_device_data(
      dataset.sequences,
      split.device_recent,
      test,
      candidates,
      num_items=dataset.num_items,
      max_len=model.max_len,
      num_recent=split.device_window,
      num_negatives=4,
      seed=0,
    )
    result = adapt.adapt_and_score(model, params, data, config)
    has_recent = data.mask.sum(axis=1) > 0
    assert has_recent.sum() >= 37
    first = result.first_loss[has_recent]
    last = result.last_loss[has_recent]
    assert np.all(last < first), name
    assert last.mean() < first.mean(), name


def test_device_without_recent_windows_keeps_shared_scores(sasrec):
  model, params = sasrec
  data = _toy_data(seed=2)
  data = adapt.DeviceData(
    data.history,
    data.candidates,
    np.zeros_like(data.mask),
    data.eval_history,
    data.eval_candidates,
  )
  shared = model.apply(params, data.eval_history, data.eval_candidates)
  for subset, optimizer in (
    ('output_head', 'sgd'),
    ('all_but_item_table', 'adam'),
  ):
    config = adapt.AdaptConfig(
      num_steps=3, optimizer=optimizer, subset=subset, history_widths=()
    )
    result = adapt.adapt_and_score(model, params, data, config)
    np.testing.assert_allclose(
      result.scores, np.asarray(shared), rtol=1e-5, atol=1e-5
    )


def test_partition_merge_round_trip_and_empty_subset(sasrec):
  model, params = sasrec
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
  with pytest.raises(ValueError, match='unknown adapted subset'):
    adapt.subset_predicate(model, 'everything')
  # The head subset of a device copy is small next to the earlier default.
  head = adapt.describe_subset(params, model.is_head_parameter)
  rest = adapt.describe_subset(params, adapt.all_but_item_table)
  assert head['adapted_parameters'] < rest['adapted_parameters']


def test_output_head_needs_a_trunk_head_split():
  class NoSplit:
    num_items = NUM_ITEMS

  with pytest.raises(ValueError, match='has no trunk/head split'):
    adapt.subset_predicate(NoSplit(), 'output_head')


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
