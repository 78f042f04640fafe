"""Per-device adaptation: every device fine-tunes its own copy of the SRM.

LSC4Rec (Lv et al., KDD 2025) re-trains the on-device model on the newest
interactions, which live on the device. The paper re-trains one global
model; here each user's device can also fine-tune its *own* copy of a chosen
parameter subset on its *own* recent interactions, for a few steps, and then
score its candidate list with it.

Which parameters a device adapts is named by `AdaptConfig.subset` (see
`SUBSETS`):

- 'output_head' (default): the SRM's output head, the layers on top of the
  model (SASRec: the last block's feed-forward and the final LayerNorm;
  GRU4Rec: the output projection; DIN: the scoring MLP after target
  attention). A device's copy is a few tens of kB.
- 'all_but_item_table': every parameter except the item embedding table
  (the earlier default, about six times as many parameters for SASRec).

The head is the default because of what it lets the computation skip.
Everything below it, the trunk, uses the shared, frozen parameters, so its
output on a device's windows and candidates does not change across steps:
it runs once per device, before the steps, and each step runs only the
small head. For the causal SRMs (SASRec, GRU4Rec) the trunk even runs on
one history per device: the recent windows are usually prefixes of the
evaluation history, whose per-position states then serve every window.
With 'all_but_item_table' each step re-runs the whole model and
back-propagates through per-device copies of every weight matrix, which on
a CPU is no faster vmapped than in a loop of per-device calls; with the
head, the vmapped form is several times faster than that loop, because a
device's remaining arithmetic is small next to the cost of a call. The
item table is never adapted per device: a copy of it with its optimizer
state would cost megabytes per device.

All devices run as one `jax.vmap` inside `jax.jit`, in chunks of a fixed
size, so memory stays bounded for any number of users; only the scores and
losses leave a chunk, and the adapted copies are never stored for all users
at once. Devices are grouped into chunks by form (one history or not) and
by how far back their histories reach, and a chunk's histories are cut to
the narrowest of a few widths that keeps all their items (the SRMs ignore
left padding; most histories are far shorter than the model's width). Each
(form, width, chunk size) compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsc_jax.data import batching
from lsc_jax.data.splits import Windows
from lsc_jax.models import srm
from lsc_jax.train import losses

PathPredicate = Callable[[tuple[str, ...]], bool]


def all_but_item_table(path: tuple[str, ...]) -> bool:
  """Every parameter outside `item_embedding` (subset 'all_but_item_table')."""
  return 'item_embedding' not in path


def has_output_head(model) -> bool:
  """Whether `model` splits into a trunk and an output head.

  Such a model has the methods `trunk`, `head` and `is_head_parameter`
  described in `lsc_jax.models.srm`.
  """
  return all(
    callable(getattr(model, name, None))
    for name in ('trunk', 'head', 'is_head_parameter')
  )


def _output_head(model) -> PathPredicate:
  if not has_output_head(model):
    raise ValueError(
      f"subset 'output_head': {type(model).__name__} has no trunk/head "
      'split (methods trunk, head and is_head_parameter); choose '
      "subset='all_but_item_table'"
    )
  return model.is_head_parameter


# Named parameter subsets: name -> function(model) -> path predicate.
SUBSETS: dict[str, Callable[[Any], PathPredicate]] = {
  'output_head': _output_head,
  'all_but_item_table': lambda model: all_but_item_table,
}


def subset_predicate(model, subset: str) -> PathPredicate:
  """The path predicate of the named subset for `model`.

  Raises:
    ValueError: for an unknown name, or 'output_head' on a model without a
      trunk/head split.
  """
  if subset not in SUBSETS:
    raise ValueError(
      f'unknown adapted subset {subset!r}; expected one of {sorted(SUBSETS)}'
    )
  return SUBSETS[subset](model)


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
    subset: which parameters each device adapts, a name in `SUBSETS`.
      'output_head' (default) adapts the SRM's output head only; its
      frozen trunk runs once per device instead of once per step, which is
      what makes the vmapped form several times faster than a per-device
      loop on a CPU (see the module docstring). 'all_but_item_table'
      adapts every parameter except the item table.
    history_widths: widths a chunk's histories may be cut to (their left
      padding dropped), besides the data's full width. Devices are chunked
      in order of how far back their histories reach (`history_spans`),
      so a chunk holds similar lengths and is cut to the smallest width in
      this list (or the full width) that keeps every real item. The SRMs
      ignore left padding, so scores agree with uncut histories up to
      floating-point rounding. Each width used compiles once. Empty: never
      cut.
  """

  num_steps: int = 5
  learning_rate: float = 0.05
  optimizer: str = 'sgd'
  num_negatives: int = 4
  chunk_size: int = 32
  subset: str = 'output_head'
  history_widths: tuple[int, ...] = (4, 8, 16, 32)

  def __post_init__(self):
    widths = tuple(self.history_widths)
    if list(widths) != sorted(set(widths)) or (widths and widths[0] < 1):
      raise ValueError(
        'AdaptConfig.history_widths: expected increasing positive widths, '
        f'got {widths}'
      )
    object.__setattr__(self, 'history_widths', widths)
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
    if self.subset not in SUBSETS:
      raise ValueError(
        f'AdaptConfig.subset: expected one of {sorted(SUBSETS)}, got '
        f'{self.subset!r}'
      )

  def make_optimizer(self) -> optax.GradientTransformation:
    if self.optimizer == 'adam':
      return optax.adam(self.learning_rate)
    return optax.sgd(self.learning_rate)


