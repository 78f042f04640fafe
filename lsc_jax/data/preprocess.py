"""Preprocessing: raw interactions -> `Dataset`, and `load`.

`load` runs, in this order, printing one summary line per step when
`verbose` (users, items, interactions after the step):

1. read: `readers.read` (format detected from the path).
2. dedupe: for formats with timestamps an exact duplicate is a second row
   with the same user, item and timestamp; it is dropped and counted. For
   formats without timestamps (`p5`, `pairs`, a csv without a timestamp
   column) the same user and item at another position is a repeat
   consumption, not a duplicate, and nothing is dropped.
3. order: each user's interactions are sorted stably by (timestamp, file
   position within the user, item id). Formats without timestamps sort by
   file position alone (their file order is the sequence order). Formats
   with timestamps ignore file position, so rows with the same user and
   timestamp are ordered by raw item id (numerically for integer ids) and
   the result does not depend on the order of the input rows.
4. k-core: users with fewer than `min_user_interactions` and items with
   fewer than `min_item_interactions` interactions are removed, repeatedly,
   until every remaining user and item meets its threshold (a fixed point).
   Counts include repeat interactions. Defaults: 0 for P5 data (P5 already
   applied 5-core), 5 otherwise. Users left with no interaction vanish.
5. re-index: users get indices 0..num_users-1 in order of first appearance
   in the file for formats without timestamps, and in increasing raw user
   id order (numeric for integer ids) for formats with timestamps, so that
   shuffled rows give the same dataset; MovieLens' file order is already
   increasing user id. Items get ids 1..num_items:
   - `reindex='keep'`: for the integer formats (`p5`, `pairs`) the file's
     own ids in increasing order, so P5's ids are kept exactly when no item
     is filtered out. P5 numbered items in order of first appearance while
     walking the users, so the next item is often "largest id in the
     history + 1": a leak that a model can exploit. For csv sources, ids in
     order of first appearance walking the users in index order, each
     user's sequence oldest first (the P5 scheme).
   - `reindex='random'` (default): a permutation of the 'keep' ids drawn
     from `np.random.default_rng(seed)`, which removes that leak.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from lsc_jax.data import readers
from lsc_jax.data.dataset import Dataset
from lsc_jax.data.readers import DataError, RawInteractions

BUILTIN_DIR = Path(__file__).resolve().parent / 'builtin'
BUILTIN = {
  'beauty': 'beauty',
  'ml-latest-small': 'ml-latest-small',
  'movielens': 'ml-latest-small',
}
REINDEX_MODES = ('keep', 'random')


def builtin_path(name: str) -> Path:
  """The directory of a built-in dataset ('beauty', 'ml-latest-small' or
  its alias 'movielens')."""
  if name not in BUILTIN:
    raise DataError(
      f'unknown built-in dataset {name!r}; expected one of '
      f'{", ".join(sorted(BUILTIN))} or a path that exists'
    )
  return BUILTIN_DIR / BUILTIN[name]


def natural_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Dense codes that follow the natural order of raw ids.

  Args:
    values: `[n]` raw ids, int64 (numeric order) or str (code point order).

  Returns:
    `(unique, codes)`: `unique[codes] == values`, unique sorted ascending.
  """
  unique, codes = np.unique(values, return_inverse=True)
  return unique, codes.reshape(-1).astype(np.int64)


def first_appearance_codes(values: np.ndarray) -> np.ndarray:
  """Codes 0..k-1 numbering distinct values in order of first appearance."""
  _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
  rank = np.empty(len(first), dtype=np.int64)
  rank[np.argsort(first, kind='stable')] = np.arange(len(first))
  return rank[inverse.reshape(-1)]


def kcore_filter(
  user_codes: np.ndarray,
  item_codes: np.ndarray,
  *,
  min_user_interactions: int,
  min_item_interactions: int,
) -> tuple[np.ndarray, int]:
  """Iterated k-core filtering to a fixed point.

  Args:
    user_codes: int `[n]` user of each interaction, in 0..num_users-1.
    item_codes: int `[n]` item of each interaction, in 0..num_item_codes-1.
    min_user_interactions: a user needs at least this many interactions.
    min_item_interactions: an item needs at least this many interactions.

  Returns:
    `(keep, rounds)`: bool `[n]` rows that survive, and the number of
    removal rounds that changed something.
  """
  if min_user_interactions < 0 or min_item_interactions < 0:
    raise ValueError(
      'k-core thresholds must be >= 0, got '
      f'min_user_interactions={min_user_interactions}, '
      f'min_item_interactions={min_item_interactions}'
    )
  num_users = int(user_codes.max()) + 1 if len(user_codes) else 0
  num_items = int(item_codes.max()) + 1 if len(item_codes) else 0
  keep = np.ones(len(user_codes), dtype=bool)
  rounds = 0
  while True:
    user_count = np.bincount(user_codes[keep], minlength=num_users)
    item_count = np.bincount(item_codes[keep], minlength=num_items)
    drop = keep & (
      (user_count[user_codes] < min_user_interactions)
      | (item_count[item_codes] < min_item_interactions)
    )
    if not drop.any():
      return keep, rounds
    keep &= ~drop
    rounds += 1


