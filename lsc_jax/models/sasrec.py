"""SASRec: causal self-attention over a user's item history.

SASRec (Kang and McAuley, ICDM 2018) is one of the three on-device models
(SRMs) of LSC4Rec. This port differs from the official LSC4Rec code on
purpose (see the method notes, section 4.2):

- Causal + padding attention mask. A position attends to itself and the real
  items before it, never to padding or to later items. The official code uses
  no mask at all, so padding takes part in attention.
- Left padding, most recent item in the last column; the user state is the
  last column. The official code right-pads and gathers the last real item.
- Positions count real items from the oldest one kept (0 = oldest), so the
  same history padded to two widths gives the same encodings, and the
  encoding after item t of a long history equals the encoding of the prefix
  ending at t (what next-item training at every position relies on).
- Pre-LN blocks (LayerNorm before attention and before the feed-forward,
  residual around each, a final LayerNorm), as the original SASRec; the
  official LSC4Rec code uses one post-LN PyTorch encoder layer. The
  feed-forward uses GELU (official: ReLU) and is `ff_dim` wide.
- The input is `sqrt(dim) * E[item] + P[position]`, as the original SASRec;
  the official code uses `tanh(W (E[item] + P[position]) + b)`.
- Candidates are scored by a dot product with the shared item embedding; the
  official code passes candidate embeddings through a two-layer tanh tower.

An empty (all-padding) history has no real item to attend to. Padding
columns are held at exactly zero through every block, so its user state is
the final LayerNorm of a zero vector, i.e. that LayerNorm's bias: a fixed,
learned vector, the same for every empty history. Its scores are finite and
rank items by their dot product with that vector, a popularity-like prior.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsc_jax.models import srm


class SASRecBlock(nn.Module):
  """One pre-LN transformer block on `[batch, seq_len, dim]` states."""

  embed_dim: int
  num_heads: int
  ff_dim: int
  dropout_rate: float

  @nn.compact
  def __call__(
    self, x: jax.Array, attention_mask: jax.Array, train: bool
  ) -> jax.Array:
    """Applies the block.

    Args:
      x: `[batch, seq_len, dim]` states, exactly zero at padding.
      attention_mask: `[batch, 1, seq_len, seq_len]` booleans, True where
        query i may attend to key j.
      train: enables dropout.

    Returns:
      `[batch, seq_len, dim]` states (not yet re-zeroed at padding).
    """
    deterministic = not train
    h = nn.LayerNorm(name='attention_norm')(x)
    h = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      qkv_features=self.embed_dim,
      out_features=self.embed_dim,
      dropout_rate=self.dropout_rate,
      deterministic=deterministic,
      name='attention',
    )(h, h, mask=attention_mask)
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)

    h = nn.LayerNorm(name='feed_forward_norm')(x)
    h = nn.Dense(self.ff_dim, name='feed_forward_in')(h)
    h = nn.gelu(h)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = nn.Dense(self.embed_dim, name='feed_forward_out')(h)
    return x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


class SASRec(srm.SequenceScoring, nn.Module):
  """SASRec with causal + padding masks and left-padded histories.

  Attributes:
    num_items: catalogue size; the item table has `num_items + 2` rows.
    embed_dim: width of item, position and hidden states.
    max_len: longest history (columns) the model accepts.
    num_blocks: number of transformer blocks.
    num_heads: attention heads per block.
    ff_dim: feed-forward width (None: `embed_dim`, as the original SASRec).
    dropout_rate: dropout on embeddings, attention weights and residuals.
  """

  num_items: int
  embed_dim: int = 64
  max_len: int = 50
  num_blocks: int = 2
  num_heads: int = 1
  ff_dim: int | None = None
  dropout_rate: float = 0.2

  def setup(self):
    init = nn.initializers.normal(srm.EMBEDDING_INIT_STDDEV)
    self.item_embedding = nn.Embed(
      self.num_items + 2, self.embed_dim, embedding_init=init
    )
    self.position_embedding = nn.Embed(
      self.max_len, self.embed_dim, embedding_init=init
    )
    self.input_dropout = nn.Dropout(self.dropout_rate)
    self.blocks = [
      SASRecBlock(
        embed_dim=self.embed_dim,
        num_heads=self.num_heads,
        ff_dim=self.ff_dim or self.embed_dim,
        dropout_rate=self.dropout_rate,
      )
      for _ in range(self.num_blocks)
    ]
    self.final_norm = nn.LayerNorm()

  def encode_positions(
    self, history: jax.Array, train: bool = False
  ) -> jax.Array:
    """User states after every position.

    Args:
      history: `[batch, seq_len]` left-padded item ids, most recent last,
        `seq_len <= max_len`.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      `[batch, seq_len, dim]`; column t depends only on the items in columns
      0..t. Padding columns hold the final LayerNorm's bias.
    """
    srm.check_history_shape(history, self.max_len, 'SASRec')
    real = srm.padding_mask(history)
    real_f = real[..., None].astype(jnp.float32)

    # Position 0 is the oldest real item kept; padding gets position 0 too
    # but is zeroed below.
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
    # Item embeddings are scaled by sqrt(dim), as in the original SASRec.
    scale = jnp.sqrt(jnp.float32(self.embed_dim))
    x = self.item_vectors(history) * scale + self.position_embedding(positions)
    x = self.input_dropout(x * real_f, deterministic=not train)

    # Query i attends to real keys j <= i, and always to itself, so a
    # padding query has one key and the softmax never sees an empty row.
    seq_len = history.shape[1]
    causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    allowed = causal[None] & real[:, None, :]
    allowed = allowed | jnp.eye(seq_len, dtype=bool)[None]
    attention_mask = allowed[:, None]

    for block in self.blocks:
      x = block(x, attention_mask, train) * real_f
    return self.final_norm(x)
