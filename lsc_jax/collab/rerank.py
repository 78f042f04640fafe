"""On-device re-ranking: an SRM scores the LLM's candidate lists.

The device holds, per user, a candidate list from the cloud LLM and scores
every candidate with its own model and the user's fresh history. SASRec and
GRU4Rec encode the history once and score all candidates against it; DIN
vectorises over the candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from lsc_jax.models import srm


def list_scorer(model) -> Callable[..., jax.Array]:
  """A jitted `(params, history [B, L], candidates [B, K]) -> [B, K]`."""
  return jax.jit(
    lambda params, history, candidates: model.apply(params, history, candidates)
  )


def score_lists(
  model,
  params,
  history: np.ndarray,
  candidates: np.ndarray,
  *,
  batch_size: int = 512,
  scorer: Callable[..., jax.Array] | None = None,
) -> np.ndarray:
  """SRM logits of every candidate, in fixed-size batches.

  Args:
    model: an SRM module.
    params: its parameters.
    history: int32 `[num_users, L]` left-padded histories.
    candidates: int32 `[num_users, K]` candidate items; 0 marks an empty
      slot (its score is computed but meaningless; mask it downstream).
    batch_size: rows per compiled call; the last batch is padded, so the
      scorer compiles once.
    scorer: a `list_scorer(model)` to reuse across calls (None: a new one).

  Returns:
    float32 `[num_users, K]` logits.

  Raises:
    ValueError: if an id is outside 0..num_items (it would otherwise be
      silently mapped to the out-of-vocabulary row).
  """
  history = np.asarray(history, np.int32)
  candidates = np.asarray(candidates, np.int32)
  if history.shape[0] != candidates.shape[0]:
    raise ValueError(
      f'score_lists: {history.shape[0]} histories for '
      f'{candidates.shape[0]} candidate lists'
    )
  for name, ids in (('history', history), ('candidates', candidates)):
    _, num_oov = srm.check_item_ids(ids, model.num_items)
    if num_oov:
      raise ValueError(
        f'score_lists: {num_oov} {name} ids outside 0..{model.num_items}'
      )
  scorer = scorer or list_scorer(model)
  num_rows = history.shape[0]
  size = min(batch_size, max(num_rows, 1))
  out = []
  for start in range(0, num_rows, size):
    index = np.arange(start, start + size)
    index = np.where(index < num_rows, index, start)
    scores = scorer(params, history[index], candidates[index])
    out.append(np.asarray(scores)[: min(size, num_rows - start)])
  if not out:
    return np.zeros(candidates.shape, np.float32)
  return np.concatenate(out).astype(np.float32)