def split_params(model, params, config: AdaptConfig):
  """`partition_params` by the subset `config.subset` names for `model`."""
  return partition_params(params, subset_predicate(model, config.subset))


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


def runs_trunk_once(model, adapted) -> bool:
  """Whether the update of `adapted` can compute the frozen trunk once.

  True when `model` has a trunk/head split and every adapted parameter
  belongs to its head, so the trunk reads frozen parameters only.

  Args:
    model: an SRM module.
    adapted: the flat adapted dict of `partition_params` (its keys only are
      read).
  """
  return has_output_head(model) and all(
    model.is_head_parameter(path) for path in adapted
  )


def prefix_windows(data: DeviceData) -> np.ndarray:
  """bool `[num_devices]`: every recent window is a prefix of the eval history.

  True where each recent window (mask 1) holds exactly the evaluation
  history without its newest items, shifted right by their number: the
  same oldest item, the same order, no truncation in between. A causal
  SRM's state at that column of the evaluation history is then the
  window's own state, so one pass over the evaluation history serves all
  of the device's windows.
  """
  history = np.asarray(data.history)
  eval_history = np.asarray(data.eval_history)
  width = eval_history.shape[-1]
  eval_count = (eval_history != srm.PADDING_ID).sum(axis=-1)
  count = (history != srm.PADDING_ID).sum(axis=-1)
  shift = eval_count[:, None] - count  # [num_devices, num_recent]
  source = np.arange(width) - np.maximum(shift, 0)[..., None]
  shifted = np.take_along_axis(
    eval_history[:, None, :], np.maximum(source, 0), axis=-1
  )
  shifted = np.where(source >= 0, shifted, srm.PADDING_ID)
  is_prefix = (shift >= 0) & np.all(shifted == history, axis=-1)
  return np.all(is_prefix | (np.asarray(data.mask) == 0), axis=1)


def _fine_tune(loss_fn, adapted, optimizer, num_steps: int):
  """`num_steps` optimizer steps on `loss_fn(adapted)`.

  Returns:
    (adapted after the steps, losses `[num_steps + 1]`: before each step,
    then after the last one).
  """

  def step(carry, _):
    adapted, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(adapted)
    updates, opt_state = optimizer.update(grads, opt_state, adapted)
    return (optax.apply_updates(adapted, updates), opt_state), loss

  carry = (adapted, optimizer.init(adapted))
  (adapted, _), step_losses = jax.lax.scan(step, carry, None, length=num_steps)
  final_loss = loss_fn(adapted)
  return adapted, jnp.append(step_losses, final_loss)