def _default_k(fmt: str) -> int:
  return 0 if fmt == 'p5' else 5


def _counts(users: np.ndarray, items: np.ndarray) -> str:
  return (
    f'users {len(np.unique(users)):,}, items {len(np.unique(items)):,}, '
    f'interactions {len(users):,}'
  )


def preprocess(
  raw: RawInteractions,
  *,
  name: str,
  reindex: str = 'random',
  seed: int = 0,
  min_user_interactions: int | None = None,
  min_item_interactions: int | None = None,
  verbose: bool = True,
  log_fn: Callable[[str], None] = print,
) -> Dataset:
  """Dedupe, order, k-core and re-index raw interactions (module docs).

  Args:
    raw: interactions from a reader.
    name: the dataset name.
    reindex: 'keep' or 'random'.
    seed: seed of the 'random' item permutation.
    min_user_interactions: k-core threshold for users; None = format
      default (P5 0, else 5).
    min_item_interactions: same for items.
    verbose: print one summary line per step through `log_fn`.
    log_fn: where summary lines go.

  Returns:
    A validated `Dataset`; its `log` holds the summary lines.
  """
  if reindex not in REINDEX_MODES:
    raise ValueError(f'reindex must be one of {REINDEX_MODES}, got {reindex!r}')
  k_user = (
    _default_k(raw.format)
    if min_user_interactions is None
    else min_user_interactions
  )
  k_item = (
    _default_k(raw.format)
    if min_item_interactions is None
    else min_item_interactions
  )
  log: list[str] = []

  def emit(step: str, message: str) -> None:
    line = f'[data] {name} {step}: {message}'
    log.append(line)
    if verbose:
      log_fn(line)

  # Dense codes for users and items; user code order is the user order.
  if raw.sequence_order:
    user_codes = first_appearance_codes(raw.users)
    user_unique = np.empty(int(user_codes.max()) + 1, dtype=raw.users.dtype)
    user_unique[user_codes] = raw.users
  else:
    user_unique, user_codes = natural_codes(raw.users)
  item_unique, item_codes = natural_codes(raw.items)
  positions = np.arange(raw.num_rows, dtype=np.int64)
  timestamps = raw.timestamps
  emit(
    'read',
    f'{_counts(user_codes, item_codes)} ({raw.format} from {raw.source})',
  )

  # Dedupe exact (user, item, timestamp) rows; keep the first in the file.
  if timestamps is not None:
    order = np.lexsort((positions, timestamps, item_codes, user_codes))
    same = (
      (np.diff(user_codes[order]) == 0)
      & (np.diff(item_codes[order]) == 0)
      & (np.diff(timestamps[order]) == 0)
    )
    keep = np.ones(raw.num_rows, dtype=bool)
    keep[order[1:][same]] = False
    dropped = int((~keep).sum())
    user_codes, item_codes = user_codes[keep], item_codes[keep]
    positions, timestamps = positions[keep], timestamps[keep]
    emit(
      'dedupe',
      f'{_counts(user_codes, item_codes)} ({dropped:,} exact duplicate '
      '(user, item, timestamp) rows dropped)',
    )
  else:
    emit(
      'dedupe',
      f'{_counts(user_codes, item_codes)} (no timestamps: repeats are '
      'kept as repeat consumption)',
    )

  # Stable chronological order per user.
  if timestamps is not None:
    order = np.lexsort((item_codes, timestamps, user_codes))
    user_codes, item_codes = user_codes[order], item_codes[order]
    positions, timestamps = positions[order], timestamps[order]
    ties = int(((np.diff(user_codes) == 0) & (np.diff(timestamps) == 0)).sum())
    rule = f'by timestamp, then item id; {ties:,} same-timestamp pairs'
  else:
    order = np.lexsort((positions, user_codes))
    user_codes, item_codes = user_codes[order], item_codes[order]
    positions = positions[order]
    rule = 'by file position'
  emit('order', f'{_counts(user_codes, item_codes)} ({rule})')

  # Iterated k-core.
  keep, rounds = kcore_filter(
    user_codes,
    item_codes,
    min_user_interactions=k_user,
    min_item_interactions=k_item,
  )
  user_codes, item_codes = user_codes[keep], item_codes[keep]
  if timestamps is not None:
    timestamps = timestamps[keep]
  emit(
    'k-core',
    f'{_counts(user_codes, item_codes)} (users >= {k_user}, items >= '
    f'{k_item}, {rounds} rounds)',
  )
  if not len(user_codes):
    raise DataError(
      f'{raw.source}: no interactions left after k-core filtering with '
      f'min_user_interactions={k_user}, min_item_interactions={k_item}'
    )

  # Re-index users (order kept) and items.
  kept_users, user_index = np.unique(user_codes, return_inverse=True)
  user_index = user_index.reshape(-1)
  kept_items, item_rank = np.unique(item_codes, return_inverse=True)
  item_rank = item_rank.reshape(-1)
  num_items = len(kept_items)
  if raw.format in ('p5', 'pairs'):
    keep_ids = item_rank + 1
  else:
    keep_ids = first_appearance_codes(item_rank) + 1
  if reindex == 'random':
    permutation = np.random.default_rng(seed).permutation(num_items) + 1
    item_ids = permutation[keep_ids - 1]
  else:
    item_ids = keep_ids
  # raw_of_id[new id] = raw item id.
  raw_of_id = np.empty(num_items + 1, dtype=item_unique.dtype)
  raw_of_id[item_ids] = item_unique[item_codes]
  item_raw_ids = ['<pad>'] + [str(v) for v in raw_of_id[1:].tolist()]

  item_text = None
  titles_line = f'none ({raw.text_source})'
  if raw.item_text is not None:
    item_text = [''] + [raw.item_text.get(r, '') for r in item_raw_ids[1:]]
    missing = sum(r not in raw.item_text for r in item_raw_ids[1:])
    empty = sum(not t for t in item_text[1:]) - missing
    titles_line = (
      f'{num_items - missing - empty:,} titles from {raw.text_source}, '
      f'{empty} empty, {missing} missing, {raw.titles_normalised} with '
      'whitespace normalised'
    )

  bounds = np.flatnonzero(np.diff(user_index)) + 1
  sequences = np.split(item_ids.astype(np.int32), bounds)
  stamp_lists = None
  if timestamps is not None:
    stamp_lists = np.split(timestamps.astype(np.int64), bounds)
  user_raw_ids = [str(v) for v in user_unique[kept_users].tolist()]
  emit(
    'reindex',
    f'{_counts(user_index, item_ids)} (items: {reindex}'
    + (f', seed {seed}' if reindex == 'random' else '')
    + f'); titles: {titles_line}',
  )

  dataset = Dataset(
    name=name,
    sequences=sequences,
    num_items=num_items,
    timestamps=stamp_lists,
    item_text=item_text,
    user_raw_ids=user_raw_ids,
    item_raw_ids=item_raw_ids,
    source=raw.source,
    log=tuple(log),
  )
  dataset.validate()
  return dataset


