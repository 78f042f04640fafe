"""Batching: windows -> fixed-shape numpy arrays for jitted code.

- `histories` gathers left-padded input histories for many windows at once
  from one flat concatenation of all sequences (`FlatSequences`).
- `sample_negatives` draws uniform negatives by vectorised rejection
  sampling, never the padding id, the positive or an excluded item.
- `iterate_batches` yields dicts of numpy arrays with exactly `batch_size`
  rows (filler rows masked). With `bucket_edges` the windows are grouped by
  history length and each batch is padded to its bucket's edge, so jitted
  code compiles once per bucket rather than once per batch and short
  histories do not pay for a full `max_len` of padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from lsc_jax.data.dataset import FlatSequences, flatten
from lsc_jax.data.splits import Windows

__all__ = [
  'FlatSequences',
  'count_batches',
  'flatten',
  'histories',
  'iterate_batches',
  'sample_negatives',
]


def _int_vector(name: str, value) -> np.ndarray:
  array = np.asarray(value)
  if array.ndim != 1 or not (
    array.size == 0 or np.issubdtype(array.dtype, np.integer)
  ):
    raise ValueError(
      f'{name} must be a 1-D integer array, got dtype {array.dtype} with '
      f'shape {array.shape}'
    )
  return array.astype(np.int64)


def _check_windows(
  flat: FlatSequences,
  users: np.ndarray,
  positions: np.ndarray,
  *,
  allow_end: bool,
) -> None:
  """Users in range; positions in [0, length) (or [0, length])."""
  if users.shape != positions.shape:
    raise ValueError(
      f'users {users.shape} and positions {positions.shape} must match'
    )
  if not len(users):
    return
  bad_user = (users < 0) | (users >= flat.num_users)
  if bad_user.any():
    r = int(np.flatnonzero(bad_user)[0])
    raise ValueError(
      f'window {r}: user {users[r]} outside 0..{flat.num_users - 1}'
    )
  lengths = flat.lengths()[users]
  top = lengths if allow_end else lengths - 1
  bad = (positions < 0) | (positions > top)
  if bad.any():
    r = int(np.flatnonzero(bad)[0])
    raise ValueError(
      f'window {r}: position {positions[r]} outside 0..{top[r]} for user '
      f'{users[r]} (sequence length {lengths[r]})'
    )


def _gather(
  flat: FlatSequences,
  users: np.ndarray,
  ends: np.ndarray,
  max_len: int,
) -> np.ndarray:
  """int32 `[n, max_len]`: last max_len items of each user's prefix of
  length `ends`, left-padded with 0."""
  lengths = np.minimum(ends, max_len)
  cols = np.arange(max_len)
  index = (flat.offsets[users] + ends)[:, None] - max_len + cols[None, :]
  valid = cols[None, :] >= (max_len - lengths)[:, None]
  if not len(flat.items):
    return np.zeros((len(users), max_len), np.int32)
  gathered = flat.items[np.where(valid, index, 0)]
  return np.where(valid, gathered, 0).astype(np.int32)


def histories(
  sequences,
  users,
  positions,
  max_len: int,
  *,
  gap: int = 0,
) -> np.ndarray:
  """Left-padded input histories, most recent item last.

  Args:
    sequences: per-user int arrays, or a `FlatSequences` (faster when
      called many times).
    users: int `[num_windows]` user index per window.
    positions: int `[num_windows]` history end per window (the target
      index), 0..len(sequences[user]).
    max_len: L, the number of columns.
    gap: drop the newest `gap` items (the cloud's stale view); a window
      with position <= gap gets an empty (all-padding) history.

  Returns:
    int32 `[num_windows, max_len]`; row r holds the last max_len items of
    `sequences[users[r]][:positions[r] - gap]`, left-padded with 0.
  """
  if max_len < 1:
    raise ValueError(f'max_len must be >= 1, got {max_len}')
  if gap < 0:
    raise ValueError(f'gap must be >= 0, got {gap}')
  flat = flatten(sequences)
  users = _int_vector('users', users)
  positions = _int_vector('positions', positions)
  _check_windows(flat, users, positions, allow_end=True)
  return _gather(flat, users, np.maximum(positions - gap, 0), max_len)


@dataclasses.dataclass(frozen=True)
class _CooExclude:
  """Excluded items as parallel (row, item) arrays."""

  rows: np.ndarray
  items: np.ndarray


def _exclude_to_coo(exclude, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Row and item arrays from a padded matrix or a list of arrays."""
  if exclude is None:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  if isinstance(exclude, _CooExclude):
    return exclude.rows.astype(np.int64), exclude.items.astype(np.int64)
  if isinstance(exclude, np.ndarray) and exclude.ndim == 2:
    if exclude.shape[0] != num_rows:
      raise ValueError(
        f'exclude has {exclude.shape[0]} rows, expected {num_rows}'
      )
    rows = np.repeat(np.arange(num_rows), exclude.shape[1])
    return rows, exclude.reshape(-1).astype(np.int64)
  if len(exclude) != num_rows:
    raise ValueError(f'exclude has {len(exclude)} rows, expected {num_rows}')
  parts = [np.asarray(e, dtype=np.int64).reshape(-1) for e in exclude]
  counts = np.fromiter((len(p) for p in parts), np.int64, num_rows)
  rows = np.repeat(np.arange(num_rows), counts)
  items = np.concatenate(parts) if counts.sum() else np.zeros(0, np.int64)
  return rows, items


def _in_sorted(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
  """bool: whether each key is in the sorted `table`."""
  if not len(table):
    return np.zeros(keys.shape, dtype=bool)
  where = np.minimum(np.searchsorted(table, keys), len(table) - 1)
  return table[where] == keys


def sample_negatives(
  rng,
  positives,
  num_negatives: int,
  num_items: int,
  *,
  exclude=None,
  distinct: bool = False,
  max_rounds: int = 32,
) -> np.ndarray:
  """Uniform negatives over 1..num_items by vectorised rejection sampling.

  Never 0, never the row's positive, never an item in the row's `exclude`.
  Pass only items the model may see at training time (e.g. the input
  history) as `exclude`, so negatives never depend on valid/test items.
  Rows still unsatisfied after `max_rounds` rounds (only when nearly every
  item is forbidden) are drawn exactly from their allowed items, so the
  result never depends on luck beyond the generator's state.

  Args:
    rng: a `np.random.Generator` or an int seed.
    positives: int `[n]`, ids in 1..num_items.
    num_negatives: N negatives per row.
    num_items: the item vocabulary is 1..num_items.
    exclude: None, an int `[n, m]` matrix padded with 0, or a sequence of
      n int arrays; ids in 0..num_items (0 is ignored).
    distinct: also make the N negatives of a row distinct.
    max_rounds: rejection rounds before the exact fallback.

  Returns:
    int32 `[n, num_negatives]`.

  Raises:
    ValueError: an id out of range, or a row with too few allowed items
      (names the row).
  """
  rng = np.random.default_rng(rng)
  positives = _int_vector('positives', positives)
  n = len(positives)
  if num_negatives < 0 or num_items < 1:
    raise ValueError(
      f'need num_negatives >= 0 and num_items >= 1, got {num_negatives}, '
      f'{num_items}'
    )
  if n and (positives.min() < 1 or positives.max() > num_items):
    r = int(np.flatnonzero((positives < 1) | (positives > num_items))[0])
    raise ValueError(f'positives[{r}] = {positives[r]} outside 1..{num_items}')
  ex_rows, ex_items = _exclude_to_coo(exclude, n)
  if len(ex_items) and (ex_items.min() < 0 or ex_items.max() > num_items):
    bad = int(np.flatnonzero((ex_items < 0) | (ex_items > num_items))[0])
    raise ValueError(
      f'exclude row {ex_rows[bad]} holds item {ex_items[bad]} outside '
      f'0..{num_items}'
    )
  if num_negatives == 0 or n == 0:
    return np.zeros((n, num_negatives), np.int32)

  # Forbidden (row, item) pairs as sorted unique keys row * V + item.
  vocab = num_items + 1
  nonzero = ex_items > 0
  forbidden = np.unique(
    np.concatenate(
      [
        np.arange(n) * vocab + positives,
        ex_rows[nonzero] * vocab + ex_items[nonzero],
      ]
    )
  )
  allowed = num_items - np.bincount(forbidden // vocab, minlength=n)
  need = num_negatives if distinct else 1
  if (allowed < need).any():
    r = int(np.flatnonzero(allowed < need)[0])
    raise ValueError(
      f'row {r}: only {allowed[r]} of {num_items} items are allowed (not '
      f'the positive, not excluded), need {need}'
      + (' distinct negatives' if distinct else '')
    )

  out = np.zeros(n * num_negatives, np.int64)
  pending = np.ones(n * num_negatives, dtype=bool)
  slot_rows = np.arange(n * num_negatives) // num_negatives
  for _ in range(max_rounds):
    todo = np.flatnonzero(pending)
    if not len(todo):
      break
    out[todo] = rng.integers(1, num_items + 1, size=len(todo))
    pending[todo] = _in_sorted(slot_rows[todo] * vocab + out[todo], forbidden)
    if distinct:
      done = np.flatnonzero(~pending)
      _, first = np.unique(
        slot_rows[done] * vocab + out[done], return_index=True
      )
      repeat = np.ones(len(done), dtype=bool)
      repeat[first] = False
      pending[done[repeat]] = True

  # Exact fallback for the few slots rejection did not fill.
  for r in np.unique(slot_rows[pending]):
    slots = np.flatnonzero(pending[r * num_negatives : (r + 1) * num_negatives])
    row_forbidden = forbidden[forbidden // vocab == r] % vocab
    if distinct:
      taken = out[r * num_negatives : (r + 1) * num_negatives]
      taken = taken[~pending[r * num_negatives : (r + 1) * num_negatives]]
      row_forbidden = np.concatenate([row_forbidden, taken])
    choices = np.setdiff1d(np.arange(1, vocab), row_forbidden)
    picks = rng.choice(choices, size=len(slots), replace=not distinct)
    out[r * num_negatives + slots] = picks
  return out.reshape(n, num_negatives).astype(np.int32)


def _bucket_edges(bucket_edges, max_len: int) -> np.ndarray:
  if max_len < 1:
    raise ValueError(f'max_len must be >= 1, got {max_len}')
  if bucket_edges is None:
    return np.array([max_len])
  edges = [int(e) for e in bucket_edges]
  if any(e < 1 or e > max_len for e in edges) or any(
    b <= a for a, b in zip(edges, edges[1:], strict=False)
  ):
    raise ValueError(
      f'bucket_edges must increase strictly within 1..max_len={max_len}, '
      f'got {tuple(bucket_edges)}'
    )
  if not edges or edges[-1] < max_len:
    edges.append(max_len)
  return np.array(edges)


def _plan(
  flat: FlatSequences,
  windows: Windows,
  *,
  batch_size: int,
  max_len: int,
  seed: int,
  epoch: int,
  shuffle: bool,
  bucket_edges,
  gap: int,
) -> list[tuple[int, np.ndarray]]:
  """The batches of one epoch: (padded length, window indices)."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if gap < 0:
    raise ValueError(f'gap must be >= 0, got {gap}')
  edges = _bucket_edges(bucket_edges, max_len)
  users = windows.users.astype(np.int64)
  positions = windows.positions.astype(np.int64)
  _check_windows(flat, users, positions, allow_end=False)
  lengths = np.minimum(np.maximum(positions - gap, 0), max_len)
  bucket = np.searchsorted(edges, lengths, side='left')
  rng = np.random.default_rng([seed, epoch])
  batches = []
  for b, edge in enumerate(edges.tolist()):
    index = np.flatnonzero(bucket == b)
    if shuffle:
      index = rng.permutation(index)
    for start in range(0, len(index), batch_size):
      batches.append((edge, index[start : start + batch_size]))
  if shuffle and batches:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches


def count_batches(
  sequences,
  windows: Windows,
  *,
  batch_size: int,
  max_len: int,
  bucket_edges: Sequence[int] | None = None,
  gap: int = 0,
) -> int:
  """How many batches `iterate_batches` yields per epoch (for progress)."""
  flat = flatten(sequences)
  return len(
    _plan(
      flat,
      windows,
      batch_size=batch_size,
      max_len=max_len,
      seed=0,
      epoch=0,
      shuffle=False,
      bucket_edges=bucket_edges,
      gap=gap,
    )
  )


def iterate_batches(
  sequences,
  windows: Windows,
  *,
  batch_size: int,
  max_len: int,
  seed: int,
  epoch: int,
  shuffle: bool = True,
  bucket_edges: Sequence[int] | None = None,
  num_negatives: int = 0,
  num_items: int | None = None,
  gap: int = 0,
  distinct_negatives: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape batches over windows, deterministic given (seed, epoch).

  With `bucket_edges=(10, 20, 50)` and `max_len=50`, a window whose
  history (after `gap`, capped at max_len) has length l goes to the
  smallest edge >= l, and batches of that bucket have L = that edge;
  max_len is always the last edge. Without edges every batch has
  L = max_len. With `shuffle`, windows are shuffled within buckets and the
  batches across buckets; without, batches follow bucket order, then
  window order. A short last batch of a bucket is filled up to
  `batch_size` by repeating its own rows (so models see real histories)
  with `mask` 0.

  Negatives (when `num_negatives` > 0) are uniform over 1..num_items,
  never the target and never an item of the window's input history
  `sequences[user][:position]`; batch k draws them from a generator seeded
  with (seed, epoch, k), so a resumed epoch reproduces them.

  Args:
    sequences: per-user int arrays, or a `FlatSequences`.
    windows: the (user, position) windows to batch; position is the
      target's index, so it must be < len(sequences[user]).
    batch_size: B rows per batch.
    max_len: the longest history kept.
    seed: base seed.
    epoch: epoch number (changes the shuffle and the negatives).
    shuffle: shuffle windows and batches.
    bucket_edges: increasing history-length edges, or None.
    num_negatives: N negatives per row (0: no 'negatives' key).
    num_items: vocabulary size, needed for negatives.
    gap: histories end `gap` items before the target (stale view).
    distinct_negatives: make a row's negatives distinct.

  Yields:
    dicts with 'history' int32 `[B, L]` (left-padded, newest last),
    'target' int32 `[B]`, 'user' int32 `[B]`, 'position' int32 `[B]`,
    'mask' float32 `[B]` (0 on filler rows) and, when asked, 'negatives'
    int32 `[B, N]`.
  """
  if num_negatives and num_items is None:
    raise ValueError('num_items is required when num_negatives > 0')
  flat = flatten(sequences)
  plan = _plan(
    flat,
    windows,
    batch_size=batch_size,
    max_len=max_len,
    seed=seed,
    epoch=epoch,
    shuffle=shuffle,
    bucket_edges=bucket_edges,
    gap=gap,
  )
  all_users = windows.users.astype(np.int64)
  all_positions = windows.positions.astype(np.int64)
  for k, (length, index) in enumerate(plan):
    real = len(index)
    rows = np.concatenate([index, index[np.arange(batch_size - real) % real]])
    users, positions = all_users[rows], all_positions[rows]
    mask = np.zeros(batch_size, np.float32)
    mask[:real] = 1.0
    batch = {
      'history': _gather(flat, users, np.maximum(positions - gap, 0), length),
      'target': flat.items[flat.offsets[users] + positions].astype(np.int32),
      'user': users.astype(np.int32),
      'position': positions.astype(np.int32),
      'mask': mask,
    }
    if num_negatives:
      counts = positions
      ex_rows = np.repeat(np.arange(batch_size), counts)
      within = np.arange(counts.sum()) - np.repeat(
        np.cumsum(counts) - counts, counts
      )
      ex_items = flat.items[np.repeat(flat.offsets[users], counts) + within]
      batch['negatives'] = sample_negatives(
        np.random.default_rng([seed, epoch, k]),
        batch['target'],
        num_negatives,
        num_items,
        exclude=_CooExclude(ex_rows, ex_items),
        distinct=distinct_negatives,
      )
    yield batch
