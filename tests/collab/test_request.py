"""Tests of the per-user request policy in `lsc_jax.collab.request`."""

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from lsc_jax.collab import request


def test_budget_is_exact_floor():
  assert request.request_budget(100, 0.29) == 29  # Float math gives 28.
  assert request.request_budget(7, 3 / 7) == 3
  assert request.request_budget(7, 0.42) == 2
  assert request.request_budget(10**7, 0.29) == 2_900_000
  assert request.request_budget(22363, 0.05) == 1118
  assert request.request_budget(7, 0.0) == 0
  assert request.request_budget(7, 1.0) == 7
  assert request.request_budget(0, 0.5) == 0
  for bad in (-0.1, 1.5, float('nan')):
    with pytest.raises(ValueError, match='rho'):
      request.request_budget(10, bad)


def test_calibrate_on_known_distribution():
  values = np.random.default_rng(0).permutation(100).astype(np.float64)
  threshold = request.calibrate_threshold(values, 0.1)
  assert threshold == 9.5
  assert int(np.sum(values < threshold)) == 10
  assert request.calibrate_threshold(values, 0.0) == -np.inf
  assert request.calibrate_threshold(values, 1.0) == np.inf
  # Uniform validation scores: the threshold sits near the rho quantile.
  uniform = np.random.default_rng(1).random(20011)
  assert request.calibrate_threshold(uniform, 0.2) == pytest.approx(
    0.2, abs=0.01
  )


def test_calibrate_tie_at_the_boundary_stays_within_budget():
  values = np.array([0.1, 0.2, 0.5, 0.5, 0.5, 0.9])
  threshold = request.calibrate_threshold(values, 0.5)  # Budget 3.
  assert threshold == 0.5
  assert int(np.sum(values < threshold)) == 2


def test_threshold_requests_with_and_without_cap():
  consistency = jnp.array([0.3, -0.2, 0.9, 0.1, 0.1, 0.5, -0.4])
  below = request.threshold_requests(consistency, 0.35)
  np.testing.assert_array_equal(below, [1, 1, 0, 1, 1, 0, 1])
  capped = request.threshold_requests(consistency, 0.35, rho=3 / 7)
  np.testing.assert_array_equal(capped, [0, 1, 0, 1, 0, 0, 1])
  # A tie at the cap: exactly the budget, drawn from the tied users.
  capped = np.asarray(request.threshold_requests(consistency, 0.35, rho=0.5))
  assert capped.sum() == 3 and capped[1] and capped[6]
  assert capped[3] != capped[4]


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
  values=st.lists(st.integers(-3, 3), min_size=1, max_size=41),
  rho=st.floats(0.0, 1.0),
  seed=st.integers(0, 5),
)
def test_budgeted_topk_exact_count_least_consistent(values, rho, seed):
  consistency = jnp.asarray(values, jnp.float32)
  picked = np.asarray(
    request.budgeted_topk_requests(consistency, rho, seed=seed)
  )
  assert picked.sum() == request.request_budget(len(values), rho)
  values = np.asarray(values)
  if 0 < picked.sum() < len(values):
    assert values[picked].max() <= values[~picked].min()


def test_topk_ties_depend_on_seed_only():
  flat = jnp.zeros(53)
  a = request.budgeted_topk_requests(flat, 0.3, seed=0)
  b = request.budgeted_topk_requests(flat, 0.3, seed=0)
  c = request.budgeted_topk_requests(flat, 0.3, seed=1)
  np.testing.assert_array_equal(a, b)
  assert int(a.sum()) == int(c.sum()) == 15
  assert not np.array_equal(a, c)
  assert request.budgeted_topk_requests(flat, 0.0).sum() == 0
  assert bool(request.budgeted_topk_requests(flat, 1.0).all())


def test_random_requests_exact_deterministic_and_nested():
  a = np.asarray(request.random_requests(997, 0.1, seed=3))
  assert a.sum() == 99
  np.testing.assert_array_equal(a, request.random_requests(997, 0.1, seed=3))
  assert not np.array_equal(a, request.random_requests(997, 0.1, seed=4))
  larger = np.asarray(request.random_requests(997, 0.3, seed=3))
  assert larger.sum() == 299 and np.all(larger[a])
  assert request.random_requests(997, 0.0, seed=3).sum() == 0
  assert bool(request.random_requests(997, 1.0, seed=3).all())


def test_never_and_always():
  assert request.never_requests(13).shape == (13,)
  assert not bool(request.never_requests(13).any())
  assert bool(request.always_requests(13).all())


def test_nan_raises_and_jit():
  with pytest.raises(ValueError, match='NaN consistency.*index 1'):
    request.budgeted_topk_requests(jnp.array([0.0, jnp.nan]), 0.5)
  with pytest.raises(ValueError, match='NaN'):
    request.calibrate_threshold(np.array([0.0, np.nan]), 0.5)
  run = jax.jit(
    functools.partial(request.budgeted_topk_requests, rho=0.5, seed=0)
  )
  picked = run(jnp.array([0.2, jnp.nan, -0.1, 0.4]))
  np.testing.assert_array_equal(picked, [1, 0, 1, 0])
