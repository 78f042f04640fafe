"""Per-device adaptation: every device fine-tunes its own copy of the SRM.

LSC4Rec (Lv et al., KDD 2025) re-trains the on-device model on the newest
interactions, which live on the device. The paper re-trains one global
model; here each user's device can also fine-tune its *own* copy of a chosen
parameter subset on its *own* recent interactions, for a few steps, and then
score its candidate list with it.

All devices run as one `jax.vmap` inside `jax.jit`. Devices are processed in
chunks of a fixed size (the last chunk is padded and its filler rows are
dropped), so memory stays bounded for any number of users and the function
compiles once. Only the scores leave a chunk; the adapted copies are never
stored for all users at once.

By default every parameter except the item embedding table is adapted: a
per-device copy of the table (and its optimizer state) would cost megabytes
per device and make the vmapped step bound by memory traffic. The shared
table stays frozen and is read once per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.traverse_util
import jax
import numpy as np
import optax

from lsc_jax.data import batching
from lsc_jax.data.splits import Windows
from lsc_jax.models import srm
from lsc_jax.train import losses

PathPredicate = Callable[[tuple[str, ...]], bool]


def all_but_item_table(path: tuple[str, ...]) -> bool:
  """Default adapted subset: every parameter outside `item_embedding`."""
  return 'item_embedding' not in path


def partition_params(params, is_adapted: PathPredicate):
  """Splits a parameter tree into (adapted, frozen) flat dicts.

  Args:
    params: a nested parameter dict (as returned by `model.init`).
    is_adapted: called with each leaf's path (a tuple of names); True puts
      the leaf in the adapted part.

  Returns:
    (adapted, frozen): two flat dicts keyed by path tuples. `merge_params`
    joins them back.

  Raises:
    ValueError: if the adapted part is empty (nothing would be learned).
  """
  flat = flax.traverse_util.flatten_dict(params)
  adapted = {k: v for k, v in flat.items() if is_adapted(k)}
  frozen = {k: v for k, v in flat.items() if not is_adapted(k)}
  if not adapted:
    raise ValueError(
      'partition_params: the adapted subset is empty; parameter paths are '
      f'{sorted(flat)[:8]}...'
    )
  return adapted, frozen


def merge_params(adapted, frozen):
  """Joins the flat dicts of `partition_params` into a nested tree."""
  return flax.traverse_util.unflatten_dict({**frozen, **adapted})


def tree_bytes(tree) -> int:
  """Bytes held by the arrays of a pytree."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
  """How each device fine-tunes its copy.

  Attributes:
    num_steps: full-batch optimizer steps per device.
    learning_rate: step size of the per-device optimizer.
    optimizer: 'sgd' or 'adam'.
    num_negatives: random negatives per recent target (BCE, the paper's
      re-training objective).
    chunk_size: devices per compiled vmapped call.
    is_adapted: which parameters each device adapts (path predicate).
  """

  num_steps: int = 5
  learning_rate: float = 0.05
  optimizer: str = 'sgd'
  num_negatives: int = 4
  chunk_size: int = 32
  is_adapted: PathPredicate = all_but_item_table

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f'AdaptConfig.num_steps must be >= 1: {self.num_steps}')
    if self.chunk_size < 1:
      raise ValueError(
        f'AdaptConfig.chunk_size must be >= 1: {self.chunk_size}'
      )
    if self.optimizer not in ('sgd', 'adam'):
      raise ValueError(
        f"AdaptConfig.optimizer: expected 'sgd' or 'adam', got "
        f'{self.optimizer!r}'
      )

  def make_optimizer(self) -> optax.GradientTransformation:
    if self.optimizer == 'adam':
      return optax.adam(self.learning_rate)
    return optax.sgd(self.learning_rate)


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """Every device's recent interactions and the list it must score.

  Attributes:
    history: int32 `[num_devices, num_recent, L]` input of each recent
      target.
    candidates: int32 `[num_devices, num_recent, 1 + num_negatives]`: the
      recent target first, then sampled negatives.
    mask: float32 `[num_devices, num_recent]`, 0 where a device has fewer
      recent targets than `num_recent`.
    eval_history: int32 `[num_devices, L]` the history used for scoring.
    eval_candidates: int32 `[num_devices, K]` items to score (0 = empty
      slot; its score is meaningless and should be masked by the caller).
  """

  history: np.ndarray
  candidates: np.ndarray
  mask: np.ndarray
  eval_history: np.ndarray
  eval_candidates: np.ndarray

  def __len__(self) -> int:
    return self.history.shape[0]

  def rows(self, index) -> DeviceData:
    return DeviceData(
      *(getattr(self, f.name)[index] for f in dataclasses.fields(self))
    )


