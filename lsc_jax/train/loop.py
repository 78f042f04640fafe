"""A model-agnostic training loop: epochs, progress, early stopping, resume.

`train_loop` knows nothing about the model. It needs

- a train state (any pytree with a `params` field and an integer `step`,
  e.g. `lsc_jax.train.state.TrainState`),
- `train_step(state, batch) -> (state, metrics)`, where `metrics['loss']` is
  the scalar loss of the step (a `CompiledStep` compiles it once per batch
  shape and donates the state),
- `epoch_batches(epoch) -> iterable of batches`, which must depend only on
  the epoch (and a fixed seed), so a resumed run sees the same batches,
- optionally `evaluate(params, epoch) -> dict of floats` on validation data
  (never test data) for early stopping.

Each epoch it logs progress lines (steps done of total, samples/s, ETA) and a
one-line summary, appends the summary to `<workdir>/metrics.jsonl`, and saves
a checkpoint (`lsc_jax.checkpoint`) holding the state and the best
parameters so far. On start it resumes from the newest readable checkpoint in
`<workdir>/checkpoints`; because batches are a function of (seed, epoch) and
step keys of (seed, step), a resumed run ends with exactly the parameters of
an uninterrupted one. A non-finite loss stops the run with
`NonFiniteLossError` naming the first bad step.

The loop runs unchanged on a mesh: pass a state placed on it and a sharded
step (`lsc_jax.sharding.ShardedStep`). In a multi-host run every process
runs the loop; checkpoints are written together (`lsc_jax.checkpoint`),
a restored state keeps the layout of the state passed in, and only
process 0 appends to `metrics.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsc_jax import checkpoint

_LOG = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """A training step produced a NaN or infinite loss."""


def _shape_signature(tree: Any):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(
    (tuple(np.shape(x)), str(getattr(x, 'dtype', type(x).__name__)))
    for x in leaves
  )


def describe_shapes(tree: Any) -> str:
  """A short text of the leaf shapes of `tree`, e.g. `history=[32, 12]`."""
  parts = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    parts.append(f'{name}={list(np.shape(leaf))}')
  return ' '.join(parts)


class CompiledStep:
  """`jax.jit` that compiles once per argument shapes and logs each compile.

  The first call with new shapes logs "compiling <name> for <shapes>", compiles
  ahead of time and logs the compile time; later calls with those shapes run
  the cached executable. With the default `donate_argnums=(0,)` the first
  argument (the train state) is donated: do not use it after the call.
  """

  def __init__(
    self,
    fn: Callable[..., Any],
    name: str,
    donate_argnums: tuple[int, ...] = (0,),
    log: Callable[[str], None] | None = None,
  ):
    self.name = name
    self._jitted = jax.jit(fn, donate_argnums=donate_argnums)
    self._compiled: dict[Any, Any] = {}
    self._log = log or _LOG.info
    self.compile_seconds: dict[str, float] = {}

  @property
  def num_compiles(self) -> int:
    """How many argument shapes have been compiled."""
    return len(self._compiled)

  def lower(self, *args):
    """`jax.jit(fn).lower(*args)`, e.g. for `cost_analysis()`."""
    return self._jitted.lower(*args)

  def __call__(self, *args):
    signature = _shape_signature(args)
    executable = self._compiled.get(signature)
    if executable is None:
      shapes = describe_shapes(args[1:] if len(args) > 1 else args)
      self._log(f'compiling {self.name} for {shapes} ...')
      start = time.perf_counter()
      executable = self._jitted.lower(*args).compile()
      seconds = time.perf_counter() - start
      self._log(f'compiled {self.name} in {seconds:.1f} s')
      self.compile_seconds[shapes] = seconds
      self._compiled[signature] = executable
    return executable(*args)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Settings of `train_loop`.

  Attributes:
    epochs: total epochs of the run (a resumed run continues up to this).
    workdir: directory for `metrics.jsonl` and `checkpoints/`; None keeps
      nothing on disk (no checkpoints, no resume).
    early_stop_metric: key of `evaluate`'s result to select the best
      parameters and stop on (None: keep the last parameters).
    early_stop_mode: 'max' or 'min'.
    patience: stop after this many epochs without improvement (None: never
      stop early; the best parameters are still kept).
    keep_checkpoints: newest checkpoints kept on disk.
    log_every_seconds: a progress line at most this often.
    name: prefix of log lines, e.g. 'sasrec'.
  """

  epochs: int
  workdir: str | None = None
  early_stop_metric: str | None = None
  early_stop_mode: str = 'max'
  patience: int | None = None
  keep_checkpoints: int = 2
  log_every_seconds: float = 20.0
  name: str = 'train'

  def __post_init__(self):
    if self.epochs < 0:
      raise ValueError(f'LoopConfig.epochs must be >= 0, got {self.epochs}')
    if self.early_stop_mode not in ('max', 'min'):
      raise ValueError(
        "LoopConfig.early_stop_mode must be 'max' or 'min', got "
        f'{self.early_stop_mode!r}'
      )
    if self.patience is not None and self.patience < 1:
      raise ValueError(
        f'LoopConfig.patience must be >= 1 or None, got {self.patience}'
      )


