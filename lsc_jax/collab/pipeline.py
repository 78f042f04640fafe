"""The whole LSC4Rec pipeline as cached stages.

Stages (each writes its output under `workdir/<stage>/` and is skipped on a
rerun once finished; the training stages also resume mid-run from their
checkpoints):

1. `llm`: train the cloud LLM on the LLM windows of the device-cloud split.
2. `srm_independent`: train the SRM on its own windows.
3. `lists`: the frozen LLM generates candidate lists: for the cooperative
   training windows, and for validation and test users from the stale
   history (the cloud's cached view, gap g) and the fresh history (what a
   request returns).
4. `srm_cooperative`: the SRM learns to rank inside the LLM's lists.
5. `srm_retrained`: global adaptive re-training on the newest device-side
   windows (the paper's re-training).
6. per-device adaptation (vmapped over devices, chunked): each device
   fine-tunes its own copy of a parameter subset on its recent windows.
7. the device-cloud simulation: SRM re-ranking, fusion, the Kendall gate
   and request policies at several budgets; a table, `results.json`,
   `results.md` and `request_curve.png`.

The library reads no flags: `experiments/lsc4rec.py` builds a
`PipelineConfig` and calls `run`.

With a mesh (`run(config, log, mesh)`), the LLM and SRM training stages
train data-parallel, the LLM's lists are generated with each batch's
prompts split over the devices, and per-device adaptation splits each
chunk's users (`lsc_jax.sharding`). In a multi-host run every process runs
the pipeline over a workdir that all of them see; only process 0 writes
the stage markers, cached arrays and results (checkpoints are written
together, see `lsc_jax.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from lsc_jax import checkpoint, sharding
from lsc_jax import data as data_lib
from lsc_jax.collab import adapt as adapt_lib
from lsc_jax.collab import cooperative, request, rerank, simulate
from lsc_jax.models import registry
from lsc_jax.train import srm_steps

_LOG = logging.getLogger(__name__)

KS = (1, 5, 10, 20)


# Fusion weights tried on validation: 0.05, 0.1, 0.2, ..., 0.9, 0.95.
ALPHA_GRID = (0.05, *(round(0.1 * i, 1) for i in range(1, 10)), 0.95)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Every setting of the pipeline.

  Attributes:
    dataset: built-in name or path (see `lsc_jax.data.load`).
    reindex: 'random' (default) or 'keep' item ids.
    max_users: keep only the first N users (None: all), for quick runs.
    seed: the one seed every stage derives from.
    gap: staleness gap g of the cloud's cached lists.
    device_window: newest training targets that live only on the device.
    srm: 'sasrec', 'gru4rec' or 'din'.
    srm_preset: SRM size and training preset.
    srm_epochs: override the preset's epochs (None: keep).
    llm_preset: LLM size preset.
    llm_epochs: override the LLM preset's epochs (None: keep).
    llm_embedding_lr_multiplier: override the LLM preset's learning-rate
      multiple of the token embedding (None: keep; see
      `lsc_jax.train.llm_steps.LLMTrainConfig`).
    id_scheme: 'atomic' (one token per item) or 'text' (decimal digits).
    num_candidates: K, the length of the LLM's lists at test time.
    beam_size: beams of the LLM's search (>= num_candidates).
    coop_candidates: K of the lists for cooperative training (the paper:
      20).
    coop_windows_per_user: newest SRM training windows per user that get a
      cooperative list.
    coop: cooperative training settings.
    retrain_epochs: epochs of global re-training on device windows.
    adapt: per-device adaptation settings.
    adapt_devices: adapt per device (stage 6) or not.
    final_srm: SRM whose scores the fusion and the gate use: 'retrained'
      (the paper), 'adapted', 'cooperative' or 'independent'.
    alpha: LLM weight of the fusion; None (the default) chooses it on the
      validation users' stale lists from `alpha_grid` by `alpha_metric`.
    alpha_grid: the weights tried when `alpha` is None.
    alpha_metric: the validation metric that chooses alpha.
    llm_score: 'logprob' (the default: the LLM's sequence log-probability,
      min-max normalised per list) or 'rank' (the paper: 1 - j/K).
    normalisation: SRM score normalisation of the fusion: 'minmax' (the
      default) or the paper's 'sigmoid', which suits SRMs trained with a
      pointwise BCE loss; the `cpu` SRMs train with full cross-entropy,
      whose logits are large enough that sigmoid saturates and erases the
      SRM's order within a list.
    consistency: 'kendall' (tau-b) or 'footrule' (the official code's).
    ratios: request budgets to simulate.
    workdir: where every stage writes.
  """

  dataset: str = 'beauty'
  reindex: str = 'random'
  max_users: int | None = None
  seed: int = 0
  gap: int = 2
  device_window: int = 3
  srm: str = 'sasrec'
  srm_preset: str = 'cpu'
  srm_epochs: int | None = None
  llm_preset: str = 'cpu'
  llm_epochs: int | None = None
  llm_embedding_lr_multiplier: float | None = None
  id_scheme: str = 'atomic'
  num_candidates: int = 50
  beam_size: int = 50
  coop_candidates: int = 20
  coop_windows_per_user: int = 1
  coop: cooperative.CooperativeConfig = cooperative.CooperativeConfig()
  retrain_epochs: int = 3
  adapt: adapt_lib.AdaptConfig = adapt_lib.AdaptConfig()
  adapt_devices: bool = True
  final_srm: str = 'retrained'
  alpha: float | None = None
  alpha_grid: Sequence[float] = ALPHA_GRID
  alpha_metric: str = 'ndcg@10'
  llm_score: str = 'logprob'
  normalisation: str = 'minmax'
  consistency: str = 'kendall'
  ratios: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
  workdir: str = 'workdir/lsc4rec'

  def __post_init__(self):
    if self.final_srm not in SRM_STAGES:
      raise ValueError(
        f'final_srm must be one of {SRM_STAGES}, got {self.final_srm!r}'
      )
    if self.final_srm == 'adapted' and not self.adapt_devices:
      raise ValueError("final_srm='adapted' needs adapt_devices=True")
    alphas = list(self.alpha_grid) + (
      [] if self.alpha is None else [self.alpha]
    )
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad or not self.alpha_grid:
      raise ValueError(
        f'alpha and alpha_grid must be in [0, 1] (grid non-empty), got '
        f'alpha={self.alpha}, alpha_grid={self.alpha_grid}'
      )
    object.__setattr__(
      self, 'alpha_grid', tuple(float(a) for a in self.alpha_grid)
    )
    bad = [r for r in self.ratios if not 0.0 <= r <= 1.0]
    if bad:
      raise ValueError(f'ratios must be in [0, 1], got {bad}')
    object.__setattr__(self, 'ratios', tuple(float(r) for r in self.ratios))

  def llm_training(self):
    """The LLM's `llm_steps.LLMTrainConfig`: its preset's with the
    overrides above."""
    from lsc_jax.train import llm_steps

    return llm_steps.train_config(
      self.llm_preset,
      epochs=self.llm_epochs,
      embedding_lr_multiplier=self.llm_embedding_lr_multiplier,
    )

  def to_dict(self) -> dict[str, Any]:
    """Every field, plus `llm_training`: the LLM settings the preset
    resolved to, so that a workdir records them even if a preset changes."""
    out = {}
    for field in dataclasses.fields(self):
      out[field.name] = _plain(getattr(self, field.name))
    out['llm_training'] = _plain(self.llm_training())
    return out