def build_device_data(
  sequences,
  recent: Windows,
  eval_windows: Windows,
  eval_candidates: np.ndarray,
  *,
  num_items: int,
  max_len: int,
  num_recent: int,
  num_negatives: int,
  seed: int,
) -> DeviceData:
  """Gathers each evaluated user's recent windows into fixed shapes.

  Args:
    sequences: per-user item arrays or a `FlatSequences`.
    recent: the device-side training windows (e.g. `split.device_recent`);
      a user's newest `num_recent` of them are used.
    eval_windows: one window per device (e.g. `split.test`); its history is
      what the adapted copy scores with.
    eval_candidates: int `[len(eval_windows), K]` items to score.
    num_items: catalogue size.
    max_len: history width L.
    num_recent: recent targets per device (users with fewer are masked).
    num_negatives: negatives per recent target, sampled uniformly from the
      items outside that window's own input history, so they never look at
      later (validation or test) items.
    seed: seeds the negatives.

  Returns:
    A `DeviceData` with one row per evaluation window.
  """
  flat = batching.flatten(sequences)
  num_devices = len(eval_windows)
  eval_candidates = np.asarray(eval_candidates, np.int32)
  if eval_candidates.shape[0] != num_devices:
    raise ValueError(
      f'eval_candidates has {eval_candidates.shape[0]} rows for '
      f'{num_devices} evaluation windows'
    )

  # Slot s of a device holds its s-th newest recent window.
  order = np.lexsort((-recent.positions, recent.users))
  users, positions = recent.users[order], recent.positions[order]
  first = np.searchsorted(users, users, side='left')
  rank = np.arange(len(users)) - first
  keep = rank < num_recent
  users, positions, rank = users[keep], positions[keep], rank[keep]

  device_of_user = np.full(flat.num_users, -1, np.int64)
  device_of_user[eval_windows.users] = np.arange(num_devices)
  device = device_of_user[users]
  on_device = device >= 0
  users, positions = users[on_device], positions[on_device]
  rank, device = rank[on_device], device[on_device]

  history = np.zeros((num_devices, num_recent, max_len), np.int32)
  candidates = np.zeros((num_devices, num_recent, 1 + num_negatives), np.int32)
  mask = np.zeros((num_devices, num_recent), np.float32)
  if len(users):
    window_history = batching.histories(flat, users, positions, max_len)
    targets = flat.items[flat.offsets[users] + positions]
    negatives = batching.sample_negatives(
      np.random.default_rng([seed, 11]),
      targets,
      num_negatives,
      num_items,
      exclude=window_history,
    )
    history[device, rank] = window_history
    candidates[device, rank, 0] = targets
    candidates[device, rank, 1:] = negatives
    mask[device, rank] = 1.0

  eval_history = batching.histories(
    flat, eval_windows.users, eval_windows.positions, max_len
  )
  return DeviceData(history, candidates, mask, eval_history, eval_candidates)


