"""Tests of the on-device models (SASRec, GRU4Rec, DIN), smoke preset.

Sizes are primes (batch 3, history 7, candidates 11, 13 items) so a
transposed axis cannot pass by accident.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsc_jax.models import (
  SRM_NAMES,
  check_item_ids,
  get_srm_config,
  make_srm,
  oov_id,
)

NUM_ITEMS = 13
BATCH, SEQ_LEN, NUM_CANDIDATES = 3, 7, 11


def _history(width=SEQ_LEN):
  """Three left-padded histories: a short one, an empty one, a full one."""
  rows = [[3, 4, 5, 1, 2], [], [1, 2, 3, 4, 5, 6, 7][-width:]]
  out = np.zeros((BATCH, width), np.int32)
  for r, items in enumerate(rows):
    if items:
      out[r, -len(items) :] = items
  return jnp.asarray(out)


def _candidates():
  rng = np.random.default_rng(0)
  return jnp.asarray(
    rng.integers(1, NUM_ITEMS + 1, size=(BATCH, NUM_CANDIDATES)), jnp.int32
  )


def _build(name, **overrides):
  return _build_cached(name, tuple(sorted(overrides.items())))


@functools.lru_cache
def _build_cached(name, overrides):
  model = make_srm(name, num_items=NUM_ITEMS, preset='smoke', **dict(overrides))
  params = model.init(jax.random.key(0), _history(), _candidates())
  # Perturb every parameter so zero-initialised biases and LayerNorm
  # offsets cannot hide a bug.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [
    x + 0.1 * jax.random.normal(k, x.shape)
    for x, k in zip(leaves, keys, strict=True)
  ]
  return model, jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize('name', SRM_NAMES)
def test_shapes_and_score_all_columns(name):
  model, params = _build(name)
  history, candidates = _history(), _candidates()
  scores = model.apply(params, history, candidates)
  everything = model.apply(params, history, method='score_all')
  assert scores.shape == (BATCH, NUM_CANDIDATES)
  assert everything.shape == (BATCH, NUM_ITEMS + 1)
  assert np.all(np.isneginf(everything[:, 0]))
  assert np.all(np.isfinite(everything[:, 1:]))
  np.testing.assert_allclose(
    scores,
    np.take_along_axis(np.asarray(everything), np.asarray(candidates), 1),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize('name', SRM_NAMES)
def test_left_padding_invariance(name):
  model, params = _build(name)
  short = model.apply(params, _history(SEQ_LEN), _candidates())
  wide = jnp.pad(_history(SEQ_LEN), ((0, 0), (4, 0)))
  assert wide.shape == (BATCH, 11)
  long = model.apply(params, wide, _candidates())
  np.testing.assert_allclose(short, long, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', SRM_NAMES)
def test_history_changes_scores(name):
  """The invariance above must not hold because history is ignored."""
  model, params = _build(name)
  history = _history()
  other = history.at[0, -1].set(11)
  a = model.apply(params, history, _candidates())
  b = model.apply(params, other, _candidates())
  assert np.abs(np.asarray(a[0] - b[0])).max() > 1e-4
  np.testing.assert_allclose(a[1:], b[1:], rtol=1e-6)


@pytest.mark.parametrize('name', SRM_NAMES)
def test_empty_history_is_finite_and_fixed(name):
  model, params = _build(name)
  empty_7 = jnp.zeros((2, 7), jnp.int32)
  empty_11 = jnp.zeros((2, 11), jnp.int32)
  a = model.apply(params, empty_7, method='score_all')
  b = model.apply(params, empty_11, method='score_all')
  assert np.all(np.isfinite(a[:, 1:]))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a[0], a[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['sasrec', 'gru4rec'])
def test_causality_of_per_position_states(name):
  model, params = _build(name)
  history = _history()
  changed = history.at[:, 4].set(jnp.array([9, 9, 9]))
  a = model.apply(params, history, method='encode_positions')
  b = model.apply(params, changed, method='encode_positions')
  assert a.shape == (BATCH, SEQ_LEN, 16)
  # Columns before the change are untouched; the changed column differs
  # (row 1 was padding there and becomes a real item).
  np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-6, atol=1e-6)
  for row in range(BATCH):
    assert np.abs(np.asarray(a[row, 4] - b[row, 4])).max() > 1e-4


@pytest.mark.parametrize('name', ['sasrec', 'gru4rec'])
def test_prefix_state_equals_state_of_truncated_history(name):
  """Column t of a history encodes exactly the prefix ending at t."""
  model, params = _build(name)
  history = _history()
  states = model.apply(params, history, method='encode_positions')
  prefix = jnp.pad(history[:, :5], ((0, 0), (2, 0)))
  prefix_user = model.apply(params, prefix, method='encode')
  np.testing.assert_allclose(
    np.asarray(states)[[0, 2], 4],
    np.asarray(prefix_user)[[0, 2]],
    rtol=1e-5,
    atol=1e-5,
  )


def test_check_item_ids_numpy_and_jax():
  ids = np.array([[-2, -1, 0, 1], [13, 14, 15, 10**6]], np.int32)
  expected = np.array([[14, 14, 0, 1], [13, 14, 14, 14]], np.int32)
  mapped, count = check_item_ids(ids, NUM_ITEMS)
  np.testing.assert_array_equal(mapped, expected)
  assert count == 5 and isinstance(count, int)
  mapped_jax, count_jax = jax.jit(check_item_ids, static_argnums=1)(
    jnp.asarray(ids), NUM_ITEMS
  )
  np.testing.assert_array_equal(mapped_jax, expected)
  assert int(count_jax) == 5
  assert oov_id(NUM_ITEMS) == 14
  with pytest.raises(TypeError, match='integers'):
    check_item_ids(np.array([1.0]), NUM_ITEMS)
  with pytest.raises(ValueError, match='num_items'):
    check_item_ids(np.array([1]), 0)


@pytest.mark.parametrize('name', SRM_NAMES)
def test_unknown_ids_never_borrow_an_item_embedding(name):
  model, params = _build(name)
  table = np.asarray(params['params']['item_embedding']['embedding'])
  assert table.shape[0] == NUM_ITEMS + 2
  unknown = jnp.array([-1, -2, -14, 14, 15, 10**6], jnp.int32)
  vectors = np.asarray(model.apply(params, unknown, method='item_vectors'))
  for v in vectors:
    np.testing.assert_array_equal(v, table[NUM_ITEMS + 1])
  # Unclamped gathers would give row 13 for -2 (wrap) and rows 0 and 13
  # for -14 and 10**6 after clamping; all differ from the OOV row.
  assert np.abs(table[NUM_ITEMS + 1] - table[NUM_ITEMS]).max() > 1e-3
  assert np.abs(table[NUM_ITEMS + 1] - table[0]).max() > 1e-3

  history = _history()
  candidates = jnp.array([[-2, 13, 14, 10**6]] * BATCH, jnp.int32)
  scores = np.asarray(model.apply(params, history, candidates))
  np.testing.assert_allclose(scores[:, 0], scores[:, 2], rtol=1e-6)
  np.testing.assert_allclose(scores[:, 3], scores[:, 2], rtol=1e-6)
  assert np.abs(scores[:, 0] - scores[:, 1]).max() > 1e-5

  in_history = history.at[0, -1].set(-2)
  as_oov = history.at[0, -1].set(14)
  as_item = history.at[0, -1].set(13)
  a = model.apply(params, in_history, candidates)
  np.testing.assert_allclose(a, model.apply(params, as_oov, candidates))
  assert np.abs(np.asarray(a - model.apply(params, as_item, candidates))).max()


@pytest.mark.parametrize('name', SRM_NAMES)
def test_dropout_only_when_training(name):
  model, params = _build(name, dropout_rate=0.5)
  history, candidates = _history(), _candidates()
  a = model.apply(params, history, candidates)
  np.testing.assert_array_equal(a, model.apply(params, history, candidates))
  t1 = model.apply(
    params,
    history,
    candidates,
    train=True,
    rngs={'dropout': jax.random.key(1)},
  )
  t2 = model.apply(
    params,
    history,
    candidates,
    train=True,
    rngs={'dropout': jax.random.key(2)},
  )
  assert np.abs(np.asarray(t1 - t2)).max() > 1e-4


@pytest.mark.parametrize('name', SRM_NAMES)
def test_history_longer_than_max_len_raises(name):
  model, params = _build(name)
  too_long = jnp.ones((BATCH, 13), jnp.int32)
  with pytest.raises(ValueError, match='max_len=12'):
    model.apply(params, too_long, _candidates())


def test_candidates_must_match_history_batch():
  model, params = _build('sasrec')
  with pytest.raises(ValueError, match='candidates'):
    model.apply(params, _history(), jnp.ones((2, 5), jnp.int32))


def test_registry_presets_and_errors():
  paper = get_srm_config('sasrec', 'paper')
  assert (paper.embed_dim, paper.max_len, paper.num_blocks) == (32, 10, 1)
  assert (paper.loss, paper.num_negatives) == ('bce', 4)
  cpu = get_srm_config('sasrec')
  assert (cpu.embed_dim, cpu.max_len) == (64, 50)
  assert get_srm_config('din', 'cpu').objective == 'last_item'
  assert get_srm_config('sasrec', 'cpu', max_len=30).bucket_edges[-1] == 30
  with pytest.raises(ValueError, match='unknown SRM'):
    make_srm('bert4rec', num_items=NUM_ITEMS)
  with pytest.raises(ValueError, match='unknown SRMConfig fields'):
    make_srm('sasrec', num_items=NUM_ITEMS, hidden=3)
  with pytest.raises(ValueError, match='preset'):
    make_srm('sasrec', num_items=NUM_ITEMS, preset='gpu')
  with pytest.raises(ValueError, match='per-position'):
    get_srm_config('din', 'smoke', objective='next_item')
  with pytest.raises(ValueError, match='loss'):
    get_srm_config('sasrec', 'smoke', loss='hinge')


def test_paper_preset_sizes():
  """Item table of the paper's SASRec: (num_items + 2) x 32."""
  model = make_srm('sasrec', num_items=12101, preset='paper')
  params = jax.eval_shape(
    model.init,
    jax.random.key(0),
    jnp.ones((1, 10), jnp.int32),
    jnp.ones((1, 1), jnp.int32),
  )
  assert params['params']['item_embedding']['embedding'].shape == (12103, 32)
  assert params['params']['position_embedding']['embedding'].shape == (10, 32)
  assert len([k for k in params['params'] if k.startswith('blocks_')]) == 1
