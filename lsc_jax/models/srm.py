"""Pieces shared by the on-device recommendation models (SRMs).

Every SRM in `lsc_jax.models` (SASRec, GRU4Rec, DIN) reads item ids through
the same vocabulary:

- row 0 of the item table is padding (histories are left-padded with 0),
- rows 1..num_items are the catalogue items,
- row num_items + 1 is the out-of-vocabulary (OOV) row.

JAX clamps (and, for negative indices, wraps) out-of-range gather indices
silently, so an unknown id would borrow another item's embedding. Every id
that enters a model is therefore mapped by `check_item_ids` first: ids below 0
or above num_items go to the OOV row, and the number of such ids is returned
so the caller-facing paths (training and evaluation) can count and log them.

The sequence models (SASRec, GRU4Rec) share `SequenceScoring`: they encode a
history once into a user state `[batch, dim]` and score any number of
candidates by a dot product with the candidates' item embeddings.

Every SRM also splits into a trunk and an output head, for per-device
adaptation (`lsc_jax.collab.adapt`), which fine-tunes the head only:

- `trunk(history, candidates) -> features` computes everything below the
  head (no dropout) and reads no head parameter,
- `head(features) -> [batch, num_candidates]` logits reads the head's
  parameters (and no item table: candidate embeddings are in `features`;
  every leaf of `features` has the batch axis first),
- `is_head_parameter(path)` names the head's parameters,

and `head(trunk(history, candidates))` equals the model's evaluation-mode
`__call__(history, candidates)` up to floating-point rounding.

The causal models (`SequenceScoring`: SASRec, GRU4Rec) also take
`trunk(history, candidates, columns)`: the features of the prefixes of each
history that end at the given columns, from one pass over the history. The
state at column t equals the state of the prefix history ending at t
whenever both keep the same oldest item (no truncation in between), so a
device whose recent windows are prefixes of its evaluation history encodes
that history once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Histories are left-padded with this id; it is also row 0 of the item table.
PADDING_ID = 0

# Default initialiser of item tables: a small normal, as in common SASRec
# ports (the official LSC4Rec code uses Xavier-uniform over the whole table,
# whose bound sqrt(6 / (rows + dim)) is of the same size).
EMBEDDING_INIT_STDDEV = 0.02


def oov_id(num_items: int) -> int:
  """Returns the id of the out-of-vocabulary row, `num_items + 1`."""
  return num_items + 1


def check_item_ids(ids, num_items: int):
  """Maps ids outside [0, num_items] to the out-of-vocabulary row.

  Args:
    ids: integer item ids of any shape, a numpy or a JAX array (also inside
      `jax.jit`). 0 is padding; 1..num_items are items.
    num_items: size of the catalogue.

  Returns:
    (mapped, num_oov): `mapped` has the shape and array type of `ids`, with
    every id < 0 or > num_items replaced by `num_items + 1`; `num_oov` is the
    number of ids replaced (a Python int for numpy input, a scalar int32 JAX
    array for JAX input).

  Raises:
    TypeError: if `ids` is not an integer array.
    ValueError: if `num_items` is not a positive integer.
  """
  if not isinstance(num_items, int | np.integer) or num_items < 1:
    raise ValueError(
      f'check_item_ids: num_items must be a positive int, got {num_items!r}'
    )
  if isinstance(ids, np.ndarray | np.integer):
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(
        f'check_item_ids: item ids must be integers, got dtype {ids.dtype}'
      )
    unknown = (ids < 0) | (ids > num_items)
    mapped = np.where(unknown, oov_id(num_items), ids).astype(ids.dtype)
    return mapped, int(unknown.sum())

  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(
      f'check_item_ids: item ids must be integers, got dtype {ids.dtype}'
    )
  unknown = (ids < 0) | (ids > num_items)
  mapped = jnp.where(unknown, oov_id(num_items), ids).astype(ids.dtype)
  return mapped, jnp.sum(unknown, dtype=jnp.int32)


def check_history_shape(history, max_len: int, model: str) -> None:
  """Raises a ValueError unless `history` is `[batch, seq_len <= max_len]`."""
  if history.ndim != 2:
    raise ValueError(
      f'{model}: history must be [batch, seq_len], got shape {history.shape}'
    )
  if history.shape[1] > max_len:
    raise ValueError(
      f'{model}: history has {history.shape[1]} columns but the model was '
      f'built for at most max_len={max_len}; keep the most recent max_len '
      'items (left-padded) before calling it'
    )


def check_candidates_shape(history, candidates, model: str) -> None:
  """Raises a ValueError unless `candidates` is `[batch, num_candidates]`."""
  if candidates.ndim != 2 or candidates.shape[0] != history.shape[0]:
    raise ValueError(
      f'{model}: candidates must be [batch, num_candidates] with the batch '
      f'of history {history.shape}, got shape {candidates.shape}'
    )


def module_path(path: tuple[str, ...]) -> tuple[str, ...]:
  """A parameter path without its leading 'params' collection, if any.

  `flax.traverse_util.flatten_dict` of `model.init(...)` output gives paths
  like ('params', 'final_norm', 'scale'); of `params['params']`, paths
  like ('final_norm', 'scale'). Both map to the second form.
  """
  path = tuple(path)
  return path[1:] if path and path[0] == 'params' else path


def mask_padding_column(scores: jax.Array) -> jax.Array:
  """Sets column 0 (the padding id) of `[..., num_items + 1]` to -inf."""
  return scores.at[..., PADDING_ID].set(-jnp.inf)


def padding_mask(history: jax.Array) -> jax.Array:
  """Returns `[batch, seq_len]` booleans, True where a real item is."""
  return history != PADDING_ID


def check_columns(history, candidates, columns, model: str) -> None:
  """Raises a ValueError unless `columns` `[batch, m]` and `candidates`
  `[batch, m, num_candidates]` fit `history` `[batch, seq_len]`."""
  if columns.ndim != 2 or columns.shape[0] != history.shape[0]:
    raise ValueError(
      f'{model}: columns must be [batch, m] with the batch of history '
      f'{history.shape}, got shape {columns.shape}'
    )
  if candidates.ndim != 3 or candidates.shape[:2] != columns.shape:
    raise ValueError(
      f'{model}: with columns {columns.shape}, candidates must be '
      f'[batch, m, num_candidates], got shape {candidates.shape}'
    )


def gather_columns(x: jax.Array, columns: jax.Array) -> jax.Array:
  """`x[b, columns[b, j]]`: `[batch, seq_len, ...]` -> `[batch, m, ...]`.

  Column values are traced, so they cannot be checked here: a column
  outside [0, seq_len) gives NaN (floating `x`), never another column's
  value (negative columns do not wrap around).
  """
  columns = jnp.where(columns < 0, x.shape[1], columns)
  index = columns.reshape(columns.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1, mode='fill')


class SequenceScoring:
  """Scoring methods for SRMs that encode a history into one user state.

  A subclass (a Flax linen module) defines `self.item_embedding` (an
  `nn.Embed` with `num_items + 2` rows), the attribute `num_items`, and
  `encode_positions(history, train) -> [batch, seq_len, dim]`, the user state
  after each position (causal: position t sees items 0..t only). The state
  used to score candidates is the one at the last column, which holds the
  most recent item because histories are left-padded.
  """

  def item_vectors(self, item_ids: jax.Array) -> jax.Array:
    """Item embeddings `[..., dim]` of checked ids `[...]` (OOV mapped)."""
    mapped, _ = check_item_ids(item_ids, self.num_items)
    return self.item_embedding(mapped)

  def item_table(self) -> jax.Array:
    """Embeddings of ids 0..num_items, `[num_items + 1, dim]`.

    Row 0 is the padding row; the OOV row is left out, so the table lines up
    with full-catalogue score columns.
    """
    return self.item_embedding.embedding[: self.num_items + 1]

  def encode(self, history: jax.Array, train: bool = False) -> jax.Array:
    """User states `[batch, dim]` of left-padded histories `[batch, L]`."""
    return self.encode_positions(history, train=train)[:, -1]

  def __call__(
    self, history: jax.Array, candidates: jax.Array, train: bool = False
  ) -> jax.Array:
    """Scores candidates against each history, encoding it once.

    Args:
      history: `[batch, seq_len]` left-padded item ids, most recent last.
      candidates: `[batch, num_candidates]` item ids.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      `[batch, num_candidates]` logits (dot products of user state and
      candidate item embeddings).
    """
    check_candidates_shape(history, candidates, type(self).__name__)
    user = self.encode(history, train=train)
    return jnp.einsum('bd,bcd->bc', user, self.item_vectors(candidates))

  def score_all(self, history: jax.Array, train: bool = False) -> jax.Array:
    """Scores every catalogue item: `[batch, num_items + 1]` logits.

    Column j is item j; column 0 (padding) is -inf.
    """
    user = self.encode(history, train=train)
    return mask_padding_column(user @ self.item_table().T)