def make_device_fine_tune(
  model,
  config: AdaptConfig,
  *,
  trunk_once: bool = True,
  shared_prefix: bool = False,
) -> Callable[..., tuple[Any, jax.Array, jax.Array]]:
  """Returns `fine_tune(adapted, frozen, *device) -> (adapted, scores,
  losses)`.

  `fine_tune` runs `config.num_steps` full-batch optimizer steps on one
  device's copy of the adapted parameters (a flat dict, as from
  `partition_params`) on its recent windows (BCE over the target and its
  negatives, the paper's re-training loss), then scores the device's
  evaluation candidates with the result. `frozen` (the shared parameters,
  e.g. the item table) is an argument, not a constant, so one compiled
  function serves any parameter values. `device` is one row of
  `DeviceData`: history, candidates, mask, eval_history, eval_candidates.
  It returns the adapted copy, the scores `[K]` and the recent-window loss
  `[num_steps + 1]` before each step and after the last one.

  Three forms compute the same result (up to floating-point rounding):

  - trunk once (when `trunk_once` and `runs_trunk_once(model, adapted)`):
    the model's trunk runs once on the recent windows and once on the
    evaluation list, with the frozen parameters only; each step runs the
    head alone. Under `vmap` the trunk is one batched computation with
    shared weights for all devices of a chunk.
  - trunk once over one history (also `shared_prefix`, for a causal SRM,
    `srm.SequenceScoring`): the trunk runs once, on the evaluation history
    only, and yields the recent windows' features at the columns where
    they end. Only valid for devices whose windows are prefixes of the
    evaluation history (`prefix_windows`); for others the result is
    wrong, which is why the callers route devices by that test.
  - generic (otherwise): each step runs the whole model with the merged
    parameters; back-propagation stops at the frozen ones.

  Args:
    model: an SRM module.
    config: the adaptation settings.
    trunk_once: allow the trunk-once forms (False forces the generic one,
      e.g. to check one against the other).
    shared_prefix: use the one-history form where it applies.
  """
  optimizer = config.make_optimizer()

  def bce(logits, mask):
    return losses.bce_with_negatives(logits[:, 0], logits[:, 1:], mask)

  def generic(
    adapted, frozen, history, candidates, mask, eval_history, eval_items
  ):
    def loss_fn(adapted):
      logits = model.apply(merge_params(adapted, frozen), history, candidates)
      return bce(logits, mask)

    adapted, step_losses = _fine_tune(
      loss_fn, adapted, optimizer, config.num_steps
    )
    params = merge_params(adapted, frozen)
    scores = model.apply(params, eval_history[None], eval_items[None])[0]
    return adapted, scores, step_losses

  def tune_head(adapted, frozen, features, eval_features, mask):
    # Only the head runs per step: the trunk's features are fixed.
    def loss_fn(adapted):
      params = merge_params(adapted, frozen)
      return bce(model.apply(params, features, method='head'), mask)

    adapted, step_losses = _fine_tune(
      loss_fn, adapted, optimizer, config.num_steps
    )
    params = merge_params(adapted, frozen)
    scores = model.apply(params, eval_features, method='head')[0]
    return adapted, scores, step_losses

  def head_only(
    adapted, frozen, history, candidates, mask, eval_history, eval_items
  ):
    # The trunk gets the frozen parameters only: should it read an adapted
    # one, Flax raises instead of silently using the stale value.
    frozen_tree = flax.traverse_util.unflatten_dict(frozen)
    features = model.apply(frozen_tree, history, candidates, method='trunk')
    eval_features = model.apply(
      frozen_tree, eval_history[None], eval_items[None], method='trunk'
    )
    return tune_head(adapted, frozen, features, eval_features, mask)

  def one_history(
    adapted, frozen, history, candidates, mask, eval_history, eval_items
  ):
    # Window r ends `eval_count - count[r]` columns before the last one.
    # Masked windows get some valid column; their loss weight is 0.
    width = eval_history.shape[-1]
    eval_count = jnp.sum(eval_history != srm.PADDING_ID)
    count = jnp.sum(history != srm.PADDING_ID, axis=-1)
    ends = jnp.clip(width - 1 - (eval_count - count), 0, width - 1)
    # Both calls read the same history with the same parameters; XLA
    # merges the common part, so the history is encoded once.
    frozen_tree = flax.traverse_util.unflatten_dict(frozen)
    features = model.apply(
      frozen_tree,
      eval_history[None],
      candidates[None],
      ends[None],
      method='trunk',
    )
    # Drop the batch axis of one history: the windows' features then have
    # the layout of the other form (`[num_recent, ...]`), which the steps
    # run fastest on.
    features = jax.tree.map(lambda leaf: leaf[0], features)
    eval_features = model.apply(
      frozen_tree, eval_history[None], eval_items[None], method='trunk'
    )
    return tune_head(adapted, frozen, features, eval_features, mask)

  def fine_tune(adapted, frozen, *device):
    # Decided while tracing, from the (static) keys of `adapted`.
    if trunk_once and runs_trunk_once(model, adapted):
      if shared_prefix and isinstance(model, srm.SequenceScoring):
        return one_history(adapted, frozen, *device)
      return head_only(adapted, frozen, *device)
    return generic(adapted, frozen, *device)

  return fine_tune


