"""GRU4Rec: a recurrent encoder of a user's item history.

GRU4Rec (Hidasi et al., ICLR 2016) is one of the three on-device models
(SRMs) of LSC4Rec. Differences from the official LSC4Rec code (BUILD_NOTES.md,
'Deviations from the official code'), on purpose:

- Left padding, most recent item last. The recurrent state starts at zero and
  is held unchanged over padding columns, so padding never changes it and the
  same history padded to two widths gives the same states.
- The item embedding goes straight into the GRU (with dropout); the official
  code first applies a tanh Dense layer.
- Candidates are scored by a dot product of a projected GRU state with the
  shared item embedding; the official code uses a two-layer tanh tower on
  each side.
- Flax's `GRUCell` has one bias per gate where PyTorch has an input and a
  hidden bias; their sum is the same function.

An empty (all-padding) history leaves the state at zero, so its user state is
the output projection's bias: a fixed, learned vector, the same for every
empty history, and its scores are finite (a popularity-like prior).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsc_jax.models import srm


class _MaskedGRUStep(nn.Module):
  """One GRU step that keeps the previous state where the input is padding."""

  features: int

  @nn.compact
  def __call__(self, state, inputs):
    x, real = inputs
    new_state, _ = nn.GRUCell(self.features, name='cell')(state, x)
    state = jnp.where(real[:, None], new_state, state)
    return state, state


class GRU4Rec(srm.SequenceScoring, nn.Module):
  """GRU4Rec on left-padded histories.

  Attributes:
    num_items: catalogue size; the item table has `num_items + 2` rows.
    embed_dim: width of item embeddings, GRU states and user states.
    max_len: longest history (columns) the model accepts.
    num_blocks: number of stacked GRU layers.
    dropout_rate: dropout on item embeddings and between layers.
  """

  num_items: int
  embed_dim: int = 64
  max_len: int = 50
  num_blocks: int = 1
  dropout_rate: float = 0.2

  def setup(self):
    init = nn.initializers.normal(srm.EMBEDDING_INIT_STDDEV)
    self.item_embedding = nn.Embed(
      self.num_items + 2, self.embed_dim, embedding_init=init
    )
    scan_step = nn.scan(
      _MaskedGRUStep,
      variable_broadcast='params',
      split_rngs={'params': False},
      in_axes=1,
      out_axes=1,
    )
    self.layers = [
      scan_step(self.embed_dim, name=f'gru_{i}') for i in range(self.num_blocks)
    ]
    self.dropout = nn.Dropout(self.dropout_rate)
    self.output_projection = nn.Dense(self.embed_dim)

  def _recurrent_states(self, history: jax.Array, train: bool) -> jax.Array:
    """States of the last GRU layer after every position, `[b, L, dim]`."""
    srm.check_history_shape(history, self.max_len, 'GRU4Rec')
    real = srm.padding_mask(history)
    x = self.dropout(self.item_vectors(history), deterministic=not train)

    batch = history.shape[0]
    for layer in self.layers:
      state = jnp.zeros((batch, self.embed_dim), x.dtype)
      _, x = layer(state, (x, real))
      x = self.dropout(x, deterministic=not train)
    return x

  def encode_positions(
    self, history: jax.Array, train: bool = False
  ) -> jax.Array:
    """User states after every position.

    Args:
      history: `[batch, seq_len]` left-padded item ids, most recent last,
        `seq_len <= max_len`.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      `[batch, seq_len, dim]`; column t depends only on columns 0..t.
    """
    return self.output_projection(self._recurrent_states(history, train))

  @nn.nowrap
  def is_head_parameter(self, path: tuple[str, ...]) -> bool:
    """True for the output head, the output projection.

    Args:
      path: a parameter's path as `flax.traverse_util.flatten_dict` gives
        it, with or without the leading 'params' collection.
    """
    return srm.module_path(path)[0] == 'output_projection'

  def trunk(
    self,
    history: jax.Array,
    candidates: jax.Array,
    columns: jax.Array | None = None,
  ):
    """Everything below the output head, without dropout.

    Args:
      history: `[batch, seq_len]` left-padded item ids.
      candidates: `[batch, num_candidates]` item ids, or with `columns`
        `[batch, m, num_candidates]`.
      columns: optional int `[batch, m]`: the features of the prefixes of
        `history` that end at these columns (see `srm`).

    Returns:
      A dict: 'state' `[batch, dim]` (with columns `[batch, m, dim]`), the
      last GRU layer's state after the most recent item; 'candidates'
      `[batch, num_candidates, dim]` (`[batch, m, num_candidates, dim]`)
      candidate item embeddings.
    """
    states = self._recurrent_states(history, train=False)
    if columns is None:
      srm.check_candidates_shape(history, candidates, 'GRU4Rec')
      state = states[:, -1]
    else:
      srm.check_columns(history, candidates, columns, 'GRU4Rec')
      state = srm.gather_columns(states, columns)
    return {'state': state, 'candidates': self.item_vectors(candidates)}

  def head(self, features) -> jax.Array:
    """The output head on `trunk` features: `[..., num_candidates]`."""
    user = self.output_projection(features['state'])
    return jnp.einsum('...d,...cd->...c', user, features['candidates'])
