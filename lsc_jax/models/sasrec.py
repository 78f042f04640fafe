"""SASRec: causal self-attention over a user's item history.

SASRec (Kang and McAuley, ICDM 2018) is one of the three on-device models
(SRMs) of LSC4Rec. This port differs from the official LSC4Rec code on
purpose (see BUILD_NOTES.md, 'Deviations from the official code'):

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
  """One pre-LN transformer block on `[batch, seq_len, dim]` states.

  The attention and feed-forward sub-layers are separate methods so that
  the feed-forward one can run alone: the last block's feed-forward is
  part of SASRec's output head (see `SASRec.head`).
  """

  embed_dim: int
  num_heads: int
  ff_dim: int
  dropout_rate: float

  def setup(self):
    self.attention_norm = nn.LayerNorm()
    self.attention = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      qkv_features=self.embed_dim,
      out_features=self.embed_dim,
      dropout_rate=self.dropout_rate,
    )
    self.feed_forward_norm = nn.LayerNorm()
    self.feed_forward_in = nn.Dense(self.ff_dim)
    self.feed_forward_out = nn.Dense(self.embed_dim)
    # NOTE: these are the names Flax gave the dropouts when this block was
    # written as one `nn.compact` method; dropout masks are drawn from keys
    # folded with the module name, so keeping them keeps training runs
    # identical to that form.
    self.Dropout_0 = nn.Dropout(self.dropout_rate)
    self.Dropout_1 = nn.Dropout(self.dropout_rate)
    self.Dropout_2 = nn.Dropout(self.dropout_rate)

  def attend(
    self,
    x: jax.Array,
    attention_mask: jax.Array,
    train: bool,
    columns: jax.Array | None = None,
  ) -> jax.Array:
    """The attention sub-layer with its residual, `[batch, seq_len, dim]`.

    Args:
      x: `[batch, seq_len, dim]` states, exactly zero at padding.
      attention_mask: `[batch, 1, seq_len, seq_len]` booleans, True where
        query i may attend to key j.
      train: enables dropout.
      columns: optional int `[batch, m]`: compute these query columns only
        (every column is still a key); returns `[batch, m, dim]`.
    """
    deterministic = not train
    h = self.attention_norm(x)
    queries = h
    if columns is not None:
      x = srm.gather_columns(x, columns)
      queries = srm.gather_columns(h, columns)
      # Rows of the mask: `[batch, 1, m, seq_len]`.
      attention_mask = jnp.take_along_axis(
        attention_mask, columns[:, None, :, None], axis=2
      )
    h = self.attention(
      queries, h, mask=attention_mask, deterministic=deterministic
    )
    return x + self.Dropout_0(h, deterministic=deterministic)

  def feed_forward(self, x: jax.Array, train: bool) -> jax.Array:
    """The position-wise feed-forward sub-layer with its residual.

    Args:
      x: `[..., dim]` states (any leading axes: it acts per position).
      train: enables dropout.
    """
    deterministic = not train
    h = self.feed_forward_norm(x)
    h = self.feed_forward_in(h)
    h = nn.gelu(h)
    h = self.Dropout_1(h, deterministic=deterministic)
    h = self.feed_forward_out(h)
    return x + self.Dropout_2(h, deterministic=deterministic)

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
    return self.feed_forward(self.attend(x, attention_mask, train), train)


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

  def _embed(self, history: jax.Array, train: bool):
    """Block inputs of a history, with its padding and attention masks.

    Returns:
      (x `[batch, seq_len, dim]` zero at padding, real_f `[batch, seq_len,
      1]` 1.0 at real items, attention_mask `[batch, 1, seq_len,
      seq_len]`).
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
    return x, real_f, allowed[:, None]

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
    x, real_f, attention_mask = self._embed(history, train)
    for block in self.blocks:
      x = block(x, attention_mask, train) * real_f
    return self.final_norm(x)

  @nn.nowrap
  def is_head_parameter(self, path: tuple[str, ...]) -> bool:
    """True for the output head: last block's feed-forward, final norm.

    Args:
      path: a parameter's path as `flax.traverse_util.flatten_dict` gives
        it, with or without the leading 'params' collection.
    """
    names = srm.module_path(path)
    last = f'blocks_{self.num_blocks - 1}'
    if names[0] == 'final_norm':
      return True
    return names[0] == last and names[1].startswith('feed_forward')

  def trunk(
    self,
    history: jax.Array,
    candidates: jax.Array,
    columns: jax.Array | None = None,
  ):
    """Everything below the output head, without dropout.

    The head is position-wise, so the last block's attention computes only
    the queries of the columns whose states are wanted: the last one, or
    `columns`.

    Args:
      history: `[batch, seq_len]` left-padded item ids.
      candidates: `[batch, num_candidates]` item ids, or with `columns`
        `[batch, m, num_candidates]`.
      columns: optional int `[batch, m]`: the features of the prefixes of
        `history` that end at these columns (see `srm`).

    Returns:
      A dict: 'state' `[batch, dim]` (with columns `[batch, m, dim]`), the
      last column after the last block's attention sub-layer; 'real'
      `[batch, 1]` (`[batch, m, 1]`), 1.0 where that column is a real item;
      'candidates' `[batch, num_candidates, dim]` (`[batch, m,
      num_candidates, dim]`) candidate item embeddings.
    """
    picked = columns
    if columns is None:
      srm.check_candidates_shape(history, candidates, 'SASRec')
      picked = jnp.full((history.shape[0], 1), history.shape[1] - 1)
    else:
      srm.check_columns(history, candidates, columns, 'SASRec')
    x, real_f, attention_mask = self._embed(history, train=False)
    for block in self.blocks[:-1]:
      x = block(x, attention_mask, False) * real_f
    if self.blocks:
      x = self.blocks[-1].attend(x, attention_mask, False, columns=picked)
    else:
      x = srm.gather_columns(x, picked)
    features = {'state': x, 'real': srm.gather_columns(real_f, picked)}
    if columns is None:
      features = {k: v[:, 0] for k, v in features.items()}
    features['candidates'] = self.item_vectors(candidates)
    return features

  def head(self, features) -> jax.Array:
    """The output head on `trunk` features: `[..., num_candidates]`."""
    x = features['state']
    if self.blocks:
      x = self.blocks[-1].feed_forward(x, False)
    user = self.final_norm(x * features['real'])
    return jnp.einsum('...d,...cd->...c', user, features['candidates'])
