"""The cloud LLM scorer: T5 + tokenizer + item identifiers + prompts.

LSC4Rec (Lv et al., KDD 2025) asks a cloud LLM for a ranked candidate list
from a (possibly stale) user history. `LLMScorer` bundles what that takes:
the T5 module and its parameters, the prompt tokenizer, the item identifier
scheme with its trie, and the prompt builder. Two services:

- `generate_for_windows`: the top-K items per window by trie-constrained
  beam search (`lsc_jax.models.beam_search`), with their sequence
  log-probabilities, best first;
- `score_for_windows` / `score_candidates`: the teacher-forced
  log-likelihood of given candidate items, so the LLM can score a list it
  did not generate (e.g. an SRM's).

Windows follow `lsc_jax.data.splits`: window r is (users[r], positions[r])
and the LLM reads `sequences[user][:position - gap]` (clipped at 0), the
cloud's stale view. Windows are sorted by prompt length and batched into a
few padded shapes (multiples of 16 tokens), each compiled once; the last
batch of a shape is padded with empty rows.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from lsc_jax import prompts as prompts_lib
from lsc_jax.models import beam_search as beam_lib
from lsc_jax.models import t5
from lsc_jax.models.item_ids import ItemIds

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class LLMScorer:
  """Everything needed to prompt the LLM and read items out of it.

  Attributes:
    model: the T5 module.
    params: its parameters.
    config: the `transformers.T5Config` of `model`.
    tokenizer: the prompt tokenizer.
    item_ids: the item identifier scheme and its trie.
    prompts: builds prompt token ids.
    mesh: a `jax.sharding.Mesh` whose devices split the prompts of every
      beam search (None: one device); see `lsc_jax.sharding.mesh_llm`.
  """

  model: t5.T5
  params: Any
  config: transformers.T5Config
  tokenizer: Any
  item_ids: ItemIds
  prompts: prompts_lib.PromptBuilder
  mesh: Any = None

  def __post_init__(self):
    if self.config.vocab_size != self.item_ids.vocab_size:
      raise ValueError(
        f'the model vocabulary ({self.config.vocab_size}) does not match '
        f'the item identifiers ({self.item_ids.scheme}: '
        f'{self.item_ids.vocab_size}).'
      )
    self._searchers: dict[tuple[int, int], Callable] = {}
    self._scorer = None
    # (beam, K, prompt shape) already compiled, for the log line.
    self.compiled_shapes: set[tuple[int, int, tuple[int, int]]] = set()

  def searcher(self, beam_size: int, num_candidates: int) -> Callable:
    key = (beam_size, num_candidates)
    if key not in self._searchers:
      search = beam_lib.make_beam_search(
        self.model,
        self.item_ids.trie,
        beam_size=beam_size,
        num_candidates=num_candidates,
      )
      if self.mesh is not None:
        # `lsc_jax.sharding` imports this package, so it is imported here.
        from lsc_jax import sharding

        split = sharding.shard_map_batched(search, self.mesh)

        def sharded_search(*args):
          return sharding.to_host(split(*args))

        search = sharded_search

      self._searchers[key] = search
    return self._searchers[key]

  def scorer(self) -> Callable:
    if self._scorer is None:
      tokens = jnp.asarray(self.item_ids.tokens)
      lengths = jnp.asarray(self.item_ids.lengths)
      model = self.model

      @jax.jit
      def run(params, input_ids, attention_mask, candidates):
        return score_candidates(
          model, params, input_ids, attention_mask, candidates, tokens, lengths
        )

      self._scorer = run
    return self._scorer


def build_llm(
  *,
  config: transformers.T5Config,
  params: Any,
  tokenizer: Any,
  item_ids: ItemIds,
  max_history: int | None = 20,
  max_prompt_tokens: int = 512,
) -> LLMScorer:
  """An `LLMScorer` from its parts."""
  return LLMScorer(
    model=t5.build_t5(config),
    params=params,
    config=config,
    tokenizer=tokenizer,
    item_ids=item_ids,
    prompts=prompts_lib.PromptBuilder(
      tokenizer, item_ids, max_history, max_prompt_tokens
    ),
  )


def score_candidates(
  model: t5.T5,
  params: Any,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  candidates: jax.Array,
  id_tokens: jax.Array,
  id_lengths: jax.Array,
) -> jax.Array:
  """Log-likelihood of each candidate's identifier given its prompt.

  Args:
    input_ids: int32 `[batch, src_len]` prompts; attention_mask bool.
    candidates: int32 `[batch, num_candidates]` items (1..num_items).
    id_tokens: int32 `[num_items + 1, id_len]` (`ItemIds.tokens`).
    id_lengths: int32 `[num_items + 1]`.

  Returns:
    float32 `[batch, num_candidates]`: the sum of token log-probabilities of
    each identifier (EOS included), the same quantity beam search reports.
  """
  batch, count = candidates.shape
  encoded = model.apply(
    {'params': params}, input_ids, attention_mask, method=t5.T5.encode
  )
  targets = id_tokens[candidates].reshape(batch * count, -1)
  lengths = id_lengths[candidates].reshape(batch * count)
  decoder_ids = t5.shift_right(targets, model.settings.decoder_start_token_id)
  logits = model.apply(
    {'params': params},
    decoder_ids,
    encoded,
    attention_mask,
    method=t5.T5.decode,
  )
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  token_scores = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  valid = jnp.arange(targets.shape[1]) < lengths[:, None]
  scores = jnp.sum(jnp.where(valid, token_scores, 0.0), axis=-1)
  return scores.reshape(batch, count)


def _progress(label: str, every_seconds: float, total: int, log_fn):
  start = time.perf_counter()
  last = [start]

  def report(done: int, force: bool = False):
    now = time.perf_counter()
    if not force and now - last[0] < every_seconds:
      return
    last[0] = now
    rate = done / max(now - start, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    log_fn(
      f'{label}: {done:,}/{total:,} windows ({100 * done / max(total, 1):.0f}'
      f'%), {rate:,.0f} windows/s, ETA {eta:.0f} s'
    )

  return report


def _batches(
  llm: LLMScorer,
  sequences: Sequence[np.ndarray],
  users: np.ndarray,
  positions: np.ndarray,
  gap: int,
  batch_size: int,
  template: str,
  separator: str,
):
  """Yields (window indices, padded ids, mask) sorted by prompt length."""
  users = np.asarray(users)
  positions = np.asarray(positions)
  if users.shape != positions.shape or users.ndim != 1:
    raise ValueError(
      f'users {users.shape} and positions {positions.shape} must be 1-D '
      'and of the same shape.'
    )
  if gap < 0:
    raise ValueError(f'gap must be >= 0, got {gap}.')
  ends = np.maximum(positions - gap, 0)
  prompts = llm.prompts.build_many(
    users, ends, sequences, templates=template, separators=separator
  )
  lengths = np.asarray([len(p) for p in prompts])
  order = np.argsort(lengths, kind='stable')
  for start in range(0, len(order), batch_size):
    index = order[start : start + batch_size]
    width = prompts_lib.bucket_length(int(lengths[index].max()))
    ids, mask = prompts_lib.pad_prompts(
      [prompts[i] for i in index], width, rows=batch_size
    )
    # Empty padding rows would have an all-masked encoder input; give them
    # one visible (EOS) token so nothing divides by zero.
    ids[len(index) :, 0] = llm.item_ids.eos_id
    mask[len(index) :, 0] = True
    yield index, ids, mask


def generate_for_windows(
  llm: LLMScorer,
  sequences: Sequence[np.ndarray],
  users: np.ndarray,
  positions: np.ndarray,
  *,
  gap: int,
  num_candidates: int = 50,
  beam_size: int = 50,
  batch_size: int = 64,
  template: str = prompts_lib.TEST_TEMPLATE,
  separator: str = prompts_lib.SEPARATORS[0],
  log_fn: Callable[[str], None] | None = None,
  log_every_seconds: float = 20.0,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-K candidates per window by constrained beam search.

  Args:
    llm: the scorer.
    sequences: per-user item sequences (items 1..num_items).
    users, positions: int `[num_windows]`; the prompt history is
      `sequences[user][:max(position - gap, 0)]`.
    gap: staleness gap (0 for an up-to-date request).
    num_candidates: K.
    beam_size: beams per prompt (>= K).
    batch_size: prompts per compiled batch.
    template, separator: the prompt.
    log_fn: progress lines (default `logging.info`).

  Returns:
    (items int32 `[num_windows, K]`, log_probs float32 `[num_windows, K]`),
    each row best first; every item is a valid, distinct item id.
  """
  log_fn = log_fn or log.info
  total = len(users)
  items = np.zeros((total, num_candidates), np.int32)
  scores = np.zeros((total, num_candidates), np.float32)
  search = llm.searcher(beam_size, num_candidates)
  report = _progress('llm generate', log_every_seconds, total, log_fn)
  done = 0
  for index, ids, mask in _batches(
    llm, sequences, users, positions, gap, batch_size, template, separator
  ):
    shape_key = (beam_size, num_candidates, ids.shape)
    if shape_key not in llm.compiled_shapes:
      llm.compiled_shapes.add(shape_key)
      log_fn(f'llm generate: compiling beam search for prompts {ids.shape}')
    batch_items, batch_scores = jax.device_get(
      search(llm.params, jnp.asarray(ids), jnp.asarray(mask))
    )
    items[index] = batch_items[: len(index)]
    scores[index] = batch_scores[: len(index)]
    done += len(index)
    report(done)
  if total:
    report(done, force=True)
  if total and (items < 1).any():
    raise RuntimeError(
      'beam search returned fewer than num_candidates items for some '
      'prompt; the trie has too few items for K.'
    )
  return items, scores


