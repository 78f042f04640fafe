"""Training the cloud LLM: seq2seq batches, the jitted step, evaluation.

LSC4Rec (Lv et al., KDD 2025) trains P5 on T5 with token cross-entropy on
the target item's identifier: averaged over a sample's non-pad target tokens,
then over the batch; AdamW (eps 1e-6, weight decay 0.01 on every
parameter), linear warm-up over 5% of the steps then linear decay to 0,
gradient clipping at global norm 1.0. This module provides that step and
drives it with the shared `lsc_jax.train.loop.train_loop` (progress,
JSON-lines metrics, Orbax checkpoints, exact resume).

Data: every `split.llm_train` window is one sample per epoch. Its prompt is
a direct next-item template drawn uniformly from `prompts.TRAIN_TEMPLATES`
with a random separator, over the newest `max_history` items before the
target; the target is the item's identifier. Batches are formed from
length-sorted chunks of a shuffled epoch and padded to a multiple of 16
tokens, so a few shapes are compiled and the batch count per epoch is
exactly ceil(windows / batch_size). Everything random is a function of
(seed, epoch) or (seed, step), so a resumed run matches an uninterrupted
one.

Evaluation (`evaluate_llm`): beam search of K candidates per window from
the history the split gives the cloud (the stale one at test, gap g);
HR/NDCG@k over the beam order, a target outside the K is a miss, and
recall@K = HR@K.

Scale-out: `train_llm(..., mesh=...)` trains data-parallel with the
prompts of each batch split over the mesh (`lsc_jax.sharding`), and
`evaluate_llm(sharding.mesh_llm(llm, mesh), ...)` splits the generation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from jax.experimental import multihost_utils

from lsc_jax import metrics as metrics_lib
from lsc_jax import prompts as prompts_lib
from lsc_jax import sharding
from lsc_jax.models import item_ids as item_ids_lib
from lsc_jax.models import llm as llm_lib
from lsc_jax.models import t5
from lsc_jax.train import loop as loop_lib
from lsc_jax.train import state as state_lib

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LLMTrainConfig:
  """Settings of LLM training (the paper's values where it has them).

  Attributes:
    epochs: passes over the LLM training windows (paper: 10).
    batch_size: prompts per step (paper: 32).
    learning_rate: peak learning rate (paper: 1e-3).
    warmup_fraction: linear warm-up share of all steps (paper: 0.05).
    weight_decay: AdamW decay, applied to every parameter (paper: 0.01);
      AdamW multiplies it by the learning rate of the parameter's group.
    adam_eps: AdamW epsilon (paper: 1e-6).
    clip_norm: global gradient-norm clip (paper: 1.0).
    embedding_lr_multiplier: the token table (the shared embedding, also
      the output layer when tied, and an untied `lm_head`) learns at this
      multiple of `learning_rate` (paper: 1, a pretrained T5 whose rows
      already mean something). Atomic item tokens trained from scratch
      need more: their rows start at T5's standard deviation 1 while Adam
      moves each coordinate by about the learning rate per step, so at
      1e-3 they barely leave their random start in a few thousand steps.
      AdamW's decoupled weight decay is proportional to the learning rate,
      so the table's decay per step grows by the same multiple.
    max_history: newest history items in a prompt (None: all; the paper's
      code only cuts at 512 tokens).
    tokenizer_vocab: size of a tokenizer trained on the spot.
    chunk_batches: batches per length-sorted chunk of the shuffled epoch.
    keep_checkpoints: newest checkpoints kept.
    log_every_seconds: progress line interval.
  """

  epochs: int = 10
  batch_size: int = 32
  learning_rate: float = 1e-3
  warmup_fraction: float = 0.05
  weight_decay: float = 0.01
  adam_eps: float = 1e-6
  clip_norm: float = 1.0
  embedding_lr_multiplier: float = 1.0
  max_history: int | None = 20
  tokenizer_vocab: int = 1000
  chunk_batches: int = 50
  keep_checkpoints: int = 2
  log_every_seconds: float = 20.0

  def __post_init__(self):
    if (
      self.epochs < 0
      or self.batch_size < 1
      or self.learning_rate <= 0
      or self.embedding_lr_multiplier <= 0
    ):
      raise ValueError(f'invalid LLMTrainConfig: {self}')
    if not 0 <= self.warmup_fraction < 1:
      raise ValueError(
        f'warmup_fraction must be in [0, 1), got {self.warmup_fraction}'
      )


# Training presets, keyed like the model size presets of `t5.T5_PRESETS`.
LLM_TRAIN_PRESETS: dict[str, LLMTrainConfig] = {
  # Short prompts (newest 5 items) keep smoke runs to one or two compiled
  # prompt widths.
  'smoke': LLMTrainConfig(
    epochs=2, batch_size=16, learning_rate=3e-3, max_history=5
  ),
  # About 80 s per epoch of Beauty's 71k LLM windows on two free CPU cores.
  # 3e-3 was too high for T5's small query initialisation at d 128: the
  # model never learned even to copy the last history item. The embedding
  # multiplier is the best of 1, 10, 30, 100, 300 on validation (2 epochs,
  # 6,000 users): HR@10 from the stale history 0.0075 at 1, 0.0333 at 300
  # (see BUILD_NOTES.md).
  'cpu': LLMTrainConfig(
    epochs=4,
    batch_size=64,
    learning_rate=1e-3,
    max_history=10,
    embedding_lr_multiplier=300.0,
  ),
  't5-small': LLMTrainConfig(max_history=None),
}


def train_config(preset: str, **overrides) -> LLMTrainConfig:
  """The training preset of a size preset, with overrides (None = keep)."""
  if preset not in LLM_TRAIN_PRESETS:
    raise ValueError(
      f'Unknown LLM preset {preset!r}; expected one of '
      f'{sorted(LLM_TRAIN_PRESETS)}.'
    )
  overrides = {k: v for k, v in overrides.items() if v is not None}
  return dataclasses.replace(LLM_TRAIN_PRESETS[preset], **overrides)


def learning_rate_schedule(
  config: LLMTrainConfig, total_steps: int
) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_fraction` of the steps, then
  linear decay to 0 at `total_steps` (Hugging Face's linear schedule)."""
  total_steps = max(int(total_steps), 1)
  warmup = int(config.warmup_fraction * total_steps)
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
      optax.linear_schedule(
        config.learning_rate, 0.0, max(total_steps - warmup, 1)
      ),
    ],
    [warmup],
  )