def make_device_update(
  model,
  config: AdaptConfig,
  *,
  trunk_once: bool = True,
  shared_prefix: bool = False,
) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Returns `update(adapted, frozen, *device) -> (scores [K], losses)`.

  `make_device_fine_tune` without the adapted copy in its output: the form
  that is vmapped over devices, where only scores and losses leave a chunk.
  """
  fine_tune = make_device_fine_tune(
    model, config, trunk_once=trunk_once, shared_prefix=shared_prefix
  )

  def update(adapted, frozen, *device):
    _, scores, step_losses = fine_tune(adapted, frozen, *device)
    return scores, step_losses

  return update


@functools.lru_cache(maxsize=32)
def _chunk_function(
  model, config: AdaptConfig, trunk_once: bool, shared_prefix: bool
):
  """The jitted, vmapped update over a chunk of devices (cached).

  Returns (function, traces): `traces[0]` counts how often it was traced,
  i.e. compiled for new shapes.
  """
  update = jax.vmap(
    make_device_update(
      model, config, trunk_once=trunk_once, shared_prefix=shared_prefix
    ),
    in_axes=(None, None, 0, 0, 0, 0, 0),
  )
  traces = [0]

  def run_chunk(adapted, frozen, *device_rows):
    traces[0] += 1
    return update(adapted, frozen, *device_rows)

  return jax.jit(run_chunk), traces


@functools.lru_cache(maxsize=32)
def _device_function(
  model, config: AdaptConfig, trunk_once: bool, shared_prefix: bool
):
  """The jitted update of one device (cached), for the loop baseline."""
  return jax.jit(
    make_device_update(
      model, config, trunk_once=trunk_once, shared_prefix=shared_prefix
    )
  )


@dataclasses.dataclass
class AdaptResult:
  """Scores of every device's adapted copy.

  Attributes:
    scores: float32 `[num_devices, K]` logits of the evaluation candidates.
    first_loss, last_loss: float32 `[num_devices]` recent-window loss before
      the first step and after the last one (devices without recent
      windows have 0 loss and are left unchanged).
    adapted_bytes: bytes of one device's adapted parameters.
    state_bytes: bytes of one device's adapted parameters plus optimizer
      state, i.e. what each device's copy costs during adaptation.
    num_compiles: how many new shapes the chunk function compiled for
      (0 when previous calls had the same shapes).
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


