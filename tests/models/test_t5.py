"""Tests of the Flax T5: cached decoding, grouped cross-attention, buckets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsc_jax.models import t5


@functools.cache
def _smoke(feed_forward_proj='relu', tied=True, vocab=31):
  """(model, params, jitted apply), built once per configuration."""
  config = t5.make_config(
    vocab_size=vocab,
    d_model=22,
    d_kv=5,
    d_ff=37,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=3,
    feed_forward_proj=feed_forward_proj,
    tie_word_embeddings=tied,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
  )
  model = t5.build_t5(config)
  params = t5.init_params(model, jax.random.key(3))
  apply = jax.jit(model.apply, static_argnames=('method', 'deterministic'))
  return model, params, apply


def _prompts(batch=3, length=13, vocab=31):
  rng = np.random.default_rng(0)
  ids = rng.integers(2, vocab, size=(batch, length))
  mask = np.ones((batch, length), bool)
  mask[-1, 7:] = False
  ids[~mask] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize('ff,tied', [('relu', True), ('gated-gelu', False)])
def test_incremental_decoding_equals_full_decoding(ff, tied):
  model, params, apply = _smoke(ff, tied)
  ids, mask = _prompts()
  targets = jnp.asarray(np.random.default_rng(1).integers(1, 31, (3, 7)))
  decoder_ids = t5.shift_right(targets, 0)
  full = apply({'params': params}, ids, mask, decoder_ids)

  encoded = apply({'params': params}, ids, mask, method=t5.T5.encode)
  # A longer cache than needed: unused positions must stay invisible.
  cache = model.apply(
    {'params': params}, encoded, 3, 11, method=t5.T5.init_cache
  )
  step = jax.jit(
    lambda tokens, cache: model.apply(
      {'params': params}, tokens, cache, mask, method=t5.T5.decode_step
    )
  )
  for position in range(7):
    logits, cache = step(decoder_ids[:, position], cache)
    np.testing.assert_allclose(logits, full[:, position], atol=1e-5, rtol=1e-5)
  assert int(cache['index']) == 7


def test_grouped_decoder_rows_equal_repeated_encoder_rows():
  model, params, apply = _smoke()
  ids, mask = _prompts()
  group = 5
  decoder_ids = jnp.asarray(
    np.random.default_rng(2).integers(0, 31, (3 * group, 4))
  )
  encoded = apply({'params': params}, ids, mask, method=t5.T5.encode)
  grouped = apply(
    {'params': params}, decoder_ids, encoded, mask, method=t5.T5.decode
  )
  repeated = apply(
    {'params': params},
    decoder_ids,
    jnp.repeat(encoded, group, axis=0),
    jnp.repeat(mask, group, axis=0),
    method=t5.T5.decode,
  )
  np.testing.assert_allclose(grouped, repeated, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_the_output():
  model, params, apply = _smoke()
  ids, mask = _prompts(batch=1, length=7)
  decoder_ids = jnp.asarray([[0, 5, 9]])
  short = apply({'params': params}, ids, mask, decoder_ids)
  padded_ids = jnp.concatenate([ids, jnp.zeros((1, 6), ids.dtype)], axis=1)
  padded_mask = jnp.concatenate([mask, jnp.zeros((1, 6), bool)], axis=1)
  padded = apply({'params': params}, padded_ids, padded_mask, decoder_ids)
  np.testing.assert_allclose(short, padded, atol=1e-5, rtol=1e-5)


def test_relative_position_buckets_by_hand():
  # Bidirectional, 32 buckets, max distance 128 (T5's defaults): 16 per
  # direction, 8 exact, then log-spaced; positive offsets add 16.
  relative = jnp.asarray([[0, 1, -1, 7, -7, 8, -8, 127, -127, 500, -500]])
  got = t5.relative_position_bucket(
    relative, bidirectional=True, num_buckets=32, max_distance=128
  )
  # 8 -> 8 + floor(log(8/8)/log(16) * 8) = 8; 127 -> 8 + floor(7.98) = 15.
  np.testing.assert_array_equal(
    got[0], [0, 17, 1, 23, 7, 24, 8, 31, 15, 31, 15]
  )
  causal = t5.relative_position_bucket(
    relative, bidirectional=False, num_buckets=32, max_distance=128
  )
  # Future positions (positive offsets) all fall in bucket 0; 16 exact.
  np.testing.assert_array_equal(causal[0], [0, 0, 1, 0, 7, 0, 8, 0, 31, 0, 31])


def test_relative_position_buckets_match_transformers():
  torch = pytest.importorskip('torch', reason='reference implementation')
  from transformers.models.t5.modeling_t5 import T5Attention

  relative = np.arange(-300, 301)[None, :]
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (8, 12), (13, 41)):
      expected = T5Attention._relative_position_bucket(
        torch.tensor(relative),
        bidirectional=bidirectional,
        num_buckets=buckets,
        max_distance=distance,
      ).numpy()
      got = t5.relative_position_bucket(
        jnp.asarray(relative),
        bidirectional=bidirectional,
        num_buckets=buckets,
        max_distance=distance,
      )
      np.testing.assert_array_equal(np.asarray(got), expected)


def test_dropout_is_active_only_when_asked():
  _, params, apply = _smoke()
  ids, mask = _prompts()
  decoder_ids = ids[:, :4]
  a = apply({'params': params}, ids, mask, decoder_ids)
  b = apply({'params': params}, ids, mask, decoder_ids)
  np.testing.assert_array_equal(a, b)
  c = apply(
    {'params': params},
    ids,
    mask,
    decoder_ids,
    deterministic=False,
    rngs={'dropout': jax.random.key(1)},
  )
  assert not np.allclose(a, c)


def test_presets():
  sizes = {}
  for preset in ('smoke', 'cpu', 't5-small'):
    config = t5.llm_config(preset, 13_441)
    model = t5.build_t5(config)
    shapes = jax.eval_shape(
      lambda m=model: t5.init_params(m, jax.random.key(0))
    )
    sizes[preset] = t5.count_params(shapes)
  assert sizes['smoke'] < 1_000_000
  assert 2_000_000 <= sizes['cpu'] <= 3_000_000, sizes
  # t5-small without its 32k vocabulary: 60.5M - 32128 * 512 ~= 44M.
  assert 40_000_000 < sizes['t5-small'] < 60_000_000
  with pytest.raises(ValueError, match='Unknown LLM size preset'):
    t5.llm_config('huge', 10)