def load(
  name_or_path,
  *,
  reindex: str = 'random',
  seed: int = 0,
  min_user_interactions: int | None = None,
  min_item_interactions: int | None = None,
  verbose: bool = True,
  format: str = 'auto',
  log_fn: Callable[[str], None] = print,
) -> Dataset:
  """Loads a built-in dataset or a file and preprocesses it.

  Args:
    name_or_path: 'beauty', 'ml-latest-small' (alias 'movielens'), or a
      path: a directory with `sequential_data.txt` (P5) or `ratings.csv`
      (MovieLens), a P5 file, a file of `user item` lines, or a CSV/TSV
      with a header (see `lsc_jax.data.readers`).
    reindex: 'random' (default, seeded item permutation) or 'keep'.
    seed: seed of the random item permutation.
    min_user_interactions: k-core threshold for users (None = P5 0,
      otherwise 5).
    min_item_interactions: k-core threshold for items (same default).
    verbose: print one summary line per preprocessing step.
    format: 'auto', or force one of `readers.FORMATS`.
    log_fn: where the summary lines go when verbose.

  Returns:
    The preprocessed `Dataset`.

  Raises:
    DataError: a missing or malformed file, or an unknown built-in name.
  """
  if isinstance(name_or_path, str) and name_or_path in BUILTIN:
    path = builtin_path(name_or_path)
    name = BUILTIN[name_or_path]
  else:
    path = Path(name_or_path)
    if not path.exists() and isinstance(name_or_path, str):
      if '/' not in name_or_path and '.' not in name_or_path:
        builtin_path(name_or_path)  # raises: unknown built-in name
    name = path.name if path.is_dir() else path.stem
  raw = readers.read(path, format=format)
  return preprocess(
    raw,
    name=name,
    reindex=reindex,
    seed=seed,
    min_user_interactions=min_user_interactions,
    min_item_interactions=min_item_interactions,
    verbose=verbose,
    log_fn=log_fn,
  )
