r"""Trains the cloud LLM (T5) and reports LLM-only test metrics.

Trains on `split.llm_train` (prompt: the history before the target; target:
the item's identifier), then generates K = --num_candidates items per test
user by trie-constrained beam search from the stale cloud history (the
history minus the newest --gap items, as the LSC4Rec paper's dcc_t2 test)
and reports HR/NDCG@{5,10} over the beam order (a target outside the list
is a miss) and recall@K. Writes `metrics.jsonl`, checkpoints, the tokenizer
and `results.json` to the workdir; a rerun with the same workdir resumes.

  python -m experiments.train_llm --workdir=/tmp/llm
  python -m experiments.train_llm --size=smoke --epochs=1 --max_users=500
  python -m experiments.train_llm --size=t5-small --id_scheme=text \
      --pretrained=/path/to/t5-small --reindex=keep
  python -m experiments.train_llm --size=smoke --compile_only

Training and generation are data-parallel over every device (all hosts'
with --multihost); --mesh_devices and --compile_only (compile the train
step for the mesh, print XLA's memory and FLOP estimates, exit) are the
shared flags of experiments/common.py. Only process 0 writes results.json
and the Hugging Face export.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import numpy as np
from absl import app, flags

from experiments import common
from lsc_jax import sharding
from lsc_jax.train import llm_steps

_DATA = common.define_data_flags(
  'Checkpoints, tokenizer, metrics.jsonl, results.json.'
)
_SIZE = flags.DEFINE_enum(
  'size', 'cpu', sorted(llm_steps.LLM_TRAIN_PRESETS), 'LLM size preset.'
)
_ID_SCHEME = flags.DEFINE_enum(
  'id_scheme', 'atomic', ['atomic', 'text'], 'Item identifiers.'
)
_PRETRAINED = flags.DEFINE_string(
  'pretrained', None, 'Local Hugging Face T5 directory to start from.'
)
_NUM_CANDIDATES = flags.DEFINE_integer(
  'num_candidates', 50, 'K: candidates generated per test user.'
)
_BEAM_SIZE = flags.DEFINE_integer('beam_size', 50, 'Beams (>= K).')
_EVAL_BATCH = flags.DEFINE_integer('eval_batch_size', 64, 'Prompts per batch.')
_EXPORT_HF = flags.DEFINE_bool(
  'export_hf', False, 'Also write <workdir>/hf (Hugging Face T5 format).'
)
# Overrides of the size preset; unset flags keep the preset's value.
_EPOCHS = flags.DEFINE_integer('epochs', None, 'Epochs.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Prompts per step.')
_LR = flags.DEFINE_float('lr', None, 'Peak learning rate.')
_MAX_HISTORY = flags.DEFINE_integer(
  'max_history', None, 'Newest history items per prompt.'
)
_EMBEDDING_LR_MULTIPLIER = flags.DEFINE_float(
  'embedding_lr_multiplier',
  None,
  'Learning-rate multiple of the shared token embedding.',
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  common.init_distributed()
  mesh = common.make_mesh()
  common.log_topology(mesh, log=logging.info)
  start = time.perf_counter()
  config = llm_steps.train_config(
    _SIZE.value,
    epochs=_EPOCHS.value,
    batch_size=_BATCH_SIZE.value,
    learning_rate=_LR.value,
    max_history=_MAX_HISTORY.value,
    embedding_lr_multiplier=_EMBEDDING_LR_MULTIPLIER.value,
  )
  dataset, split = _DATA.load()
  logging.info('config: %s', config)
  if common.compile_only_requested():
    llm = llm_steps.build_untrained_llm(
      num_users=dataset.num_users,
      num_items=dataset.num_items,
      preset=_SIZE.value,
      id_scheme=_ID_SCHEME.value,
      seed=_DATA.seed.value,
      pretrained=_PRETRAINED.value,
      config=config,
      log=logging.info,
    )
    common.compile_only_llm(
      llm, config, _DATA.seed.value, mesh, name=f'{_SIZE.value} LLM train step'
    )
    return

  run = llm_steps.train_llm(
    sequences=dataset.sequences,
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    split=split,
    preset=_SIZE.value,
    id_scheme=_ID_SCHEME.value,
    seed=_DATA.seed.value,
    workdir=_DATA.workdir.value,
    config=config,
    pretrained=_PRETRAINED.value,
    log=logging.info,
    mesh=mesh,
  )
  train_seconds = time.perf_counter() - start

  # Generation splits each batch's prompts over the mesh; the batch size is
  # rounded up to a multiple of the device count (filler prompts are
  # generated and dropped).
  llm, eval_batch = run.llm, _EVAL_BATCH.value
  if sharding.training_mesh(mesh) is not None:
    llm = sharding.mesh_llm(run.llm, mesh)
    eval_batch = mesh.size * -(-eval_batch // mesh.size)
  eval_start = time.perf_counter()
  test = llm_steps.evaluate_llm(
    llm,
    dataset.sequences,
    split.test.users,
    split.test.positions,
    gap=_DATA.gap.value,
    num_candidates=_NUM_CANDIDATES.value,
    beam_size=_BEAM_SIZE.value,
    batch_size=eval_batch,
    log_fn=logging.info,
  )
  eval_seconds = time.perf_counter() - eval_start
  if not common.is_primary():
    return

  recall = f'recall@{_NUM_CANDIDATES.value}'
  keys = ['hr@5', 'ndcg@5', 'hr@10', 'ndcg@10', recall]
  print(
    f'LLM ({_SIZE.value}, {_ID_SCHEME.value} ids) on {dataset.name} '
    f'({_DATA.reindex.value} ids): {len(split.test):,} test users, '
    f'stale history (gap {_DATA.gap.value}), beam {_BEAM_SIZE.value}, '
    f'K {_NUM_CANDIDATES.value}'
  )
  print('  ' + '  '.join(f'{k:>9}' for k in keys))
  print('  ' + '  '.join(f'{test[k]:9.4f}' for k in keys))
  print(
    f'  train {train_seconds:.0f} s, generation {eval_seconds:.0f} s '
    f'({len(split.test) / max(eval_seconds, 1e-9):,.0f} users/s)'
  )
  if _DATA.workdir.value:
    results = {
      'dataset': dataset.name,
      'size': _SIZE.value,
      'id_scheme': _ID_SCHEME.value,
      'reindex': _DATA.reindex.value,
      'seed': _DATA.seed.value,
      'gap': _DATA.gap.value,
      'num_candidates': _NUM_CANDIDATES.value,
      'beam_size': _BEAM_SIZE.value,
      'train': dataclasses.asdict(config),
      'epochs_run': len(run.loop.history),
      'final_train_loss': float(np.asarray(run.loop.history[-1]['train/loss']))
      if run.loop.history
      else None,
      'test': test,
      'train_seconds': train_seconds,
      'generation_seconds': eval_seconds,
      'mesh': dict(mesh.shape),
      'processes': jax.process_count(),
    }
    common.write_json(
      os.path.join(_DATA.workdir.value, 'results.json'), results
    )
    if _EXPORT_HF.value:
      llm_steps.save_hf(run.llm, os.path.join(_DATA.workdir.value, 'hf'))


if __name__ == '__main__':
  app.run(main)
