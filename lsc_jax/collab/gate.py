"""Consistency gate: how much the LLM's and the SRM's orders agree.

LSC4Rec's device requests a fresh candidate list from the cloud when the
cached LLM order and the on-device SRM order of the same candidates
disagree. Two per-user measures are offered:

- `kendall_tau`: Kendall's tau-b between the two score vectors over the
  valid candidate slots, in [-1, 1]; higher = more consistent. This is the
  gate of this project.
- `footrule_displacement`: the official LSC4Rec code's measure, the mean
  absolute difference between each candidate's LLM rank and SRM rank
  (a Spearman footrule); higher = less consistent. The official code pools
  it over a batch of 16 users; here it is per user.

`consistency` maps either onto one direction: higher = more consistent, so
a user requests when consistency is low (`lsc_jax.collab.request`).

Speed: tau-b needs, per user, the sum of sign products over all candidate
pairs and the tie counts of each list. Building the `[batch, K, K]` pair
tensor makes XLA on CPU write and re-read it (a reduction is not fused with
its producer), which is bound by memory traffic. Instead the pairs are
accumulated column by column into three `[batch, K]` integer counters: a
loop over blocks of columns, each block unrolled into one elementwise
fusion, so nothing bigger than the inputs is written. See
`benchmarks/gate_bench.py` for the measured speed against scipy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Columns unrolled into one fused elementwise step of the tau-b loop.
_COLUMN_BLOCK = 10


def kendall_tau(
  x: jax.Array,
  y: jax.Array,
  valid: jax.Array | None = None,
  *,
  undefined_value: float = 1.0,
) -> jax.Array:
  """Kendall's tau-b of `x` and `y` over the valid slots of each row.

  tau_b = (n_c - n_d) / sqrt((n_0 - n_1) (n_0 - n_2)) with n valid slots,
  n_0 = n (n - 1) / 2 pairs, n_c / n_d concordant / discordant pairs and
  n_1 / n_2 the pairs tied in x / in y; equal to
  `scipy.stats.kendalltau(x, y)` (variant 'b') wherever that is defined.

  Where tau-b is undefined (fewer than two valid slots, or every valid
  score tied in x or in y; scipy returns NaN) this returns
  `undefined_value`, 1.0 by default: with nothing to order, or with one
  model expressing no preference, the two lists do not contradict each
  other, so there is no reason to spend a request on the user.

  NaN scores in valid slots: on concrete input this raises `ValueError`;
  inside `jax.jit` the row's result is NaN (never a silent number).

  Args:
    x: `[batch, num_candidates]` scores (e.g. the LLM's).
    y: `[batch, num_candidates]` scores (e.g. the SRM's).
    valid: `[batch, num_candidates]` bool, False on padded slots; None
      means all valid.
    undefined_value: value for rows where tau-b is undefined.

  Returns:
    `[batch]` float (float64 if an input is float64, else float32).
  """
  x, y, valid = _check_pair_inputs(x, y, valid, 'kendall_tau')
  return _kendall_tau(x, y, valid, undefined_value)


@jax.jit
def _kendall_tau(x, y, valid, undefined_value):
  dtype = jnp.result_type(x.dtype, y.dtype, jnp.float32)
  batch, num_candidates = x.shape
  num_blocks = -(-num_candidates // _COLUMN_BLOCK)
  padding = num_blocks * _COLUMN_BLOCK - num_candidates
  widths = ((0, 0), (0, padding))
  x_columns = jnp.pad(x, widths)
  y_columns = jnp.pad(y, widths)
  valid_columns = jnp.pad(valid, widths)

  # For every slot i, over valid slots j (i itself included): the sum of
  # sign(x_i - x_j) sign(y_i - y_j), and the counts of x_j == x_i and of
  # y_j == y_i. Comparisons, not subtraction, so huge scores cannot
  # overflow; a NaN compares unequal to everything and is caught below.
  def block(b, carry):
    sign_sum, x_ties, y_ties = carry
    start = b * _COLUMN_BLOCK
    xs = jax.lax.dynamic_slice_in_dim(x_columns, start, _COLUMN_BLOCK, 1)
    ys = jax.lax.dynamic_slice_in_dim(y_columns, start, _COLUMN_BLOCK, 1)
    vs = jax.lax.dynamic_slice_in_dim(valid_columns, start, _COLUMN_BLOCK, 1)
    for j in range(_COLUMN_BLOCK):
      xj, yj, vj = xs[:, j : j + 1], ys[:, j : j + 1], vs[:, j : j + 1]
      x_above, x_below = x > xj, x < xj
      y_above, y_below = y > yj, y < yj
      concordant = (x_above & y_above) | (x_below & y_below)
      discordant = (x_above & y_below) | (x_below & y_above)
      sign = jnp.where(concordant, 1, jnp.where(discordant, -1, 0))
      sign_sum = sign_sum + jnp.where(vj, sign, 0)
      x_ties = x_ties + (vj & (x == xj))
      y_ties = y_ties + (vj & (y == yj))
    return sign_sum, x_ties, y_ties

  zeros = jnp.zeros((batch, num_candidates), jnp.int32)
  sign_sum, x_ties, y_ties = jax.lax.fori_loop(
    0, num_blocks, block, (zeros, zeros, zeros)
  )

  # Ordered pairs count every pair twice; the diagonal adds n ties.
  n = jnp.sum(valid, axis=1, dtype=jnp.int32)
  score = jnp.sum(jnp.where(valid, sign_sum, 0), axis=1) // 2
  x_tied = (jnp.sum(jnp.where(valid, x_ties, 0), axis=1) - n) // 2
  y_tied = (jnp.sum(jnp.where(valid, y_ties, 0), axis=1) - n) // 2
  pairs = n * (n - 1) // 2
  denominator = (pairs - x_tied).astype(dtype) * (pairs - y_tied).astype(dtype)
  defined = denominator > 0
  tau = score.astype(dtype) / jnp.sqrt(jnp.where(defined, denominator, 1))
  tau = jnp.where(defined, tau, jnp.asarray(undefined_value, dtype))
  has_nan = jnp.any(valid & (jnp.isnan(x) | jnp.isnan(y)), axis=1)
  return jnp.where(has_nan, jnp.nan, tau)


def footrule_displacement(
  llm_order: jax.Array,
  srm_scores: jax.Array,
  valid: jax.Array | None = None,
  *,
  pad_penalty: bool = False,
) -> jax.Array:
  """Mean absolute LLM-rank vs SRM-rank displacement per user.

  The official LSC4Rec code's consistency measure, per user: rank the
  valid candidates by the LLM (`llm_order` ascending, ties by slot index)
  and by the SRM (`srm_scores` descending, ties in LLM order, as the
  official stable sort of the beam-ordered list does), and average
  |llm_rank - srm_rank| over the valid candidates. Higher means LESS
  consistent; `consistency(..., measure='footrule')` negates it so that a
  user requests when consistency is low. 0 for rows with no valid slot.

  Args:
    llm_order: `[batch, num_candidates]` each slot's position in the LLM's
      list, smaller = ranked earlier (`jnp.arange(K)` for slots in beam
      order; negated LLM scores also work).
    srm_scores: `[batch, num_candidates]` SRM scores, higher is better.
    valid: `[batch, num_candidates]` bool, False on padded slots.
    pad_penalty: add the official code's (4 + 0.3 Z)^2, Z = number of
      padded slots in the row. The official code pools it over a batch;
      with no padding it is the constant 16, which changes no decision.

  Returns:
    `[batch]` float; NaN for rows with NaN scores under `jax.jit` (concrete
    input with NaN raises).
  """
  llm_order, srm_scores, valid = _check_pair_inputs(
    llm_order, srm_scores, valid, 'footrule_displacement'
  )
  return _footrule(llm_order, srm_scores, valid, pad_penalty)


@functools.partial(jax.jit, static_argnames='pad_penalty')
def _footrule(llm_order, srm_scores, valid, pad_penalty):
  dtype = jnp.result_type(llm_order.dtype, srm_scores.dtype, jnp.float32)
  columns = jnp.broadcast_to(
    jnp.arange(llm_order.shape[1], dtype=jnp.int32), llm_order.shape
  )
  padded = (~valid).astype(jnp.int32)

  # LLM rank: padded slots last, then LLM order, then slot index.
  llm_rank = _ranks_of_sort((padded, llm_order, columns))
  # SRM rank: padded slots last, then SRM score descending, then LLM rank.
  srm_rank = _ranks_of_sort((padded, -srm_scores, llm_rank))

  n = jnp.sum(valid, axis=1)
  distance = jnp.abs(llm_rank - srm_rank).astype(dtype)
  total = jnp.sum(jnp.where(valid, distance, 0), axis=1)
  mean = total / jnp.maximum(n, 1).astype(dtype)
  if pad_penalty:
    num_padded = jnp.sum(padded, axis=1).astype(dtype)
    mean = mean + (4.0 + 0.3 * num_padded) ** 2
  has_nan = jnp.any(
    valid & (jnp.isnan(llm_order) | jnp.isnan(srm_scores)), axis=1
  )
  return jnp.where(has_nan, jnp.nan, mean)


def consistency(
  llm_scores: jax.Array,
  srm_scores: jax.Array,
  valid: jax.Array | None = None,
  *,
  measure: str = 'kendall',
) -> jax.Array:
  """Per-user consistency of the LLM and SRM orders; higher = consistent.

  Args:
    llm_scores: `[batch, num_candidates]` LLM scores, higher is better
      (beam log-probabilities, or `-jnp.arange(K)` for beam order).
    srm_scores: `[batch, num_candidates]` SRM scores, higher is better.
    valid: `[batch, num_candidates]` bool, False on padded slots.
    measure: `'kendall'` (tau-b, in [-1, 1]; 1.0 where undefined) or
      `'footrule'` (minus the mean rank displacement, in (-K, 0]).

  Returns:
    `[batch]` float.
  """
  if measure == 'kendall':
    return kendall_tau(llm_scores, srm_scores, valid)
  if measure == 'footrule':
    llm_scores = jnp.asarray(llm_scores)
    return -footrule_displacement(-llm_scores, srm_scores, valid)
  raise ValueError(
    f"consistency: measure must be 'kendall' or 'footrule', got {measure!r}"
  )


def _ranks_of_sort(keys: tuple[jax.Array, ...]) -> jax.Array:
  """0-based position of each slot after a lexicographic sort of `keys`.

  `keys` are `[batch, K]`, the first is the primary key; the last must be
  unique within a row, so the order is total and deterministic.
  """
  columns = jnp.broadcast_to(
    jnp.arange(keys[0].shape[1], dtype=jnp.int32), keys[0].shape
  )
  *_, order = jax.lax.sort((*keys, columns), dimension=1, num_keys=len(keys))
  rows = jnp.arange(order.shape[0])[:, None]
  return jnp.zeros_like(order).at[rows, order].set(columns)


def _check_pair_inputs(x, y, valid, where: str):
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  if x.ndim != 2 or y.shape != x.shape:
    raise ValueError(
      f'{where} expects two [batch, num_candidates] arrays of the same '
      f'shape, got {x.shape} and {y.shape}'
    )
  if valid is None:
    valid = jnp.ones(x.shape, jnp.bool_)
  valid = jnp.asarray(valid)
  if valid.shape != x.shape or valid.dtype != jnp.bool_:
    raise ValueError(
      f'{where}: valid must be a bool mask of shape {x.shape}, got '
      f'{valid.dtype} {valid.shape}'
    )
  concrete = not any(isinstance(a, jax.core.Tracer) for a in (x, y, valid))
  if concrete:
    bad = np.asarray(jnp.any(valid & (_isnan(x) | _isnan(y)), axis=1))
    if bad.any():
      rows = np.flatnonzero(bad)
      raise ValueError(
        f'{where}: NaN score in a valid slot in {len(rows)} row(s), first at '
        f'row {int(rows[0])}'
      )
  return x, y, valid


def _isnan(a: jax.Array) -> jax.Array:
  if jnp.issubdtype(a.dtype, jnp.floating):
    return jnp.isnan(a)
  return jnp.zeros(a.shape, jnp.bool_)
