"""Tests of the trie-constrained beam search and candidate scoring.

The reference is exhaustive enumeration: every item's identifier is scored
by a plain teacher-forced forward pass (`T5.__call__`, no cache) and a
numpy log-softmax, and the best K are compared with the beam search.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsc_jax.models import beam_search, item_ids, llm, t5

VOCAB = 17


def _model(vocab=VOCAB, seed=0):
  config = t5.make_config(
    vocab_size=vocab,
    d_model=22,
    d_kv=5,
    d_ff=29,
    num_layers=1,
    num_decoder_layers=2,
    num_heads=3,
    dropout_rate=0.0,
  )
  model = t5.build_t5(config)
  params = t5.init_params(model, jax.random.key(seed))
  # Sharper output distributions than T5's init, so beams compete.
  params['shared']['embedding'] = 4.0 * params['shared']['embedding']
  return model, params


def _ragged_ids():
  """19 items over tokens 3..8 with identifiers of 1 to 3 tokens (+ EOS);
  some share prefixes, one is a prefix of others before EOS."""
  rows = [
    [3], [4], [3, 5], [3, 6], [3, 5, 7], [3, 5, 8], [4, 4], [4, 4, 4],
    [5, 3], [5, 4], [5, 5, 5], [6], [6, 7, 8], [6, 8, 7], [7, 3, 3],
    [7, 3, 4], [8], [8, 8], [8, 3, 5],
  ]  # fmt: skip
  return item_ids.from_token_rows(
    'text', rows, base_vocab_size=VOCAB, vocab_size=VOCAB, eos_id=1, pad_id=0
  )


def _prompts(batch=3, length=11, vocab=VOCAB, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  mask[0, 6:] = False
  ids[~mask] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


def _exhaustive(model, params, ids, mask, identifiers: item_ids.ItemIds):
  """`[batch, num_items]` log-likelihood of every item, item i at i - 1."""
  items = np.arange(1, identifiers.num_items + 1)
  tokens, lengths = identifiers.identifiers(items)
  batch = ids.shape[0]
  out = np.zeros((batch, len(items)))
  forward = jax.jit(model.apply)
  for b in range(batch):
    rep = lambda x, b=b: jnp.repeat(x[b : b + 1], len(items), axis=0)
    logits = forward(
      {'params': params},
      rep(ids),
      rep(mask),
      t5.shift_right(jnp.asarray(tokens), 0),
    )
    logits = np.asarray(logits, np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_lp = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    valid = np.arange(tokens.shape[1]) < lengths[:, None]
    out[b] = (token_lp * valid).sum(-1)
  return out


_SEARCHES = {}


def _search(model, params, identifiers, ids, mask, beam, k):
  # One compiled search per shape, shared by tests (params are arguments).
  key = (model.settings, identifiers.scheme, identifiers.num_items, beam, k)
  if key not in _SEARCHES:
    _SEARCHES[key] = beam_search.make_beam_search(
      model, identifiers.trie, beam_size=beam, num_candidates=k
    )
  items, scores = _SEARCHES[key](params, ids, mask)
  return np.asarray(items), np.asarray(scores)


@pytest.mark.parametrize('seed', [0, 1])
def test_wide_beam_equals_exhaustive_top_k(seed):
  model, params = _model(seed=seed)
  identifiers = _ragged_ids()
  ids, mask = _prompts(seed=seed)
  reference = _exhaustive(model, params, ids, mask, identifiers)

  # A beam as wide as the item count keeps every prefix: exact search.
  items, scores = _search(model, params, identifiers, ids, mask, 19, 7)
  expected = np.argsort(-reference, axis=1)[:, :7] + 1
  np.testing.assert_array_equal(items, expected)
  np.testing.assert_allclose(
    scores, np.take_along_axis(reference, expected - 1, 1), atol=1e-4
  )


@pytest.mark.parametrize('beam,k', [(5, 5), (9, 4), (19, 19)])
def test_results_are_valid_distinct_sorted_and_scored(beam, k):
  model, params = _model(seed=2)
  identifiers = _ragged_ids()
  ids, mask = _prompts(batch=3, seed=3)
  reference = _exhaustive(model, params, ids, mask, identifiers)
  items, scores = _search(model, params, identifiers, ids, mask, beam, k)
  assert items.shape == scores.shape == (3, k)
  for row, row_scores, ref in zip(items, scores, reference, strict=True):
    assert ((row >= 1) & (row <= 19)).all()
    assert len(set(row.tolist())) == k
    assert (np.diff(row_scores) <= 1e-6).all()
    # Each reported score is that item's true sequence log-likelihood.
    np.testing.assert_allclose(row_scores, ref[row - 1], atol=1e-4)
  if k == 19:
    expected = np.argsort(-reference, axis=1) + 1
    np.testing.assert_array_equal(items, expected)


def test_atomic_ids_all_items_with_random_weights():
  num_items = 23
  identifiers = item_ids.atomic_ids(num_items, base_vocab_size=7)
  model, params = _model(vocab=identifiers.vocab_size, seed=4)
  assert identifiers.trie.widths == (num_items, 1)
  ids, mask = _prompts(batch=4, vocab=identifiers.vocab_size)
  items, scores = _search(
    model, params, identifiers, ids, mask, num_items, num_items
  )
  for row in items:
    assert sorted(row.tolist()) == list(range(1, num_items + 1))
  reference = _exhaustive(model, params, ids, mask, identifiers)
  np.testing.assert_array_equal(items, np.argsort(-reference, axis=1) + 1)
  np.testing.assert_allclose(
    scores, np.sort(reference, axis=1)[:, ::-1], atol=1e-4
  )


def test_candidate_scoring_agrees_with_generation():
  model, params = _model(seed=5)
  identifiers = _ragged_ids()
  ids, mask = _prompts(batch=3, seed=6)
  items, scores = _search(model, params, identifiers, ids, mask, 19, 7)
  scored = llm.score_candidates(
    model,
    params,
    ids,
    mask,
    jnp.asarray(items),
    jnp.asarray(identifiers.tokens),
    jnp.asarray(identifiers.lengths),
  )
  np.testing.assert_allclose(np.asarray(scored), scores, atol=1e-5)


def test_beam_smaller_than_k_is_rejected():
  model, params = _model()
  identifiers = _ragged_ids()
  ids, mask = _prompts()
  with pytest.raises(ValueError, match='beam_size'):
    _search(model, params, identifiers, ids, mask, 3, 4)
  with pytest.raises(ValueError, match='exceeds the number of items'):
    _search(model, params, identifiers, ids, mask, 30, 20)
