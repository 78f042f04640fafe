"""Tie-safe ranking metrics for one relevant item per user.

Every metric here is the exact expectation under uniformly random
tie-breaking. If g valid candidates score strictly higher than the target
and t others score exactly the same, the target's rank is uniform on
g+1 .. g+t+1, and for a cutoff k

  HR@k        = E[1[rank <= k]]
  NDCG@k      = E[1[rank <= k] / log2(rank + 1)]   (one relevant item, so
                                                     the ideal DCG is 1)
  MRR@k       = E[1[rank <= k] / rank]
  Precision@k = HR@k / k

are computed in closed form from prefix sums F of the discount f(r):
E[f(rank) 1[rank <= k]] = (F(min(g+t+1, k)) - F(min(g, k))) / (t+1), with
F(n) = n for HR, `D(n) = sum_{r<=n} 1/log2(r+1)` for NDCG and
`H(n) = sum_{r<=n} 1/r` for MRR.
So a model that gives every candidate the same score gets HR@1 = 1/n, not 1,
and the value is the same on every run.

Three protocols, each named in the result (`RankingMetrics.protocol`, and
the keys of `RankingMetrics.to_dict()` such as `'full/ndcg@10'`):

- `ranking_metrics`: rank inside a given candidate list (`[batch,
  num_candidates]` scores and 0/1 labels), e.g. the cloud LLM's top-50 list
  re-ranked on the device (protocol `'candidates@50'` by default). A row
  whose target is not among its candidates counts as a miss.
- `full_ranking_metrics`: rank the target against every item (scores
  `[batch, num_items + 1]`, column 0 is the padding item and never ranked);
  protocol `'full'`.
- `sampled_metrics`: the target against N negatives drawn by
  `sample_negatives`, fixed per (seed, user); protocol `'sampled@N'`.

Bad input: when the arrays are concrete (not traced inside `jax.jit`), the
public functions check them on the host and raise `ValueError` naming the
first bad row: NaN scores in valid slots, labels other than 0/1, more than
one positive, a positive on a padded slot, targets out of range. Inside
`jax.jit` nothing can raise, so the same cases follow a documented, counted
fallback and are reported in `RankingMetrics.counts`: a NaN score ranks as
-inf, the first valid positive (lowest column) is the target, positives on
padded slots are ignored, an out-of-range target is a miss.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DEFAULT_KS = (1, 5, 10, 20)
METRIC_NAMES = ('hr', 'ndcg', 'mrr', 'precision')
# Item columns per step of the full-ranking count loop.
_COLUMN_BLOCK = 2048


@struct.dataclass
class RankingMetrics:
  """Metric values with the protocol that produced them.

  A pytree (it passes through `jax.jit`); `protocol` is static.

  Attributes:
    values: `'hr@10'`, `'ndcg@10'`, `'mrr@10'`, `'precision@10'`, ... for
      every cutoff; scalars (averaged over rows) or `[batch]` (per row).
    counts: diagnostics, summed over weighted rows (scalars) or per row
      (`[batch]`): `rows` (total row weight), `rows_without_target` (the
      target is not among the ranked items: a miss), `nan_scores` (NaN
      scores that ranked as -inf), `extra_positives` (positives beyond the
      first, ignored), `padded_positives` (positives on padded slots,
      ignored), `invalid_targets` (out-of-range targets, misses),
      `excluded_targets` (targets present in `exclude`, kept).
    protocol: `'full'`, `'sampled@100'`, `'candidates@50'`, ...
  """

  values: dict[str, jax.Array]
  counts: dict[str, jax.Array]
  protocol: str = struct.field(pytree_node=False)

  def __getitem__(self, name: str) -> jax.Array:
    return self.values[name]

  def keys(self):
    return self.values.keys()

  def to_dict(self, *, include_counts: bool = True) -> dict[str, float]:
    """Host floats keyed `'<protocol>/<name>'`, e.g. `'full/ndcg@10'`."""
    out = {}
    items = list(self.values.items())
    if include_counts:
      items += list(self.counts.items())
    for name, value in items:
      value = np.asarray(value)
      if value.ndim != 0:
        raise ValueError(
          f'RankingMetrics.to_dict needs averaged metrics, but {name!r} '
          f'has shape {value.shape}; call reduce_rows() first'
        )
      out[f'{self.protocol}/{name}'] = float(value)
    return out


def metric_keys(ks: Sequence[int] = DEFAULT_KS) -> tuple[str, ...]:
  """Names of the metric values for `ks`, e.g. `('hr@1', 'ndcg@1', ...)`."""
  return tuple(f'{name}@{k}' for k in ks for name in METRIC_NAMES)


def reduce_rows(
  per_row: RankingMetrics, row_weights: jax.Array | None = None
) -> RankingMetrics:
  """Weighted mean of per-row metrics; counts are weighted sums.

  Args:
    per_row: a `RankingMetrics` whose values are `[batch]`.
    row_weights: `[batch]` non-negative weights, or a boolean mask of the
      rows to keep (e.g. False for filler rows of a padded batch, or a
      subset of users). None weighs every row 1.

  Returns:
    Scalar metrics. With zero total weight the means are NaN (there is no
    row to average); `counts['rows']` is then 0.
  """
  batch = per_row.counts['rows'].shape[0]
  weights = _row_weights(row_weights, batch)
  total = jnp.sum(weights)

  def weighted_sum(value):
    # A zero weight drops the row even where its value is not finite.
    return jnp.sum(jnp.where(weights > 0, weights * value, 0))

  values = {
    name: weighted_sum(value) / total for name, value in per_row.values.items()
  }
  counts = {name: weighted_sum(value) for name, value in per_row.counts.items()}
  return RankingMetrics(values=values, counts=counts, protocol=per_row.protocol)


def ranking_metrics(
  scores: jax.Array,
  labels: jax.Array,
  ks: Sequence[int] = DEFAULT_KS,
  valid: jax.Array | None = None,
  *,
  row_weights: jax.Array | None = None,
  reduce: bool = True,
  protocol: str | None = None,
) -> RankingMetrics:
  """HR, NDCG, MRR and Precision at each k inside candidate lists.

  Args:
    scores: `[batch, num_candidates]` scores, higher is better.
    labels: `[batch, num_candidates]` 0/1 (or bool); at most one positive per
      row among the valid slots. A row without one is a miss (all metrics
      0). Under `jax.jit`, extra positives are ignored (the lowest column
      wins) and counted; on concrete input they raise.
    ks: cutoffs.
    valid: `[batch, num_candidates]` bool; False marks padded slots, which
      are never ranked (they cannot outrank the target) and are never the
      target. None means every slot is valid.
    row_weights: `[batch]` weights or bool mask for the mean (e.g. False on
      filler rows of a padded batch); ignored when `reduce=False`. Host
      checks skip rows of weight 0.
    reduce: average over rows (True) or return `[batch]` values.
    protocol: name stored in the result; default
      `'candidates@<num_candidates>'`.

  Returns:
    `RankingMetrics` (see the module docstring for ties and NaN).
  """
  ks = _check_ks(ks)
  scores = jnp.asarray(scores)
  labels = jnp.asarray(labels)
  if scores.ndim != 2 or labels.shape != scores.shape:
    raise ValueError(
      'ranking_metrics expects scores and labels of the same shape '
      f'[batch, num_candidates], got {scores.shape} and {labels.shape}'
    )
  valid = _valid_mask(valid, scores.shape, 'ranking_metrics')
  if protocol is None:
    protocol = f'candidates@{scores.shape[1]}'
  if _is_concrete(scores, labels, valid, row_weights):
    _check_candidate_inputs(scores, labels, valid, row_weights)
  values, counts = _candidate_metrics(scores, labels, valid, ks)
  per_row = RankingMetrics(values=values, counts=counts, protocol=protocol)
  return reduce_rows(per_row, row_weights) if reduce else per_row


def full_ranking_metrics(
  scores: jax.Array,
  targets: jax.Array,
  *,
  exclude: jax.Array | None = None,
  ks: Sequence[int] = DEFAULT_KS,
  row_weights: jax.Array | None = None,
  reduce: bool = True,
) -> RankingMetrics:
  """Metrics of the target ranked against every item (protocol `'full'`).

  Only counts of items scoring above and equal to the target are needed;
  they are accumulated over blocks of item columns, so the temporaries are
  `[batch, 2048]`, never scores-sized.

  Args:
    scores: `[batch, num_items + 1]`; column 0 is the padding item and is
      never ranked.
    targets: `[batch]` int item ids in 1..num_items.
    exclude: optional bool `[batch, num_items + 1]`; True removes an item
      from the ranking (e.g. the user's history). Applied only when the
      caller passes it. The target itself is never excluded: a target
      marked in `exclude` is still ranked (and counted in
      `counts['excluded_targets']`).
    ks: cutoffs.
    row_weights: `[batch]` weights or bool mask for the mean.
    reduce: average over rows (True) or return `[batch]` values.

  Returns:
    `RankingMetrics` with protocol `'full'`.
  """
  ks = _check_ks(ks)
  scores = jnp.asarray(scores)
  targets = jnp.asarray(targets)
  if scores.ndim != 2 or targets.shape != scores.shape[:1]:
    raise ValueError(
      'full_ranking_metrics expects scores [batch, num_items + 1] and '
      f'targets [batch], got {scores.shape} and {targets.shape}'
    )
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(
      f'full_ranking_metrics: targets must be integer item ids, got dtype '
      f'{targets.dtype}'
    )
  if exclude is not None:
    exclude = jnp.asarray(exclude)
    if exclude.shape != scores.shape or exclude.dtype != jnp.bool_:
      raise ValueError(
        'full_ranking_metrics: exclude must be a bool mask shaped like '
        f'scores {scores.shape}, got {exclude.dtype} {exclude.shape}'
      )
  if _is_concrete(scores, targets, exclude, row_weights):
    _check_full_inputs(scores, targets, exclude, row_weights)
  values, counts = _full_metrics(scores, targets, exclude, ks)
  per_row = RankingMetrics(values=values, counts=counts, protocol='full')
  return reduce_rows(per_row, row_weights) if reduce else per_row


def sampled_metrics(
  candidate_scores: jax.Array,
  ks: Sequence[int] = DEFAULT_KS,
  valid: jax.Array | None = None,
  *,
  row_weights: jax.Array | None = None,
  reduce: bool = True,
) -> RankingMetrics:
  """Metrics of the target against N sampled negatives (`'sampled@N'`).

  Args:
    candidate_scores: `[batch, 1 + num_negatives]`; column 0 is the target,
      the rest the negatives from `sample_negatives` (see
      `sampled_candidates`). Ties are expectations, so putting the target
      first gives it no advantage.
    ks: cutoffs.
    valid: optional `[batch, 1 + num_negatives]` bool; column 0 must be
      valid.
    row_weights: `[batch]` weights or bool mask for the mean.
    reduce: average over rows (True) or return `[batch]` values.

  Returns:
    `RankingMetrics` with protocol `'sampled@<num_negatives>'`.
  """
  candidate_scores = jnp.asarray(candidate_scores)
  if candidate_scores.ndim != 2 or candidate_scores.shape[1] < 1:
    raise ValueError(
      'sampled_metrics expects candidate_scores [batch, 1 + num_negatives], '
      f'got shape {candidate_scores.shape}'
    )
  labels = jnp.zeros(candidate_scores.shape, jnp.int32).at[:, 0].set(1)
  return ranking_metrics(
    candidate_scores,
    labels,
    ks,
    valid,
    row_weights=row_weights,
    reduce=reduce,
    protocol=f'sampled@{candidate_scores.shape[1] - 1}',
  )


def sample_negatives(
  user_ids: np.ndarray,
  targets: np.ndarray,
  num_items: int,
  num_negatives: int,
  *,
  seed: int,
  exclude: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
  """Negatives for the sampled protocol, fixed per (seed, user).

  User u's negatives come from `np.random.default_rng([seed, u])`, so they
  do not depend on the batch, the order of users or the other users. They
  are drawn uniformly without replacement from 1..num_items, never the
  target and never an item of `exclude[row]`.

  Args:
    user_ids: `[batch]` non-negative int user ids.
    targets: `[batch]` target item ids in 1..num_items.
    num_items: number of real items (ids 1..num_items; 0 is padding).
    num_negatives: N.
    seed: the sampling seed.
    exclude: optional per-row arrays of item ids to avoid (e.g. history).

  Returns:
    int32 `[batch, num_negatives]`.
  """
  user_ids = np.asarray(user_ids)
  targets = np.asarray(targets)
  if user_ids.ndim != 1 or targets.shape != user_ids.shape:
    raise ValueError(
      'sample_negatives expects user_ids and targets of shape [batch], got '
      f'{user_ids.shape} and {targets.shape}'
    )
  if exclude is not None and len(exclude) != len(user_ids):
    raise ValueError(
      f'sample_negatives: exclude has {len(exclude)} rows, expected '
      f'{len(user_ids)}'
    )
  if num_negatives < 0 or num_items < 1:
    raise ValueError(
      'sample_negatives needs num_items >= 1 and num_negatives >= 0, got '
      f'{num_items} and {num_negatives}'
    )
  out = np.zeros((len(user_ids), num_negatives), np.int32)
  for row, (user, target) in enumerate(zip(user_ids, targets, strict=True)):
    if user < 0:
      raise ValueError(f'sample_negatives: row {row} has user id {user} < 0')
    if not 1 <= target <= num_items:
      raise ValueError(
        f'sample_negatives: row {row} (user {user}) has target {target}, '
        f'expected 1..{num_items}'
      )
    banned = {int(target)}
    if exclude is not None:
      banned.update(int(item) for item in np.asarray(exclude[row]).ravel())
    banned.discard(0)
    allowed = num_items - sum(1 for item in banned if 1 <= item <= num_items)
    if allowed < num_negatives:
      raise ValueError(
        f'sample_negatives: row {row} (user {user}) has only {allowed} '
        f'items to sample from, needs {num_negatives}'
      )
    rng = np.random.default_rng([int(seed), int(user)])
    chosen: list[int] = []
    taken = set(banned)
    while len(chosen) < num_negatives:
      draws = rng.integers(1, num_items + 1, size=2 * num_negatives + 8)
      for item in draws.tolist():
        if item not in taken:
          taken.add(item)
          chosen.append(item)
          if len(chosen) == num_negatives:
            break
    out[row] = chosen
  return out


def sampled_candidates(
  targets: np.ndarray, negatives: np.ndarray
) -> np.ndarray:
  """`[batch, 1 + N]` item ids: the target in column 0, then negatives."""
  targets = np.asarray(targets)
  negatives = np.asarray(negatives)
  if negatives.ndim != 2 or targets.shape != negatives.shape[:1]:
    raise ValueError(
      'sampled_candidates expects targets [batch] and negatives [batch, N], '
      f'got {targets.shape} and {negatives.shape}'
    )
  return np.concatenate([targets[:, None], negatives], axis=1).astype(np.int32)


def expected_metrics(
  greater: jax.Array,
  ties: jax.Array,
  found: jax.Array,
  ks: Sequence[int] = DEFAULT_KS,
  dtype=jnp.float32,
) -> dict[str, jax.Array]:
  """Closed-form expected metrics from rank counts.

  Args:
    greater: int `[batch]` valid items scoring strictly above the target.
    ties: int `[batch]` other valid items scoring exactly the target score.
    found: bool `[batch]`; False rows are misses (every metric 0).
    ks: cutoffs.
    dtype: float dtype of the results.

  Returns:
    `{'hr@k', 'ndcg@k', 'mrr@k', 'precision@k'}` each `[batch]`.
  """
  ks = _check_ks(ks)
  max_k = max(ks)
  ranks = np.arange(1, max_k + 1, dtype=np.float64)
  # Prefix sums F(n) for n = 0..max_k, computed in float64 on the host.
  discount = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(ranks + 1.0))])
  harmonic = np.concatenate([[0.0], np.cumsum(1.0 / ranks)])
  discount = jnp.asarray(discount, dtype)
  harmonic = jnp.asarray(harmonic, dtype)

  greater = jnp.asarray(greater, jnp.int32)
  ties = jnp.asarray(ties, jnp.int32)
  found = jnp.asarray(found, jnp.bool_)
  count = (ties + 1).astype(dtype)
  out = {}
  for k in ks:
    low = jnp.minimum(greater, k)
    high = jnp.minimum(greater + ties + 1, k)
    hit = (high - low).astype(dtype) / count
    ndcg = (discount[high] - discount[low]) / count
    mrr = (harmonic[high] - harmonic[low]) / count
    zero = jnp.zeros_like(hit)
    out[f'hr@{k}'] = jnp.where(found, hit, zero)
    out[f'ndcg@{k}'] = jnp.where(found, ndcg, zero)
    out[f'mrr@{k}'] = jnp.where(found, mrr, zero)
    out[f'precision@{k}'] = out[f'hr@{k}'] / k
  return out


@functools.partial(jax.jit, static_argnames='ks')
def _candidate_metrics(scores, labels, valid, ks):
  """Per-row metrics and counts inside candidate lists (jitted core)."""
  dtype = _float_dtype(scores.dtype)
  columns = jnp.arange(scores.shape[1])[None, :]
  nan = jnp.isnan(scores) & valid
  scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)

  positive = labels.astype(jnp.bool_)
  valid_positive = positive & valid
  found = jnp.any(valid_positive, axis=1)
  target = jnp.argmax(valid_positive, axis=1)
  target_score = jnp.take_along_axis(scores, target[:, None], axis=1)

  others = valid & (columns != target[:, None])
  greater = jnp.sum(others & (scores > target_score), axis=1)
  ties = jnp.sum(others & (scores == target_score), axis=1)
  values = expected_metrics(greater, ties, found, ks, dtype)
  num_positive = jnp.sum(valid_positive, axis=1)
  counts = {
    'rows': jnp.ones(scores.shape[0], dtype),
    'rows_without_target': (~found).astype(dtype),
    'nan_scores': jnp.sum(nan, axis=1).astype(dtype),
    'extra_positives': jnp.maximum(num_positive - 1, 0).astype(dtype),
    'padded_positives': jnp.sum(positive & ~valid, axis=1).astype(dtype),
  }
  return values, counts


@functools.partial(jax.jit, static_argnames='ks')
def _full_metrics(scores, targets, exclude, ks):
  """Per-row metrics and counts of full ranking (jitted core)."""
  dtype = _float_dtype(scores.dtype)
  num_columns = scores.shape[1]
  in_range = (targets >= 1) & (targets < num_columns)
  safe_targets = jnp.where(in_range, targets, 0)
  target_score = jnp.take_along_axis(scores, safe_targets[:, None], axis=1)
  target_nan = jnp.isnan(target_score[:, 0])
  target_score = jnp.where(jnp.isnan(target_score), -jnp.inf, target_score)

  greater, ties, nan = _count_against_target(
    scores, exclude, safe_targets, target_score
  )
  values = expected_metrics(greater, ties, in_range, ks, dtype)
  counts = {
    'rows': jnp.ones(scores.shape[0], dtype),
    'rows_without_target': (~in_range).astype(dtype),
    'nan_scores': (nan + (target_nan & in_range)).astype(dtype),
    'invalid_targets': (~in_range).astype(dtype),
  }
  if exclude is not None:
    excluded = jnp.take_along_axis(exclude, safe_targets[:, None], axis=1)
    counts['excluded_targets'] = (excluded[:, 0] & in_range).astype(dtype)
  return values, counts


def _count_against_target(scores, exclude, targets, target_score):
  """Ranked items above, tied with, and NaN against the target, per row.

  Ranked items are columns 1.. that are not excluded and not the target; a
  NaN score counts as -inf. Columns are visited in blocks of
  `_COLUMN_BLOCK`, so the temporaries are `[batch, _COLUMN_BLOCK]` rather
  than scores-sized arrays (XLA on CPU writes a reduction's input out).

  Args:
    scores: `[batch, num_items + 1]`.
    exclude: bool `[batch, num_items + 1]` or None.
    targets: int `[batch]` target columns (0 for invalid targets).
    target_score: `[batch, 1]` target scores with NaN replaced by -inf.

  Returns:
    Three int32 `[batch]` counts: greater, ties, NaN scores.
  """
  batch, num_columns = scores.shape
  target_is_lowest = target_score == -jnp.inf

  def block_counts(start, width):
    block = jax.lax.dynamic_slice_in_dim(scores, start, width, axis=1)
    columns = start + jnp.arange(width)[None, :]
    others = (columns > 0) & (columns != targets[:, None])
    if exclude is not None:
      others &= ~jax.lax.dynamic_slice_in_dim(exclude, start, width, axis=1)
    nan = jnp.isnan(block)
    # NaN compares false with everything: it is never above the target
    # and ties with it only where the target is -inf (or NaN).
    greater = others & (block > target_score)
    ties = others & ((block == target_score) | (nan & target_is_lowest))
    return (
      jnp.sum(greater, axis=1, dtype=jnp.int32),
      jnp.sum(ties, axis=1, dtype=jnp.int32),
      jnp.sum(others & nan, axis=1, dtype=jnp.int32),
    )

  def body(index, totals):
    counts = block_counts(index * _COLUMN_BLOCK, _COLUMN_BLOCK)
    return tuple(a + b for a, b in zip(totals, counts, strict=True))

  num_blocks = num_columns // _COLUMN_BLOCK
  zeros = jnp.zeros((batch,), jnp.int32)
  totals = (zeros, zeros, zeros)
  if num_blocks:
    totals = jax.lax.fori_loop(0, num_blocks, body, totals)
  tail = num_columns - num_blocks * _COLUMN_BLOCK
  if tail:
    counts = block_counts(num_blocks * _COLUMN_BLOCK, tail)
    totals = tuple(a + b for a, b in zip(totals, counts, strict=True))
  return totals


def _float_dtype(dtype) -> jnp.dtype:
  """Result dtype: the score dtype if it is float32/64, else float32."""
  return jnp.result_type(dtype, jnp.float32)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
  ks = tuple(ks)
  if not ks or any(
    not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1
    for k in ks
  ):
    raise ValueError(f'ks must be a non-empty sequence of ints >= 1, got {ks}')
  return tuple(int(k) for k in ks)


def _valid_mask(valid, shape, where: str) -> jax.Array:
  if valid is None:
    return jnp.ones(shape, jnp.bool_)
  valid = jnp.asarray(valid)
  if valid.shape != tuple(shape) or valid.dtype != jnp.bool_:
    raise ValueError(
      f'{where}: valid must be a bool mask of shape {tuple(shape)}, got '
      f'{valid.dtype} {valid.shape}'
    )
  return valid


def _row_weights(row_weights, batch: int) -> jax.Array:
  if row_weights is None:
    return jnp.ones((batch,), jnp.float32)
  row_weights = jnp.asarray(row_weights)
  if row_weights.shape != (batch,):
    raise ValueError(
      f'row_weights must have shape ({batch},), got {row_weights.shape}'
    )
  if row_weights.dtype == jnp.bool_:
    return row_weights.astype(jnp.float32)
  if _is_concrete(row_weights) and bool(jnp.any(row_weights < 0)):
    raise ValueError('row_weights must be non-negative')
  return row_weights


def _is_concrete(*arrays) -> bool:
  """True when no argument is a tracer, i.e. host checks are possible."""
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _checked_rows(row_weights, batch: int) -> np.ndarray:
  if row_weights is None:
    return np.ones(batch, bool)
  return np.asarray(row_weights) != 0


def _check_candidate_inputs(scores, labels, valid, row_weights) -> None:
  """Host checks of `ranking_metrics` inputs; raises on the first bad row."""
  rows = _checked_rows(row_weights, scores.shape[0])
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  valid = np.asarray(valid)
  bad = rows & np.any(np.isnan(scores) & valid, axis=1)
  _raise_on_row(bad, 'ranking_metrics: NaN score in a valid slot')
  bad = rows & np.any((labels != 0) & (labels != 1), axis=1)
  _raise_on_row(bad, 'ranking_metrics: labels must be 0 or 1')
  bad = rows & np.any((labels == 1) & ~valid, axis=1)
  _raise_on_row(bad, 'ranking_metrics: a positive label on a padded slot')
  bad = rows & (np.sum((labels == 1) & valid, axis=1) > 1)
  _raise_on_row(
    bad, 'ranking_metrics: more than one positive (expected at most one)'
  )


def _check_full_inputs(scores, targets, exclude, row_weights) -> None:
  """Host checks of `full_ranking_metrics` inputs."""
  rows = _checked_rows(row_weights, scores.shape[0])
  targets = np.asarray(targets)
  num_items = scores.shape[1] - 1
  bad = rows & ((targets < 1) | (targets > num_items))
  _raise_on_row(
    bad, f'full_ranking_metrics: target out of range 1..{num_items}'
  )
  # One device-side reduction first; the per-row search runs only on NaN.
  if not bool(jnp.any(jnp.isnan(scores[:, 1:]))):
    return
  ranked = np.array(jnp.isnan(scores))
  ranked[:, 0] = False
  if exclude is not None:
    target_nan = ranked[np.arange(len(targets)), targets]
    ranked &= ~np.asarray(exclude)
    ranked[np.arange(len(targets)), targets] = target_nan
  bad = rows & np.any(ranked, axis=1)
  _raise_on_row(bad, 'full_ranking_metrics: NaN score of a ranked item')


def _raise_on_row(bad: np.ndarray, message: str) -> None:
  if np.any(bad):
    rows = np.flatnonzero(bad)
    raise ValueError(
      f'{message}: {len(rows)} row(s), first at row {int(rows[0])}'
    )