def is_embedding_parameter(path: str) -> bool:
  """Whether a parameter path (`jax.tree_util.keystr`) holds rows or
  columns of the token table: T5's shared embedding and, in an untied
  model, its output layer `lm_head`. These form the group that
  `embedding_lr_multiplier` scales (not the relative-position
  `embedding`s of the attention layers)."""
  return re.match(r"(\['params'\])?\['(shared|lm_head)'\]", path) is not None


def make_optimizer(
  config: LLMTrainConfig, total_steps: int
) -> optax.GradientTransformation:
  """Clip at `clip_norm` (one global norm over all parameters), then AdamW
  on `learning_rate_schedule`; the token table's schedule is scaled by
  `embedding_lr_multiplier`."""
  schedule = learning_rate_schedule(config, total_steps)

  def adamw(learning_rate):
    return optax.adamw(
      learning_rate,
      b1=0.9,
      b2=0.999,
      eps=config.adam_eps,
      weight_decay=config.weight_decay,
    )

  if config.embedding_lr_multiplier == 1.0:
    update = adamw(schedule)
  else:
    multiplier = config.embedding_lr_multiplier

    def groups(params):
      return jax.tree_util.tree_map_with_path(
        lambda path, _: (
          'embedding'
          if is_embedding_parameter(jax.tree_util.keystr(path))
          else 'rest'
        ),
        params,
      )

    update = optax.multi_transform(
      {
        'embedding': adamw(lambda step: multiplier * schedule(step)),
        'rest': adamw(schedule),
      },
      groups,
    )
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), update)


