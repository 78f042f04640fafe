"""Cooperative training: the SRM learns to rank inside the LLM's lists.

In LSC4Rec's cooperative training (Lv et al., KDD 2025) the frozen cloud
LLM generates a candidate list for each of the SRM's training windows, and
the SRM is trained to put the true next item on top of that list. At test
time the SRM re-ranks exactly such lists, so it learns the task it will do.

Each training list is

  [target, LLM candidate 1..K, random negative 1..M]

- The LLM candidates are the hard negatives (the official code adds
  "digit-recombination" ids, which are near-duplicates of the candidates
  only under P5's leaky sequential item ids; random negatives keep the
  SRM's view of the whole catalogue instead).
- A candidate equal to the target is a correct LLM guess. With the paper's
  `'bce'` loss it is labelled positive, as the official code does; with
  `'listwise'` (softmax over the list, target in slot 0) it is masked out so
  the target is counted once.
- Empty slots (id 0: the LLM returned fewer than K items) are masked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsc_jax import metrics as metrics_lib
from lsc_jax.data import batching
from lsc_jax.data.splits import Windows
from lsc_jax.train import loop
from lsc_jax.train import state as state_lib

LOSSES = ('bce', 'listwise')


@dataclasses.dataclass(frozen=True)
class TrainingLists:
  """Cooperative training lists, one per window.

  Attributes:
    history: int32 `[num_windows, L]` the SRM's input (left-padded).
    candidates: int32 `[num_windows, 1 + K + M]`: target, LLM candidates,
      random negatives; 0 marks an empty slot.
    labels: bool `[num_windows, 1 + K + M]`: True where the slot is the
      target.
  """

  history: np.ndarray
  candidates: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return self.history.shape[0]


def build_training_lists(
  sequences,
  windows: Windows,
  llm_candidates: np.ndarray,
  *,
  num_items: int,
  max_len: int,
  num_negatives: int,
  seed: int,
) -> TrainingLists:
  """Builds `[target | LLM candidates | random negatives]` lists.

  Args:
    sequences: per-user item arrays or a `FlatSequences`.
    windows: the SRM training windows the LLM made lists for.
    llm_candidates: int `[len(windows), K]` the LLM's lists, 0 = empty.
    num_items: catalogue size.
    max_len: SRM history width.
    num_negatives: M random negatives per list, drawn from the items
      outside the window's input history and the target.
    seed: seeds the negatives.

  Returns:
    `TrainingLists`.
  """
  flat = batching.flatten(sequences)
  llm_candidates = np.asarray(llm_candidates, np.int32)
  if llm_candidates.ndim != 2 or llm_candidates.shape[0] != len(windows):
    raise ValueError(
      f'build_training_lists: llm_candidates must be [{len(windows)}, K], '
      f'got {llm_candidates.shape}'
    )
  if ((llm_candidates < 0) | (llm_candidates > num_items)).any():
    raise ValueError(
      f'build_training_lists: LLM candidate ids outside 0..{num_items}'
    )
  history = batching.histories(flat, windows.users, windows.positions, max_len)
  targets = flat.items[flat.offsets[windows.users] + windows.positions]
  parts = [targets[:, None], llm_candidates]
  if num_negatives:
    parts.append(
      batching.sample_negatives(
        np.random.default_rng([seed, 17]),
        targets,
        num_negatives,
        num_items,
        exclude=history,
      )
    )
  candidates = np.concatenate(parts, axis=1).astype(np.int32)
  labels = (candidates == targets[:, None]) & (candidates > 0)
  return TrainingLists(history, candidates, labels)


def list_loss(
  logits: jax.Array,
  labels: jax.Array,
  valid: jax.Array,
  mask: jax.Array,
  loss: str,
) -> jax.Array:
  """Loss of SRM logits over training lists.

  Args:
    logits: `[batch, C]`; slot 0 holds the target.
    labels: bool `[batch, C]`, True at the target's slots.
    valid: bool `[batch, C]`, False at empty slots.
    mask: `[batch]`, 0 on filler rows of a padded batch.
    loss: `'bce'` (mean binary cross-entropy over the valid slots of the
      real rows, the paper's) or `'listwise'` (softmax cross-entropy of slot
      0 against the other valid, non-target slots).

  Returns:
    Scalar loss.
  """
  keep = valid & (mask[:, None] > 0)
  if loss == 'bce':
    per_slot = optax.sigmoid_binary_cross_entropy(
      logits, labels.astype(logits.dtype)
    )
    total = jnp.sum(jnp.where(keep, per_slot, 0.0))
    return total / jnp.maximum(jnp.sum(keep), 1)
  if loss == 'listwise':
    in_softmax = keep & ~labels
    in_softmax = in_softmax.at[:, 0].set(keep[:, 0])
    masked = jnp.where(in_softmax, logits, -jnp.inf)
    per_row = jax.nn.logsumexp(masked, axis=1) - logits[:, 0]
    real = keep[:, 0]
    return jnp.sum(jnp.where(real, per_row, 0.0)) / jnp.maximum(
      jnp.sum(real), 1
    )
  raise ValueError(f'list_loss: loss must be one of {LOSSES}, got {loss!r}')


def make_list_train_step(model, loss: str):
  """Returns `step(state, batch) -> (state, {'loss'})` over training lists.

  Batches hold `history [B, L]`, `candidates [B, C]`, `labels [B, C]` and
  `mask [B]`. Dropout uses `state.step_key()`.
  """
  if loss not in LOSSES:
    raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')

  def loss_fn(params, batch, rngs):
    logits = model.apply(
      params, batch['history'], batch['candidates'], train=True, rngs=rngs
    )
    valid = batch['candidates'] > 0
    return list_loss(logits, batch['labels'], valid, batch['mask'], loss)

  def step(state, batch):
    rngs = {'dropout': state.step_key()}
    value, grads = jax.value_and_grad(loss_fn)(state.params, batch, rngs)
    return state.apply_gradients(grads=grads), {'loss': value}

  return step


def iterate_list_batches(
  lists: TrainingLists, *, batch_size: int, seed: int, epoch: int
):
  """Shuffled fixed-size batches of training lists; the last is padded.

  Yields dicts of numpy arrays: `history`, `candidates`, `labels`, `mask`.
  The order is a function of (seed, epoch) only, so a resumed run sees the
  same batches.
  """
  order = np.random.default_rng([seed, epoch, 23]).permutation(len(lists))
  for start in range(0, len(order), batch_size):
    index = order[start : start + batch_size]
    mask = np.ones(batch_size, np.float32)
    if len(index) < batch_size:
      mask[len(index) :] = 0.0
      index = np.concatenate(
        [index, np.full(batch_size - len(index), index[0])]
      )
    yield {
      'history': lists.history[index],
      'candidates': lists.candidates[index],
      'labels': lists.labels[index],
      'mask': mask,
    }


@dataclasses.dataclass(frozen=True)
class CooperativeConfig:
  """Settings of cooperative training.

  Attributes:
    loss: `'bce'` (the paper's) or `'listwise'`.
    num_negatives: random negatives appended to each LLM list.
    learning_rate: Adam step size (the paper: 1e-3).
    batch_size: lists per step.
    epochs: most epochs.
    patience: epochs without a better validation metric before stopping.
    early_stop_metric: validation metric inside the LLM's lists.
  """

  loss: str = 'bce'
  num_negatives: int = 20
  learning_rate: float = 1e-3
  batch_size: int = 128
  epochs: int = 10
  patience: int = 2
  early_stop_metric: str = 'ndcg@10'


def make_list_evaluator(
  model,
  history: np.ndarray,
  candidates: np.ndarray,
  targets: np.ndarray,
  *,
  batch_size: int = 512,
  ks=(1, 5, 10, 20),
) -> Callable[[Any], dict[str, float]]:
  """`params -> metrics` of the SRM re-ranking fixed candidate lists.

  The target counts as a miss where it is not in its list.
  """
  from lsc_jax.collab import rerank

  scorer = rerank.list_scorer(model)
  labels = (candidates == np.asarray(targets)[:, None]) & (candidates > 0)
  valid = candidates > 0

  def evaluate(params) -> dict[str, float]:
    scores = rerank.score_lists(
      model, params, history, candidates, batch_size=batch_size, scorer=scorer
    )
    result = metrics_lib.ranking_metrics(
      scores, _first_positive(labels), ks, valid
    )
    return {k: float(v) for k, v in result.values.items()}

  return evaluate


def _first_positive(labels: np.ndarray) -> np.ndarray:
  """Keeps only the first True per row (a list may repeat the target)."""
  first = np.argmax(labels, axis=1)
  out = np.zeros_like(labels)
  has = labels.any(axis=1)
  out[np.flatnonzero(has), first[has]] = True
  return out


def train_cooperative(
  model,
  params,
  lists: TrainingLists,
  config: CooperativeConfig,
  *,
  evaluate: Callable[[Any], dict[str, float]] | None,
  seed: int,
  workdir: str | None = None,
  log: Callable[[str], None] | None = None,
) -> loop.LoopResult:
  """Trains the SRM on the LLM's lists, starting from `params`.

  Args:
    model: the SRM module.
    params: starting parameters (the independently trained SRM).
    lists: `build_training_lists` output.
    config: `CooperativeConfig`.
    evaluate: `params -> metrics` on validation lists (never test), for
      early stopping; None trains all epochs.
    seed: seeds batch order and dropout.
    workdir: checkpoints and metrics.jsonl; a rerun resumes.
    log: progress lines.

  Returns:
    The loop's `LoopResult` (`best_params` is the trained SRM).
  """
  tx = state_lib.make_optimizer(config.learning_rate)
  # The loop donates its state; copy so the caller's parameters survive.
  params = jax.tree.map(jnp.copy, params)
  state = state_lib.create_train_state(model.apply, params, tx, seed)
  step = loop.CompiledStep(
    make_list_train_step(model, config.loss),
    'cooperative train step',
    log=log,
  )
  steps = -(-len(lists) // config.batch_size)
  loop_config = loop.LoopConfig(
    epochs=config.epochs,
    workdir=workdir,
    early_stop_metric=config.early_stop_metric if evaluate else None,
    patience=config.patience if evaluate else None,
    name='cooperative',
  )
  return loop.train_loop(
    state,
    step,
    lambda epoch: iterate_list_batches(
      lists, batch_size=config.batch_size, seed=seed, epoch=epoch
    ),
    steps,
    loop_config,
    evaluate=(lambda p, epoch: evaluate(p)) if evaluate else None,
    metadata={'stage': 'cooperative', 'config': dataclasses.asdict(config)},
    log=log,
  )