def _plain(value):
  """A dataclass as a dict of its non-callable fields, a tuple as a list."""
  if dataclasses.is_dataclass(value):
    value = {
      k: v for k, v in dataclasses.asdict(value).items() if not callable(v)
    }
  return list(value) if isinstance(value, tuple) else value


SRM_STAGES = ('independent', 'cooperative', 'retrained', 'adapted')

# Named settings of `PipelineConfig` (fields not named keep their default).
PRESETS: dict[str, dict[str, Any]] = {
  # Sized for two CPU cores (18 minutes end to end on Beauty; see
  # BUILD_NOTES.md).
  'cpu': dict(srm_preset='cpu', llm_preset='cpu'),
  # Tiny models on the first users: seconds per stage, for tests.
  'smoke': dict(
    srm_preset='smoke',
    llm_preset='smoke',
    max_users=400,
    srm_epochs=2,
    llm_epochs=2,
    retrain_epochs=1,
    num_candidates=10,
    beam_size=10,
    # Cooperative lists as long as the test lists: one beam search shape.
    coop_candidates=10,
    coop=cooperative.CooperativeConfig(epochs=1, num_negatives=5),
    adapt=adapt_lib.AdaptConfig(num_steps=2, chunk_size=64),
  ),
  # The paper's sizes: T5-small, SRM d 32 with history 10, decimal ids.
  'paper': dict(
    srm_preset='paper',
    llm_preset='t5-small',
    id_scheme='text',
    alpha=0.5,
    llm_score='rank',
    normalisation='sigmoid',
  ),
}


# ---------------------------------------------------------------------------
# Stage bookkeeping.


class Stages:
  """Times stages, logs one summary line each and marks them finished."""

  def __init__(self, workdir: str, log: Callable[[str], None]):
    self.workdir = workdir
    self.log = log
    self.seconds: dict[str, float] = {}
    os.makedirs(workdir, exist_ok=True)

  def path(self, stage: str, *parts: str) -> str:
    return os.path.join(self.workdir, stage, *parts)

  def done(self, stage: str) -> dict[str, Any] | None:
    """The summary a finished stage left, or None."""
    marker = self.path(stage, 'done.json')
    if not os.path.exists(marker):
      return None
    with open(marker) as f:
      return json.load(f)

  def finish(self, stage: str, summary: dict[str, Any], seconds: float):
    # Process 0 alone marks a stage finished (every process sees the file).
    if jax.process_index() == 0:
      os.makedirs(self.path(stage), exist_ok=True)
      record = dict(summary, seconds=round(seconds, 2))
      tmp = self.path(stage, 'done.json.tmp')
      with open(tmp, 'w') as f:
        json.dump(record, f, indent=1, sort_keys=True, default=float)
      os.replace(tmp, self.path(stage, 'done.json'))
    self.seconds[stage] = seconds
    self.log(f'[{stage}] finished in {seconds:.1f} s: ' + _short(summary))


