"""Tests of the consistency gate in `lsc_jax.collab.gate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from lsc_jax.collab import gate


def random_case(rng, batch, num_candidates, levels, dtype):
  """Integer-valued scores (many ties) and masks with short rows."""
  x = rng.integers(0, levels, (batch, num_candidates)).astype(dtype)
  y = rng.normal(size=(batch, num_candidates)).astype(dtype)
  y[:, ::3] = np.round(y[:, ::3])
  valid = rng.random((batch, num_candidates)) < 0.85
  valid[0] = True  # One full row.
  valid[1] = False  # One empty row.
  valid[2] = np.arange(num_candidates) == 0  # One single-item row.
  return x, y, valid


def scipy_tau(x, y, valid, undefined_value=1.0):
  out = []
  for row in range(x.shape[0]):
    if valid[row].sum() < 2:  # scipy warns and returns NaN.
      out.append(undefined_value)
      continue
    statistic = scipy.stats.kendalltau(
      x[row][valid[row]], y[row][valid[row]], variant='b'
    ).statistic
    out.append(undefined_value if np.isnan(statistic) else statistic)
  return np.array(out)


@pytest.mark.parametrize('num_candidates', [2, 3, 13, 23, 50])
@pytest.mark.parametrize('levels', [2, 5, 1000])
def test_matches_scipy_float32(num_candidates, levels):
  rng = np.random.default_rng(num_candidates * 7 + levels)
  x, y, valid = random_case(rng, 37, num_candidates, levels, np.float32)
  ours = np.asarray(gate.kendall_tau(x, y, valid))
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, scipy_tau(x, y, valid), atol=1e-5)


@pytest.mark.parametrize('num_candidates', [7, 31, 50])
def test_matches_scipy_float64(num_candidates):
  rng = np.random.default_rng(num_candidates)
  x, y, valid = random_case(rng, 41, num_candidates, 4, np.float64)
  with jax.enable_x64(True):
    ours = np.asarray(gate.kendall_tau(x, y, valid))
  assert ours.dtype == np.float64
  np.testing.assert_allclose(ours, scipy_tau(x, y, valid), atol=1e-6)


def test_undefined_cases_return_documented_value():
  x = jnp.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [4.0, 5.0, 6.0]])
  y = jnp.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [7.0, 7.0, 7.0]])
  valid = jnp.array(
    [[True, False, False], [True, True, True], [True, True, True]]
  )
  np.testing.assert_array_equal(gate.kendall_tau(x, y, valid), [1, 1, 1])
  np.testing.assert_array_equal(
    gate.kendall_tau(x, y, valid, undefined_value=0.0), [0, 0, 0]
  )


def test_known_values_and_symmetries():
  x = jnp.array([[0.1, 0.4, 0.2, 0.9, 0.5]])
  assert float(gate.kendall_tau(x, x)[0]) == pytest.approx(1.0)
  assert float(gate.kendall_tau(x, -x)[0]) == pytest.approx(-1.0)
  # Swapping the two largest of a sorted list of 5 leaves 9 of the 10
  # pairs concordant and 1 discordant: (9 - 1) / 10.
  a = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
  b = jnp.array([[1.0, 2.0, 3.0, 5.0, 4.0]])
  assert float(gate.kendall_tau(a, b)[0]) == pytest.approx(0.8)
  rng = np.random.default_rng(0)
  p = rng.normal(size=(5, 11)).astype(np.float32)
  q = rng.normal(size=(5, 11)).astype(np.float32)
  np.testing.assert_allclose(gate.kendall_tau(p, q), gate.kendall_tau(q, p))


def test_padded_slots_do_not_matter():
  rng = np.random.default_rng(1)
  x, y, valid = random_case(rng, 19, 13, 3, np.float32)
  base = np.asarray(gate.kendall_tau(x, y, valid))
  x2 = np.where(valid, x, rng.normal(size=x.shape) * 1e6).astype(np.float32)
  y2 = np.where(valid, y, np.inf).astype(np.float32)
  np.testing.assert_array_equal(gate.kendall_tau(x2, y2, valid), base)


def test_nan_raises_on_host_and_propagates_under_jit():
  x = jnp.array([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0]])
  y = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
  with pytest.raises(ValueError, match='NaN score.*first at row 0'):
    gate.kendall_tau(x, y)
  # A NaN on a padded slot is fine.
  valid = jnp.array([[True, False, True], [True, True, True]])
  np.testing.assert_allclose(gate.kendall_tau(x, y, valid), [1.0, 1.0])
  jitted = jax.jit(gate.kendall_tau)(x, y)
  assert np.isnan(float(jitted[0])) and float(jitted[1]) == 1.0


def test_integer_inputs_and_shape_errors():
  x = jnp.array([[3, 1, 2, 2]])
  y = jnp.array([[1, 2, 3, 4]])
  expected = scipy.stats.kendalltau([3, 1, 2, 2], [1, 2, 3, 4]).statistic
  assert float(gate.kendall_tau(x, y)[0]) == pytest.approx(expected)
  with pytest.raises(ValueError, match='same shape'):
    gate.kendall_tau(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='bool mask'):
    gate.kendall_tau(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3)))


def official_footrule(llm_order, srm_scores, valid):
  """The official code's displacement for one user, with Python sorts."""
  slots = [i for i in range(len(llm_order)) if valid[i]]
  llm_list = sorted(slots, key=lambda i: (llm_order[i], i))
  srm_list = sorted(llm_list, key=lambda i: srm_scores[i], reverse=True)
  if not slots:
    return 0.0
  total = sum(abs(r - llm_list.index(item)) for r, item in enumerate(srm_list))
  return total / len(slots)


def test_footrule_matches_python_reference():
  rng = np.random.default_rng(2)
  batch, num_candidates = 23, 17
  llm_order = np.stack([rng.permutation(num_candidates) for _ in range(batch)])
  srm_scores = rng.integers(0, 6, (batch, num_candidates)).astype(np.float32)
  valid = rng.random((batch, num_candidates)) < 0.8
  valid[1] = False
  ours = np.asarray(gate.footrule_displacement(llm_order, srm_scores, valid))
  expected = [
    official_footrule(llm_order[b], srm_scores[b], valid[b])
    for b in range(batch)
  ]
  np.testing.assert_allclose(ours, expected, rtol=1e-6)
  penalised = gate.footrule_displacement(
    llm_order, srm_scores, valid, pad_penalty=True
  )
  pads = (~valid).sum(axis=1)
  np.testing.assert_allclose(penalised, ours + (4 + 0.3 * pads) ** 2, rtol=1e-6)


def test_footrule_hand_values_and_direction():
  order = jnp.arange(4)[None, :]
  same = jnp.array([[4.0, 3.0, 2.0, 1.0]])
  reverse = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  # Reversed list of 4: |0-3| + |1-2| + |2-1| + |3-0| = 8, mean 2.
  assert float(gate.footrule_displacement(order, same)[0]) == 0.0
  assert float(gate.footrule_displacement(order, reverse)[0]) == 2.0
  llm_scores = -order.astype(jnp.float32)
  for measure in ('kendall', 'footrule'):
    consistent = gate.consistency(llm_scores, same, measure=measure)
    inconsistent = gate.consistency(llm_scores, reverse, measure=measure)
    assert float(consistent[0]) > float(inconsistent[0])
  assert float(gate.consistency(llm_scores, same)[0]) == 1.0
  assert float(gate.consistency(llm_scores, reverse)[0]) == -1.0
  with pytest.raises(ValueError, match='measure'):
    gate.consistency(llm_scores, same, measure='spearman')
