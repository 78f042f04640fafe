"""Device-cloud splits: which (user, position) windows each stage sees.

A window is a pair (user, position): the target is
`sequences[user][position]` and the input history is
`sequences[user][:position]`. A `DeviceCloudSplit` holds five sets of
windows (LLM training, SRM training, device-recent re-training,
validation, test) plus the staleness gap g: the cloud's cached candidate
list at a valid/test window was built from a history that ends g items
before the target (`stale_positions`).

Positional split (`positional_split`, the LSC4Rec paper's official code):
for a user sequence i_1..i_n (1-based), with `gap` g, `device_window` w
and `min_history` h:

- test: target i_n, history i_1..i_{n-1}; needs n >= 2.
- valid: target i_{n-1}; needs n >= 3.
- srm_train: every target i_{h+1}..i_{n-2} (0-based positions h..n-3).
- device_recent: targets i_{n-1-w}..i_{n-2}, the newest SRM training
  targets (a subset of srm_train, so also >= i_{h+1}).
- llm_train: every target i_{h+1}..i_{n-2-w}, so the cloud never trains
  on the device's newest items.
- stale cloud view: test i_1..i_{n-1-g}, valid i_1..i_{n-2-g}.

With the defaults (g 2, w 3, h 1), a user with
- n = 3 gets test i_3 and valid i_2 (stale views empty), nothing else;
- n = 5 gets test i_5 (stale i_1..i_2), valid i_4 (stale i_1), srm_train
  i_2, i_3, device_recent i_2, i_3, no llm_train;
- n = 7 gets test i_7 (stale i_1..i_4), valid i_6 (stale i_1..i_3),
  srm_train i_2..i_5, device_recent i_3..i_5, llm_train i_2.

The official code samples one random target per user and epoch from the
last three of each range (LLM i_{n-7}..i_{n-5}, SRM i_{n-4}..i_{n-2}) with
a random history start; here every position of a range is a window and
per-epoch sampling is left to the batcher.

Time split (`time_split`, for data with timestamps): interactions at or
after `test_time` are test targets, those in [valid_time, test_time)
validation targets, earlier ones training targets (srm_train);
device_recent are each user's last w training targets and llm_train the
earlier training targets. A user may have several valid and test windows.

Users too short for a kind of window get none of that kind; `summary()`
counts them. Every function here is a pure function of its arguments.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lsc_jax.data.dataset import Dataset, flatten

KINDS = ('llm_train', 'srm_train', 'device_recent', 'valid', 'test')


@dataclasses.dataclass(frozen=True, eq=False)
class Windows:
  """A set of (user, target position) windows.

  Attributes:
    users: int32 `[num_windows]` user index.
    positions: int32 `[num_windows]` 0-based index of the target in
      `sequences[user]`; the input history is `sequences[user][:position]`.
  """

  users: np.ndarray
  positions: np.ndarray

  def __post_init__(self):
    for field in ('users', 'positions'):
      value = np.asarray(getattr(self, field))
      if value.ndim != 1 or not (
        value.size == 0 or np.issubdtype(value.dtype, np.integer)
      ):
        raise ValueError(
          f'Windows.{field} must be a 1-D integer array, got dtype '
          f'{value.dtype} with shape {value.shape}'
        )
      object.__setattr__(self, field, value.astype(np.int32))
    if self.users.shape != self.positions.shape:
      raise ValueError(
        f'Windows.users {self.users.shape} and positions '
        f'{self.positions.shape} must have the same shape'
      )

  def __len__(self) -> int:
    return len(self.users)

  def targets(self, sequences) -> np.ndarray:
    """int32 `[num_windows]`: `sequences[user][position]` per window.

    `sequences` is a list of per-user arrays, a `Dataset` or a
    `FlatSequences`.
    """
    flat = flatten(sequences)
    if len(self) and (
      self.users.min() < 0 or self.users.max() >= flat.num_users
    ):
      raise ValueError(f'Windows hold users outside 0..{flat.num_users - 1}')
    lengths = flat.lengths()[self.users]
    bad = (self.positions < 0) | (self.positions >= lengths)
    if bad.any():
      r = int(np.flatnonzero(bad)[0])
      raise ValueError(
        f'window {r}: no target at position {self.positions[r]} for user '
        f'{self.users[r]} (sequence length {lengths[r]})'
      )
    return flat.items[flat.offsets[self.users] + self.positions]

  def select(self, index) -> Windows:
    """The windows at `index` (a boolean mask or integer indices)."""
    return Windows(self.users[index], self.positions[index])

  def num_users_covered(self) -> int:
    return len(np.unique(self.users))


def _empty() -> Windows:
  return Windows(np.zeros(0, np.int32), np.zeros(0, np.int32))


def _ranges(low: np.ndarray, high: np.ndarray) -> Windows:
  """Windows for every position in [low[u], high[u]] (inclusive) per user.

  Users with high < low get none. Output is sorted by user, then position.
  """
  count = np.maximum(high - low + 1, 0)
  users = np.repeat(np.arange(len(low)), count)
  starts = np.repeat(low, count)
  offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
  return Windows(users, starts + offsets)


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceCloudSplit:
  """Windows for every stage of the device-cloud pipeline.

  Attributes:
    llm_train: targets the cloud LLM trains on.
    srm_train: targets the on-device SRM trains on (independent training).
    device_recent: the newest device-side targets (adaptive re-training),
      a subset of srm_train.
    valid: validation windows (positional: one per user, the second-to-last
      item).
    test: test windows (positional: one per user, the last item).
    gap: staleness gap g; the cloud's view at a window ends g items before
      the target.
    device_window: how many of the newest training targets are device-only.
    num_users: users in the dataset the split was made from.
    kind: 'positional' or 'time'.
    params: the remaining parameters the split was made with.
  """

  llm_train: Windows
  srm_train: Windows
  device_recent: Windows
  valid: Windows
  test: Windows
  gap: int
  device_window: int
  num_users: int = 0
  kind: str = 'positional'
  params: dict = dataclasses.field(default_factory=dict)

  def stale_positions(self, windows: Windows) -> np.ndarray:
    """int32 `[num_windows]`: where the cloud's stale history ends.

    The cloud's view of window r is `sequences[user][:stale[r]]` with
    `stale = positions - gap`, clipped at 0: a window whose target is at
    most `gap` items from the start has an empty stale history
    (`summary()` counts these for valid and test).
    """
    return np.maximum(windows.positions - self.gap, 0).astype(np.int32)

  def windows(self, kind: str) -> Windows:
    if kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    return getattr(self, kind)

  def summary(self) -> dict[str, int]:
    """Counts per kind: windows, users covered, users without a window;
    and for valid/test the windows whose stale history is empty."""
    out: dict[str, int] = {'users': self.num_users}
    for kind in KINDS:
      windows = self.windows(kind)
      covered = windows.num_users_covered()
      out[f'{kind}_windows'] = len(windows)
      out[f'{kind}_users'] = covered
      out[f'{kind}_users_without'] = self.num_users - covered
    for kind in ('valid', 'test'):
      windows = self.windows(kind)
      out[f'{kind}_empty_stale'] = int(
        (windows.positions - self.gap <= 0).sum()
      )
    return out

  def summary_text(self) -> str:
    """The summary as a few readable lines."""
    s = self.summary()
    lines = [
      f'{self.kind} split of {s["users"]:,} users (gap {self.gap}, device '
      f'window {self.device_window}, {self.params})'
    ]
    for kind in KINDS:
      lines.append(
        f'  {kind:<14}{s[f"{kind}_windows"]:>9,} windows, '
        f'{s[f"{kind}_users"]:,} users ({s[f"{kind}_users_without"]:,} '
        'without)'
      )
    lines.append(
      f'  empty stale histories: valid {s["valid_empty_stale"]:,}, test '
      f'{s["test_empty_stale"]:,}'
    )
    return '\n'.join(lines)


def _check_params(gap: int, device_window: int, min_history: int) -> None:
  for name, value, low in (
    ('gap', gap, 0),
    ('device_window', device_window, 0),
    ('min_history', min_history, 0),
  ):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')


def positional_split(
  dataset: Dataset,
  *,
  gap: int = 2,
  device_window: int = 3,
  min_history: int = 1,
) -> DeviceCloudSplit:
  """Per-user split by position from the end (see the module docstring).

  Args:
    dataset: the preprocessed dataset.
    gap: staleness gap g of the cloud's view at valid/test.
    device_window: w, the newest SRM training targets kept from the cloud.
    min_history: h, the shortest input history of a training window.

  Returns:
    The `DeviceCloudSplit`; windows are sorted by user, then position.
  """
  _check_params(gap, device_window, min_history)
  n = dataset.lengths()
  users = np.arange(len(n))
  has_test = n >= 2
  has_valid = n >= 3
  test = Windows(users[has_test], n[has_test] - 1)
  valid = Windows(users[has_valid], n[has_valid] - 2)
  low = np.full(len(n), min_history)
  srm_train = _ranges(low, n - 3)
  device_recent = _ranges(np.maximum(low, n - 2 - device_window), n - 3)
  llm_train = _ranges(low, n - 3 - device_window)
  return DeviceCloudSplit(
    llm_train=llm_train,
    srm_train=srm_train,
    device_recent=device_recent,
    valid=valid,
    test=test,
    gap=gap,
    device_window=device_window,
    num_users=len(n),
    kind='positional',
    params={'min_history': min_history},
  )


def time_cuts_from_quantiles(
  dataset: Dataset,
  valid_quantile: float = 0.8,
  test_quantile: float = 0.9,
) -> tuple[int, int]:
  """Cut times at quantiles of all interaction timestamps.

  Returns:
    `(valid_time, test_time)`: the smallest timestamps t such that at least
    the given fraction of all interactions happen at or before t ('lower'
    quantiles of the pooled timestamps, so they are real timestamps).
  """
  if dataset.timestamps is None:
    raise ValueError(f'dataset {dataset.name!r} has no timestamps')
  if not 0.0 < valid_quantile <= test_quantile < 1.0:
    raise ValueError(
      'expected 0 < valid_quantile <= test_quantile < 1, got '
      f'{valid_quantile}, {test_quantile}'
    )
  stamps = np.concatenate(dataset.timestamps)
  valid_time, test_time = np.quantile(
    stamps, [valid_quantile, test_quantile], method='inverted_cdf'
  )
  return int(valid_time), int(test_time)


def time_split(
  dataset: Dataset,
  *,
  valid_time: int,
  test_time: int,
  gap: int = 2,
  device_window: int = 3,
  min_history: int = 1,
  eval_windows: str = 'all',
) -> DeviceCloudSplit:
  """Split by two global cut times (see the module docstring).

  Args:
    dataset: a dataset with timestamps (non-decreasing per user).
    valid_time: targets with valid_time <= t < test_time are validation.
    test_time: targets with t >= test_time are test.
    gap: staleness gap g of the cloud's view at valid/test.
    device_window: w, each user's newest training targets kept from the
      cloud (device_recent); the earlier ones are llm_train.
    min_history: h, shortest input history of a training window.
      Validation and test windows need a history of at least one item.
    eval_windows: 'all' (every validation/test target) or 'first' (only
      each user's first validation and first test target).

  Returns:
    The `DeviceCloudSplit`; windows are sorted by user, then position.
  """
  _check_params(gap, device_window, min_history)
  if dataset.timestamps is None:
    raise ValueError(
      f'dataset {dataset.name!r} has no timestamps; use positional_split'
    )
  if valid_time > test_time:
    raise ValueError(
      f'expected valid_time <= test_time, got {valid_time} > {test_time}'
    )
  if eval_windows not in ('all', 'first'):
    raise ValueError(
      f"eval_windows must be 'all' or 'first', got {eval_windows!r}"
    )
  n = dataset.lengths()
  stamps = np.concatenate(dataset.timestamps) if len(n) else np.zeros(0)
  starts = np.cumsum(n) - n
  users = np.repeat(np.arange(len(n)), n)
  positions = np.arange(len(users)) - np.repeat(starts, n)
  if len(users) and np.any((np.diff(stamps) < 0) & (np.diff(users) == 0)):
    raise ValueError(
      f'dataset {dataset.name!r}: timestamps must be non-decreasing '
      'within each user'
    )

  is_test = (stamps >= test_time) & (positions >= 1)
  is_valid = (stamps >= valid_time) & (stamps < test_time) & (positions >= 1)
  is_train = (stamps < valid_time) & (positions >= min_history)
  if eval_windows == 'first':
    is_test &= _first_per_user(is_test, users)
    is_valid &= _first_per_user(is_valid, users)

  # Rank of each training target from the user's newest one (1 = newest).
  train_count = np.cumsum(is_train)
  before_user = np.concatenate([[0], train_count])[starts]
  within = train_count - np.repeat(before_user, n)
  total = np.bincount(users[is_train], minlength=len(n))
  from_end = total[users] - within + 1
  is_device = is_train & (from_end <= device_window)

  def pick(mask):
    return Windows(users[mask], positions[mask])

  return DeviceCloudSplit(
    llm_train=pick(is_train & ~is_device),
    srm_train=pick(is_train),
    device_recent=pick(is_device),
    valid=pick(is_valid),
    test=pick(is_test),
    gap=gap,
    device_window=device_window,
    num_users=len(n),
    kind='time',
    params={
      'valid_time': int(valid_time),
      'test_time': int(test_time),
      'min_history': min_history,
      'eval_windows': eval_windows,
    },
  )


def _first_per_user(mask: np.ndarray, users: np.ndarray) -> np.ndarray:
  """bool `[n]`: True at the first True of `mask` within each user."""
  first = np.zeros(len(mask), dtype=bool)
  index = np.flatnonzero(mask)
  if len(index):
    keep = np.concatenate([[True], users[index][1:] != users[index][:-1]])
    first[index[keep]] = True
  return first
