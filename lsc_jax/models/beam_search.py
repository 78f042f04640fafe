"""Trie-constrained beam search over item identifiers, in JAX.

The cloud LLM of LSC4Rec (Lv et al., KDD 2025) generates its candidate list
by beam search (the paper's code: Hugging Face `generate` with 50 beams,
then drops strings that are not item ids and pads with item 0). Here the
search only ever extends a hypothesis along an edge of the `PrefixTrie` of
valid identifiers, so every result is a real item, and since distinct trie
paths are distinct items, the top-K list has no duplicates, whatever the
weights.

Per step d (the trie depth, unrolled: identifiers are a few tokens long)
every alive beam proposes its trie children, gathered sparsely: at most
`trie.widths[d]` edges per beam, never a `[vocab]` mask. A proposal whose
child is terminal (its token is EOS) is a complete item and competes for
the finished pool of the K best items; the others compete for the
`beam_size` alive beams. Scores are the model's full-vocabulary token
log-probabilities summed along the identifier (the constraint picks the
tokens, it does not renormalise), so they equal the teacher-forced scores of
`lsc_jax.models.llm.score_candidates`.

Length normalisation: none. Atomic ids all have two tokens, so none is
needed; for text ids this ranks by sequence log-probability, whereas
Hugging Face's default divides by the length (length_penalty 1.0).

The first step runs the decoder on one row per prompt (all beams would be
identical), then the cache is copied out to the beams.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lsc_jax.models import t5
from lsc_jax.models.item_ids import PrefixTrie

Array = jax.Array


def _reorder_cache(cache: dict, rows: Array) -> dict:
  """Gathers the decoder self-attention cache rows (cross stays shared)."""
  layers = [
    dict(layer, key=layer['key'][rows], value=layer['value'][rows])
    for layer in cache['layers']
  ]
  return {'index': cache['index'], 'layers': layers}


def beam_search(
  model: t5.T5,
  params: Any,
  input_ids: Array,
  attention_mask: Array,
  trie_arrays: dict[str, Array],
  *,
  widths: tuple[int, ...],
  beam_size: int,
  num_candidates: int,
) -> tuple[Array, Array]:
  """Top `num_candidates` items per prompt by constrained beam search.

  Jittable (`widths`, `beam_size` and `num_candidates` are static).

  Args:
    model: the T5 module.
    params: its parameters.
    input_ids: int32 `[batch, src_len]` prompts.
    attention_mask: bool `[batch, src_len]`.
    trie_arrays: `PrefixTrie.arrays()`.
    widths: `PrefixTrie.widths`.
    beam_size: alive hypotheses per prompt; must be >= num_candidates,
      which guarantees `num_candidates` complete items when the trie holds
      that many.
    num_candidates: K.

  Returns:
    (items int32 `[batch, K]`, log_probs float32 `[batch, K]`), best first.
    A slot that found no item (only possible when the trie has fewer than
    K items) has item 0 and log-prob -inf.
  """
  if beam_size < num_candidates:
    raise ValueError(
      f'beam_size ({beam_size}) must be >= num_candidates ({num_candidates}).'
    )
  variables = {'params': params}
  settings = model.settings
  batch = input_ids.shape[0]
  depth = len(widths)
  offsets = trie_arrays['offsets']
  child_tokens = trie_arrays['child_tokens']
  child_nodes = trie_arrays['child_nodes']
  node_items = trie_arrays['node_items']
  last_edge = child_tokens.shape[0] - 1
  neg_inf = jnp.float32(-jnp.inf)

  encoded = model.apply(
    variables, input_ids, attention_mask, method=t5.T5.encode
  )
  cache = model.apply(variables, encoded, batch, depth, method=t5.T5.init_cache)
  tokens = jnp.full((batch,), settings.decoder_start_token_id, jnp.int32)
  logits, cache = model.apply(
    variables, tokens, cache, attention_mask, method=t5.T5.decode_step
  )

  # Alive hypotheses: [batch, alive]; one (the root) before the first step.
  alive_nodes = jnp.zeros((batch, 1), jnp.int32)
  alive_scores = jnp.zeros((batch, 1), jnp.float32)
  finished_items = jnp.zeros((batch, num_candidates), jnp.int32)
  finished_scores = jnp.full((batch, num_candidates), neg_inf)

  for step, width in enumerate(widths):
    alive = alive_nodes.shape[1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_probs = log_probs.reshape(batch, alive, -1)

    # Gather each beam's trie edges: [batch, alive, width].
    slot = jnp.arange(width)
    start = offsets[alive_nodes]
    degree = offsets[alive_nodes + 1] - start
    # Slots past a node's degree (and dead beams) are masked to -inf below;
    # their edge index is only kept in range for the gather.
    edge = jnp.minimum(start[..., None] + slot, last_edge)
    valid = (slot < degree[..., None]) & jnp.isfinite(alive_scores)[..., None]
    edge_tokens = child_tokens[edge]
    edge_children = child_nodes[edge]
    token_scores = jnp.take_along_axis(log_probs, edge_tokens, axis=-1)
    scores = jnp.where(valid, alive_scores[..., None] + token_scores, neg_inf)
    terminal = node_items[edge_children] > 0

    flat_scores = scores.reshape(batch, alive * width)
    flat_terminal = terminal.reshape(batch, alive * width)
    flat_items = node_items[edge_children].reshape(batch, alive * width)

    # Complete identifiers join the finished pool (each is a distinct item:
    # a trie path is reached at most once).
    pool_scores = jnp.concatenate(
      [finished_scores, jnp.where(flat_terminal, flat_scores, neg_inf)], 1
    )
    pool_items = jnp.concatenate([finished_items, flat_items], 1)
    finished_scores, pick = jax.lax.top_k(pool_scores, num_candidates)
    finished_items = jnp.take_along_axis(pool_items, pick, axis=1)

    if step == depth - 1:
      break

    # The rest compete for the alive beams.
    open_scores = jnp.where(flat_terminal, neg_inf, flat_scores)
    keep = min(beam_size, alive * width)
    alive_scores, pick = jax.lax.top_k(open_scores, keep)
    source_beam = pick // width
    alive_nodes = jnp.take_along_axis(
      edge_children.reshape(batch, -1), pick, axis=1
    )
    next_tokens = jnp.take_along_axis(
      edge_tokens.reshape(batch, -1), pick, axis=1
    )
    rows = (jnp.arange(batch)[:, None] * alive + source_beam).reshape(-1)
    cache = _reorder_cache(cache, rows)
    logits, cache = model.apply(
      variables,
      next_tokens.reshape(-1),
      cache,
      attention_mask,
      method=t5.T5.decode_step,
    )

  finished_items = jnp.where(jnp.isfinite(finished_scores), finished_items, 0)
  return finished_items, finished_scores


def make_beam_search(
  model: t5.T5, trie: PrefixTrie, *, beam_size: int, num_candidates: int
):
  """A jitted `(params, input_ids, attention_mask) -> (items, log_probs)`
  for one trie (its arrays are passed as arguments, not constants)."""
  if num_candidates > trie.num_items:
    raise ValueError(
      f'num_candidates ({num_candidates}) exceeds the number of items '
      f'({trie.num_items}).'
    )
  arrays = trie.arrays()

  @jax.jit
  def run(params, trie_arrays, input_ids, attention_mask):
    return beam_search(
      model,
      params,
      input_ids,
      attention_mask,
      trie_arrays,
      widths=trie.widths,
      beam_size=beam_size,
      num_candidates=num_candidates,
    )

  return lambda params, input_ids, attention_mask: run(
    params, arrays, input_ids, attention_mask
  )
