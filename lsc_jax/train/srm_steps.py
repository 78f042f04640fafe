"""Training and full-ranking evaluation of on-device recommendation models.

Two training objectives (`SRMConfig.objective`):

- 'next_item' (SASRec, GRU4Rec): each training example is a slice of a
  user's sequence; every column predicts the item after it, so one causal
  encoding trains on all of a user's SRM-training targets at once. Only
  targets that are SRM-training windows count (the `mask`), so validation
  and test items are never trained on. `next_item_examples` builds the
  slices and `iterate_next_item_batches` batches them by length bucket.
- 'last_item' (all three, the paper's way): one target per window, batched
  by `lsc_jax.data.iterate_batches`.

Three losses (`SRMConfig.loss`, see `lsc_jax.train.losses`): 'bce' with
sampled negatives (the paper's 1 positive + 4 negatives), 'sampled_softmax',
and 'full_ce' over the whole catalogue.

Every id entering a step is checked on the host first (`check_item_ids`):
ids outside 0..num_items go to the out-of-vocabulary row and are counted and
logged; a target outside 1..num_items cannot be scored, so it is masked out
of the loss and counted.

`FullRankingEvaluator` ranks each window's target against every item (the
paper's standalone SRM protocol) and reports the tie-safe HR, NDCG, MRR
and precision of `lsc_jax.metrics.full_ranking_metrics`;
`train_srm` ties model, batches, loop, early stopping and test evaluation
together for `experiments/train_srm.py` and the benchmarks. Given a
`jax.sharding.Mesh` it trains data-parallel (`lsc_jax.sharding`): every
batch is split over the mesh's devices, the state is replicated (or its
item table split by shard rules), and evaluation batches are split too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsc_jax import data as data_lib
from lsc_jax import metrics as metrics_lib
from lsc_jax import sharding
from lsc_jax.models import registry, srm
from lsc_jax.train import loop, losses
from lsc_jax.train import state as state_lib

_LOG = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Next-item examples and batches.


@dataclasses.dataclass(frozen=True, eq=False)
class NextItemExamples:
  """Slices of user sequences for next-item training at every position.

  Attributes:
    users: int32 `[num_examples]` user of each slice.
    history: int32 `[num_examples, max_len]` input items, left-padded with
      0, most recent last.
    targets: int32 `[num_examples, max_len]`; `targets[r, j]` is the item
      after `history[r, j]` (0 under padding).
    mask: float32 `[num_examples, max_len]`, 1 where the target is a
      training window.
    lengths: int32 `[num_examples]` real (non-padding) columns.
  """

  users: np.ndarray
  history: np.ndarray
  targets: np.ndarray
  mask: np.ndarray
  lengths: np.ndarray

  def __len__(self) -> int:
    return len(self.users)

  @property
  def num_targets(self) -> int:
    return int(self.mask.sum())


def next_item_examples(
  sequences, windows: data_lib.Windows, max_len: int
) -> NextItemExamples:
  """Cuts each user's training windows into slices of at most max_len.

  For a user whose training target positions are P, the first slice ends at
  the last target e = max(P): its inputs are `seq[a:e]` with
  `a = max(0, e - max_len)` and its targets `seq[a + 1:e + 1]`. Targets
  before `a + 1` go to further slices, ending at the largest remaining
  position. Every window of `windows` is the target of exactly one column;
  columns whose target is not a window get mask 0. As in SASRec, a target
  in a later slice sees only the items of its slice (at most max_len).

  Args:
    sequences: per-user int arrays (items 1..num_items).
    windows: training windows (user, target position >= 1).
    max_len: columns per slice.

  Returns:
    The `NextItemExamples`, ordered by user.

  Raises:
    ValueError: a window with position 0 (no history to predict from) or
      outside its user's sequence.
  """
  if max_len < 1:
    raise ValueError(f'max_len must be >= 1, got {max_len}')
  users = np.asarray(windows.users, np.int64)
  positions = np.asarray(windows.positions, np.int64)
  if len(users) and positions.min() < 1:
    r = int(np.argmin(positions))
    raise ValueError(
      f'next_item_examples: window {r} (user {users[r]}) has target '
      'position 0, i.e. an empty history; next-item training needs >= 1'
    )
  order = np.lexsort((positions, users))
  users, positions = users[order], positions[order]
  starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
  ends = np.r_[starts[1:], len(users)]

  rows_user, rows_hist, rows_tgt, rows_mask, rows_len = [], [], [], [], []
  for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
    user = int(users[s])
    seq = np.asarray(sequences[user])
    user_positions = positions[s:e]
    if user_positions[-1] >= len(seq):
      raise ValueError(
        f'next_item_examples: user {user} has a window at position '
        f'{user_positions[-1]} but a sequence of length {len(seq)}'
      )
    remaining = user_positions
    while len(remaining):
      last = int(remaining[-1])
      first = max(0, last - max_len)
      length = last - first
      hist = np.zeros(max_len, np.int32)
      tgt = np.zeros(max_len, np.int32)
      msk = np.zeros(max_len, np.float32)
      hist[max_len - length :] = seq[first:last]
      tgt[max_len - length :] = seq[first + 1 : last + 1]
      inside = remaining[remaining > first]
      msk[max_len - length + (inside - first - 1)] = 1.0
      rows_user.append(user)
      rows_hist.append(hist)
      rows_tgt.append(tgt)
      rows_mask.append(msk)
      rows_len.append(length)
      remaining = remaining[remaining <= first]

  if not rows_user:
    empty = np.zeros((0, max_len), np.int32)
    return NextItemExamples(
      np.zeros(0, np.int32),
      empty,
      empty,
      empty.astype(np.float32),
      np.zeros(0, np.int32),
    )
  return NextItemExamples(
    users=np.asarray(rows_user, np.int32),
    history=np.stack(rows_hist),
    targets=np.stack(rows_tgt),
    mask=np.stack(rows_mask),
    lengths=np.asarray(rows_len, np.int32),
  )


def _next_item_plan(
  examples: NextItemExamples,
  batch_size: int,
  bucket_edges: Sequence[int],
  rng: np.random.Generator | None,
) -> list[tuple[int, np.ndarray]]:
  """(width, example indices) per batch; shuffled when `rng` is given."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  edges = np.asarray(bucket_edges)
  max_len = examples.history.shape[1]
  if edges[-1] != max_len:
    raise ValueError(
      f"bucket_edges {tuple(edges)} must end at the examples' max_len {max_len}"
    )
  bucket = np.searchsorted(edges, examples.lengths, side='left')
  plan = []
  for b, width in enumerate(edges.tolist()):
    index = np.flatnonzero(bucket == b)
    if rng is not None:
      index = rng.permutation(index)
    for start in range(0, len(index), batch_size):
      plan.append((width, index[start : start + batch_size]))
  if rng is not None and plan:
    plan = [plan[i] for i in rng.permutation(len(plan))]
  return plan