def _short(summary: dict[str, Any]) -> str:
  parts = []
  for key, value in summary.items():
    if isinstance(value, float):
      parts.append(f'{key} {value:.4f}')
    elif isinstance(value, int | str):
      parts.append(f'{key} {value}')
  return ', '.join(parts[:8])


def _save_params(path: str, params, metadata: dict[str, Any]):
  checkpoint.save(path, 0, params, metadata, keep=1)


def _load_params(path: str, like):
  restored = checkpoint.restore_latest(path, like)
  if restored is None:
    raise checkpoint.CheckpointError(
      f'{path}: the stage is marked finished but holds no parameters; '
      'delete its directory to recompute it'
    )
  return restored[0]


def _save_arrays(path: str, **arrays):
  if jax.process_index() != 0:  # every process holds the same arrays
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _load_arrays(path: str) -> dict[str, np.ndarray] | None:
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as error:
    raise ValueError(
      f'{path}: cached arrays are unreadable ({error}); delete the file to '
      'recompute them'
    ) from error


# ---------------------------------------------------------------------------
# Data.


def load_data(config: PipelineConfig, log: Callable[[str], None]):
  """The dataset (optionally its first `max_users` users) and its split."""
  dataset = data_lib.load(
    config.dataset, reindex=config.reindex, seed=config.seed, log_fn=log
  )
  if config.max_users is not None and config.max_users < dataset.num_users:
    dataset = dataclasses.replace(
      dataset,
      sequences=dataset.sequences[: config.max_users],
      timestamps=(
        dataset.timestamps[: config.max_users]
        if dataset.timestamps is not None
        else None
      ),
      user_raw_ids=dataset.user_raw_ids[: config.max_users],
    )
    log(
      f'kept the first {dataset.num_users:,} users '
      f'({dataset.num_interactions:,} interactions)'
    )
  split = data_lib.positional_split(
    dataset, gap=config.gap, device_window=config.device_window
  )
  for line in split.summary_text().splitlines():
    log(line)
  return dataset, split


def newest_windows(windows: data_lib.Windows, per_user: int):
  """Each user's newest `per_user` windows."""
  order = np.lexsort((-windows.positions, windows.users))
  users = windows.users[order]
  rank = np.arange(len(users)) - np.searchsorted(users, users, side='left')
  return windows.select(np.sort(order[rank < per_user]))


# ---------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass
class Context:
  config: PipelineConfig
  dataset: Any
  split: Any
  stages: Stages
  log: Callable[[str], None]
  model: Any = None
  srm_config: Any = None
  params: dict[str, Any] = dataclasses.field(default_factory=dict)
  srm_full: dict[str, dict[str, float]] = dataclasses.field(
    default_factory=dict
  )
  lists: dict[str, dict[str, np.ndarray]] = dataclasses.field(
    default_factory=dict
  )
  llm: Any = None
  llm_test: dict[str, float] = dataclasses.field(default_factory=dict)
  coop_windows: Any = None
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  mesh: Any = None  # a jax.sharding.Mesh to split work over, or None


def _srm_config(config: PipelineConfig, **overrides):
  if config.srm_epochs is not None:
    overrides.setdefault('epochs', config.srm_epochs)
  return registry.get_srm_config(config.srm, config.srm_preset, **overrides)


def stage_llm(ctx: Context):
  """Trains (or restores) the cloud LLM; stores `ctx.llm`."""
  from lsc_jax.train import llm_steps

  config = ctx.config
  start = time.perf_counter()
  finished = ctx.stages.done('llm')
  run = llm_steps.train_llm(
    sequences=ctx.dataset.sequences,
    num_users=ctx.dataset.num_users,
    num_items=ctx.dataset.num_items,
    split=ctx.split,
    preset=config.llm_preset,
    id_scheme=config.id_scheme,
    seed=config.seed,
    config=config.llm_training(),
    workdir=ctx.stages.path('llm'),
    log=ctx.log,
    mesh=ctx.mesh,
  )
  ctx.llm = run.llm
  if sharding.training_mesh(ctx.mesh) is not None:
    # Its beam searches split each batch's prompts over the mesh.
    ctx.llm = sharding.mesh_llm(run.llm, ctx.mesh)
  if finished is None:
    ctx.stages.finish(
      'llm', {'epochs': len(run.loop.history)}, time.perf_counter() - start
    )


def stage_srm_independent(ctx: Context):
  config = ctx.config
  ctx.srm_config = _srm_config(config)
  ctx.model = registry.srm_from_config(
    config.srm, ctx.dataset.num_items, ctx.srm_config
  )
  like = srm_steps.init_params(ctx.model, ctx.srm_config.max_len, config.seed)
  finished = ctx.stages.done('srm_independent')
  if finished is not None:
    ctx.params['independent'] = _load_params(
      ctx.stages.path('srm_independent', 'params'), like
    )
    ctx.srm_full['independent'] = finished['test']
    return
  start = time.perf_counter()
  run = srm_steps.train_srm(
    config.srm,
    sequences=ctx.dataset.sequences,
    num_items=ctx.dataset.num_items,
    train_windows=ctx.split.srm_train,
    valid_windows=ctx.split.valid,
    test_windows=ctx.split.test,
    config=ctx.srm_config,
    seed=config.seed,
    workdir=ctx.stages.path('srm_independent', 'train'),
    ks=KS,
    log=ctx.log,
    mesh=ctx.mesh,
  )
  ctx.params['independent'] = run.params
  ctx.srm_full['independent'] = run.test
  _save_params(
    ctx.stages.path('srm_independent', 'params'),
    run.params,
    {'stage': 'srm_independent'},
  )
  ctx.stages.finish(
    'srm_independent',
    {'valid': run.valid, 'test': run.test, 'best_epoch': run.loop.best_epoch},
    time.perf_counter() - start,
  )


