"""Builds on-device recommendation models (SRMs) by name and preset.

`make_srm('sasrec', num_items=12101, preset='cpu')` returns a Flax module
with one interface for all three SRMs:

- `model.apply(params, history [B, L], candidates [B, C])` -> `[B, C]`,
- `model.apply(params, history, method='score_all')` -> `[B, num_items + 1]`.

A preset (`SRMConfig`) holds the model's sizes and its training
hyper-parameters together:

- `paper`: the sizes of the LSC4Rec paper's code (embedding 32, history 10,
  one block), trained as it does (1 positive + 4 random negatives, BCE).
- `cpu` (default): embedding 64, history 50, two blocks, next-item training
  at every position with full cross-entropy for the causal models; sized to
  train in minutes on two CPU cores.
- `smoke`: tiny, for tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn

from lsc_jax.models.din import DIN
from lsc_jax.models.gru4rec import GRU4Rec
from lsc_jax.models.sasrec import SASRec

SRM_NAMES = ('sasrec', 'gru4rec', 'din')
PRESETS = ('paper', 'cpu', 'smoke')

# Training objectives. 'next_item': every position of a causal model's
# history predicts the item after it (SASRec, GRU4Rec). 'last_item': one
# target per window (the paper's way; the only one DIN supports).
OBJECTIVES = ('next_item', 'last_item')
LOSSES = ('bce', 'sampled_softmax', 'full_ce')


@dataclasses.dataclass(frozen=True)
class SRMConfig:
  """Model sizes and training hyper-parameters of one SRM.

  Model fields:
    embed_dim: width of item embeddings and hidden states.
    max_len: history length (most recent items kept).
    num_blocks: transformer blocks (SASRec) or GRU layers (GRU4Rec).
    num_heads: attention heads (SASRec).
    ff_dim: SASRec feed-forward width (None: embed_dim).
    mlp_dims: DIN scoring MLP hidden widths.
    dropout_rate: dropout rate.

  Training fields:
    objective: 'next_item' or 'last_item' (see OBJECTIVES).
    loss: 'bce' (1 positive + num_negatives, the paper's), 'sampled_softmax'
      or 'full_ce' (cross-entropy over the whole catalogue).
    num_negatives: random negatives per target for 'bce' and
      'sampled_softmax'.
    shared_negatives: with objective 'next_item', draw one set of
      num_negatives for the whole batch instead of a set per target.
    learning_rate, weight_decay: Adam(W) settings.
    batch_size: histories per training step.
    epochs: most epochs to train.
    patience: epochs without a better validation metric before stopping.
    early_stop_metric: validation metric for early stopping and best
      parameters (full ranking).
    bucket_edges: history widths that batches are padded to.
    eval_batch_size: histories per evaluation step.
    valid_max_windows: early-stop on a fixed random subset of this many
      validation windows (None: all). Keeps full-ranking validation of DIN,
      whose scoring is per (history, item) pair, affordable on a CPU.
  """

  embed_dim: int = 64
  max_len: int = 50
  num_blocks: int = 2
  num_heads: int = 1
  ff_dim: int | None = None
  mlp_dims: Sequence[int] = (128, 64)
  dropout_rate: float = 0.2
  objective: str = 'next_item'
  loss: str = 'full_ce'
  num_negatives: int = 4
  shared_negatives: bool = False
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  batch_size: int = 128
  epochs: int = 50
  patience: int = 5
  early_stop_metric: str = 'ndcg@10'
  bucket_edges: Sequence[int] = (5, 10, 20, 50)
  eval_batch_size: int = 256
  valid_max_windows: int | None = None

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(
        f'SRMConfig.objective: expected one of {OBJECTIVES}, got '
        f'{self.objective!r}'
      )
    if self.loss not in LOSSES:
      raise ValueError(
        f'SRMConfig.loss: expected one of {LOSSES}, got {self.loss!r}'
      )
    edges = tuple(self.bucket_edges)
    if not edges or list(edges) != sorted(set(edges)) or edges[0] < 1:
      raise ValueError(
        'SRMConfig.bucket_edges: expected increasing positive widths, got '
        f'{edges}'
      )
    if edges[-1] != self.max_len:
      raise ValueError(
        f'SRMConfig.bucket_edges: the last edge ({edges[-1]}) must equal '
        f'max_len ({self.max_len})'
      )
    object.__setattr__(self, 'bucket_edges', edges)
    object.__setattr__(self, 'mlp_dims', tuple(self.mlp_dims))

  def to_dict(self) -> dict:
    """Returns the fields as JSON-friendly values."""
    return {
      k: list(v) if isinstance(v, tuple) else v
      for k, v in dataclasses.asdict(self).items()
    }


_PRESETS = {
  'paper': dict(
    embed_dim=32,
    max_len=10,
    num_blocks=1,
    num_heads=4,
    ff_dim=128,
    mlp_dims=(128, 64),
    dropout_rate=0.0,
    objective='last_item',
    loss='bce',
    num_negatives=4,
    learning_rate=1e-3,
    batch_size=128,
    epochs=10,
    patience=10,
    bucket_edges=(10,),
  ),
  'cpu': dict(
    embed_dim=64,
    max_len=50,
    num_blocks=2,
    num_heads=1,
    dropout_rate=0.3,
    objective='next_item',
    loss='full_ce',
    learning_rate=3e-3,
    batch_size=128,
    epochs=15,
    patience=2,
    bucket_edges=(3, 5, 8, 12, 20, 30, 50),
  ),
  'smoke': dict(
    embed_dim=16,
    max_len=12,
    num_blocks=1,
    num_heads=2,
    mlp_dims=(16,),
    dropout_rate=0.1,
    objective='next_item',
    loss='full_ce',
    learning_rate=3e-3,
    batch_size=32,
    epochs=2,
    patience=2,
    # One width: tests and smoke runs compile each step once.
    bucket_edges=(12,),
    eval_batch_size=64,
  ),
}

# Per-model changes to a preset. DIN's attention depends on the candidate,
# so it trains on one target per window against sampled negatives.
_MODEL_OVERRIDES = {
  ('gru4rec', 'cpu'): dict(num_blocks=1),
  ('din', 'cpu'): dict(
    mlp_dims=(64, 32),
    objective='last_item',
    loss='sampled_softmax',
    num_negatives=100,
    learning_rate=2e-3,
    batch_size=256,
    epochs=10,
    dropout_rate=0.2,
    eval_batch_size=64,
    valid_max_windows=4000,
  ),
  ('din', 'smoke'): dict(objective='last_item', loss='sampled_softmax'),
}


def get_srm_config(name: str, preset: str = 'cpu', **overrides) -> SRMConfig:
  """Returns the `SRMConfig` of model `name` under `preset`, with overrides.

  Raises:
    ValueError: for an unknown model, preset or field, or a DIN config with
      objective 'next_item' (DIN has no per-position encoding).
  """
  if name not in SRM_NAMES:
    raise ValueError(f'unknown SRM {name!r}; expected one of {SRM_NAMES}')
  if preset not in _PRESETS:
    raise ValueError(f'unknown SRM preset {preset!r}; expected {PRESETS}')
  fields = {f.name for f in dataclasses.fields(SRMConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
      f'unknown SRMConfig fields {unknown}; expected some of {sorted(fields)}'
    )
  values = dict(_PRESETS[preset])
  values.update(_MODEL_OVERRIDES.get((name, preset), {}))
  values.update(overrides)
  if 'max_len' in overrides and 'bucket_edges' not in overrides:
    # Keep the preset's edges below the new width and end at it.
    edges = [e for e in values['bucket_edges'] if e < overrides['max_len']]
    values['bucket_edges'] = (*edges, overrides['max_len'])
  config = SRMConfig(**values)
  if name == 'din' and config.objective == 'next_item':
    raise ValueError(
      "DIN has no per-position encoding: use objective='last_item'"
    )
  return config


def srm_from_config(name: str, num_items: int, config: SRMConfig) -> nn.Module:
  """Builds the Flax module of model `name` from a config."""
  if name == 'sasrec':
    return SASRec(
      num_items=num_items,
      embed_dim=config.embed_dim,
      max_len=config.max_len,
      num_blocks=config.num_blocks,
      num_heads=config.num_heads,
      ff_dim=config.ff_dim,
      dropout_rate=config.dropout_rate,
    )
  if name == 'gru4rec':
    return GRU4Rec(
      num_items=num_items,
      embed_dim=config.embed_dim,
      max_len=config.max_len,
      num_blocks=config.num_blocks,
      dropout_rate=config.dropout_rate,
    )
  if name == 'din':
    return DIN(
      num_items=num_items,
      embed_dim=config.embed_dim,
      max_len=config.max_len,
      mlp_dims=config.mlp_dims,
      dropout_rate=config.dropout_rate,
    )
  raise ValueError(f'unknown SRM {name!r}; expected one of {SRM_NAMES}')


def make_srm(
  name: str, *, num_items: int, preset: str = 'cpu', **overrides
) -> nn.Module:
  """Builds SRM `name` ('sasrec', 'gru4rec', 'din') for `num_items` items.

  `overrides` may name any `SRMConfig` field; training fields are accepted
  and ignored here (see `get_srm_config`).
  """
  if not isinstance(num_items, int) or num_items < 1:
    raise ValueError(
      f'make_srm: num_items must be a positive int, got {num_items!r}'
    )
  return srm_from_config(
    name, num_items, get_srm_config(name, preset, **overrides)
  )
