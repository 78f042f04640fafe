r"""The LSC4Rec main experiment: every stage, one table.

Trains the cloud LLM and the device SRM, runs cooperative training, global
re-training and per-device adaptation, then simulates device-cloud inference
with the Kendall-tau request gate and random requests at several budgets.
Writes `results.json`, `results.md` and `request_curve.png` to the workdir;
a rerun reuses finished stages and an interrupted run resumes.

  python -m experiments.lsc4rec                      # built-in Beauty, cpu
  python -m experiments.lsc4rec --preset=smoke --workdir=/tmp/lsc_smoke
  python -m experiments.lsc4rec --dataset=ml-latest-small --srm=gru4rec

The training stages, the LLM's lists and per-device adaptation run
data-parallel over every device (--mesh_devices, --multihost and
--compile_only are the flags of experiments/common.py); --shard_item_table
applies to --compile_only here.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags
from absl import logging as absl_logging

from experiments import common
from lsc_jax.collab import adapt as adapt_lib
from lsc_jax.collab import pipeline
from lsc_jax.models import registry
from lsc_jax.train import llm_steps

_PRESET = flags.DEFINE_enum(
  'preset', 'cpu', sorted(pipeline.PRESETS), 'Sizes of every model and stage.'
)
_DATASET = flags.DEFINE_string(
  'dataset', None, "Built-in name ('beauty', 'ml-latest-small') or a path."
)
_SRM = flags.DEFINE_enum(
  'srm', None, ['sasrec', 'gru4rec', 'din'], 'On-device model.'
)
_LLM_SIZE = flags.DEFINE_enum(
  'llm_size',
  None,
  ['smoke', 'cpu', 't5-small'],
  'LLM size preset (default: from --preset).',
)
_ID_SCHEME = flags.DEFINE_enum(
  'id_scheme', None, ['atomic', 'text'], 'Item identifiers of the LLM.'
)
_REINDEX = flags.DEFINE_enum(
  'reindex', None, ['random', 'keep'], 'Item re-indexing (keep = P5 leaky ids).'
)
_GAP = flags.DEFINE_integer('gap', None, 'Staleness gap g of cached lists.')
_LLM_EMBEDDING_LR = flags.DEFINE_float(
  'llm_embedding_lr_multiplier',
  None,
  "Learning-rate multiple of the LLM's token embedding (default: preset's).",
)
_ALPHA = flags.DEFINE_float(
  'alpha',
  None,
  'LLM weight of the fusion (default: the best of a grid on validation).',
)
_LLM_SCORE = flags.DEFINE_enum(
  'llm_score', None, ['rank', 'logprob'], 'LLM score used by the fusion.'
)
_RATIOS = flags.DEFINE_list(
  'ratios', None, 'Request ratios in percent, e.g. 0,5,10,20.'
)
_FINAL_SRM = flags.DEFINE_enum(
  'final_srm',
  None,
  list(pipeline.SRM_STAGES),
  'SRM whose scores the fusion and gate use.',
)
_NORMALISATION = flags.DEFINE_enum(
  'normalisation',
  None,
  ['minmax', 'sigmoid', 'softmax', 'none'],
  'SRM score normalisation of the fusion.',
)
_ADAPT_SUBSET = flags.DEFINE_enum(
  'adapt_subset',
  None,
  list(adapt_lib.SUBSETS),
  'Parameters each device adapts (default: the SRM output head).',
)
_CONSISTENCY = flags.DEFINE_enum(
  'consistency',
  None,
  ['kendall', 'footrule'],
  'Consistency measure of the request gate.',
)
_MAX_USERS = flags.DEFINE_integer(
  'max_users', None, 'Keep only the first N users.'
)
_SEED = flags.DEFINE_integer('seed', None, 'The one seed of the run.')
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Where stages write (default workdir/lsc4rec_<preset>).'
)


def build_config() -> pipeline.PipelineConfig:
  """The `PipelineConfig` of the preset with the flags that were given."""
  values = dict(pipeline.PRESETS[_PRESET.value])
  values['workdir'] = _WORKDIR.value or f'workdir/lsc4rec_{_PRESET.value}'
  given = {
    'dataset': _DATASET.value,
    'srm': _SRM.value,
    'llm_preset': _LLM_SIZE.value,
    'id_scheme': _ID_SCHEME.value,
    'reindex': _REINDEX.value,
    'gap': _GAP.value,
    'llm_embedding_lr_multiplier': _LLM_EMBEDDING_LR.value,
    'alpha': _ALPHA.value,
    'llm_score': _LLM_SCORE.value,
    'normalisation': _NORMALISATION.value,
    'final_srm': _FINAL_SRM.value,
    'consistency': _CONSISTENCY.value,
    'max_users': _MAX_USERS.value,
    'seed': _SEED.value,
  }
  values.update({k: v for k, v in given.items() if v is not None})
  if _RATIOS.value is not None:
    values['ratios'] = tuple(float(r) / 100 for r in _RATIOS.value)
  if _ADAPT_SUBSET.value is not None:
    values['adapt'] = dataclasses.replace(
      values.get('adapt', adapt_lib.AdaptConfig()), subset=_ADAPT_SUBSET.value
    )
  return pipeline.PipelineConfig(**values)


def compile_checks(config: pipeline.PipelineConfig, mesh) -> None:
  """--compile_only: compiles the SRM and LLM train steps for the mesh."""
  dataset, _ = pipeline.load_data(config, log=lambda line: None)
  srm_config = registry.get_srm_config(config.srm, config.srm_preset)
  common.compile_only_srm(
    config.srm, srm_config, dataset.num_items, config.seed, mesh
  )
  train_config = config.llm_training()
  llm = llm_steps.build_untrained_llm(
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    preset=config.llm_preset,
    id_scheme=config.id_scheme,
    seed=config.seed,
    config=train_config,
    log=lambda line: None,
  )
  common.compile_only_llm(
    llm,
    train_config,
    config.seed,
    mesh,
    name=f'{config.llm_preset} LLM train step',
  )


def main(argv):
  del argv
  # Progress comes from the pipeline's own lines; keep library logs quiet.
  absl_logging.set_verbosity(absl_logging.WARNING)
  common.init_distributed()
  mesh = common.make_mesh()
  common.log_topology(mesh, log=print)
  config = build_config()
  if common.compile_only_requested():
    compile_checks(config, mesh)
    return
  print(f'LSC4Rec pipeline, preset {_PRESET.value}, workdir {config.workdir}')
  print(
    'config: '
    + ', '.join(
      f'{k}={v}'
      for k, v in dataclasses.asdict(config).items()
      if not isinstance(v, dict)
    )
  )
  results = pipeline.run(
    config, log=lambda line: print(line, flush=True), mesh=mesh
  )
  if not common.is_primary():
    return
  print()
  print(pipeline.markdown_table(results))
  print()
  for line in results['checks']:
    print('-', line)
  print(
    f'\nwrote {config.workdir}/results.json, results.md and '
    f'request_curve.png in {results["seconds"]:.0f} s'
  )


if __name__ == '__main__':
  app.run(main)
