r"""Trains one on-device model (SRM) and reports full-ranking test metrics.

Trains on `split.srm_train`, early-stops on `split.valid` and ranks each
test target (`split.test`, history = every item before it, truncated to the
model's max_len) against the whole catalogue: the LSC4Rec paper's
standalone SRM protocol. Writes `metrics.jsonl`, checkpoints and
`results.json` to the workdir; a rerun with the same workdir resumes.

  python -m experiments.train_srm --model=sasrec --workdir=/tmp/sasrec
  python -m experiments.train_srm --model=din --preset=paper --epochs=10
  python -m experiments.train_srm --model=gru4rec --reindex=keep --seed=1
  python -m experiments.train_srm --preset=smoke --compile_only

Training is data-parallel over every device (all hosts' with --multihost);
--mesh_devices, --shard_item_table and --compile_only (compile the train
step for the mesh, print XLA's memory and FLOP estimates, exit) are the
shared flags of experiments/common.py. Only process 0 writes results.json.
"""

from __future__ import annotations

import logging
import os

import jax
from absl import app, flags

from experiments import common
from lsc_jax.models import PRESETS, SRM_NAMES, get_srm_config
from lsc_jax.train import srm_steps

_DATA = common.define_data_flags('Checkpoints, metrics.jsonl and results.json.')
_MODEL = flags.DEFINE_enum('model', 'sasrec', SRM_NAMES, 'Which SRM.')
_PRESET = flags.DEFINE_enum('preset', 'cpu', PRESETS, 'Size preset.')
_EXCLUDE_HISTORY = flags.DEFINE_bool(
  'exclude_history', False, 'Drop history items from the test ranking.'
)
# Overrides of the preset; unset flags keep the preset's value.
_EPOCHS = flags.DEFINE_integer('epochs', None, 'Most epochs.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Histories per step.')
_LR = flags.DEFINE_float('lr', None, 'Learning rate.')
_LOSS = flags.DEFINE_enum(
  'loss', None, ['bce', 'sampled_softmax', 'full_ce'], 'Training loss.'
)
_OBJECTIVE = flags.DEFINE_enum(
  'objective', None, ['next_item', 'last_item'], 'Targets per history.'
)
_NUM_NEGATIVES = flags.DEFINE_integer('num_negatives', None, 'Negatives.')
_MAX_LEN = flags.DEFINE_integer('max_len', None, 'History length.')
_EMBED_DIM = flags.DEFINE_integer('embed_dim', None, 'Embedding width.')
_DROPOUT = flags.DEFINE_float('dropout', None, 'Dropout rate.')
_PATIENCE = flags.DEFINE_integer('patience', None, 'Early-stop patience.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  common.init_distributed()
  mesh = common.make_mesh()
  common.log_topology(mesh, log=logging.info)
  overrides = {
    field: flag.value
    for field, flag in (
      ('epochs', _EPOCHS),
      ('batch_size', _BATCH_SIZE),
      ('learning_rate', _LR),
      ('loss', _LOSS),
      ('objective', _OBJECTIVE),
      ('num_negatives', _NUM_NEGATIVES),
      ('max_len', _MAX_LEN),
      ('embed_dim', _EMBED_DIM),
      ('dropout_rate', _DROPOUT),
      ('patience', _PATIENCE),
    )
    if flag.value is not None
  }
  config = get_srm_config(_MODEL.value, _PRESET.value, **overrides)
  dataset, split = _DATA.load()
  logging.info('config: %s', config)
  if common.compile_only_srm(
    _MODEL.value, config, dataset.num_items, _DATA.seed.value, mesh
  ):
    return

  run = srm_steps.train_srm(
    _MODEL.value,
    sequences=dataset.sequences,
    num_items=dataset.num_items,
    train_windows=split.srm_train,
    valid_windows=split.valid,
    test_windows=split.test,
    config=config,
    seed=_DATA.seed.value,
    workdir=_DATA.workdir.value,
    exclude_history=_EXCLUDE_HISTORY.value,
    log=logging.info,
    mesh=mesh,
    shard_rules=common.shard_rules(
      num_items=dataset.num_items, mesh=mesh, log=logging.warning
    ),
  )
  if not common.is_primary():
    return

  keys = [f'{m}@{k}' for m in ('hr', 'ndcg') for k in (5, 10, 20)]
  print(
    f'{_MODEL.value} on {dataset.name} ({_DATA.reindex.value} ids), full '
    f'ranking of {int(run.test["count"]):,} test users, best epoch '
    f'{run.loop.best_epoch}:'
  )
  print('  ' + '  '.join(f'{k:>8}' for k in keys))
  print('  ' + '  '.join(f'{run.test[k]:8.4f}' for k in keys))
  if _DATA.workdir.value:
    results = {
      'model': _MODEL.value,
      'dataset': dataset.name,
      'reindex': _DATA.reindex.value,
      'seed': _DATA.seed.value,
      'config': config.to_dict(),
      'best_epoch': run.loop.best_epoch,
      'valid': run.valid,
      'test': run.test,
      'train_seconds': run.train_seconds,
      'oov_ids': run.oov.ids,
      'mesh': dict(mesh.shape),
      'processes': jax.process_count(),
    }
    common.write_json(
      os.path.join(_DATA.workdir.value, 'results.json'), results
    )


if __name__ == '__main__':
  app.run(main)