def make_device_update(
  model, config: AdaptConfig
) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Returns `update(adapted, frozen, *device) -> (scores [K], losses)`.

  The update fine-tunes one device's copy of the adapted parameters for
  `config.num_steps` full-batch steps on its recent windows (BCE over the
  target and its negatives, the paper's re-training loss), then scores the
  device's evaluation candidates with the result. `frozen` (the shared
  parameters, e.g. the item table) is an argument, not a constant, so one
  compiled update serves any parameter values. `device` is one row of
  `DeviceData`: history, candidates, mask, eval_history, eval_candidates.
  Returns the scores `[K]` and the loss before each step `[num_steps]`.
  """
  optimizer = config.make_optimizer()

  def loss_fn(adapted, frozen, history, candidates, mask):
    params = merge_params(adapted, frozen)
    logits = model.apply(params, history, candidates)
    return losses.bce_with_negatives(logits[:, 0], logits[:, 1:], mask)

  def update(
    adapted, frozen, history, candidates, mask, eval_history, eval_items
  ):
    def step(carry, _):
      adapted, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(
        adapted, frozen, history, candidates, mask
      )
      updates, opt_state = optimizer.update(grads, opt_state, adapted)
      return (optax.apply_updates(adapted, updates), opt_state), loss

    carry = (adapted, optimizer.init(adapted))
    (adapted, _), step_losses = jax.lax.scan(
      step, carry, None, length=config.num_steps
    )
    params = merge_params(adapted, frozen)
    scores = model.apply(params, eval_history[None], eval_items[None])[0]
    return scores, step_losses

  return update


@functools.lru_cache(maxsize=16)
def _chunk_function(model, config: AdaptConfig):
  """The jitted, vmapped update over a chunk of devices (cached).

  Returns (function, traces): `traces[0]` counts how often it was traced,
  i.e. compiled for new shapes.
  """
  update = jax.vmap(
    make_device_update(model, config), in_axes=(None, None, 0, 0, 0, 0, 0)
  )
  traces = [0]

  def run_chunk(adapted, frozen, *device_rows):
    traces[0] += 1
    return update(adapted, frozen, *device_rows)

  return jax.jit(run_chunk), traces


@functools.lru_cache(maxsize=16)
def _device_function(model, config: AdaptConfig):
  """The jitted update of one device (cached), for the loop baseline."""
  return jax.jit(make_device_update(model, config))


@dataclasses.dataclass
class AdaptResult:
  """Scores of every device's adapted copy.

  Attributes:
    scores: float32 `[num_devices, K]` logits of the evaluation candidates.
    first_loss, last_loss: float32 `[num_devices]` recent-window loss before
      the first and before the last step (devices without recent windows
      have 0 loss and are left unchanged).
    adapted_bytes: bytes of one device's adapted parameters.
    state_bytes: bytes of one device's adapted parameters plus optimizer
      state, i.e. what each device's copy costs during adaptation.
    num_compiles: how many new shapes the chunk function compiled for
      (1 on a first call, 0 when a previous call had the same shapes).
  """

  scores: np.ndarray
  first_loss: np.ndarray
  last_loss: np.ndarray
  adapted_bytes: int
  state_bytes: int
  num_compiles: int


def _fields(data: DeviceData) -> tuple[np.ndarray, ...]:
  return (
    data.history,
    data.candidates,
    data.mask,
    data.eval_history,
    data.eval_candidates,
  )


def adapt_and_score(
  model,
  params,
  data: DeviceData,
  config: AdaptConfig = AdaptConfig(),
  *,
  log: Callable[[str], None] | None = None,
) -> AdaptResult:
  """Fine-tunes one copy per device (vmapped, chunked) and scores with it.

  Args:
    model: an SRM module (`model.apply(params, history, candidates)`).
    params: the shared starting parameters (e.g. the re-trained SRM).
    data: `build_device_data` output, one row per device.
    config: the adaptation settings.
    log: receives one progress line per chunk batch (None: quiet).

  Returns:
    An `AdaptResult`.
  """
  adapted, frozen = partition_params(params, config.is_adapted)
  history, candidates, _, _, eval_items = _fields(data)
  for name, ids in (
    ('history', history),
    ('candidates', candidates),
    ('eval_candidates', eval_items),
  ):
    _, num_oov = srm.check_item_ids(ids, model.num_items)
    if num_oov:
      raise ValueError(
        f'adapt_and_score: {num_oov} {name} ids outside 0..{model.num_items}'
      )

  run_chunk, traces = _chunk_function(model, config)
  traces_before = traces[0]

  num_devices = len(data)
  size = min(config.chunk_size, max(num_devices, 1))
  scores, first, last = [], [], []
  for start in range(0, num_devices, size):
    stop = min(start + size, num_devices)
    index = np.arange(start, start + size)
    index = np.where(index < stop, index, start)  # filler rows repeat row 0
    chunk = [np.asarray(f)[index] for f in _fields(data)]
    chunk_scores, chunk_losses = run_chunk(adapted, frozen, *chunk)
    n = stop - start
    scores.append(np.asarray(chunk_scores)[:n])
    first.append(np.asarray(chunk_losses)[:n, 0])
    last.append(np.asarray(chunk_losses)[:n, -1])
    if log is not None:
      log(f'per-device adaptation: {stop:,}/{num_devices:,} devices')

  optimizer = config.make_optimizer()
  k = data.eval_candidates.shape[1]
  return AdaptResult(
    scores=np.concatenate(scores) if scores else np.zeros((0, k), np.float32),
    first_loss=np.concatenate(first) if first else np.zeros(0, np.float32),
    last_loss=np.concatenate(last) if last else np.zeros(0, np.float32),
    adapted_bytes=tree_bytes(adapted),
    state_bytes=tree_bytes(adapted) + tree_bytes(optimizer.init(adapted)),
    num_compiles=traces[0] - traces_before,
  )


def adapt_and_score_loop(
  model, params, data: DeviceData, config: AdaptConfig = AdaptConfig()
) -> np.ndarray:
  """The same computation as `adapt_and_score`, one jitted call per device.

  This is the baseline the vmapped form is measured against, and a
  reference for tests. Returns float32 `[num_devices, K]` scores.
  """
  adapted, frozen = partition_params(params, config.is_adapted)
  update = _device_function(model, config)
  rows = []
  for i in range(len(data)):
    scores, _ = update(adapted, frozen, *(f[i] for f in _fields(data)))
    rows.append(np.asarray(scores))
  return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def adapted_paths(params, is_adapted: PathPredicate) -> Sequence[str]:
  """The '/'-joined names of the adapted parameters (for logs and docs)."""
  adapted, _ = partition_params(params, is_adapted)
  return sorted('/'.join(k) for k in adapted)


def describe_subset(params, is_adapted: PathPredicate) -> dict[str, Any]:
  """Sizes of the adapted and frozen parts of `params`."""
  adapted, frozen = partition_params(params, is_adapted)
  return {
    'adapted_parameters': int(sum(x.size for x in adapted.values())),
    'frozen_parameters': int(sum(x.size for x in frozen.values())),
    'adapted_bytes': tree_bytes(adapted),
  }