def _generate(ctx: Context, name: str, windows, *, gap: int, k: int):
  """LLM lists for `windows`, cached as `lists/<name>.npz`."""
  from lsc_jax.models import llm as llm_lib

  path = ctx.stages.path('lists', f'{name}.npz')
  cached = _load_arrays(path)
  if cached is not None:
    ctx.lists[name] = cached
    return cached
  start = time.perf_counter()
  # With a mesh, batches of a multiple of its size (filler prompts dropped).
  devices = 1 if ctx.mesh is None else ctx.mesh.size
  items, scores = llm_lib.generate_for_windows(
    ctx.llm,
    ctx.dataset.sequences,
    windows.users,
    windows.positions,
    gap=gap,
    num_candidates=k,
    beam_size=max(
      k, ctx.config.beam_size if k == ctx.config.num_candidates else k
    ),
    batch_size=devices * -(-64 // devices),
    log_fn=ctx.log,
  )
  seconds = time.perf_counter() - start
  ctx.timings[f'llm_generate_{name}'] = seconds
  result = {
    'items': items,
    'llm_scores': scores,
    'seconds_per_user': np.float64(seconds / max(len(windows), 1)),
  }
  _save_arrays(path, **result)
  ctx.lists[name] = result
  ctx.log(f'[lists] {name}: {len(windows):,} lists of {k} in {seconds:.1f} s')
  return result


def stage_lists(ctx: Context):
  """Every LLM list the later stages need."""
  config, split = ctx.config, ctx.split
  ctx.coop_windows = newest_windows(
    split.srm_train, config.coop_windows_per_user
  )
  _generate(
    ctx,
    'coop_train',
    ctx.coop_windows,
    gap=config.gap,
    k=config.coop_candidates,
  )
  for part in ('valid', 'test'):
    windows = getattr(split, part)
    _generate(
      ctx, f'{part}_stale', windows, gap=config.gap, k=config.num_candidates
    )
    _generate(ctx, f'{part}_fresh', windows, gap=0, k=config.num_candidates)
  flat = data_lib.flatten(ctx.dataset.sequences)
  for part in ('valid', 'test'):
    windows = getattr(split, part)
    targets = flat.items[flat.offsets[windows.users] + windows.positions]
    for view in ('stale', 'fresh'):
      hit = (ctx.lists[f'{part}_{view}']['items'] == targets[:, None]).any(1)
      ctx.llm_test[f'{part}_{view}_recall@{config.num_candidates}'] = float(
        hit.mean()
      )
  if ctx.stages.done('lists') is None:
    generated = sum(
      v for k, v in ctx.timings.items() if k.startswith('llm_generate_')
    )
    ctx.stages.finish('lists', dict(ctx.llm_test), generated)


def _histories(ctx: Context, windows) -> np.ndarray:
  return data_lib.histories(
    ctx.dataset.sequences,
    windows.users,
    windows.positions,
    ctx.srm_config.max_len,
  )


def _targets(ctx: Context, windows) -> np.ndarray:
  flat = data_lib.flatten(ctx.dataset.sequences)
  return flat.items[flat.offsets[windows.users] + windows.positions]


def stage_cooperative(ctx: Context):
  config = ctx.config
  like = ctx.params['independent']
  finished = ctx.stages.done('srm_cooperative')
  if finished is not None:
    ctx.params['cooperative'] = _load_params(
      ctx.stages.path('srm_cooperative', 'params'), like
    )
    return
  start = time.perf_counter()
  lists = cooperative.build_training_lists(
    ctx.dataset.sequences,
    ctx.coop_windows,
    ctx.lists['coop_train']['items'],
    num_items=ctx.dataset.num_items,
    max_len=ctx.srm_config.max_len,
    num_negatives=config.coop.num_negatives,
    seed=config.seed,
  )
  valid = ctx.split.valid
  evaluate = cooperative.make_list_evaluator(
    ctx.model,
    _histories(ctx, valid),
    ctx.lists['valid_stale']['items'],
    _targets(ctx, valid),
    ks=KS,
  )
  before = evaluate(ctx.params['independent'])
  result = cooperative.train_cooperative(
    ctx.model,
    ctx.params['independent'],
    lists,
    config.coop,
    evaluate=evaluate,
    seed=config.seed,
    workdir=ctx.stages.path('srm_cooperative', 'train'),
    log=ctx.log,
  )
  after = evaluate(result.best_params)
  metric = config.coop.early_stop_metric
  # Early stopping never looked at epoch 0: keep the independent SRM if no
  # cooperative epoch beat it on validation.
  params = result.best_params
  if after[metric] < before[metric]:
    ctx.log(
      f'[srm_cooperative] no epoch beat the independent SRM on '
      f'validation {metric} ({after[metric]:.4f} < '
      f'{before[metric]:.4f}); keeping the independent parameters'
    )
    params = ctx.params['independent']
  ctx.params['cooperative'] = params
  _save_params(
    ctx.stages.path('srm_cooperative', 'params'),
    params,
    {'stage': 'srm_cooperative'},
  )
  ctx.stages.finish(
    'srm_cooperative',
    {
      f'valid_in_lists_before/{metric}': before[metric],
      f'valid_in_lists_after/{metric}': after[metric],
      'training_lists': len(lists),
    },
    time.perf_counter() - start,
  )


def stage_retrain(ctx: Context):
  """Global re-training on the newest device-side windows."""
  config = ctx.config
  like = ctx.params['cooperative']
  finished = ctx.stages.done('srm_retrained')
  if finished is not None:
    ctx.params['retrained'] = _load_params(
      ctx.stages.path('srm_retrained', 'params'), like
    )
    ctx.srm_full['retrained'] = finished['test']
    return
  start = time.perf_counter()
  # One target per recent window; DIN keeps its sampled loss.
  loss = ctx.srm_config.loss
  retrain_config = dataclasses.replace(
    ctx.srm_config,
    objective='last_item',
    epochs=config.retrain_epochs,
    patience=1,
    bucket_edges=ctx.srm_config.bucket_edges,
    loss=loss,
  )
  run = srm_steps.train_srm(
    config.srm,
    sequences=ctx.dataset.sequences,
    num_items=ctx.dataset.num_items,
    train_windows=ctx.split.device_recent,
    valid_windows=ctx.split.valid,
    test_windows=ctx.split.test,
    config=retrain_config,
    seed=config.seed,
    workdir=ctx.stages.path('srm_retrained', 'train'),
    params=jax.tree.map(np.array, ctx.params['cooperative']),
    ks=KS,
    log=ctx.log,
    mesh=ctx.mesh,
  )
  ctx.params['retrained'] = run.params
  ctx.srm_full['retrained'] = run.test
  _save_params(
    ctx.stages.path('srm_retrained', 'params'),
    run.params,
    {'stage': 'srm_retrained'},
  )
  ctx.stages.finish(
    'srm_retrained',
    {'valid': run.valid, 'test': run.test, 'best_epoch': run.loop.best_epoch},
    time.perf_counter() - start,
  )


def _srm_scores(ctx: Context, stage: str, part: str) -> dict[str, np.ndarray]:
  """SRM logits of the stale and fresh lists of `part` for an SRM stage."""
  windows = getattr(ctx.split, part)
  history = _histories(ctx, windows)
  out = {}
  for view in ('stale', 'fresh'):
    items = ctx.lists[f'{part}_{view}']['items']
    start = time.perf_counter()
    out[view] = rerank.score_lists(ctx.model, ctx.params[stage], history, items)
    ctx.timings[f'srm_score_{stage}_{part}_{view}'] = (
      time.perf_counter() - start
    )
  return out


def stage_adapt(ctx: Context, part: str) -> dict[str, np.ndarray]:
  """Per-device adaptation, scoring `part`'s stale and fresh lists."""
  path = ctx.stages.path('adapted', f'{part}_scores.npz')
  cached = _load_arrays(path)
  if cached is not None:
    return cached
  config = ctx.config
  windows = getattr(ctx.split, part)
  stale = ctx.lists[f'{part}_stale']['items']
  fresh = ctx.lists[f'{part}_fresh']['items']
  data = adapt_lib.build_device_data(
    ctx.dataset.sequences,
    ctx.split.device_recent,
    windows,
    np.concatenate([stale, fresh], axis=1),
    num_items=ctx.dataset.num_items,
    max_len=ctx.srm_config.max_len,
    num_recent=config.device_window,
    num_negatives=config.adapt.num_negatives,
    seed=config.seed,
  )
  start = time.perf_counter()
  mesh = ctx.mesh
  if mesh is not None and mesh.size > 1:
    # Each chunk's users split over the mesh; a chunk must split evenly, so
    # its size is rounded up (no effect on the scores).
    adapt_config = config.adapt
    if adapt_config.chunk_size % mesh.size:
      chunk = mesh.size * -(-adapt_config.chunk_size // mesh.size)
      ctx.log(
        f'[adapted] chunk_size {adapt_config.chunk_size} rounded up to '
        f'{chunk}, a multiple of the {mesh.size} devices of the mesh'
      )
      adapt_config = dataclasses.replace(adapt_config, chunk_size=chunk)
    result = sharding.sharded_adapt_and_score(
      ctx.model, ctx.params['retrained'], data, adapt_config, mesh
    )
  else:
    result = adapt_lib.adapt_and_score(
      ctx.model,
      ctx.params['retrained'],
      data,
      config.adapt,
      log=lambda line: None,
    )
  seconds = time.perf_counter() - start
  k = stale.shape[1]
  out = {'stale': result.scores[:, :k], 'fresh': result.scores[:, k:]}
  _save_arrays(path, **out)
  ctx.log(
    f'[adapted] {part}: {len(data):,} devices adapted in {seconds:.1f} s; '
    f'mean recent-window loss {result.first_loss.mean():.4f} -> '
    f'{result.last_loss.mean():.4f}; each device copy '
    f'{result.state_bytes / 1e6:.2f} MB with optimizer state'
  )
  ctx.timings[f'adapt_{part}'] = seconds
  return out


def _user_lists(
  ctx: Context, part: str, view: str, scores: dict[str, np.ndarray]
) -> simulate.UserLists:
  lists = ctx.lists[f'{part}_{view}']
  return simulate.UserLists(lists['items'], lists['llm_scores'], scores[view])


def simulate_requests(ctx: Context) -> dict[str, Any]:
  """Builds every row of the results table."""
  config = ctx.config
  test = ctx.split.test
  targets = _targets(ctx, test)
  stage_names = ['independent', 'cooperative', 'retrained']
  scores = {stage: _srm_scores(ctx, stage, 'test') for stage in stage_names}
  if config.adapt_devices:
    scores['adapted'] = stage_adapt(ctx, 'test')
    stage_names.append('adapted')

  # Validation users' lists choose alpha (and calibrate the gate below).
  final = config.final_srm
  if final == 'adapted':
    valid_scores = stage_adapt(ctx, 'valid')
  else:
    valid_scores = _srm_scores(ctx, final, 'valid')
  valid_stale = _user_lists(ctx, 'valid', 'stale', valid_scores)
  alpha_curve = {}
  alpha = config.alpha
  if alpha is None:
    alpha, alpha_curve = simulate.choose_alpha(
      valid_stale,
      _targets(ctx, ctx.split.valid),
      grid=config.alpha_grid,
      metric=config.alpha_metric,
      llm_score=config.llm_score,
      normalisation=config.normalisation,
    )
    ctx.log(
      f'[fusion] alpha {alpha:g} chosen on validation {config.alpha_metric} '
      '(' + ', '.join(f'{a:g}: {v:.4f}' for a, v in alpha_curve.items()) + ')'
    )

  def metrics_of(lists, alpha, reduce=True):
    return simulate.list_metrics(
      lists,
      targets,
      alpha=alpha,
      llm_score=config.llm_score,
      normalisation=config.normalisation,
      ks=KS,
      reduce=reduce,
    )

  rows = []
  any_scores = scores['independent']
  stale_llm = _user_lists(ctx, 'test', 'stale', any_scores)
  fresh_llm = _user_lists(ctx, 'test', 'fresh', any_scores)
  rows.append(
    dict(
      name='LLM only (stale list)',
      group='llm',
      protocol=f'candidates@{config.num_candidates}',
      metrics=metrics_of(stale_llm, 1.0),
    )
  )
  rows.append(
    dict(
      name='LLM only (fresh list, every user requests)',
      group='llm',
      protocol=f'candidates@{config.num_candidates}',
      metrics=metrics_of(fresh_llm, 1.0),
    )
  )
  for stage in stage_names:
    if stage in ctx.srm_full and ctx.srm_full[stage]:
      rows.append(
        dict(
          name=f'SRM only, full ranking ({stage})',
          group='srm_full',
          protocol='full',
          metrics=ctx.srm_full[stage],
        )
      )
  for stage in stage_names:
    lists = _user_lists(ctx, 'test', 'stale', scores[stage])
    rows.append(
      dict(
        name=f'SRM only, re-ranks stale list ({stage})',
        group='srm_rerank',
        protocol=f'candidates@{config.num_candidates}',
        metrics=metrics_of(lists, 0.0),
      )
    )
  for stage in stage_names:
    lists = _user_lists(ctx, 'test', 'stale', scores[stage])
    rows.append(
      dict(
        name=fusion_row_name(alpha, stage),
        group='fusion',
        protocol=f'candidates@{config.num_candidates}',
        alpha=alpha,
        metrics=metrics_of(lists, alpha),
      )
    )

  # The gate: final SRM scores on stale lists, calibrated on validation.
  stale = _user_lists(ctx, 'test', 'stale', scores[final])
  fresh = _user_lists(ctx, 'test', 'fresh', scores[final])
  test_consistency = simulate.consistency(stale, config.consistency)
  valid_consistency = simulate.consistency(valid_stale, config.consistency)
  history_lengths = np.minimum(test.positions, 10**9)
  requests = []
  gate_requests = {}
  for policy in ('gate', 'gate_topk', 'random'):
    for ratio in config.ratios:
      run = simulate.run_policy(
        policy,
        ratio,
        stale=stale,
        fresh=fresh,
        targets=targets,
        history_lengths=history_lengths,
        test_consistency=test_consistency,
        valid_consistency=valid_consistency,
        alpha=alpha,
        llm_score=config.llm_score,
        normalisation=config.normalisation,
        seed=config.seed,
        ks=KS,
      )
      if policy == 'gate':
        gate_requests[ratio] = run.requests
      requests.append(
        dict(
          name=f'LSC4Rec, {policy} requests, ratio {ratio:g}',
          group=f'lsc4rec_{policy}',
          protocol=f'candidates@{config.num_candidates}',
          policy=policy,
          ratio=ratio,
          metrics=run.metrics,
          traffic=dataclasses.asdict(run.traffic),
        )
      )
      if run.expected_metrics is not None:
        requests.append(
          dict(
            name=f'LSC4Rec, random requests (expected), ratio {ratio:g}',
            group=f'lsc4rec_{policy}_expected',
            protocol=f'candidates@{config.num_candidates}',
            policy=f'{policy}_expected',
            ratio=ratio,
            metrics=run.expected_metrics,
            traffic=dataclasses.asdict(run.expected_traffic),
          )
        )
  comparisons = paired_comparisons(
    metrics_of=lambda lists, a: metrics_of(lists, a, reduce=False),
    llm_stale=stale_llm,
    stale=stale,
    fresh=fresh,
    alpha=alpha,
    gate_requests=gate_requests,
  )
  return {
    'rows': rows + requests,
    'comparisons': comparisons,
    'alpha': alpha,
    'alpha_validation': {f'{a:g}': v for a, v in alpha_curve.items()},
    'final_srm': final,
    'num_test_users': int(len(test)),
  }


def paired_comparisons(
  *,
  metrics_of: Callable,
  llm_stale,
  stale,
  fresh,
  alpha: float,
  gate_requests: dict[float, np.ndarray],
) -> list[dict[str, Any]]:
  """The claims of the paper as per-user paired differences on test.

  Fusion against each end on the same stale lists (NDCG@5 and @10), and
  the gate at each budget against the expectation over random draws of the
  same number of requests (NDCG@5), each with a 95% interval
  (`simulate.paired_difference`).

  Args:
    metrics_of: (lists, alpha) -> per-user metric arrays.
    llm_stale: the test lists with any SRM's scores (the LLM-only end).
    stale, fresh: the test lists with the final SRM's scores.
  """
  if len(stale) < 2:
    return []  # no spread to measure with fewer than two users
  fused = metrics_of(stale, alpha)
  srm_only = metrics_of(stale, 0.0)
  llm_only = metrics_of(llm_stale, 1.0)
  fused_fresh = metrics_of(fresh, alpha)
  out = []

  def add(name, metric, a, b, ratio=None):
    diff = simulate.paired_difference(a[metric], b[metric])
    entry = dict(name=name, metric=metric, **dataclasses.asdict(diff))
    entry['separated'] = diff.separated
    if ratio is not None:
      entry['ratio'] = ratio
    out.append(entry)

  for metric in ('ndcg@5', 'ndcg@10'):
    add('fusion - SRM only', metric, fused, srm_only)
    add('fusion - LLM only', metric, fused, llm_only)
  for ratio, chosen in sorted(gate_requests.items()):
    if not 0.0 < ratio < 1.0:
      continue
    share = request.request_budget(len(chosen), ratio) / len(chosen)
    gated = metrics_of(stale.select(chosen, fresh), alpha)
    expected = simulate.random_expectation(fused, fused_fresh, share)
    add('gate - random (expected)', 'ndcg@5', gated, expected, ratio)
  return out


def fusion_row_name(alpha: float, stage: str) -> str:
  return f'fusion, alpha {alpha:g} ({stage})'


def checks(results: dict[str, Any], config: PipelineConfig) -> list[str]:
  """Plain-language verdicts on the paper's claims (never tuned on test)."""
  rows = results['rows']
  by_name = {r['name']: r for r in rows}
  final = results['final_srm']
  fusion = by_name[fusion_row_name(results['alpha'], final)]['metrics']
  llm = by_name['LLM only (stale list)']['metrics']
  srm = by_name[f'SRM only, re-ranks stale list ({final})']['metrics']
  lines = []
  paired = {
    (c['name'], c['metric'], c.get('ratio')): c
    for c in results.get('comparisons', [])
  }

  def interval(name, metric, ratio=None):
    c = paired.get((name, metric, ratio))
    if c is None:
      return ''
    verdict = 'apart' if c['separated'] else 'within noise'
    return (
      f' [{name}: {c["mean"]:+.5f}, 95% interval {c["low"]:+.5f} to '
      f'{c["high"]:+.5f} over {c["users"]:,} users, {verdict}]'
    )

  for k in (5, 10):
    key = f'ndcg@{k}'
    ok = fusion[key] > llm[key] and fusion[key] > srm[key]
    lines.append(
      f'fusion {"beats" if ok else "does NOT beat"} both LLM-only and '
      f'SRM-only on {key}: {fusion[key]:.5f} vs {llm[key]:.5f} (LLM) and '
      f'{srm[key]:.5f} (SRM re-rank, {final})'
      + interval('fusion - SRM only', key)
    )

  def by_ratio(policy):
    return {r['ratio']: r['metrics'] for r in rows if r.get('policy') == policy}

  gate, drawn = by_ratio('gate'), by_ratio('random')
  expected = by_ratio('random_expected')
  for ratio in (0.05, 0.1, 0.2):
    if ratio in gate and ratio in expected:
      g, e = gate[ratio]['ndcg@5'], expected[ratio]['ndcg@5']
      lines.append(
        f'Kendall gate {"beats" if g > e else "does NOT beat"} random '
        f'requests at ratio {ratio:g} on ndcg@5: {g:.5f} vs {e:.5f} '
        f'expected over random draws ({drawn[ratio]["ndcg@5"]:.5f} in the '
        'seeded draw)' + interval('gate - random (expected)', 'ndcg@5', ratio)
      )
  return lines


def markdown_table(results: dict[str, Any]) -> str:
  """The results as one Markdown table."""
  keys = [f'{m}@{k}' for k in KS for m in ('hr', 'ndcg', 'mrr')]
  header = (
    '| method | protocol | '
    + ' | '.join(keys)
    + ' | requests | bytes up | bytes down |'
  )
  lines = [header, '|' + '---|' * (len(keys) + 5)]
  for row in results['rows']:
    traffic = row.get('traffic', {})
    values = ' | '.join(
      f'{row["metrics"][k]:.4f}' if k in row['metrics'] else '-' for k in keys
    )
    lines.append(
      f'| {row["name"]} | {row["protocol"]} | {values} | '
      f'{traffic.get("requests", "-")} | '
      f'{traffic.get("bytes_up", "-")} | {traffic.get("bytes_down", "-")} |'
    )
  return '\n'.join(lines)


def plot_curve(results: dict[str, Any], path: str, metric: str = 'ndcg@5'):
  """PNG of `metric` against request ratio, gate versus random."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for policy, label in (
    ('gate', 'Kendall gate (threshold from validation)'),
    ('gate_topk', 'Kendall gate (budgeted top-k)'),
    ('random', 'random requests (one seeded draw)'),
    ('random_expected', 'random requests (expected over draws)'),
  ):
    points = sorted(
      (r['ratio'], r['metrics'][metric])
      for r in results['rows']
      if r.get('policy') == policy
    )
    if points:
      xs, ys = zip(*points, strict=True)
      ax.plot([100 * x for x in xs], ys, marker='o', label=label)
  ax.set_xlabel('request ratio (% of users)')
  ax.set_ylabel(metric.upper())
  ax.set_title('LSC4Rec: accuracy against request budget')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# Settings that only the final simulation reads: a rerun on a finished
# workdir may change them. Any other change would mix cached stages built
# with other settings into the table.
SIMULATION_FIELDS = frozenset(
  {
    'alpha',
    'alpha_grid',
    'alpha_metric',
    'llm_score',
    'normalisation',
    'consistency',
    'ratios',
    'final_srm',
    'workdir',
  }
)


def check_workdir_config(config: PipelineConfig) -> None:
  """Refuses a workdir whose cached stages were built with other settings.

  Raises:
    ValueError: naming the settings that differ from the workdir's
      `config.json` (other than `SIMULATION_FIELDS`).
  """
  path = os.path.join(config.workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    try:
      previous = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(
        f'{path}: unreadable ({error}); delete it or use a new workdir'
      ) from error
  current = json.loads(json.dumps(config.to_dict(), default=str))
  changed = sorted(
    key
    for key in set(previous) | set(current)
    if key not in SIMULATION_FIELDS and previous.get(key) != current.get(key)
  )
  if changed:
    details = ', '.join(
      f'{key}: {previous.get(key)!r} -> {current.get(key)!r}' for key in changed
    )
    raise ValueError(
      f'{config.workdir} holds stages built with other settings ({details}); '
      'use a new workdir (only the fusion, gate and ratio settings may '
      'change on a finished one)'
    )


def run(
  config: PipelineConfig,
  log: Callable[[str], None] | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
  """Runs (or resumes) every stage and writes the results to the workdir.

  Args:
    config: the settings.
    log: receives progress lines (default `logging.info`).
    mesh: split the training stages, the LLM's lists and per-device
      adaptation over this mesh (None: one device). In a multi-host run
      every process calls `run` with the same arguments.

  Returns:
    The results dict also written to `<workdir>/results.json` (by process
    0; every process returns it).
  """
  log = log or _LOG.info
  start = time.perf_counter()
  primary = jax.process_index() == 0
  stages = Stages(config.workdir, log)
  check_workdir_config(config)
  if primary:
    with open(os.path.join(config.workdir, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f, indent=1, default=str)
  dataset, split = load_data(config, log)
  ctx = Context(
    config=config,
    dataset=dataset,
    split=split,
    stages=stages,
    log=log,
    mesh=mesh,
  )

  stage_llm(ctx)
  stage_srm_independent(ctx)
  stage_lists(ctx)
  stage_cooperative(ctx)
  stage_retrain(ctx)
  results = simulate_requests(ctx)
  results['config'] = config.to_dict()
  results['llm_recall'] = ctx.llm_test
  results['timings'] = {k: round(v, 3) for k, v in ctx.timings.items()}
  results['seconds'] = round(time.perf_counter() - start, 1)
  results['checks'] = checks(results, config)
  if not primary:
    return results

  with open(os.path.join(config.workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=float)
  table = markdown_table(results)
  with open(os.path.join(config.workdir, 'results.md'), 'w') as f:
    f.write(
      table + '\n\n' + '\n'.join(f'- {c}' for c in results['checks']) + '\n'
    )
  plot_curve(results, os.path.join(config.workdir, 'request_curve.png'))
  return results
