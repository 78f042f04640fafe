"""DIN: target attention from each candidate over the history.

DIN (Zhou et al., KDD 2018) is one of the three on-device models (SRMs) of
LSC4Rec. Its attention depends on the candidate, so a history cannot be
encoded once into one vector; instead the history's keys and values are
computed once and the candidate side is vectorised over all candidates
(`[batch, num_candidates, ...]`), never re-encoding the history per candidate
as the official code does.

Differences from the official LSC4Rec code (BUILD_NOTES.md, 'Deviations from
the official code'), on purpose:

- Left padding, most recent item last, and a learned recency embedding
  (0 = the most recent item) added to the history before attention; the
  official DIN has no notion of order.
- Item embeddings are used directly (the official code applies a tanh Dense
  to both sides first). Hidden activations are ReLU (official: tanh).
- The value projection is folded into the scoring MLP's first layer. The
  official MLP reads [candidate; pooled history]; its first layer is linear,
  so `W [e; sum_l a_l v_l] = W_c e + sum_l a_l (W_h v_l)`. Here `u_l` (the
  history's part, `[batch, seq_len, hidden]`) is computed once per history
  and `W_c e` once per item, so a (history, item) pair costs
  O(seq_len * (dim + hidden)) plus the later MLP layers, which is what
  makes full-catalogue scoring affordable.

An empty (all-padding) history has no key to attend to; its pooled history
is defined as the zero vector (not a softmax over nothing), so its scores are
finite and depend on the candidate alone, the same for every empty history.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsc_jax.models import srm


class DIN(nn.Module):
  """DIN with dot-product target attention and a padding mask.

  Attributes:
    num_items: catalogue size; the item table has `num_items + 2` rows.
    embed_dim: width of item embeddings and attention features.
    max_len: longest history (columns) the model accepts.
    mlp_dims: hidden widths of the scoring MLP (at least one).
    dropout_rate: dropout on history embeddings and MLP hidden layers.
    score_chunk: items scored per chunk by `score_all`, which bounds the
      `[batch, score_chunk, seq_len]` and `[batch, score_chunk, hidden]`
      activations held at once.
  """

  num_items: int
  embed_dim: int = 64
  max_len: int = 50
  mlp_dims: Sequence[int] = (64, 32)
  dropout_rate: float = 0.2
  score_chunk: int = 2048

  def setup(self):
    if not self.mlp_dims:
      raise ValueError('DIN: mlp_dims needs at least one hidden width')
    init = nn.initializers.normal(srm.EMBEDDING_INIT_STDDEV)
    self.item_embedding = nn.Embed(
      self.num_items + 2, self.embed_dim, embedding_init=init
    )
    self.recency_embedding = nn.Embed(
      self.max_len, self.embed_dim, embedding_init=init
    )
    self.query = nn.Dense(self.embed_dim, use_bias=False)
    self.key = nn.Dense(self.embed_dim, use_bias=False)
    first = self.mlp_dims[0]
    self.candidate_in = nn.Dense(first)
    self.history_in = nn.Dense(first, use_bias=False)
    self.hidden = [nn.Dense(width) for width in self.mlp_dims[1:]]
    self.output = nn.Dense(1)
    self.dropout = nn.Dropout(self.dropout_rate)

  def item_vectors(self, item_ids: jax.Array) -> jax.Array:
    """Item embeddings `[..., dim]` of checked ids `[...]` (OOV mapped)."""
    mapped, _ = srm.check_item_ids(item_ids, self.num_items)
    return self.item_embedding(mapped)

  def _history_vectors(self, history: jax.Array, train: bool):
    """History embeddings plus recency, and where the real items are.

    Returns:
      (h `[batch, seq_len, dim]`, real `[batch, seq_len]` booleans).
    """
    srm.check_history_shape(history, self.max_len, 'DIN')
    real = srm.padding_mask(history)
    seq_len = history.shape[1]
    recency = jnp.arange(seq_len - 1, -1, -1)
    h = self.item_vectors(history) + self.recency_embedding(recency)[None]
    return self.dropout(h, deterministic=not train), real

  def encode_history(self, history: jax.Array, train: bool = False):
    """Attention keys and MLP inputs of a history, computed once.

    Args:
      history: `[batch, seq_len]` left-padded item ids, most recent last.
      train: enables dropout.

    Returns:
      (keys `[batch, seq_len, dim]`, history part of the first MLP layer
      `[batch, seq_len, hidden]`, real `[batch, seq_len]` booleans).
    """
    h, real = self._history_vectors(history, train)
    return self.key(h), self.history_in(h), real

  def _attention_weights(self, logits: jax.Array, real: jax.Array):
    """Softmax over the real keys of `[batch, C, seq_len]` query-key dots.

    An all-padding row gets all-zero weights (it pools to zero).
    """
    logits = logits / jnp.sqrt(jnp.float32(self.embed_dim))
    key_real = real[:, None, :]
    logits = jnp.where(key_real, logits, -1e30)
    weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    weights = jnp.where(key_real, weights, 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)

  def _mlp(self, x: jax.Array, train: bool) -> jax.Array:
    """The scoring MLP after its first (linear) layer: `[..., C]` logits."""
    x = self.dropout(nn.relu(x), deterministic=not train)
    for layer in self.hidden:
      x = self.dropout(nn.relu(layer(x)), deterministic=not train)
    return self.output(x)[..., 0]

  def _score(self, encoded, candidate_vectors: jax.Array, train: bool):
    """Scores candidate embeddings against an encoded history.

    Args:
      encoded: output of `encode_history`.
      candidate_vectors: `[batch, num_candidates, dim]` or, shared by all
        rows, `[num_candidates, dim]`.
      train: enables dropout.

    Returns:
      `[batch, num_candidates]` logits.
    """
    keys, history_part, real = encoded
    queries = self.query(candidate_vectors)
    candidate_part = self.candidate_in(candidate_vectors)
    if candidate_vectors.ndim == 2:
      logits = jnp.einsum('cd,bld->bcl', queries, keys)
      candidate_part = candidate_part[None]
    else:
      logits = jnp.einsum('bcd,bld->bcl', queries, keys)
    weights = self._attention_weights(logits, real)
    x = candidate_part + jnp.einsum('bcl,blh->bch', weights, history_part)
    return self._mlp(x, train)

  @nn.nowrap
  def is_head_parameter(self, path: tuple[str, ...]) -> bool:
    """True for the output head: the scoring MLP after target attention.

    Args:
      path: a parameter's path as `flax.traverse_util.flatten_dict` gives
        it, with or without the leading 'params' collection.
    """
    name = srm.module_path(path)[0]
    return name in ('candidate_in', 'history_in', 'output') or (
      name.startswith('hidden_')
    )

  def trunk(self, history: jax.Array, candidates: jax.Array):
    """Target attention, everything below the scoring MLP, no dropout.

    The MLP's first layer is linear, so it may pool the history embeddings
    first and project the pooled vector (`__call__` projects, then pools;
    the two agree up to rounding).

    Args:
      history: `[batch, seq_len]` left-padded item ids.
      candidates: `[batch, num_candidates]` item ids.

    Returns:
      A dict: 'candidates' `[batch, num_candidates, dim]` candidate item
      embeddings; 'pooled' `[batch, num_candidates, dim]` the history
      embeddings pooled by each candidate's attention weights.
    """
    srm.check_candidates_shape(history, candidates, 'DIN')
    h, real = self._history_vectors(history, train=False)
    candidate_vectors = self.item_vectors(candidates)
    logits = jnp.einsum(
      'bcd,bld->bcl', self.query(candidate_vectors), self.key(h)
    )
    weights = self._attention_weights(logits, real)
    return {
      'candidates': candidate_vectors,
      'pooled': jnp.einsum('bcl,bld->bcd', weights, h),
    }

  def head(self, features) -> jax.Array:
    """The scoring MLP on `trunk` features: `[batch, num_candidates]`."""
    x = self.candidate_in(features['candidates'])
    x = x + self.history_in(features['pooled'])
    return self._mlp(x, train=False)

  def __call__(
    self, history: jax.Array, candidates: jax.Array, train: bool = False
  ) -> jax.Array:
    """Scores `[batch, num_candidates]` candidates: `[batch, C]` logits."""
    srm.check_candidates_shape(history, candidates, 'DIN')
    encoded = self.encode_history(history, train=train)
    return self._score(encoded, self.item_vectors(candidates), train)

  def score_all(self, history: jax.Array, train: bool = False) -> jax.Array:
    """Scores every item, `score_chunk` items at a time.

    Returns:
      `[batch, num_items + 1]` logits; column 0 (padding) is -inf.
    """
    encoded = self.encode_history(history, train=train)
    table = self.item_embedding.embedding[: self.num_items + 1]
    chunks = [
      self._score(encoded, table[start : start + self.score_chunk], train)
      for start in range(0, self.num_items + 1, self.score_chunk)
    ]
    return srm.mask_padding_column(jnp.concatenate(chunks, axis=-1))