def count_next_item_batches(
  examples: NextItemExamples, batch_size: int, bucket_edges: Sequence[int]
) -> int:
  """Batches per epoch of `iterate_next_item_batches`."""
  return len(_next_item_plan(examples, batch_size, bucket_edges, None))


def iterate_next_item_batches(
  examples: NextItemExamples,
  *,
  batch_size: int,
  bucket_edges: Sequence[int],
  seed: int,
  epoch: int,
  num_negatives: int = 0,
  num_items: int | None = None,
  shared_negatives: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Shuffled, length-bucketed batches; a pure function of (seed, epoch).

  A batch of bucket width W holds the last W columns of `batch_size`
  examples (filler rows: all padding, mask 0).

  Yields:
    dicts with 'history' int32 `[B, W]`, 'targets' int32 `[B, W]`, 'mask'
    float32 `[B, W]`, 'user' int32 `[B]` and, when `num_negatives` > 0,
    'negatives' int32 `[B, W, num_negatives]` drawn uniformly from
    1..num_items (a negative equal to its target is removed in the loss);
    with `shared_negatives`, one set `[num_negatives]` for the whole batch,
    which makes many negatives cheap (one `[B * W, dim] x [dim, N]` matmul).
  """
  if num_negatives and num_items is None:
    raise ValueError('num_items is required when num_negatives > 0')
  rng = np.random.default_rng([seed, epoch])
  for width, index in _next_item_plan(examples, batch_size, bucket_edges, rng):
    real = len(index)
    rows = np.concatenate([index, np.zeros(batch_size - real, np.int64)])
    keep = (np.arange(batch_size) < real)[:, None]
    batch = {
      'history': np.where(keep, examples.history[rows, -width:], 0),
      'targets': np.where(keep, examples.targets[rows, -width:], 0),
      'mask': np.where(keep, examples.mask[rows, -width:], 0.0).astype(
        np.float32
      ),
      'user': np.where(keep[:, 0], examples.users[rows], 0).astype(np.int32),
    }
    batch['history'] = batch['history'].astype(np.int32)
    batch['targets'] = batch['targets'].astype(np.int32)
    if num_negatives:
      shape = (
        (num_negatives,)
        if shared_negatives
        else (batch_size, width, num_negatives)
      )
      batch['negatives'] = rng.integers(1, num_items + 1, size=shape).astype(
        np.int32
      )
    yield batch


# ---------------------------------------------------------------------------
# Id checks on the host.


@dataclasses.dataclass
class OOVCount:
  """Running counts of out-of-vocabulary ids seen by a caller-facing path."""

  ids: int = 0
  dropped_targets: int = 0

  def add(self, other: OOVCount) -> None:
    self.ids += other.ids
    self.dropped_targets += other.dropped_targets


_ID_KEYS = ('history', 'negatives', 'candidates')
_TARGET_KEYS = ('target', 'targets')


def check_batch_ids(
  batch: dict[str, np.ndarray], num_items: int
) -> tuple[dict[str, np.ndarray], OOVCount]:
  """Maps out-of-vocabulary ids of a numpy batch and counts them.

  History, negative and candidate ids outside 0..num_items go to the OOV
  row. A target outside 1..num_items is kept as the OOV id but its mask is
  set to 0 (it cannot be scored), and counted in `dropped_targets`.
  """
  count = OOVCount()
  out = dict(batch)
  for key in _ID_KEYS:
    if key in out:
      out[key], n = srm.check_item_ids(np.asarray(out[key]), num_items)
      count.ids += n
  for key in _TARGET_KEYS:
    if key in out:
      targets = np.asarray(out[key])
      mapped, n = srm.check_item_ids(targets, num_items)
      count.ids += n
      if n:
        mask = np.asarray(out['mask'])
        bad = (mapped == srm.oov_id(num_items)) & (mask > 0)
        count.dropped_targets += int(bad.sum())
        out['mask'] = np.where(bad, 0.0, mask).astype(np.float32)
      out[key] = mapped
  return out, count


# ---------------------------------------------------------------------------
# Train step.


def make_train_step(
  model, config: registry.SRMConfig, num_items: int
) -> Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]:
  """Returns `step(state, batch) -> (state, {'loss': scalar})`.

  The step is pure: its dropout key is `state.step_key()`, i.e.
  `fold_in(key, step)`. Wrap it in `loop.CompiledStep` to jit it once per
  bucket shape and donate the state.

  Batches: 'next_item' takes `iterate_next_item_batches` batches
  (history, targets, mask, optional negatives `[B, W, N]`, or `[N]` shared
  by the batch); 'last_item' takes
  `lsc_jax.data.iterate_batches` batches (history, target, mask, optional
  negatives).
  """
  objective, loss_name = config.objective, config.loss
  if loss_name != 'full_ce' and config.num_negatives < 1:
    raise ValueError(f'loss {loss_name!r} needs num_negatives >= 1')

  def sampled_loss(positive, negative, mask, hits):
    if loss_name == 'bce':
      return losses.bce_with_negatives(positive, negative, mask, hits)
    return losses.sampled_softmax(positive, negative, mask, hits)

  def next_item_loss(params, batch, rngs):
    states = model.apply(
      params,
      batch['history'],
      train=True,
      rngs=rngs,
      method='encode_positions',
    )
    targets, mask = batch['targets'], batch['mask']
    if loss_name == 'full_ce':
      table = model.apply(params, method='item_table')
      logits = srm.mask_padding_column(states @ table.T)
      return losses.full_cross_entropy(logits, targets, mask)
    positive_vectors = model.apply(params, targets, method='item_vectors')
    negatives = batch['negatives']
    negative_vectors = model.apply(params, negatives, method='item_vectors')
    positive = jnp.einsum('bld,bld->bl', states, positive_vectors)
    if negatives.ndim == 1:
      # One set of negatives shared by every position of the batch.
      negative = jnp.einsum('bld,nd->bln', states, negative_vectors)
      hits = negatives[None, None, :] == targets[..., None]
    else:
      negative = jnp.einsum('bld,blnd->bln', states, negative_vectors)
      hits = negatives == targets[..., None]
    return sampled_loss(positive, negative, mask, hits)

  def last_item_loss(params, batch, rngs):
    history, target, mask = batch['history'], batch['target'], batch['mask']
    if loss_name == 'full_ce':
      logits = model.apply(
        params, history, train=True, rngs=rngs, method='score_all'
      )
      return losses.full_cross_entropy(logits, target, mask)
    negatives = batch['negatives']
    candidates = jnp.concatenate([target[:, None], negatives], axis=1)
    logits = model.apply(params, history, candidates, train=True, rngs=rngs)
    hits = negatives == target[:, None]
    return sampled_loss(logits[:, 0], logits[:, 1:], mask, hits)

  loss_fn = next_item_loss if objective == 'next_item' else last_item_loss

  def step(state, batch):
    rngs = {'dropout': state.step_key()}
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, rngs)
    return state.apply_gradients(grads=grads), {'loss': loss}

  return step


def example_batch(config: registry.SRMConfig) -> dict[str, Any]:
  """The widest training batch of `config`, as `jax.ShapeDtypeStruct`s.

  The shapes and dtypes `make_train_step` receives from `train_srm`'s
  batches at the largest bucket (`max_len` columns), for compile-only
  checks (`lsc_jax.sharding.compile_report`) and sharding set-up.
  """
  batch_size, width = config.batch_size, config.max_len
  i32, f32 = jnp.int32, jnp.float32
  negatives = 0 if config.loss == 'full_ce' else config.num_negatives
  shape = jax.ShapeDtypeStruct
  if config.objective == 'next_item':
    batch = {
      'history': shape((batch_size, width), i32),
      'targets': shape((batch_size, width), i32),
      'mask': shape((batch_size, width), f32),
      'user': shape((batch_size,), i32),
    }
    if negatives:
      batch['negatives'] = shape(
        (negatives,)
        if config.shared_negatives
        else (batch_size, width, negatives),
        i32,
      )
    return batch
  batch = {
    'history': shape((batch_size, width), i32),
    'target': shape((batch_size,), i32),
    'mask': shape((batch_size,), f32),
    'user': shape((batch_size,), i32),
  }
  if negatives:
    batch['negatives'] = shape((batch_size, negatives), i32)
  return batch


def init_params(model, max_len: int, seed: int):
  """Initial parameters of an SRM from `jax.random.key(seed)`."""
  history = jnp.ones((1, max_len), jnp.int32)
  candidates = jnp.ones((1, 1), jnp.int32)
  return model.init(jax.random.key(seed), history, candidates)


# ---------------------------------------------------------------------------
# Full-ranking evaluation.


class FullRankingEvaluator:
  """Ranks each window's target against the whole catalogue.

  The histories (`sequences[user][:position]`, last max_len items) are
  batched once by length bucket; scoring compiles once per bucket shape.
  Column 0 (padding) never ranks. With `exclude_history`, the items of the
  model's input history (its last max_len items; never the target itself)
  are removed from the ranking, a common variant of the protocol; by
  default every item ranks.

  With a `mesh`, each batch is split over its devices (placed once, here):
  a batch whose rows do not split evenly gets filler rows (the first row
  repeated with mask 0, counted in `filler_rows`), which the metrics
  ignore. Parameters not yet on the mesh are replicated on each call.
  """

  def __init__(
    self,
    model,
    sequences,
    windows: data_lib.Windows,
    *,
    num_items: int,
    max_len: int,
    batch_size: int,
    bucket_edges: Sequence[int] | None = None,
    ks: Sequence[int] = (5, 10, 20),
    exclude_history: bool = False,
    name: str = 'eval',
    log: Callable[[str], None] | None = None,
    share_compiled: FullRankingEvaluator | None = None,
    mesh: jax.sharding.Mesh | None = None,
  ):
    """Batches the windows' histories.

    Args:
      model: the SRM module.
      sequences: per-user item arrays or a `data.FlatSequences`.
      windows: the (user, target position) windows to rank.
      num_items: catalogue size.
      max_len: history columns kept.
      batch_size: histories per scoring step.
      bucket_edges: history widths batches are padded to.
      ks: metric cut-offs.
      exclude_history: drop history items (not the target) from the
        ranking.
      name: prefix of log lines.
      log: receives log lines (default `logging.info`).
      share_compiled: another evaluator of the same model, `ks` and
        `exclude_history` whose compiled scoring steps are reused.
      mesh: split every batch over this mesh (None: one device).
    """
    self.ks = tuple(ks)
    self.num_windows = len(windows)
    self.name = name
    self._log = log or _LOG.info
    self._batches = []
    self._inputs = []
    self.mesh = mesh
    self.filler_rows = 0
    self.oov = OOVCount()
    for batch in data_lib.iterate_batches(
      sequences,
      windows,
      batch_size=batch_size,
      max_len=max_len,
      seed=0,
      epoch=0,
      shuffle=False,
      bucket_edges=bucket_edges,
    ):
      batch = {k: batch[k] for k in ('history', 'target', 'mask')}
      batch, count = check_batch_ids(batch, num_items)
      self.oov.add(count)
      inputs = (batch['history'], batch['target'])
      if mesh is not None:
        batch, filler = sharding.pad_rows(batch, mesh.size)
        self.filler_rows += filler
        inputs = sharding.shard_global_batch(
          (batch['history'], batch['target']), mesh
        )
      self._batches.append(batch)
      self._inputs.append(inputs)
    if self.oov.ids:
      self._log(
        f'{name}: {self.oov.ids} out-of-vocabulary ids mapped to the OOV '
        f'row; {self.oov.dropped_targets} windows with an OOV target are '
        'left out of the metrics'
      )

    ks = self.ks

    def per_row_metrics(params, history, target):
      scores = model.apply(params, history, method='score_all')
      rows = jnp.arange(history.shape[0])
      exclude = None
      if exclude_history:
        exclude = jnp.zeros(scores.shape, bool)
        exclude = exclude.at[rows[:, None], history].set(True)
      result = metrics_lib.full_ranking_metrics(
        scores, target, exclude=exclude, ks=ks, reduce=False
      )
      return result.values, jnp.isfinite(scores[rows, target])

    if share_compiled is not None:
      self._per_row_metrics = share_compiled._per_row_metrics
    else:
      self._per_row_metrics = loop.CompiledStep(
        per_row_metrics, f'{name} scoring', donate_argnums=(), log=self._log
      )

  def __call__(self, params) -> dict[str, float]:
    """Metrics of `params`: 'hr@k', 'ndcg@k', 'mrr@k', 'precision@k' and
    'count' (windows ranked)."""
    if not self._batches:
      return {'count': 0.0}
    if self.mesh is None:
      outputs = jax.device_get(
        [self._per_row_metrics(params, *inputs) for inputs in self._inputs]
      )
    else:
      # One batch at a time (see `sharding.serial_dispatch`), gathered on
      # every process.
      params = sharding.on_mesh(params, self.mesh)
      outputs = [
        sharding.to_host(self._per_row_metrics(params, *inputs))
        for inputs in self._inputs
      ]
    weights = np.concatenate([b['mask'] for b in self._batches])
    finite = np.concatenate([o[1] for o in outputs])
    bad = (~finite) & (weights > 0)
    if bad.any():
      raise FloatingPointError(
        f'{self.name}: non-finite target scores for {int(bad.sum())} of '
        f'{int((weights > 0).sum())} windows'
      )
    total = max(float(weights.sum()), 1e-12)
    out = {'count': float(weights.sum())}
    for key in outputs[0][0]:
      values = np.concatenate([o[0][key] for o in outputs])
      out[key] = float((values * weights).sum() / total)
    return out


# ---------------------------------------------------------------------------
# End to end.


@dataclasses.dataclass
class SRMRun:
  """Result of `train_srm`.

  Attributes:
    name: 'sasrec', 'gru4rec' or 'din'.
    config: the `SRMConfig` used.
    model: the Flax module.
    params: the best parameters (by validation); numpy copies on every
      process when training ran on a mesh.
    valid: validation metrics of `params` on the early-stopping windows (a
      fixed subset when `config.valid_max_windows` applies; 'count' says
      how many).
    test: test metrics of `params` (empty when no test windows were given).
    loop: the `LoopResult`.
    oov: out-of-vocabulary ids counted in training batches.
    train_seconds: wall time of the training loop (compiles included).
  """

  name: str
  config: registry.SRMConfig
  model: Any
  params: Any
  valid: dict[str, float]
  test: dict[str, float]
  loop: loop.LoopResult
  oov: OOVCount
  train_seconds: float


def train_srm(
  name: str,
  *,
  sequences,
  num_items: int,
  train_windows: data_lib.Windows,
  valid_windows: data_lib.Windows,
  test_windows: data_lib.Windows | None = None,
  config: registry.SRMConfig,
  seed: int = 0,
  workdir: str | None = None,
  params: Any = None,
  ks: Sequence[int] = (5, 10, 20),
  exclude_history: bool = False,
  log: Callable[[str], None] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  shard_rules: Sequence[sharding.ShardRule] = (),
) -> SRMRun:
  """Trains SRM `name` on `train_windows`, early-stopping on validation.

  With a `mesh` of more than one device the run is data-parallel: each
  batch is split over the devices (`lsc_jax.sharding.shard_train_step`),
  the state is replicated unless `shard_rules` split some of it (e.g.
  `sharding.item_table_rules`), and evaluation batches are split as well.
  The loss is still the mean over the whole batch, so the run matches the
  single-device one up to the order of floating-point sums. Every process
  of a multi-host run calls `train_srm` with the same arguments; each
  places only its own devices' rows of each batch.

  Args:
    name: 'sasrec', 'gru4rec' or 'din'.
    sequences: per-user item arrays (e.g. `Dataset.sequences`).
    num_items: catalogue size.
    train_windows: training targets (e.g. `split.srm_train`).
    valid_windows: early-stopping windows (e.g. `split.valid`); never test.
    test_windows: evaluated once with the best parameters (e.g.
      `split.test`), or None.
    config: model and training settings (`get_srm_config`).
    seed: seeds initialisation, batch order, negatives and dropout.
    workdir: checkpoints and `metrics.jsonl` (None: nothing on disk); a
      rerun with the same workdir resumes.
    params: start from these parameters instead of a fresh initialisation
      (e.g. adaptive re-training).
    ks: metric cut-offs.
    exclude_history: drop history items from the full ranking.
    log: receives progress lines (default `logging.info`).
    mesh: train data-parallel over this mesh (None, or a one-device mesh
      in a one-process run: on one device).
    shard_rules: with a mesh, state leaves to split instead of replicate.

  Returns:
    An `SRMRun`.

  Raises:
    ValueError: with a mesh, a `config.batch_size` that is not a multiple
      of the mesh's device count (raised before anything is trained).
  """
  log = log or _LOG.info
  mesh = sharding.training_mesh(mesh)
  sharding.check_batch_size(config.batch_size, mesh, 'train_srm')
  model = registry.srm_from_config(name, num_items, config)
  if params is None:
    params = init_params(model, config.max_len, seed)
  else:
    # The loop donates its state; copy so the caller's parameters survive.
    params = jax.tree.map(jnp.copy, params)
  tx = state_lib.make_optimizer(config.learning_rate, config.weight_decay)
  state = state_lib.create_train_state(model.apply, params, tx, seed)
  flat = data_lib.flatten(sequences)
  num_negatives = 0 if config.loss == 'full_ce' else config.num_negatives
  oov = OOVCount()

  if config.objective == 'next_item':
    examples = next_item_examples(sequences, train_windows, config.max_len)
    steps = count_next_item_batches(
      examples, config.batch_size, config.bucket_edges
    )
    log(
      f'{name}: {len(examples):,} training slices holding '
      f'{examples.num_targets:,} targets, {steps} batches per epoch'
    )

    def raw_batches(epoch):
      return iterate_next_item_batches(
        examples,
        batch_size=config.batch_size,
        bucket_edges=config.bucket_edges,
        seed=seed,
        epoch=epoch,
        num_negatives=num_negatives,
        num_items=num_items,
        shared_negatives=config.shared_negatives,
      )
  else:
    steps = data_lib.count_batches(
      flat,
      train_windows,
      batch_size=config.batch_size,
      max_len=config.max_len,
      bucket_edges=config.bucket_edges,
    )
    log(
      f'{name}: {len(train_windows):,} training windows, {steps} batches per '
      'epoch'
    )

    def raw_batches(epoch):
      for batch in data_lib.iterate_batches(
        flat,
        train_windows,
        batch_size=config.batch_size,
        max_len=config.max_len,
        seed=seed,
        epoch=epoch,
        bucket_edges=config.bucket_edges,
        num_negatives=num_negatives,
        num_items=num_items,
      ):
        batch.pop('position', None)
        yield batch

  def epoch_batches(epoch):
    epoch_oov = OOVCount()
    for batch in raw_batches(epoch):
      batch, count = check_batch_ids(batch, num_items)
      epoch_oov.add(count)
      yield batch
    oov.add(epoch_oov)
    if epoch_oov.ids:
      log(
        f'{name}: epoch {epoch + 1}: {epoch_oov.ids} out-of-vocabulary ids '
        f'mapped to the OOV row, {epoch_oov.dropped_targets} targets masked'
      )

  valid_subset = valid_windows
  if config.valid_max_windows and len(valid_windows) > config.valid_max_windows:
    pick = np.random.default_rng([seed, 7]).choice(
      len(valid_windows), config.valid_max_windows, replace=False
    )
    valid_subset = valid_windows.select(np.sort(pick))
    log(
      f'{name}: early stopping on a fixed random {len(valid_subset):,} of '
      f'{len(valid_windows):,} validation windows'
    )

  def evaluator(windows, label, share_compiled=None):
    return FullRankingEvaluator(
      model,
      flat,
      windows,
      num_items=num_items,
      max_len=config.max_len,
      batch_size=config.eval_batch_size,
      bucket_edges=config.bucket_edges,
      ks=ks,
      exclude_history=exclude_history,
      name=f'{name} {label}',
      log=log,
      share_compiled=share_compiled,
      mesh=mesh,
    )

  valid_eval = evaluator(valid_subset, 'valid')
  step_fn = make_train_step(model, config, num_items)
  if mesh is None:
    train_step = loop.CompiledStep(step_fn, f'{name} train step', log=log)
  else:
    train_step = sharding.shard_train_step(
      step_fn,
      mesh,
      state,
      example_batch(config),
      shard_rules=shard_rules,
      name=f'{name} train step',
      log=log,
    )
    state = train_step.place_state(state)
    log(
      f'{name}: data-parallel over mesh {dict(mesh.shape)} '
      f'({jax.process_count()} processes), {config.batch_size // mesh.size} '
      'rows per device per step'
      + (f', shard rules {list(shard_rules)}' if shard_rules else '')
    )
  loop_config = loop.LoopConfig(
    epochs=config.epochs,
    workdir=workdir,
    early_stop_metric=config.early_stop_metric,
    patience=config.patience,
    name=name,
  )
  start = time.perf_counter()
  result = loop.train_loop(
    state,
    train_step,
    epoch_batches,
    steps,
    loop_config,
    evaluate=lambda p, epoch: valid_eval(p),
    metadata={
      'model': name,
      'seed': seed,
      'num_items': num_items,
      'config': config.to_dict(),
    },
    log=log,
  )
  train_seconds = time.perf_counter() - start
  if valid_eval.filler_rows:
    log(
      f'{name}: evaluation batches padded with {valid_eval.filler_rows} '
      f'filler rows (mask 0) to split over {mesh.size} devices'
    )

  # Validation metrics of the best parameters on the early-stopping windows
  # (the subset when `valid_max_windows` applies; see 'count').
  valid = valid_eval(result.best_params)
  test = {}
  if test_windows is not None and len(test_windows):
    test = evaluator(test_windows, 'test', valid_eval)(result.best_params)
  summary = ' '.join(f'{k} {v:.4f}' for k, v in test.items() if k != 'count')
  best_valid = valid.get(config.early_stop_metric, math.nan)
  log(
    f'{name}: best epoch {result.best_epoch}, valid '
    f'{config.early_stop_metric} {best_valid:.4f}'
    + (f'; test {summary}' if summary else '')
  )
  best_params = result.best_params
  if mesh is not None:
    # Host copies: the callers' next stages run on any device.
    best_params = sharding.to_host(best_params)
  return SRMRun(
    name=name,
    config=config,
    model=model,
    params=best_params,
    valid=valid,
    test=test,
    loop=result,
    oov=oov,
    train_seconds=train_seconds,
  )