@dataclasses.dataclass
class LoopResult:
  """What `train_loop` returns.

  Attributes:
    state: the train state after the last epoch run.
    best_params: parameters of the best validation epoch (the last epoch's
      when there is no early-stopping metric).
    best_metric: best value of the early-stopping metric (None without one).
    best_epoch: 1-based epoch of `best_params`.
    history: one dict per epoch, as written to `metrics.jsonl`.
    stopped_early: True when patience ran out.
    resumed_from_epoch: epochs already done in a restored checkpoint (0 for
      a fresh run).
  """

  state: Any
  best_params: Any
  best_metric: float | None
  best_epoch: int | None
  history: list[dict[str, Any]]
  stopped_early: bool
  resumed_from_epoch: int


def append_jsonl(path: str, record: dict[str, Any]) -> None:
  """Appends `record` as one JSON line to `path`."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'a') as f:
    f.write(json.dumps(record, sort_keys=True) + '\n')


def _default_batch_samples(batch: Any) -> int:
  """Real targets in a batch: the sum of `batch['mask']`, else rows."""
  if isinstance(batch, dict) and 'mask' in batch:
    return int(np.sum(np.asarray(batch['mask']) > 0))
  return int(np.shape(jax.tree.leaves(batch)[0])[0])


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}:{minutes:02d}:{seconds:02d}'
  return f'{minutes}:{seconds:02d}'


def _copy_tree(tree: Any) -> Any:
  """A copy with its own buffers (the state's are donated to the step)."""
  return jax.tree.map(jnp.copy, tree)


def _is_better(value: float, best: float | None, mode: str) -> bool:
  if best is None:
    return True
  return value > best if mode == 'max' else value < best


class _LossWatch:
  """Collects per-step losses on device and checks them in chunks."""

  def __init__(self):
    self.pending: list[tuple[int, int, jax.Array]] = []
    self.checked: list[np.ndarray] = []

  def add(self, step: int, batch_index: int, loss: jax.Array) -> None:
    self.pending.append((step, batch_index, loss))

  def flush(self, epoch: int) -> None:
    if not self.pending:
      return
    values = np.asarray(jax.device_get([loss for _, _, loss in self.pending]))
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      step, batch_index, _ = self.pending[bad[0]]
      raise NonFiniteLossError(
        f'non-finite loss ({values[bad[0]]}) at step {step} (epoch '
        f'{epoch}, batch {batch_index + 1}); stopping the run'
      )
    self.checked.append(values)
    self.pending = []

  @property
  def mean(self) -> float:
    """Mean of the checked losses, summed in one pass so the value does not
    depend on when the chunks were checked (exact resume)."""
    if not self.checked:
      return math.nan
    return float(np.concatenate(self.checked).astype(np.float64).mean())


def train_loop(
  state: Any,
  train_step: Callable[[Any, Any], tuple[Any, dict[str, Any]]],
  epoch_batches: Callable[[int], Iterable[Any]],
  steps_per_epoch: int | Callable[[int], int],
  config: LoopConfig,
  evaluate: Callable[[Any, int], dict[str, float]] | None = None,
  metadata: dict[str, Any] | None = None,
  batch_samples: Callable[[Any], int] = _default_batch_samples,
  log: Callable[[str], None] | None = None,
) -> LoopResult:
  """Trains for `config.epochs` epochs, resuming from `config.workdir`.

  Args:
    state: the initial train state (ignored when a checkpoint is restored,
      except as the restore target). It is donated to `train_step`.
    train_step: `(state, batch) -> (state, metrics)`; `metrics['loss']` is a
      scalar. Other scalar metrics are averaged per epoch as `train/<key>`.
    epoch_batches: `epoch -> batches` for the 0-based epoch; a pure function
      of the epoch (and fixed seeds).
    steps_per_epoch: batches per epoch (an int, or a function of the epoch),
      for progress and ETA.
    config: loop settings.
    evaluate: `(params, epoch) -> metrics` on validation data, run after
      every epoch; its keys are logged as `valid/<key>`.
    metadata: JSON-serialisable dict stored in every checkpoint (e.g. the
      model config).
    batch_samples: samples in a batch, for samples/s (default: the sum of
      `batch['mask']`, else the leading dimension).
    log: receives progress lines (default: `logging.info`).

  Returns:
    A `LoopResult`.

  Raises:
    NonFiniteLossError: on a NaN or infinite loss, naming the step.
    ValueError: if `config.early_stop_metric` is set but `evaluate` does not
      return it.
  """
  log = log or _LOG.info
  name = config.name
  steps_of = (
    steps_per_epoch if callable(steps_per_epoch) else lambda _: steps_per_epoch
  )
  checkpoint_dir = metrics_path = None
  if config.workdir:
    checkpoint_dir = os.path.join(config.workdir, 'checkpoints')
    metrics_path = os.path.join(config.workdir, 'metrics.jsonl')

  best_params = None
  best_metric = None
  best_epoch = None
  bad_epochs = 0
  history: list[dict[str, Any]] = []
  stopped_early = False
  start_epoch = 0

  if checkpoint_dir:
    restored = checkpoint.restore_latest(
      checkpoint_dir,
      {'state': state, 'best_params': state.params},
      warn=lambda message: log(f'{name}: WARNING {message}'),
    )
    if restored is not None:
      tree, meta, ckpt_step = restored
      state, best_params = tree['state'], tree['best_params']
      start_epoch = meta['epoch']
      best_metric = meta['best_metric']
      best_epoch = meta['best_epoch']
      bad_epochs = meta['bad_epochs']
      history = meta['history']
      stopped_early = meta['stopped_early']
      log(
        f'{name}: resumed from {checkpoint.step_dir(checkpoint_dir, ckpt_step)}'
        f' (epoch {start_epoch}, step {int(state.step)})'
      )
  resumed_from_epoch = start_epoch

  for epoch in range(start_epoch, config.epochs):
    if stopped_early:
      break
    total_steps = steps_of(epoch)
    watch = _LossWatch()
    extra_sums: dict[str, list[jax.Array]] = {}
    samples = 0
    epoch_start = time.perf_counter()
    last_log = epoch_start
    step = int(state.step)
    batch_index = -1

    for batch_index, batch in enumerate(epoch_batches(epoch)):
      samples += batch_samples(batch)
      state, metrics = train_step(state, batch)
      step += 1
      watch.add(step, batch_index, metrics['loss'])
      for key, value in metrics.items():
        if key != 'loss':
          extra_sums.setdefault(key, []).append(value)

      now = time.perf_counter()
      if now - last_log >= config.log_every_seconds:
        watch.flush(epoch + 1)
        last_log = now
        done = batch_index + 1
        rate = samples / (now - epoch_start)
        remaining = (now - epoch_start) / done * (total_steps - done)
        remaining_epochs = config.epochs - epoch - 1
        run_eta = remaining + remaining_epochs * (now - epoch_start) / done * (
          total_steps
        )
        log(
          f'{name}: epoch {epoch + 1}/{config.epochs} step {done}/'
          f'{total_steps} ({100 * done / max(total_steps, 1):.0f}%) loss '
          f'{watch.mean:.4f} {rate:,.0f} samples/s ETA epoch '
          f'{_format_seconds(remaining)} run {_format_seconds(run_eta)}'
        )

    watch.flush(epoch + 1)
    seconds = time.perf_counter() - epoch_start
    record: dict[str, Any] = {
      'epoch': epoch + 1,
      'step': step,
      'steps': batch_index + 1,
      'train/loss': watch.mean,
      'train/samples': samples,
      'train/seconds': seconds,
      'train/samples_per_second': samples / max(seconds, 1e-9),
    }
    for key, values in extra_sums.items():
      record[f'train/{key}'] = float(np.mean(jax.device_get(values)))

    if evaluate is not None:
      eval_start = time.perf_counter()
      valid = evaluate(state.params, epoch)
      record['valid/seconds'] = time.perf_counter() - eval_start
      record.update({f'valid/{k}': float(v) for k, v in valid.items()})

    improved = ''
    if config.early_stop_metric is not None:
      key = f'valid/{config.early_stop_metric}'
      if key not in record:
        raise ValueError(
          f'early_stop_metric {config.early_stop_metric!r} is not among the '
          f'validation metrics {sorted(k for k in record if "valid/" in k)}'
        )
      value = record[key]
      if _is_better(value, best_metric, config.early_stop_mode):
        best_metric, best_epoch, bad_epochs = value, epoch + 1, 0
        best_params = _copy_tree(state.params)
        improved = ' (best)'
      else:
        bad_epochs += 1
        if config.patience is not None and bad_epochs >= config.patience:
          stopped_early = True
    else:
      best_params, best_epoch = None, epoch + 1
    record['best_epoch'] = best_epoch
    history.append(record)

    if checkpoint_dir:
      checkpoint.save(
        checkpoint_dir,
        step,
        {
          'state': state,
          'best_params': state.params if best_params is None else best_params,
        },
        metadata={
          'epoch': epoch + 1,
          'best_metric': best_metric,
          'best_epoch': best_epoch,
          'bad_epochs': bad_epochs,
          'stopped_early': stopped_early,
          'history': history,
          'config': metadata or {},
        },
        keep=config.keep_checkpoints,
      )
    if metrics_path and jax.process_index() == 0:
      append_jsonl(metrics_path, record)

    valid_text = ' '.join(
      f'{k[len("valid/") :]} {v:.4f}'
      for k, v in record.items()
      if k.startswith('valid/') and k != 'valid/seconds'
    )
    log(
      f'{name}: epoch {epoch + 1}/{config.epochs} done in '
      f'{_format_seconds(seconds)}: loss {record["train/loss"]:.4f}, '
      f'{record["train/samples_per_second"]:,.0f} samples/s'
      + (f'; valid {valid_text}{improved}' if valid_text else '')
    )
    if stopped_early:
      log(
        f'{name}: early stop after epoch {epoch + 1}: no better '
        f'{config.early_stop_metric} for {bad_epochs} epochs (best '
        f'{best_metric:.4f} at epoch {best_epoch})'
      )

  if best_params is None:
    best_params = state.params
  return LoopResult(
    state=state,
    best_params=best_params,
    best_metric=best_metric,
    best_epoch=best_epoch,
    history=history,
    stopped_early=stopped_early,
    resumed_from_epoch=resumed_from_epoch,
  )
