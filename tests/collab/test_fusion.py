"""Tests of result fusion in `lsc_jax.collab.fusion`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsc_jax.collab import fusion


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def valid_order(scores, valid):
  """Slots of each row, best first, valid only (ties by slot index)."""
  scores = np.asarray(scores)
  return [
    [int(i) for i in np.argsort(-scores[b], kind='stable') if valid[b, i]]
    for b in range(scores.shape[0])
  ]


def random_case(seed, batch=7, num_candidates=13):
  rng = np.random.default_rng(seed)
  llm = np.sort(rng.normal(size=(batch, num_candidates)), axis=1)[:, ::-1]
  srm = rng.normal(size=(batch, num_candidates)) * 3
  valid = np.arange(num_candidates)[None, :] < rng.integers(
    1, num_candidates + 1, (batch, 1)
  )
  return (
    llm.astype(np.float32).copy(),
    srm.astype(np.float32),
    valid,
  )


def test_hand_computed_rank_fusion():
  llm = jnp.array([[-0.1, -0.5, -0.9, -2.0]])  # Beam order, K = 4.
  srm = jnp.array([[0.0, 2.0, -1.0, 0.5]])
  valid = jnp.array([[True, True, True, False]])
  fused = fusion.fuse(llm, srm, valid, alpha=0.5)
  p = sigmoid(np.array([0.0, 2.0, -1.0]))
  expected = 0.5 * (1 - np.array([1, 2, 3]) / 4) + 0.5 * p
  np.testing.assert_allclose(fused[0, :3], expected, rtol=1e-6)
  assert fused[0, 3] == -jnp.inf


@pytest.mark.parametrize('llm_score', ['rank', 'logprob'])
@pytest.mark.parametrize('normalisation', ['sigmoid', 'minmax', 'softmax'])
def test_alpha_one_is_llm_order_and_zero_is_srm_order(llm_score, normalisation):
  llm, srm, valid = random_case(0)
  kwargs = dict(llm_score=llm_score, normalisation=normalisation)
  only_llm = fusion.fuse(llm, srm, valid, alpha=1.0, **kwargs)
  only_srm = fusion.fuse(llm, srm, valid, alpha=0.0, **kwargs)
  assert valid_order(only_llm, valid) == valid_order(llm, valid)
  assert valid_order(only_srm, valid) == valid_order(srm, valid)
  assert bool(jnp.all(jnp.where(valid, True, only_llm == -jnp.inf)))


def test_official_methods_match_fusion_formulas():
  llm, srm, valid = random_case(1)
  p = np.asarray(fusion.normalise(srm, valid, 'sigmoid'))
  m3 = fusion.official_fusion(llm, srm, valid, method=3)
  m4 = fusion.official_fusion(llm, srm, valid, method='srm_weighted')
  half = fusion.fuse(llm, srm, valid, alpha=0.5)
  third = fusion.fuse(llm, srm, valid, alpha=1 / 3)
  # 0.5 (1 - j/K) + 0.5 p = 0.5 (method 3 + 1.5), and
  # (1 - j/K) / 3 + 2 p / 3 = (method 4 + 2) / 3.
  np.testing.assert_allclose(
    np.where(valid, half, 0), np.where(valid, 0.5 * (m3 + 1.5), 0), atol=1e-6
  )
  np.testing.assert_allclose(
    np.where(valid, third, 0), np.where(valid, (m4 + 2) / 3, 0), atol=1e-6
  )
  m1 = fusion.official_fusion(llm, srm, valid, method='llm_only')
  m5 = fusion.official_fusion(llm, srm, valid, method=5)
  assert valid_order(m1, valid) == valid_order(llm, valid)
  np.testing.assert_allclose(np.where(valid, m5, 0), p, rtol=1e-6)


def test_official_confident_srm_hand_values():
  llm = jnp.array([[3.0, 2.0, 1.0, 0.0]])
  p = np.array([[0.95, 0.5, 0.05, 0.7]])
  logits = np.log(p / (1 - p))
  scores = fusion.official_fusion(llm, jnp.asarray(logits), method=2)
  j = np.array([1, 2, 3, 4])
  expected = 0.5 - j / 4 + np.array([0.45, 0.0, -0.45, 0.0])
  np.testing.assert_allclose(scores[0], expected, atol=1e-6)


def test_llm_ranks_ties_and_padding():
  llm = jnp.array([[1.0, 5.0, 5.0, 9.0, 2.0]])
  valid = jnp.array([[True, True, True, False, True]])
  np.testing.assert_array_equal(
    fusion.llm_ranks(llm, valid)[0, [0, 1, 2, 4]], [4, 1, 2, 3]
  )
  assert int(fusion.llm_ranks(llm, valid)[0, 3]) == 5


def test_normalisations():
  scores = jnp.array([[2.0, 4.0, 3.0, 100.0], [1.0, 1.0, 1.0, 1.0]])
  valid = jnp.array([[True, True, True, False], [True, True, True, True]])
  minmax = fusion.normalise(scores, valid, 'minmax')
  np.testing.assert_allclose(minmax[0], [0.0, 1.0, 0.5, 0.0])
  np.testing.assert_allclose(minmax[1], [0.5] * 4)
  softmax = fusion.normalise(scores, valid, 'softmax')
  np.testing.assert_allclose(jnp.sum(softmax, axis=1), [1.0, 1.0], rtol=1e-6)
  assert float(softmax[0, 3]) == 0.0
  np.testing.assert_allclose(
    fusion.normalise(scores, valid, 'none')[0], [2.0, 4.0, 3.0, 0.0]
  )
  with pytest.raises(ValueError, match='method must be'):
    fusion.normalise(scores, valid, 'zscore')


def test_logprob_minmax_hand_values():
  llm = jnp.array([[-1.0, -2.0, -3.0]])
  srm = jnp.array([[0.0, 0.0, 0.0]])
  fused = fusion.fuse(llm, srm, alpha=0.25, llm_score='logprob')
  np.testing.assert_allclose(
    fused[0], 0.25 * np.array([1.0, 0.5, 0.0]) + 0.75 * 0.5, rtol=1e-6
  )


def test_errors():
  ones = jnp.ones((2, 3))
  with pytest.raises(ValueError, match='alpha'):
    fusion.fuse(ones, ones, alpha=1.5)
  with pytest.raises(ValueError, match='llm_score'):
    fusion.fuse(ones, ones, alpha=0.5, llm_score='beam')
  with pytest.raises(ValueError, match='NaN in srm_scores.*row 1'):
    fusion.fuse(ones, ones.at[1, 2].set(jnp.nan), alpha=0.5)
  with pytest.raises(ValueError, match='unknown method'):
    fusion.official_fusion(ones, ones, method='mean')
  with pytest.raises(ValueError, match='1-5'):
    fusion.official_fusion(ones, ones, method=6)
  with pytest.raises(ValueError, match='same shape'):
    fusion.fuse(ones, jnp.ones((2, 5)), alpha=0.5)


def test_jit_matches_eager():
  llm, srm, valid = random_case(2, batch=11, num_candidates=7)
  run = jax.jit(functools.partial(fusion.fuse, alpha=0.3))
  np.testing.assert_allclose(
    run(llm, srm, valid), fusion.fuse(llm, srm, valid, alpha=0.3), rtol=1e-6
  )
  traced_alpha = jax.jit(lambda a: fusion.fuse(llm, srm, valid, alpha=a))(0.3)
  np.testing.assert_allclose(traced_alpha, run(llm, srm, valid), rtol=1e-6)
