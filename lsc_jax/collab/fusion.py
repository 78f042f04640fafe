"""Result fusion: mix the cloud LLM's and the device SRM's candidate scores.

LSC4Rec ranks the LLM's candidate list by

  fused = alpha * llm_hat + (1 - alpha) * srm_hat

where each score is normalised per row over the valid (non-padded) slots:

- `llm_score='rank'` (the default of `fuse`, the paper's code; the pipeline
  uses 'logprob'): llm_hat = 1 - j / K, with
  j the candidate's 1-based rank in the LLM's list and K the list length
  (the number of slots, padded ones included, like the official code's
  fixed K = 50). The rank is taken from `llm_scores` (higher = earlier;
  ties by slot index, so `-jnp.arange(K)` or the beam log-probabilities of
  a list in beam order both give the beam order).
- `llm_score='logprob'`: `llm_scores` are sequence log-probabilities,
  normalised by `llm_normalisation`: `'minmax'` (default; to [0, 1] over
  the valid slots) or `'softmax'` (the LLM's distribution renormalised over
  the list; it sums to 1, so its values are small next to an SRM
  probability and alpha must be chosen with that in mind).
- SRM (`normalisation`): `'sigmoid'` (the default of `fuse`; the pipeline
  uses 'minmax'; the paper's p_j = sigmoid of
  the SRM logit, no dependence on the other candidates), `'minmax'`
  (per-row to [0, 1]), `'softmax'`, or `'none'` (already a probability).

A row whose valid scores are all equal min-max-normalises to 0.5 for every
slot (any constant keeps the order; 0.5 is the middle). Padded slots get
-inf. alpha = 1 gives exactly the LLM order and alpha = 0 exactly the SRM
order, up to ties that float rounding creates inside a normalisation (a
float32 sigmoid of logits above about 17 is 1.0).

`official_fusion` gives the official code's five scorings
(`collaboration_method` 1-5 in its test notebook) for comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NORMALISATIONS = ('sigmoid', 'minmax', 'softmax', 'none')

# The official test notebook's `collaboration_method` numbers and names.
OFFICIAL_FUSIONS = {
  'llm_only': 1,  # -j: the LLM's order.
  'confident_srm': 2,  # 0.5 - j/K + (p - 0.5) 1[|p - 0.5| > 0.4]
  'lsc4rec': 3,  # -j/K + (p - 0.5): alpha = 1/2, the main method.
  'srm_weighted': 4,  # -j/K + 2 (p - 0.5): alpha = 1/3.
  'srm_only': 5,  # p: the SRM's order.
}


def llm_ranks(llm_scores: jax.Array, valid: jax.Array) -> jax.Array:
  """1-based rank of each valid slot by `llm_scores` descending.

  Ties go to the lower slot index; padded slots come after every valid
  slot (their rank is meaningless).

  Args:
    llm_scores: `[batch, num_candidates]`, higher = earlier in the list.
    valid: `[batch, num_candidates]` bool.

  Returns:
    int32 `[batch, num_candidates]`.
  """
  columns = jnp.broadcast_to(
    jnp.arange(llm_scores.shape[1], dtype=jnp.int32), llm_scores.shape
  )
  *_, order = jax.lax.sort(
    ((~valid).astype(jnp.int32), -llm_scores, columns),
    dimension=1,
    num_keys=3,
  )
  rows = jnp.arange(order.shape[0])[:, None]
  return jnp.zeros_like(order).at[rows, order].set(columns + 1)


def normalise(scores: jax.Array, valid: jax.Array, method: str) -> jax.Array:
  """Per-row normalisation over the valid slots; padded slots become 0.

  `'minmax'` and `'softmax'` need finite valid scores: an infinite one
  puts NaN into its row, which `lsc_jax.metrics` rejects on concrete input
  (under `jax.jit` it ranks as -inf and is counted).

  Args:
    scores: `[batch, num_candidates]`.
    valid: `[batch, num_candidates]` bool.
    method: one of `NORMALISATIONS`.

  Returns:
    `[batch, num_candidates]` float.
  """
  scores = jnp.asarray(scores)
  scores = scores.astype(jnp.result_type(scores.dtype, jnp.float32))
  if method == 'sigmoid':
    out = jax.nn.sigmoid(scores)
  elif method == 'none':
    out = scores
  elif method == 'minmax':
    low = jnp.min(jnp.where(valid, scores, jnp.inf), axis=1, keepdims=True)
    high = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=1, keepdims=True)
    spread = high - low
    flat = ~(spread > 0)
    out = jnp.where(flat, 0.5, (scores - low) / jnp.where(flat, 1, spread))
  elif method == 'softmax':
    out = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=1)
  else:
    raise ValueError(
      f'normalise: method must be one of {NORMALISATIONS}, got {method!r}'
    )
  return jnp.where(valid, out, 0)


def fuse(
  llm_scores: jax.Array,
  srm_scores: jax.Array,
  valid: jax.Array | None = None,
  *,
  alpha: float | jax.Array,
  llm_score: str = 'rank',
  normalisation: str = 'sigmoid',
  llm_normalisation: str = 'minmax',
) -> jax.Array:
  """alpha * normalised LLM score + (1 - alpha) * normalised SRM score.

  Args:
    llm_scores: `[batch, num_candidates]` LLM scores, higher = better (beam
      log-probabilities, or `-jnp.arange(K)` for a list in beam order).
    srm_scores: `[batch, num_candidates]` SRM scores (logits for
      `normalisation='sigmoid'`).
    valid: `[batch, num_candidates]` bool, False on padded slots.
    alpha: LLM weight in [0, 1].
    llm_score: `'rank'` (1 - j/K) or `'logprob'`.
    normalisation: SRM normalisation, one of `NORMALISATIONS`.
    llm_normalisation: LLM normalisation for `llm_score='logprob'`.

  Returns:
    `[batch, num_candidates]` fused scores; -inf on padded slots.
  """
  llm_scores, srm_scores, valid = _check_inputs(llm_scores, srm_scores, valid)
  _check_alpha(alpha)
  if llm_score == 'rank':
    num_slots = llm_scores.shape[1]
    ranks = llm_ranks(llm_scores, valid)
    dtype = jnp.result_type(llm_scores.dtype, srm_scores.dtype, jnp.float32)
    llm_hat = 1 - ranks.astype(dtype) / num_slots
  elif llm_score == 'logprob':
    llm_hat = normalise(llm_scores, valid, llm_normalisation)
  else:
    raise ValueError(
      f"fuse: llm_score must be 'rank' or 'logprob', got {llm_score!r}"
    )
  srm_hat = normalise(srm_scores, valid, normalisation)
  fused = alpha * llm_hat + (1 - alpha) * srm_hat
  return jnp.where(valid, fused, -jnp.inf)


def official_fusion(
  llm_scores: jax.Array,
  srm_scores: jax.Array,
  valid: jax.Array | None = None,
  *,
  method: int | str,
  normalisation: str = 'sigmoid',
) -> jax.Array:
  """One of the official LSC4Rec code's five candidate scorings.

  With j the 1-based LLM rank (from `llm_scores`, as in `fuse`), K the list
  length and p the SRM probability (`normalise(srm_scores, valid,
  normalisation)`):

  | method | name | score |
  |---|---|---|
  | 1 | llm_only | -j |
  | 2 | confident_srm | 0.5 - j/K + (p - 0.5) 1[abs(p - 0.5) > 0.4] |
  | 3 | lsc4rec | -j/K + (p - 0.5), rank-equal to fuse(alpha=0.5) |
  | 4 | srm_weighted | -j/K + 2 (p - 0.5), rank-equal to alpha = 1/3 |
  | 5 | srm_only | p |

  Not reproduced: the official code keys scores by item id, so duplicate
  candidates and padding item 0 collapse into one entry (padding can take
  a top-k slot); here padded slots are -inf and never ranked.

  Args:
    llm_scores: `[batch, num_candidates]`, higher = earlier in the list.
    srm_scores: `[batch, num_candidates]` SRM scores (logits by default).
    valid: `[batch, num_candidates]` bool.
    method: 1-5 or a key of `OFFICIAL_FUSIONS`.
    normalisation: how p is made from `srm_scores`.

  Returns:
    `[batch, num_candidates]`; -inf on padded slots.
  """
  llm_scores, srm_scores, valid = _check_inputs(llm_scores, srm_scores, valid)
  if isinstance(method, str):
    if method not in OFFICIAL_FUSIONS:
      raise ValueError(
        f'official_fusion: unknown method {method!r}, expected one of '
        f'{tuple(OFFICIAL_FUSIONS)} or 1-5'
      )
    method = OFFICIAL_FUSIONS[method]
  if method not in (1, 2, 3, 4, 5):
    raise ValueError(f'official_fusion: method must be 1-5, got {method!r}')

  dtype = jnp.result_type(llm_scores.dtype, srm_scores.dtype, jnp.float32)
  rank = llm_ranks(llm_scores, valid).astype(dtype)
  rank_share = rank / llm_scores.shape[1]
  p = normalise(srm_scores, valid, normalisation)
  if method == 1:
    score = -rank
  elif method == 2:
    confident = jnp.abs(p - 0.5) > 0.4
    score = 0.5 - rank_share + jnp.where(confident, p - 0.5, 0)
  elif method == 3:
    score = -rank_share + (p - 0.5)
  elif method == 4:
    score = -rank_share + 2 * (p - 0.5)
  else:
    score = p
  return jnp.where(valid, score, -jnp.inf)


def _check_alpha(alpha) -> None:
  if isinstance(alpha, jax.core.Tracer):
    return
  value = np.asarray(alpha)
  if value.ndim != 0 or not 0.0 <= float(value) <= 1.0:
    raise ValueError(f'fuse: alpha must be a scalar in [0, 1], got {alpha!r}')


def _check_inputs(llm_scores, srm_scores, valid):
  llm_scores = jnp.asarray(llm_scores)
  srm_scores = jnp.asarray(srm_scores)
  if llm_scores.ndim != 2 or srm_scores.shape != llm_scores.shape:
    raise ValueError(
      'fusion expects llm_scores and srm_scores of the same shape '
      f'[batch, num_candidates], got {llm_scores.shape} and '
      f'{srm_scores.shape}'
    )
  if valid is None:
    valid = jnp.ones(llm_scores.shape, jnp.bool_)
  valid = jnp.asarray(valid)
  if valid.shape != llm_scores.shape or valid.dtype != jnp.bool_:
    raise ValueError(
      f'fusion: valid must be a bool mask of shape {llm_scores.shape}, got '
      f'{valid.dtype} {valid.shape}'
    )
  arrays = (llm_scores, srm_scores, valid)
  if not any(isinstance(a, jax.core.Tracer) for a in arrays):
    for name, array in (('llm_scores', llm_scores), ('srm_scores', srm_scores)):
      if not jnp.issubdtype(array.dtype, jnp.floating):
        continue
      bad = np.asarray(jnp.any(valid & jnp.isnan(array), axis=1))
      if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
          f'fusion: NaN in {name} in a valid slot in {len(rows)} row(s), '
          f'first at row {int(rows[0])}'
        )
  return arrays
