"""The `Dataset` container: one chronological item sequence per user.

Every stage after preprocessing (splits, batching, models) reads a
`Dataset`. Item ids run 1..num_items; 0 is the padding id and never appears
in a sequence. Users are indexed 0..num_users-1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Preprocessed interactions, one chronological sequence per user.

  Attributes:
    name: a short name ('beauty', 'ml-latest-small', or the file stem).
    sequences: one int32 array `[length_u]` per user, oldest item first,
      item ids in 1..num_items.
    num_items: size of the item vocabulary, not counting padding id 0.
    timestamps: one int64 array `[length_u]` per user aligned with
      `sequences` (non-decreasing), or None when the source has none.
    item_text: `[num_items + 1]` titles indexed by item id, `item_text[0]`
      is ''; an item without a title has ''. None when the source has no
      titles.
    user_raw_ids: `[num_users]` the user id as written in the source file.
    item_raw_ids: `[num_items + 1]` the item id as written in the source
      file, indexed by item id; `item_raw_ids[0]` is '<pad>'.
    source: the file or directory the data was read from ('' if built in
      memory).
    log: the one-line summaries printed by each preprocessing step.

  Equality is identity (`eq=False`): the fields hold numpy arrays, so
  compare datasets field by field.
  """

  name: str
  sequences: list[np.ndarray]
  num_items: int
  timestamps: list[np.ndarray] | None
  item_text: list[str] | None
  user_raw_ids: list[str]
  item_raw_ids: list[str]
  source: str = ''
  log: tuple[str, ...] = ()

  @property
  def num_users(self) -> int:
    return len(self.sequences)

  @property
  def num_interactions(self) -> int:
    return int(sum(len(s) for s in self.sequences))

  @functools.cached_property
  def flat(self) -> FlatSequences:
    """All sequences concatenated once (for `histories` and batching)."""
    return flatten(self.sequences)

  def lengths(self) -> np.ndarray:
    """Sequence length per user, int64 `[num_users]`."""
    return np.fromiter(
      (len(s) for s in self.sequences), np.int64, self.num_users
    )

  def summary(self) -> str:
    """One line: name, users, items, interactions."""
    return (
      f'{self.name}: {self.num_users:,} users, {self.num_items:,} items, '
      f'{self.num_interactions:,} interactions'
    )

  def validate(self) -> None:
    """Checks every invariant above; raises ValueError naming the first
    broken one."""
    if self.num_items < 1:
      raise ValueError(f'Dataset {self.name!r}: num_items must be >= 1')
    if len(self.user_raw_ids) != self.num_users:
      raise ValueError(
        f'Dataset {self.name!r}: user_raw_ids has {len(self.user_raw_ids)}'
        f' entries, expected num_users = {self.num_users}'
      )
    if len(self.item_raw_ids) != self.num_items + 1:
      raise ValueError(
        f'Dataset {self.name!r}: item_raw_ids has {len(self.item_raw_ids)}'
        f' entries, expected num_items + 1 = {self.num_items + 1}'
      )
    if self.item_text is not None:
      if len(self.item_text) != self.num_items + 1 or self.item_text[0]:
        raise ValueError(
          f'Dataset {self.name!r}: item_text must have num_items + 1 = '
          f"{self.num_items + 1} entries with item_text[0] == ''"
        )
    for user, seq in enumerate(self.sequences):
      if seq.ndim != 1 or seq.dtype != np.int32:
        raise ValueError(
          f'Dataset {self.name!r}: sequences[{user}] must be a 1-D int32 '
          f'array, got dtype {seq.dtype} with shape {seq.shape}'
        )
      if len(seq) and (seq.min() < 1 or seq.max() > self.num_items):
        raise ValueError(
          f'Dataset {self.name!r}: sequences[{user}] holds item ids outside '
          f'1..{self.num_items} (min {seq.min()}, max {seq.max()})'
        )
    if self.timestamps is not None:
      if len(self.timestamps) != self.num_users:
        raise ValueError(
          f'Dataset {self.name!r}: timestamps has {len(self.timestamps)} '
          f'users, expected {self.num_users}'
        )
      for user, (seq, ts) in enumerate(
        zip(self.sequences, self.timestamps, strict=True)
      ):
        if ts.shape != seq.shape:
          raise ValueError(
            f'Dataset {self.name!r}: timestamps[{user}] has shape '
            f'{ts.shape}, expected {seq.shape}'
          )
        if len(ts) > 1 and np.any(np.diff(ts) < 0):
          raise ValueError(
            f'Dataset {self.name!r}: timestamps[{user}] are not '
            'non-decreasing (sequences must be chronological)'
          )

  @classmethod
  def from_sequences(
    cls,
    sequences: Sequence[Sequence[int]],
    *,
    num_items: int | None = None,
    timestamps: Sequence[Sequence[int]] | None = None,
    name: str = 'sequences',
  ) -> Dataset:
    """Builds a dataset from in-memory item id lists (tests, toy data).

    Args:
      sequences: per user, item ids in 1..num_items, oldest first.
      num_items: vocabulary size; default the largest id present.
      timestamps: optional per-user timestamps, non-decreasing.
      name: dataset name.

    Returns:
      A validated `Dataset` whose raw ids are the decimal indices.
    """
    seqs = [np.asarray(s, dtype=np.int32).reshape(-1) for s in sequences]
    if num_items is None:
      num_items = max((int(s.max()) for s in seqs if len(s)), default=0)
    ts = None
    if timestamps is not None:
      ts = [np.asarray(t, dtype=np.int64).reshape(-1) for t in timestamps]
    dataset = cls(
      name=name,
      sequences=seqs,
      num_items=int(num_items),
      timestamps=ts,
      item_text=None,
      user_raw_ids=[str(u) for u in range(len(seqs))],
      item_raw_ids=['<pad>'] + [str(i) for i in range(1, num_items + 1)],
    )
    dataset.validate()
    return dataset


@dataclasses.dataclass(frozen=True, eq=False)
class FlatSequences:
  """All sequences concatenated, with offsets.

  Attributes:
    items: int32 `[num_interactions]` every user's items, user by user.
    offsets: int64 `[num_users + 1]`; user u's items are
      `items[offsets[u]:offsets[u + 1]]`.
  """

  items: np.ndarray
  offsets: np.ndarray

  @property
  def num_users(self) -> int:
    return len(self.offsets) - 1

  def lengths(self) -> np.ndarray:
    """int64 `[num_users]` sequence lengths."""
    return np.diff(self.offsets)


def flatten(sequences) -> FlatSequences:
  """Concatenates per-user sequences once (reuse it across calls).

  Args:
    sequences: a list of per-user int arrays, a `Dataset` (its cached
      `flat`) or a `FlatSequences` (returned as is).
  """
  if isinstance(sequences, FlatSequences):
    return sequences
  if isinstance(sequences, Dataset):
    return sequences.flat
  lengths = np.fromiter((len(s) for s in sequences), np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  if lengths.sum():
    items = np.concatenate([np.asarray(s) for s in sequences])
  else:
    items = np.zeros(0, np.int32)
  return FlatSequences(items.astype(np.int32, copy=False), offsets)