def score_for_windows(
  llm: LLMScorer,
  sequences: Sequence[np.ndarray],
  users: np.ndarray,
  positions: np.ndarray,
  candidates: np.ndarray,
  *,
  gap: int,
  batch_size: int = 64,
  template: str = prompts_lib.TEST_TEMPLATE,
  separator: str = prompts_lib.SEPARATORS[0],
) -> np.ndarray:
  """Teacher-forced log-likelihood of given candidates per window.

  Args:
    candidates: int `[num_windows, num_candidates]` items (1..num_items).

  Returns:
    float32 `[num_windows, num_candidates]`.
  """
  candidates = np.asarray(candidates)
  if candidates.ndim != 2 or len(candidates) != len(users):
    raise ValueError(
      f'candidates must be [num_windows={len(users)}, C], got '
      f'{candidates.shape}.'
    )
  llm.item_ids.check_items(candidates, 'score_for_windows candidates')
  out = np.zeros(candidates.shape, np.float32)
  scorer = llm.scorer()
  for index, ids, mask in _batches(
    llm, sequences, users, positions, gap, batch_size, template, separator
  ):
    rows = np.ones((batch_size, candidates.shape[1]), np.int32)
    rows[: len(index)] = candidates[index]
    scores = scorer(llm.params, ids, mask, rows)
    out[index] = np.asarray(scores)[: len(index)]
  return out