def history_spans(data: DeviceData) -> np.ndarray:
  """int `[num_devices]`: columns from a device's oldest real item to the end.

  The maximum over the device's recent-window histories and its evaluation
  history (histories are left-padded, so cutting them to their last `span`
  columns keeps every real item).
  """
  width = data.eval_history.shape[-1]

  def spans(history):
    real = np.asarray(history) != srm.PADDING_ID
    first = np.where(real.any(axis=-1), real.argmax(axis=-1), width)
    return width - first

  recent = spans(data.history).max(axis=1, initial=0)
  return np.maximum(recent, spans(data.eval_history))


def _cut_width(span: int, full: int, widths: Sequence[int]) -> int:
  """The smallest width in `widths` (or `full`) holding `span` columns."""
  return next((w for w in widths if span <= w < full), full)


def _device_rows(fields, index, width: int) -> list[np.ndarray]:
  """Rows `index` of the `_fields`, histories cut to their last `width`."""
  history, candidates, mask, eval_history, eval_candidates = fields
  return [
    np.asarray(history)[index][..., -width:],
    np.asarray(candidates)[index],
    np.asarray(mask)[index],
    np.asarray(eval_history)[index][..., -width:],
    np.asarray(eval_candidates)[index],
  ]


def _check_ids(model, data: DeviceData, where: str) -> None:
  for name in ('history', 'candidates', 'eval_candidates'):
    _, num_oov = srm.check_item_ids(getattr(data, name), model.num_items)
    if num_oov:
      raise ValueError(
        f'{where}: {num_oov} {name} ids outside 0..{model.num_items}'
      )


def _shares_prefix(model, adapted, data: DeviceData, trunk_once: bool):
  """bool `[num_devices]`: devices that take the one-history form."""
  if not (
    trunk_once
    and isinstance(model, srm.SequenceScoring)
    and runs_trunk_once(model, adapted)
  ):
    return np.zeros(len(data), bool)
  return prefix_windows(data)


def _chunks(spans: np.ndarray, shares: np.ndarray, chunk_size: int):
  """Yields (shared, rows, size): the chunks `adapt_and_score` runs.

  Devices of one form (`shares` True: the one-history form) are chunked
  together, in order of span. A form's last chunk holds fewer devices; it
  is run at the next power of two at least its number of devices (at most
  `chunk_size`), so fewer than half its rows are filler.
  """
  for shared in (True, False):
    members = np.flatnonzero(shares == shared)
    members = members[np.argsort(spans[members], kind='stable')]
    for start in range(0, len(members), chunk_size):
      rows = members[start : start + chunk_size]
      size = min(chunk_size, 1 << (len(rows) - 1).bit_length())
      yield shared, rows, size


def adapt_and_score(
  model,
  params,
  data: DeviceData,
  config: AdaptConfig = AdaptConfig(),
  *,
  log: Callable[[str], None] | None = None,
  trunk_once: bool = True,
) -> AdaptResult:
  """Fine-tunes one copy per device (vmapped, chunked) and scores with it.

  Devices are grouped so that a chunk is as uniform as possible: by
  whether their recent windows are prefixes of their evaluation history
  (`prefix_windows`; a causal SRM then encodes one history per device),
  then in order of `history_spans`; each chunk's histories are cut to a
  width of `config.history_widths` (see `AdaptConfig`). Each form's last,
  partial chunk runs at a power-of-two size. Results are returned in the
  order of `data`.

  Args:
    model: an SRM module (`model.apply(params, history, candidates)`).
    params: the shared starting parameters (e.g. the re-trained SRM).
    data: `build_device_data` output, one row per device.
    config: the adaptation settings.
    log: receives one progress line per chunk batch (None: quiet).
    trunk_once: as for `make_device_fine_tune` (False: the generic form
      for every device).

  Returns:
    An `AdaptResult`.
  """
  adapted, frozen = split_params(model, params, config)
  _check_ids(model, data, 'adapt_and_score')
  functions = {
    shared: _chunk_function(model, config, trunk_once, shared)
    for shared in (False, True)
  }
  traces_before = sum(traces[0] for _, traces in functions.values())

  num_devices = len(data)
  k = data.eval_candidates.shape[1]
  full = data.eval_history.shape[-1]
  spans = history_spans(data)
  shares = _shares_prefix(model, adapted, data, trunk_once)
  scores = np.zeros((num_devices, k), np.float32)
  first = np.zeros(num_devices, np.float32)
  last = np.zeros(num_devices, np.float32)
  done = 0
  for shared, rows, size in _chunks(spans, shares, config.chunk_size):
    # Filler rows repeat the chunk's first device; their results are dropped.
    index = np.concatenate([rows, np.full(size - len(rows), rows[0])])
    width = _cut_width(int(spans[rows].max()), full, config.history_widths)
    run_chunk, _ = functions[shared]
    chunk = _device_rows(_fields(data), index, width)
    chunk_scores, chunk_losses = run_chunk(adapted, frozen, *chunk)
    chunk_losses = np.asarray(chunk_losses)[: len(rows)]
    scores[rows] = np.asarray(chunk_scores)[: len(rows)]
    first[rows] = chunk_losses[:, 0]
    last[rows] = chunk_losses[:, -1]
    done += len(rows)
    if log is not None:
      log(f'per-device adaptation: {done:,}/{num_devices:,} devices')

  optimizer = config.make_optimizer()
  traces_after = sum(traces[0] for _, traces in functions.values())
  return AdaptResult(
    scores=scores,
    first_loss=first,
    last_loss=last,
    adapted_bytes=tree_bytes(adapted),
    state_bytes=tree_bytes(adapted) + tree_bytes(optimizer.init(adapted)),
    num_compiles=traces_after - traces_before,
  )


