"""Request policy: which users ask the cloud for a fresh candidate list.

A user requests when the consistency of the cached LLM order and the SRM
order (`lsc_jax.collab.gate.consistency`, higher = more consistent) is low.
A budget ratio rho in [0, 1] caps the requests at floor(rho * num_users).
Decisions are per user; the official LSC4Rec code decides per batch of 16
users, in batch order, until its budget runs out.

- `calibrate_threshold` picks the threshold on the VALIDATION split so that
  a share rho of those users requests; `threshold_requests` applies it to
  the test split (optionally capped by the same budget).
- `budgeted_topk_requests`: exactly the budget, the least consistent users.
- Baselines at the same budget: `random_requests`; also `never_requests`
  and `always_requests`.

The budget is floor(rho * num_users) with float error forgiven: a product
within a relative 1e-9 of an integer counts as that integer, so 0.29 of 100
users is 29 requests, not the 28 that 0.29 * 100 = 28.999999999999996 gives.

Ties in consistency are broken by a seeded random priority
(`jax.random.permutation(fold_in(key(seed), 1), num_users)`): the same seed
gives the same users, and no user is favoured by its position in the data.
NaN consistency raises on concrete input; inside `jax.jit` a NaN user
counts as the most consistent and never requests.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# fold_in tags so the tie-break stream and the random baseline differ.
_TIE_BREAK_STREAM = 1
_RANDOM_STREAM = 2
# Relative distance to an integer below which rho * num_users is rounded.
_BUDGET_TOLERANCE = 1e-9


def request_budget(num_users: int, rho: float) -> int:
  """floor(rho * num_users), forgiving float error (see the module doc)."""
  if not isinstance(num_users, int | np.integer) or num_users < 0:
    raise ValueError(f'num_users must be an int >= 0, got {num_users!r}')
  if isinstance(rho, jax.core.Tracer):
    raise ValueError(
      'rho must be a concrete number (the request count sets array shapes '
      'and comparisons); mark it static under jax.jit'
    )
  value = float(rho)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'rho must be in [0, 1], got {rho!r}')
  product = value * int(num_users)
  nearest = round(product)
  if abs(product - nearest) <= _BUDGET_TOLERANCE * max(1.0, product):
    return int(nearest)
  return math.floor(product)


def calibrate_threshold(
  valid_consistency: np.ndarray | jax.Array, rho: float
) -> float:
  """Threshold on validation consistency for a request share of rho.

  Users request when consistency < threshold. With m = floor(rho * n) and
  c_(1) <= ... <= c_(n) the sorted validation values, the threshold is
  the midpoint of c_(m) and c_(m+1), so exactly m validation users fall
  below it; -inf for m = 0 and +inf for m = n. If c_(m) == c_(m+1) (a tie
  across the boundary) the threshold is that value and fewer than m users
  fall strictly below it: the share never exceeds rho on the data it was
  calibrated on. Host-side (numpy).

  Args:
    valid_consistency: `[num_users]` validation consistency scores.
    rho: request ratio in [0, 1].

  Returns:
    The threshold as a Python float.
  """
  values = np.asarray(valid_consistency, dtype=np.float64)
  if values.ndim != 1:
    raise ValueError(
      f'calibrate_threshold expects [num_users], got shape {values.shape}'
    )
  _raise_on_nan(values, 'calibrate_threshold')
  n = values.shape[0]
  budget = request_budget(n, rho)
  if budget == 0:
    return float('-inf')
  if budget == n:
    return float('inf')
  ordered = np.sort(values)
  below, above = ordered[budget - 1], ordered[budget]
  if below == above:
    return float(above)
  return float(below + (above - below) / 2)


def threshold_requests(
  test_consistency: jax.Array,
  threshold: float,
  rho: float | None = None,
  *,
  seed: int = 0,
) -> jax.Array:
  """Users whose consistency is below `threshold`, at most the budget.

  Args:
    test_consistency: `[num_users]`.
    threshold: from `calibrate_threshold` on validation data.
    rho: optional budget; if more than floor(rho * num_users) users fall
      below the threshold, only that many of the least consistent request
      (ties by the seeded priority).
    seed: tie-break seed for the cap.

  Returns:
    bool `[num_users]`.
  """
  values = _check_consistency(test_consistency, 'threshold_requests')
  below = values < threshold
  if rho is None:
    return below
  budget = request_budget(values.shape[0], rho)
  return below & (_priority_ranks(values, seed) < budget)


def budgeted_topk_requests(
  consistency: jax.Array, rho: float, *, seed: int = 0
) -> jax.Array:
  """Exactly floor(rho * num_users) requests: the least consistent users.

  Args:
    consistency: `[num_users]`.
    rho: request ratio in [0, 1].
    seed: tie-break seed among users of equal consistency.

  Returns:
    bool `[num_users]`.
  """
  values = _check_consistency(consistency, 'budgeted_topk_requests')
  budget = request_budget(values.shape[0], rho)
  return _priority_ranks(values, seed) < budget


def random_requests(num_users: int, rho: float, seed: int) -> jax.Array:
  """Exactly floor(rho * num_users) uniformly random users.

  The users are the first of one seeded permutation, so for a fixed seed
  the users requesting at a smaller rho also request at every larger rho.

  Returns:
    bool `[num_users]`.
  """
  budget = request_budget(num_users, rho)
  key = jax.random.fold_in(jax.random.key(seed), _RANDOM_STREAM)
  priority = jax.random.permutation(key, num_users)
  return priority < budget


def never_requests(num_users: int) -> jax.Array:
  """No user requests: bool `[num_users]` all False."""
  return jnp.zeros((num_users,), jnp.bool_)


def always_requests(num_users: int) -> jax.Array:
  """Every user requests: bool `[num_users]` all True."""
  return jnp.ones((num_users,), jnp.bool_)


def _priority_ranks(values: jax.Array, seed: int) -> jax.Array:
  """0-based rank by consistency ascending, ties by a seeded priority."""
  num_users = values.shape[0]
  key = jax.random.fold_in(jax.random.key(seed), _TIE_BREAK_STREAM)
  tie_break = jax.random.permutation(key, num_users).astype(jnp.int32)
  users = jnp.arange(num_users, dtype=jnp.int32)
  # lax.sort orders NaN after every number: NaN users rank last.
  _, _, order = jax.lax.sort((values, tie_break, users), num_keys=2)
  return jnp.zeros_like(order).at[order].set(users)


def _check_consistency(consistency, where: str) -> jax.Array:
  values = jnp.asarray(consistency)
  if values.ndim != 1:
    raise ValueError(f'{where} expects [num_users], got shape {values.shape}')
  if not isinstance(values, jax.core.Tracer):
    _raise_on_nan(np.asarray(values, dtype=np.float64), where)
  return values


def _raise_on_nan(values: np.ndarray, where: str) -> None:
  bad = np.flatnonzero(np.isnan(values))
  if bad.size:
    raise ValueError(
      f'{where}: NaN consistency for {bad.size} user(s), first at index '
      f'{int(bad[0])}'
    )