def seq2seq_loss(
  logits: jax.Array,
  targets: jax.Array,
  target_mask: jax.Array,
  row_mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Token cross-entropy, mean over a row's target tokens, then over rows.

  Args:
    logits: float32 `[batch, tgt_len, vocab]`.
    targets: int32 `[batch, tgt_len]`.
    target_mask: bool `[batch, tgt_len]`, True on real target tokens.
    row_mask: bool `[batch]`, False on filler rows of a padded batch.

  Returns:
    (loss, token accuracy over real target tokens), scalars.
  """
  token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  weights = target_mask.astype(jnp.float32)
  per_row = jnp.sum(token_loss * weights, -1) / jnp.maximum(weights.sum(-1), 1)
  rows = row_mask.astype(jnp.float32)
  loss = jnp.sum(per_row * rows) / jnp.maximum(rows.sum(), 1.0)
  correct = (jnp.argmax(logits, -1) == targets) & target_mask
  correct = correct & row_mask[:, None]
  real = jnp.sum(target_mask & row_mask[:, None])
  return loss, jnp.sum(correct) / jnp.maximum(real, 1)


def make_train_step(model: t5.T5) -> Callable:
  """`(state, batch) -> (state, metrics)`; dropout key `state.step_key()`.

  The batch holds `input_ids` `[B, L]`, `attention_mask` `[B, L]`,
  `targets` `[B, T]`, `target_mask` `[B, T]` and `mask` `[B]` (real rows).
  """
  start_token = model.settings.decoder_start_token_id

  def step(state, batch):
    key = state.step_key()

    def loss_fn(params):
      logits = model.apply(
        {'params': params},
        batch['input_ids'],
        batch['attention_mask'],
        t5.shift_right(batch['targets'], start_token),
        deterministic=False,
        rngs={'dropout': key},
      )
      return seq2seq_loss(
        logits, batch['targets'], batch['target_mask'], batch['mask']
      )

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
    )
    state = state.apply_gradients(grads=grads)
    return state, {'loss': loss, 'token_accuracy': accuracy}

  return step


def example_batch(
  llm: llm_lib.LLMScorer, config: LLMTrainConfig
) -> dict[str, jax.ShapeDtypeStruct]:
  """The widest training batch `PromptBatches` can yield, as shapes.

  Prompts are padded to at most `llm.prompts.max_prompt_tokens` tokens and
  targets to the longest identifier; for compile-only checks and sharding
  set-up.
  """
  rows, prompt = config.batch_size, llm.prompts.max_prompt_tokens
  target = llm.item_ids.max_len
  shape = jax.ShapeDtypeStruct
  return {
    'input_ids': shape((rows, prompt), jnp.int32),
    'attention_mask': shape((rows, prompt), jnp.bool_),
    'targets': shape((rows, target), jnp.int32),
    'target_mask': shape((rows, target), jnp.bool_),
    'mask': shape((rows,), jnp.bool_),
  }


def _targets(sequences, users, positions) -> np.ndarray:
  """int32 `[num_windows]`: `sequences[user][position]` per window."""
  pairs = zip(
    np.asarray(users).tolist(), np.asarray(positions).tolist(), strict=True
  )
  return np.fromiter(
    (sequences[u][p] for u, p in pairs), np.int32, count=len(users)
  )


class PromptBatches:
  """Epoch batches of (prompt, target identifier) for LLM training.

  `batches(epoch)` is a pure function of (seed, epoch); `num_batches` is
  ceil(windows / batch_size) for every epoch.
  """

  def __init__(
    self,
    builder: prompts_lib.PromptBuilder,
    sequences: Sequence[np.ndarray],
    users: np.ndarray,
    positions: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    chunk_batches: int = 50,
  ):
    self.builder = builder
    self.sequences = sequences
    self.users = np.asarray(users, np.int32)
    self.positions = np.asarray(positions, np.int32)
    if len(self.users) == 0:
      raise ValueError('no LLM training windows')
    targets = _targets(sequences, self.users, self.positions)
    self.target_tokens, self.target_lengths = builder.item_ids.identifiers(
      targets
    )
    self.batch_size = batch_size
    self.seed = seed
    self.chunk = chunk_batches * batch_size

  @property
  def num_batches(self) -> int:
    return -(-len(self.users) // self.batch_size)

  def batches(self, epoch: int):
    rng = np.random.default_rng([self.seed, epoch])
    count = len(self.users)
    templates = rng.choice(prompts_lib.TRAIN_TEMPLATES, count).tolist()
    separators = rng.choice(prompts_lib.SEPARATORS, count).tolist()
    prompts = self.builder.build_many(
      self.users,
      self.positions,
      self.sequences,
      templates=templates,
      separators=separators,
    )
    lengths = np.asarray([len(p) for p in prompts])
    order = rng.permutation(count)
    groups = []
    for start in range(0, count, self.chunk):
      chunk = order[start : start + self.chunk]
      chunk = chunk[np.argsort(lengths[chunk], kind='stable')]
      for b in range(0, len(chunk), self.batch_size):
        groups.append(chunk[b : b + self.batch_size])
    for g in rng.permutation(len(groups)):
      yield self._batch(groups[g], prompts, lengths)

  def _batch(self, index, prompts, lengths) -> dict[str, np.ndarray]:
    width = prompts_lib.bucket_length(int(lengths[index].max()))
    ids, mask = prompts_lib.pad_prompts(
      [prompts[i] for i in index], width, rows=self.batch_size
    )
    real = len(index)
    # Filler rows get one visible token so attention is well defined.
    mask[real:, 0] = True
    targets = np.zeros((self.batch_size, self.target_tokens.shape[1]), np.int32)
    targets[:real] = self.target_tokens[index]
    target_mask = (
      np.arange(targets.shape[1])[None, :] < self.target_lengths[index][:, None]
    )
    target_mask = np.concatenate(
      [target_mask, np.zeros((self.batch_size - real, targets.shape[1]), bool)]
    )
    return {
      'input_ids': ids,
      'attention_mask': mask,
      'targets': targets,
      'target_mask': target_mask,
      'mask': np.arange(self.batch_size) < real,
    }


def evaluate_llm(
  llm: llm_lib.LLMScorer,
  sequences: Sequence[np.ndarray],
  users: np.ndarray,
  positions: np.ndarray,
  *,
  gap: int,
  num_candidates: int = 50,
  beam_size: int = 50,
  ks: Sequence[int] = (5, 10),
  batch_size: int = 64,
  log_fn: Callable[[str], None] | None = None,
) -> dict[str, float]:
  """LLM-only HR/NDCG@k and recall@K of beam-search candidate lists.

  The list of window r is generated from `sequences[user][:position - gap]`
  and judged against the target `sequences[user][position]`.
  """
  items, scores = llm_lib.generate_for_windows(
    llm,
    sequences,
    users,
    positions,
    gap=gap,
    num_candidates=num_candidates,
    beam_size=beam_size,
    batch_size=batch_size,
    log_fn=log_fn,
  )
  targets = _targets(sequences, users, positions)
  labels = items == targets[:, None]
  # Rank by beam order (scores are sorted; ranks avoid any tie).
  rank_scores = -np.broadcast_to(np.arange(num_candidates), items.shape)
  result = metrics_lib.ranking_metrics(
    rank_scores.astype(np.float32),
    labels,
    ks=tuple(sorted(set(ks) | {num_candidates})),
  )
  out = {}
  for k in ks:
    out[f'hr@{k}'] = float(result[f'hr@{k}'])
    out[f'ndcg@{k}'] = float(result[f'ndcg@{k}'])
  out[f'recall@{num_candidates}'] = float(result[f'hr@{num_candidates}'])
  out['windows'] = len(users)
  return out


@dataclasses.dataclass
class LLMRun:
  """What `train_llm` returns.

  Attributes:
    llm: the trained scorer (final parameters; numpy copies on every
      process when training ran on a mesh).
    loop: the shared loop's result (history, resume info).
    config: the training settings used.
    preset: the model size preset.
  """

  llm: llm_lib.LLMScorer
  loop: loop_lib.LoopResult
  config: LLMTrainConfig
  preset: str


def build_untrained_llm(
  *,
  num_users: int,
  num_items: int,
  preset: str = 'cpu',
  id_scheme: str = 'atomic',
  seed: int = 0,
  workdir: str | None = None,
  pretrained: str | None = None,
  config: LLMTrainConfig | None = None,
  log: Callable[[str], None] | None = None,
) -> llm_lib.LLMScorer:
  """An `LLMScorer` with freshly initialised (or imported) parameters.

  Args:
    pretrained: a local Hugging Face T5 directory (weights and tokenizer,
      e.g. t5-small); its vocabulary is resized to the tokenizer plus, for
      atomic ids, one token per item. None trains a tokenizer and starts
      from random weights of size `preset`.
  """
  from lsc_jax import hf_import

  log = log or _LOG.info
  config = config or train_config(preset)

  def tokenizer_of(workdir):
    return prompts_lib.load_or_train_tokenizer(
      num_users=num_users,
      num_items=num_items,
      workdir=workdir,
      pretrained=pretrained,
      vocab_size=config.tokenizer_vocab,
    )

  if jax.process_count() > 1 and workdir and not pretrained:
    # Several processes, one workdir: process 0 trains and saves the
    # tokenizer (or finds it), the others then load that very file.
    if jax.process_index() == 0:
      tokenizer = tokenizer_of(workdir)
    multihost_utils.sync_global_devices(f'lsc_jax tokenizer in {workdir}')
    if jax.process_index() != 0:
      tokenizer = tokenizer_of(workdir)
  else:
    tokenizer = tokenizer_of(workdir)
  identifiers = item_ids_lib.make_item_ids(id_scheme, num_items, tokenizer)
  key = jax.random.key(seed)
  if pretrained:
    t5_config, params = hf_import.load_t5(pretrained)
    t5_config, params = hf_import.resize_vocab(
      params, t5_config, identifiers.vocab_size, jax.random.fold_in(key, 7)
    )
  else:
    t5_config = t5.llm_config(preset, identifiers.vocab_size)
    params = t5.init_params(t5.build_t5(t5_config), key)
  llm = llm_lib.build_llm(
    config=t5_config,
    params=params,
    tokenizer=tokenizer,
    item_ids=identifiers,
    max_history=config.max_history,
  )
  log(
    f'llm: {preset} T5 with {t5.count_params(params):,} parameters, '
    f'{id_scheme} item ids (vocabulary {identifiers.vocab_size:,}, '
    f'identifiers up to {identifiers.max_len} tokens)'
  )
  return llm


def train_llm(
  *,
  sequences: Sequence[np.ndarray],
  num_users: int,
  num_items: int,
  split: Any,
  preset: str = 'cpu',
  id_scheme: str = 'atomic',
  seed: int = 0,
  epochs: int | None = None,
  workdir: str | None = None,
  log: Callable[[str], None] | None = None,
  config: LLMTrainConfig | None = None,
  pretrained: str | None = None,
  max_windows: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> LLMRun:
  """Trains the LLM on `split.llm_train` with the shared loop.

  Resumes from `<workdir>/checkpoints` (a finished run is restored, not
  retrained). The tokenizer lives in `<workdir>/tokenizer`.

  With a `mesh` of more than one device the step is data-parallel
  (`lsc_jax.sharding.shard_train_step`): each batch's prompts are split
  over the devices and the parameters and optimizer state replicated. The
  loss is the same mean over the batch's real rows, so the run matches the
  single-device one up to the order of floating-point sums. Every process
  of a multi-host run calls it with the same arguments.

  Args:
    sequences: per-user item sequences (items 1..num_items).
    split: a `lsc_jax.data.DeviceCloudSplit`.
    preset: model size and training preset ('smoke', 'cpu', 't5-small').
    id_scheme: 'atomic' or 'text'.
    epochs: overrides the preset's epochs.
    config: full training settings (overrides `preset`'s).
    pretrained: a local Hugging Face T5 directory to start from.
    max_windows: train on the first N windows only (quick runs, tests).
    mesh: train data-parallel over this mesh (None, or a one-device mesh
      in a one-process run: on one device).

  Raises:
    ValueError: with a mesh, a batch size that is not a multiple of the
      mesh's device count (before anything is built).
  """
  log = log or _LOG.info
  config = config or train_config(preset)
  if epochs is not None:
    config = dataclasses.replace(config, epochs=epochs)
  mesh = sharding.training_mesh(mesh)
  sharding.check_batch_size(config.batch_size, mesh, 'train_llm')
  llm = build_untrained_llm(
    num_users=num_users,
    num_items=num_items,
    preset=preset,
    id_scheme=id_scheme,
    seed=seed,
    workdir=workdir,
    pretrained=pretrained,
    config=config,
    log=log,
  )
  windows = split.llm_train
  users, positions = windows.users, windows.positions
  if max_windows is not None:
    users, positions = users[:max_windows], positions[:max_windows]
  data = PromptBatches(
    llm.prompts,
    sequences,
    users,
    positions,
    batch_size=config.batch_size,
    seed=seed,
    chunk_batches=config.chunk_batches,
  )
  total_steps = data.num_batches * config.epochs
  state = state_lib.create_train_state(
    llm.model.apply, llm.params, make_optimizer(config, total_steps), seed
  )
  if mesh is None:
    step = loop_lib.CompiledStep(
      make_train_step(llm.model), 'llm_train_step', log=log
    )
  else:
    step = sharding.shard_train_step(
      make_train_step(llm.model),
      mesh,
      state,
      example_batch(llm, config),
      name='llm_train_step',
      log=log,
    )
    state = step.place_state(state)
    log(
      f'llm: data-parallel over mesh {dict(mesh.shape)} '
      f'({jax.process_count()} processes), '
      f'{config.batch_size // mesh.size} prompts per device per step'
    )
  log(
    f'llm: training on {len(users):,} windows, {data.num_batches:,} '
    f'batches of {config.batch_size} per epoch, {config.epochs} epochs'
  )
  result = loop_lib.train_loop(
    state,
    step,
    data.batches,
    data.num_batches,
    loop_lib.LoopConfig(
      epochs=config.epochs,
      workdir=workdir,
      keep_checkpoints=config.keep_checkpoints,
      log_every_seconds=config.log_every_seconds,
      name='llm',
    ),
    metadata={
      'preset': preset,
      'id_scheme': id_scheme,
      'seed': seed,
      'train': dataclasses.asdict(config),
      'vocab_size': llm.item_ids.vocab_size,
    },
    log=log,
  )
  llm.params = result.best_params
  if mesh is not None:
    # Host copies: generation and the next stages run on any device.
    llm.params = sharding.to_host(result.best_params)
  return LLMRun(llm=llm, loop=result, config=config, preset=preset)


def save_hf(llm: llm_lib.LLMScorer, directory: str) -> None:
  """Writes the LLM as a Hugging Face T5 directory with its tokenizer.

  With atomic ids the model's vocabulary is the tokenizer's plus one token
  per item (`ItemIds.base_vocab_size + item - 1`); the saved tokenizer does
  not list those item tokens.
  """
  from lsc_jax import hf_import

  hf_import.export_t5(llm.params, llm.config, directory)
  if isinstance(llm.tokenizer, transformers.PreTrainedTokenizerBase):
    llm.tokenizer.save_pretrained(os.path.join(directory))