def adapt_and_score_loop(
  model,
  params,
  data: DeviceData,
  config: AdaptConfig = AdaptConfig(),
  *,
  trunk_once: bool = True,
) -> np.ndarray:
  """The same computation as `adapt_and_score`, one jitted call per device.

  This is the baseline the vmapped form is measured against, and a
  reference for tests. Each device takes the same form as in
  `adapt_and_score`, and its histories are cut to the smallest width of
  `config.history_widths` that holds its own span, never wider than its
  chunk's. Returns float32 `[num_devices, K]` scores.
  """
  adapted, frozen = split_params(model, params, config)
  _check_ids(model, data, 'adapt_and_score_loop')
  functions = {
    shared: _device_function(model, config, trunk_once, shared)
    for shared in (False, True)
  }
  full = data.eval_history.shape[-1]
  spans = history_spans(data)
  shares = _shares_prefix(model, adapted, data, trunk_once)
  rows = []
  for i in range(len(data)):
    width = _cut_width(int(spans[i]), full, config.history_widths)
    update = functions[bool(shares[i])]
    scores, _ = update(adapted, frozen, *_device_rows(_fields(data), i, width))
    rows.append(np.asarray(scores))
  k = data.eval_candidates.shape[1]
  return np.stack(rows) if rows else np.zeros((0, k), np.float32)


def adapt_device(
  model,
  params,
  data: DeviceData,
  index: int,
  config: AdaptConfig = AdaptConfig(),
  *,
  trunk_once: bool = True,
):
  """The adapted copy of device `index`, for inspection and tests.

  Runs the per-device computation of `adapt_and_score` on one device (its
  histories uncut) and keeps the adapted parameters.

  Returns:
    (params, scores `[K]`, losses `[num_steps + 1]`): `params` is the whole
    nested parameter tree with the device's adapted values.
  """
  adapted, frozen = split_params(model, params, config)
  one = data.rows(slice(index, index + 1))
  _check_ids(model, one, 'adapt_device')
  shared = bool(_shares_prefix(model, adapted, one, trunk_once)[0])
  fine_tune = jax.jit(
    make_device_fine_tune(
      model, config, trunk_once=trunk_once, shared_prefix=shared
    )
  )
  full = data.eval_history.shape[-1]
  adapted, scores, step_losses = fine_tune(
    adapted, frozen, *_device_rows(_fields(data), index, full)
  )
  return (
    merge_params(adapted, frozen),
    np.asarray(scores),
    np.asarray(step_losses),
  )


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
