r"""Cloud LLM benchmark: batched beam search speed, and LLM-only quality.

Prints two tables; nothing here is a test.

1. Generation speed. Top-K candidates for the same prompts by (a) the
   batched, jitted, trie-constrained beam search of `lsc_jax.models` and
   (b) a plain per-user Python loop: the same jitted encoder and decoder
   step, one user at a time, beams expanded on the host with numpy. Both
   return the same items; the ratio of their times, measured side by side,
   is the speed-up.
2. Quality (with --quality): the `cpu` T5 trained on built-in Beauty
   (random re-indexing, atomic item ids by default), then K = 50 candidates
   per test user from the stale history (gap 2): HR/NDCG@{5,10} over the
   beam order and recall@50. Orientation: the LSC4Rec paper's official code
   reports P5 HR@10 0.0214 on Beauty from the same stale t-2 history.

  python -m benchmarks.llm_bench                      # table 1 (untrained)
  python -m benchmarks.llm_bench --quality --workdir=/tmp/llm_bench
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lsc_jax import data
from lsc_jax import prompts as prompts_lib
from lsc_jax.models import llm as llm_lib
from lsc_jax.models import t5
from lsc_jax.train import llm_steps

_SIZE = flags.DEFINE_string('size', 'cpu', 'LLM size preset.')
_ID_SCHEME = flags.DEFINE_enum(
  'id_scheme', 'atomic', ['atomic', 'text'], 'Item identifiers.'
)
_USERS = flags.DEFINE_integer('users', 32, 'Users in the speed comparison.')
_BEAM = flags.DEFINE_integer('beam_size', 50, 'Beams.')
_CANDIDATES = flags.DEFINE_integer('candidates', 50, 'K.')
_QUALITY = flags.DEFINE_bool('quality', False, 'Also train on Beauty.')
_EPOCHS = flags.DEFINE_integer('epochs', None, 'Override preset epochs.')
_REINDEX = flags.DEFINE_enum(
  'reindex', 'random', ['random', 'keep'], 'Item id mapping.'
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where training writes.')
_VALID_USERS = flags.DEFINE_integer(
  'valid_users', 2000, 'Validation users also reported (the first N).'
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed.')

PAPER_P5_STALE_HR10 = 0.0214


def python_loop_search(
  llm: llm_lib.LLMScorer, prompt: np.ndarray, k: int, beam: int
):
  """Top-k items of one prompt: jitted model calls, host-side beams."""
  trie = llm.item_ids.trie
  ids = jnp.asarray(prompt[None])
  mask = jnp.ones_like(ids, bool)
  encoded = _encode(llm.model, llm.params, ids, mask)
  cache = llm.model.apply(
    {'params': llm.params}, encoded, 1, trie.depth, method=t5.T5.init_cache
  )
  tokens = np.array([llm.model.settings.decoder_start_token_id], np.int32)
  beams = [(0.0, 0)]  # (score, trie node)
  finished: list[tuple[float, int]] = []
  for step in range(trie.depth):
    logits, cache = _step(llm.model, llm.params, jnp.asarray(tokens), cache)
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    proposals = []
    for row, (score, node) in enumerate(beams):
      edge_tokens, edge_nodes = trie.children(node)
      for token, child in zip(edge_tokens, edge_nodes, strict=True):
        proposals.append((score + log_probs[row, token], row, token, child))
    proposals.sort(key=lambda p: -p[0])
    done = [p for p in proposals if trie.node_items[p[3]] > 0]
    finished = sorted(
      finished + [(p[0], int(trie.node_items[p[3]])) for p in done],
      key=lambda f: -f[0],
    )[:k]
    alive = [p for p in proposals if trie.node_items[p[3]] == 0][:beam]
    if not alive or step == trie.depth - 1:
      break
    rows = np.array([p[1] for p in alive])
    cache = {
      'index': cache['index'],
      'layers': [
        dict(layer, key=layer['key'][rows], value=layer['value'][rows])
        for layer in cache['layers']
      ],
    }
    beams = [(p[0], p[3]) for p in alive]
    tokens = np.array([p[2] for p in alive], np.int32)
  return [item for _, item in finished], [score for score, _ in finished]


_ENCODERS = {}


def _encode(model, params, ids, mask):
  key = (model.settings, ids.shape)
  if key not in _ENCODERS:
    _ENCODERS[key] = jax.jit(
      lambda p, i, m: model.apply({'params': p}, i, m, method=t5.T5.encode)
    )
  return _ENCODERS[key](params, ids, mask)


_STEPS = {}


def _step(model, params, tokens, cache):
  if model.settings not in _STEPS:
    # The encoder mask is all ones (single unpadded prompt); its length is
    # that of the cross-attention keys.
    def step(p, t, c):
      length = c['layers'][0]['cross_key'].shape[1]
      mask = jnp.ones((1, length), bool)
      return model.apply({'params': p}, t, c, mask, method=t5.T5.decode_step)

    _STEPS[model.settings] = jax.jit(step)
  return _STEPS[model.settings](params, tokens, cache)


def speed_table(llm: llm_lib.LLMScorer, sequences, users, positions) -> None:
  """Table 1: batched beam search against a per-user Python loop."""
  k, beam = _CANDIDATES.value, _BEAM.value
  ends = np.maximum(positions - 2, 0)
  prompts = llm.prompts.build_many(users, ends, sequences)

  # Batched: one padded batch, compiled once, timed after a warm-up call.
  width = prompts_lib.bucket_length(max(len(p) for p in prompts))
  ids, mask = prompts_lib.pad_prompts(prompts, width)
  search = llm.searcher(beam, k)
  jax.block_until_ready(search(llm.params, ids, mask))
  start = time.perf_counter()
  items, scores = jax.block_until_ready(search(llm.params, ids, mask))
  batched = time.perf_counter() - start

  # Per user: same model calls, unpadded prompts; warm up every shape.
  for prompt in prompts:
    python_loop_search(llm, prompt, k, beam)
  start = time.perf_counter()
  loop_items = [
    python_loop_search(llm, prompt, k, beam)[0] for prompt in prompts
  ]
  looped = time.perf_counter() - start

  same = np.mean(
    [
      list(np.asarray(a)) == list(b)
      for a, b in zip(items, loop_items, strict=True)
    ]
  )
  print(
    f'\n1. Top-{k} generation for {len(prompts)} users, beam {beam}, '
    f'{llm.item_ids.scheme} ids ({llm.item_ids.num_items:,} items):'
  )
  print(f'   batched jitted beam search  {batched * 1000:9.1f} ms')
  print(f'   per-user Python loop        {looped * 1000:9.1f} ms')
  print(f'   speed-up                    {looped / batched:9.1f}x')
  print(f'   identical top-{k} lists     {same:9.0%}')


def quality_table(dataset, split) -> None:
  """Table 2: train the LLM and report LLM-only test metrics."""
  start = time.perf_counter()
  run = llm_steps.train_llm(
    sequences=dataset.sequences,
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    split=split,
    preset=_SIZE.value,
    id_scheme=_ID_SCHEME.value,
    seed=_SEED.value,
    epochs=_EPOCHS.value,
    workdir=_WORKDIR.value,
    log=logging.info,
  )
  train_seconds = time.perf_counter() - start
  start = time.perf_counter()
  valid_part = split.valid.select(slice(0, _VALID_USERS.value))
  valid = llm_steps.evaluate_llm(
    run.llm,
    dataset.sequences,
    valid_part.users,
    valid_part.positions,
    gap=split.gap,
    num_candidates=_CANDIDATES.value,
    beam_size=_BEAM.value,
    log_fn=logging.info,
  )
  test = llm_steps.evaluate_llm(
    run.llm,
    dataset.sequences,
    split.test.users,
    split.test.positions,
    gap=split.gap,
    num_candidates=_CANDIDATES.value,
    beam_size=_BEAM.value,
    log_fn=logging.info,
  )
  eval_seconds = time.perf_counter() - start
  k = _CANDIDATES.value
  keys = ['hr@5', 'ndcg@5', 'hr@10', 'ndcg@10', f'recall@{k}']
  print(
    f'\n2. LLM only, {_SIZE.value} T5, {_ID_SCHEME.value} ids, '
    f'{dataset.name} ({_REINDEX.value} ids), stale history (gap '
    f'{split.gap}), K {k}, {len(run.loop.history)} epochs:'
  )
  print('   ' + ' '.join(f'{key:>12}' for key in ['split', *keys]))
  for name, values in ((f'valid[:{len(valid_part)}]', valid), ('test', test)):
    print(
      '   '
      + ' '.join([f'{name:>10}'] + [f'{values[key]:10.4f}' for key in keys])
    )
  print(
    f'   paper code (P5, t-2 history): HR@10 {PAPER_P5_STALE_HR10:.4f}; '
    f'train {train_seconds:.0f} s, generation (valid + test) '
    f'{eval_seconds:.0f} s'
  )


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  dataset = data.load(
    'beauty', reindex=_REINDEX.value, seed=_SEED.value, verbose=False
  )
  split = data.positional_split(dataset, gap=2)
  llm = llm_steps.build_untrained_llm(
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    preset=_SIZE.value,
    id_scheme=_ID_SCHEME.value,
    seed=_SEED.value,
    log=logging.info,
  )
  test = split.test.select(slice(0, _USERS.value))
  speed_table(llm, dataset.sequences, test.users, test.positions)
  if _QUALITY.value:
    quality_table(dataset, split)


if __name__ == '__main__':
  app.run(main)
