"""Multi-device checks of `lsc_jax.sharding`, run in a fresh process.

`tests/test_sharding.py` starts this script with XLA_FLAGS forcing several
CPU host devices (the pytest process has already started jax with one).

  python tests/sharding_worker.py mesh OUT_DIR
      8 host devices: single-device reference runs and their sharded
      versions (training, adaptation, LLM generation, compile reports).
  python tests/sharding_worker.py train OUT_DIR
      8 host devices: `train_srm` and `train_llm` on a slice of the
      built-in Beauty data with and without a mesh, generation through
      `sharding.mesh_llm`, and the single-device `train_srm` reference of
      the two-process run below.
  python tests/sharding_worker.py multihost OUT_DIR PROCESS_ID PORT
      one of 2 processes with 4 host devices each, joined by
      `jax.distributed.initialize` on localhost: sharded training from
      global and from process-local batches, sharded adaptation, one
      checkpoint saved and restored by both processes in one directory,
      and `train_srm` and `train_llm` over both processes with a workdir.

Results go to OUT_DIR as .npz arrays and a JSON file; the tests compare
them. `lsc_jax` is imported inside the functions, after the multi-host
mode has configured and started `jax.distributed`: that has to happen
before anything touches a device.
"""

import json
import os
import sys
import time

import jax
import numpy as np

NUM_ITEMS = 46  # 48 embedding rows (num_items + 2): rows split over 8
NUM_USERS = 131
MAX_LEN = 12
BATCH_SIZE = 32
NUM_STEPS = 4
SEED = 3
BEAUTY_USERS = 300
LLM_WINDOWS = 96


def _sequences(num_users=NUM_USERS, seed=0):
  rng = np.random.default_rng(seed)
  return [
    rng.integers(1, NUM_ITEMS + 1, size=rng.integers(4, 21)).astype(np.int32)
    for _ in range(num_users)
  ]


def _train_setup():
  """SASRec smoke (dropout on), its state and the first NUM_STEPS batches."""
  from lsc_jax.data.splits import Windows
  from lsc_jax.models import registry
  from lsc_jax.train import srm_steps
  from lsc_jax.train import state as state_lib

  sequences = _sequences()
  users, positions = [], []
  for user, seq in enumerate(sequences):
    for position in range(1, len(seq) - 2):
      users.append(user)
      positions.append(position)
  windows = Windows(np.array(users), np.array(positions))
  # One bucket width, so each run compiles once.
  config = registry.get_srm_config(
    'sasrec', 'smoke', batch_size=BATCH_SIZE, bucket_edges=(MAX_LEN,)
  )
  model = registry.srm_from_config('sasrec', NUM_ITEMS, config)
  examples = srm_steps.next_item_examples(sequences, windows, MAX_LEN)
  batches = list(
    srm_steps.iterate_next_item_batches(
      examples,
      batch_size=BATCH_SIZE,
      bucket_edges=config.bucket_edges,
      seed=SEED,
      epoch=0,
    )
  )[:NUM_STEPS]
  assert len(batches) == NUM_STEPS, len(batches)

  # One optimizer object: a train state's structure includes it.
  tx = state_lib.make_optimizer(config.learning_rate)

  def make_state():
    params = srm_steps.init_params(model, MAX_LEN, SEED)
    return state_lib.create_train_state(model.apply, params, tx, SEED)

  step_fn = srm_steps.make_train_step(model, config, NUM_ITEMS)
  return model, make_state, step_fn, batches


def _run(step, state, batches):
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return state, np.asarray(losses)


def _flat_params(params):
  from lsc_jax import sharding

  leaves = jax.tree_util.tree_flatten_with_path(sharding.to_host(params))[0]
  return {
    jax.tree_util.keystr(path, simple=True, separator='/'): np.asarray(x)
    for path, x in leaves
  }


def _save(out_dir, stem, results, arrays):
  np.savez(os.path.join(out_dir, f'{stem}.npz'), **arrays)
  with open(os.path.join(out_dir, f'{stem}.json'), 'w') as f:
    json.dump(results, f, indent=1)


def _synthetic_srm_run(mesh, workdir=None):
  """`train_srm` for one epoch on the synthetic sequences (table rows
  split over the mesh when there is one)."""
  from lsc_jax import sharding
  from lsc_jax.data.splits import Windows
  from lsc_jax.models import registry
  from lsc_jax.train import srm_steps

  sequences = _sequences()
  lengths = np.array([len(s) for s in sequences])
  users = np.repeat(np.arange(NUM_USERS), lengths - 3)
  positions = np.concatenate([np.arange(1, n - 2) for n in lengths])
  config = registry.get_srm_config(
    'sasrec',
    'smoke',
    epochs=1,
    batch_size=BATCH_SIZE,
    bucket_edges=(MAX_LEN,),
    eval_batch_size=64,
  )
  rules = () if mesh is None else sharding.item_table_rules()
  return srm_steps.train_srm(
    'sasrec',
    sequences=sequences,
    num_items=NUM_ITEMS,
    train_windows=Windows(users, positions),
    valid_windows=Windows(np.arange(NUM_USERS), lengths - 2),
    config=config,
    seed=SEED,
    workdir=workdir,
    log=lambda _: None,
    mesh=mesh,
    shard_rules=rules,
  )


def _llm_run(dataset, split, mesh, workdir=None):
  """`train_llm`: smoke T5, one epoch on the first LLM_WINDOWS windows."""
  from lsc_jax.train import llm_steps

  config = llm_steps.train_config(
    'smoke', epochs=1, batch_size=16, max_history=5, log_every_seconds=1e9
  )
  return llm_steps.train_llm(
    sequences=dataset.sequences,
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    split=split,
    preset='smoke',
    seed=SEED,
    config=config,
    max_windows=LLM_WINDOWS,
    workdir=workdir,
    log=lambda _: None,
    mesh=mesh,
  )


def _beauty_slice():
  from lsc_jax import data

  dataset = data.load('beauty', verbose=False)
  dataset = dataset.from_sequences(
    dataset.sequences[:BEAUTY_USERS], num_items=dataset.num_items
  )
  return dataset, data.positional_split(dataset, gap=2)


def _adapt_setup():
  from lsc_jax.collab import adapt
  from lsc_jax.data.splits import Windows
  from lsc_jax.models import make_srm
  from lsc_jax.train import srm_steps

  sequences = _sequences(num_users=19, seed=5)
  lengths = np.array([len(s) for s in sequences])
  recent_users, recent_positions = [], []
  for user, n in enumerate(lengths):
    for position in range(max(1, n - 4), n - 1):
      recent_users.append(user)
      recent_positions.append(position)
  recent = Windows(np.array(recent_users), np.array(recent_positions))
  test = Windows(np.arange(len(sequences)), lengths - 1)
  candidates = np.random.default_rng(6).integers(
    1, NUM_ITEMS + 1, size=(len(sequences), 13)
  )
  data = adapt.build_device_data(
    sequences,
    recent,
    test,
    candidates,
    num_items=NUM_ITEMS,
    max_len=7,
    num_recent=3,
    num_negatives=4,
    seed=0,
  )
  model = make_srm(
    'sasrec', num_items=NUM_ITEMS, preset='smoke', max_len=7, dropout_rate=0.0
  )
  params = srm_steps.init_params(model, 7, seed=4)
  config = adapt.AdaptConfig(num_steps=3, learning_rate=0.1, chunk_size=16)
  return model, params, data, config


def mesh_checks(out_dir):
  from lsc_jax import sharding
  from lsc_jax.collab import adapt
  from lsc_jax.models import beam_search, item_ids, t5
  from lsc_jax.train import loop

  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh()
  results = {'mesh_shape': dict(mesh.shape), 'seconds': {}}
  arrays = {}
  clock = [time.perf_counter()]

  def lap(name):
    now = time.perf_counter()
    results['seconds'][name] = round(now - clock[0], 2)
    clock[0] = now

  # Data-parallel SRM training against one device.
  model, make_state, step_fn, batches = _train_setup()
  reference = loop.CompiledStep(step_fn, 'reference', log=lambda _: None)
  state, losses = _run(reference, make_state(), batches)
  arrays['reference_losses'] = losses
  for name, value in _flat_params(state.params).items():
    arrays[f'reference/{name}'] = value
  for label, rules in (
    ('replicated', ()),
    ('rows', sharding.item_table_rules(layout='rows')),
  ):
    step = sharding.shard_train_step(
      step_fn,
      mesh,
      make_state(),
      batches[0],
      shard_rules=rules,
      log=lambda _: None,
    )
    state, losses = _run(step, step.place_state(make_state()), batches)
    arrays[f'{label}_losses'] = losses
    for name, value in _flat_params(state.params).items():
      arrays[f'{label}/{name}'] = value
    table = state.params['params']['item_embedding']['embedding']
    results[f'{label}_table_spec'] = str(table.sharding.spec)
    results[f'{label}_table_shard_shape'] = list(
      table.addressable_shards[0].data.shape
    )
    results[f'{label}_num_compiles'] = step.num_compiles
    results[f'{label}_step'] = int(state.step)

  lap('training')

  # Placement: device i holds rows [4 i, 4 i + 4) of a 32-row batch.
  placed = sharding.shard_batch(batches[0], mesh)
  history = placed['history']
  results['batch_rows_by_device'] = sorted(
    (shard.device.id, shard.index[0].start, shard.index[0].stop)
    for shard in history.addressable_shards
  )
  results['batch_placed_equal'] = bool(
    np.array_equal(np.asarray(history), batches[0]['history'])
  )

  # Per-device adaptation, users split over the mesh.
  model_a, params_a, data, config = _adapt_setup()
  plain = adapt.adapt_and_score(model_a, params_a, data, config)
  split = sharding.sharded_adapt_and_score(
    model_a, params_a, data, config, mesh
  )
  for label, result in (('plain', plain), ('sharded', split)):
    arrays[f'adapt_{label}_scores'] = result.scores
    arrays[f'adapt_{label}_first_loss'] = result.first_loss
    arrays[f'adapt_{label}_last_loss'] = result.last_loss
  results['adapt_sharded_num_compiles'] = split.num_compiles
  results['adapt_bytes_equal'] = (
    plain.adapted_bytes == split.adapted_bytes
    and plain.state_bytes == split.state_bytes
  )
  try:
    sharding.sharded_adapt_and_score(
      model_a,
      params_a,
      data,
      adapt.AdaptConfig(num_steps=3, chunk_size=12),
      mesh,
    )
    results['adapt_bad_chunk_error'] = None
  except ValueError as error:
    results['adapt_bad_chunk_error'] = str(error)

  lap('adaptation')

  # Compile-only reports for a mesh of 8.
  abstract_state = jax.eval_shape(make_state)
  abstract_batch = sharding.abstract(batches[-1])
  for label, rules in (
    ('replicated', ()),
    ('rows', sharding.item_table_rules()),
  ):
    report = sharding.compile_report(
      step_fn,
      mesh,
      abstract_state,
      abstract_batch,
      shard_rules=rules,
      name=f'sasrec {label}',
    )
    results[f'report_{label}'] = {
      k: v for k, v in vars(report).items() if k != 'mesh_shape'
    }
    results[f'report_{label}']['mesh_shape'] = report.mesh_shape
    results[f'report_{label}']['text'] = report.text()
  bad_batch = dict(abstract_batch)
  bad_batch['history'] = jax.ShapeDtypeStruct((30, MAX_LEN), np.int32)
  try:
    sharding.compile_report(step_fn, mesh, abstract_state, bad_batch)
    results['bad_batch_error'] = None
  except ValueError as error:
    results['bad_batch_error'] = str(error)
  try:
    sharding.compile_report(
      step_fn,
      mesh,
      abstract_state,
      abstract_batch,
      shard_rules=(('item_embeding', sharding.PartitionSpec('data')),),
    )
    results['bad_rule_error'] = None
  except ValueError as error:
    results['bad_rule_error'] = str(error)

  lap('compile_report')

  # LLM candidate generation, prompts split over the mesh.
  identifiers = item_ids.atomic_ids(23, base_vocab_size=7)
  config = t5.make_config(
    vocab_size=identifiers.vocab_size,
    d_model=22,
    d_kv=5,
    d_ff=29,
    num_layers=1,
    num_heads=3,
    dropout_rate=0.0,
  )
  llm_model = t5.build_t5(config)
  llm_params = jax.tree.map(
    lambda x: 3.0 * x, t5.init_params(llm_model, jax.random.key(0))
  )
  rng = np.random.default_rng(7)
  ids = rng.integers(2, identifiers.vocab_size, size=(16, 11)).astype(np.int32)
  mask = np.ones((16, 11), bool)
  mask[::3, 7:] = False
  ids[~mask] = 0
  search = beam_search.make_beam_search(
    llm_model, identifiers.trie, beam_size=9, num_candidates=6
  )
  # The reference: the unsharded search on each device's 2 prompts, the
  # batch shape each device sees under the mesh.
  slices = [
    jax.device_get(search(llm_params, ids[i : i + 2], mask[i : i + 2]))
    for i in range(0, 16, 2)
  ]
  arrays['generate_slice_items'] = np.concatenate([s[0] for s in slices])
  arrays['generate_slice_scores'] = np.concatenate([s[1] for s in slices])
  sharded_search = sharding.shard_map_batched(search, mesh)
  out = sharded_search(llm_params, ids, mask)
  results['generate_out_spec'] = str(out[0].sharding.spec)
  sharded_items, sharded_scores = sharding.to_host(out)
  arrays.update(
    generate_sharded_items=sharded_items,
    generate_sharded_scores=sharded_scores,
  )
  try:
    sharded_search(llm_params, ids[:12], mask[:12])
    results['generate_bad_batch_error'] = None
  except ValueError as error:
    results['generate_bad_batch_error'] = str(error)

  lap('generation')

  np.savez(os.path.join(out_dir, 'mesh.npz'), **arrays)
  with open(os.path.join(out_dir, 'mesh.json'), 'w') as f:
    json.dump(results, f, indent=1)


def train_checks(out_dir):
  import dataclasses

  from lsc_jax import sharding
  from lsc_jax.models import llm as llm_lib
  from lsc_jax.models import registry
  from lsc_jax.train import srm_steps

  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh()
  results = {'seconds': {}}
  arrays = {}
  clock = [time.perf_counter()]

  def lap(name):
    now = time.perf_counter()
    results['seconds'][name] = round(now - clock[0], 2)
    clock[0] = now

  # train_srm on 300 Beauty users; 60-row evaluation batches do not split
  # over 8 devices, so the sharded evaluator pads them.
  dataset, split = _beauty_slice()
  config = registry.get_srm_config(
    'sasrec', 'smoke', epochs=1, eval_batch_size=60
  )
  results['num_items'] = dataset.num_items
  fallback = []
  rules = sharding.item_table_rules(
    num_items=dataset.num_items, mesh=mesh, log=fallback.append
  )
  results['fallback_log'] = fallback
  for label, run_mesh in (('reference', None), ('sharded', mesh)):
    lines = []
    run = srm_steps.train_srm(
      'sasrec',
      sequences=dataset.sequences,
      num_items=dataset.num_items,
      train_windows=split.srm_train,
      valid_windows=split.valid,
      test_windows=split.test,
      config=config,
      seed=SEED,
      log=lines.append,
      mesh=run_mesh,
      shard_rules=rules if run_mesh is not None else (),
    )
    for name, value in _flat_params(run.params).items():
      arrays[f'srm_{label}/{name}'] = value
    results[f'srm_{label}_valid'] = run.valid
    results[f'srm_{label}_steps'] = int(run.loop.state.step)
    results[f'srm_{label}_test'] = run.test
    results[f'srm_{label}_history'] = [
      {k: v for k, v in r.items() if 'second' not in k}
      for r in run.loop.history
    ]
    results[f'srm_{label}_params_type'] = type(
      jax.tree.leaves(run.params)[0]
    ).__name__
    results[f'srm_{label}_lines'] = [
      line for line in lines if 'filler' in line or 'data-parallel' in line
    ]
    if run_mesh is not None:
      table = run.loop.state.params['params']['item_embedding']['embedding']
      results['srm_table_spec'] = str(table.sharding.spec)
      results['srm_table_shard_shape'] = list(
        table.addressable_shards[0].data.shape
      )
  try:
    srm_steps.train_srm(
      'sasrec',
      sequences=dataset.sequences,
      num_items=dataset.num_items,
      train_windows=split.srm_train,
      valid_windows=split.valid,
      config=dataclasses.replace(config, batch_size=30),
      mesh=mesh,
      log=lambda _: None,
    )
    results['srm_bad_batch_error'] = None
  except ValueError as error:
    results['srm_bad_batch_error'] = str(error)

  lap('train_srm')

  # The single-device reference of the two-process train_srm run.
  run = _synthetic_srm_run(None)
  for name, value in _flat_params(run.params).items():
    arrays[f'synthetic/{name}'] = value
  results['synthetic_valid'] = run.valid
  results['synthetic_steps'] = int(run.loop.state.step)

  lap('synthetic reference')

  # train_llm, smoke T5, one epoch on the first LLM windows.
  llm_runs = {}
  for label, run_mesh in (('reference', None), ('sharded', mesh)):
    run = _llm_run(dataset, split, run_mesh)
    llm_runs[label] = run
    for name, value in _flat_params(run.llm.params).items():
      arrays[f'llm_{label}/{name}'] = value
    arrays[f'llm_{label}_loss'] = np.asarray(
      [r['train/loss'] for r in run.loop.history]
    )
    results[f'llm_{label}_steps'] = int(run.loop.state.step)

  lap('train_llm')

  # Generation with each batch's 16 prompts split 2 per device, against
  # the unsharded search on batches of 2 (what each device sees).
  test = split.test
  reference = llm_runs['reference'].llm
  kwargs = dict(gap=2, num_candidates=5, beam_size=5, log_fn=lambda _: None)
  users, positions = test.users[:32], test.positions[:32]
  items, scores = llm_lib.generate_for_windows(
    sharding.mesh_llm(reference, mesh),
    dataset.sequences,
    users,
    positions,
    batch_size=16,
    **kwargs,
  )
  arrays['generate_mesh_items'], arrays['generate_mesh_scores'] = items, scores
  items, scores = llm_lib.generate_for_windows(
    reference, dataset.sequences, users, positions, batch_size=2, **kwargs
  )
  arrays['generate_plain_items'] = items
  arrays['generate_plain_scores'] = scores

  lap('generation')
  _save(out_dir, 'train', results, arrays)


def multihost_checks(out_dir, process_id, port):
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    f'localhost:{port}', num_processes=2, process_id=process_id
  )
  from lsc_jax import sharding

  mesh = sharding.make_mesh()
  results = {
    'process_count': jax.process_count(),
    'device_count': jax.device_count(),
    'local_device_count': jax.local_device_count(),
    'partial_mesh_processes': sorted(
      d.process_index for d in sharding.make_mesh(4).devices.flat
    ),
  }
  arrays = {}
  model, make_state, step_fn, batches = _train_setup()
  step = sharding.shard_train_step(
    step_fn, mesh, make_state(), batches[0], log=lambda _: None
  )
  # Every process passes the whole global batch (placed by the step), or
  # only its own half of the rows (placed by `shard_batch`).
  rows = slice(process_id * BATCH_SIZE // 2, (process_id + 1) * BATCH_SIZE // 2)
  feeds = {
    'global': batches,
    'local': [
      sharding.shard_batch({k: v[rows] for k, v in b.items()}, mesh)
      for b in batches
    ],
  }
  for label, feed in feeds.items():
    state, losses = _run(step, step.place_state(make_state()), feed)
    arrays[f'{label}_losses'] = losses
    for name, value in _flat_params(state.params).items():
      arrays[f'{label}/{name}'] = value
  results['train_num_compiles'] = step.num_compiles

  model_a, params_a, data, config = _adapt_setup()
  result = sharding.sharded_adapt_and_score(
    model_a, params_a, data, config, mesh
  )
  arrays['adapt_scores'] = result.scores

  # One checkpoint directory written and read by both processes: a state
  # whose item table rows are split over the 8 devices of both processes,
  # and an array each process holds whole on its own device.
  from lsc_jax import checkpoint

  split_step = sharding.shard_train_step(
    step_fn,
    mesh,
    make_state(),
    batches[0],
    shard_rules=sharding.item_table_rules(),
    log=lambda _: None,
  )
  trained, _ = _run(split_step, split_step.place_state(make_state()), batches)
  local = jax.numpy.arange(11.0)
  directory = os.path.join(out_dir, 'checkpoint')
  first = {'state': split_step.place_state(make_state()), 'local': local * 0}
  checkpoint.save(directory, 1, first, {'epoch': 1}, keep=1)
  checkpoint.save(
    directory, 2, {'state': trained, 'local': local}, {'epoch': 2}, keep=1
  )
  results['checkpoint_steps'] = checkpoint.list_steps(directory)
  target = {
    'state': split_step.place_state(make_state()),
    'local': jax.numpy.zeros(11),
  }
  tree, metadata, step_number = checkpoint.restore_latest(directory, target)
  results['checkpoint_metadata'] = metadata
  results['checkpoint_step'] = step_number
  restored = tree['state']
  table = restored.params['params']['item_embedding']['embedding']
  results['checkpoint_table_spec'] = str(table.sharding.spec)
  results['checkpoint_table_shard_shape'] = list(
    table.addressable_shards[0].data.shape
  )
  results['checkpoint_state_step'] = int(restored.step)
  saved_host = sharding.to_host(
    (trained.opt_state, jax.random.key_data(trained.key))
  )
  restored_host = sharding.to_host(
    (restored.opt_state, jax.random.key_data(restored.key))
  )
  results['checkpoint_opt_state_and_key_equal'] = all(
    np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves(saved_host), jax.tree.leaves(restored_host), strict=True
    )
  )
  for name, value in _flat_params(trained.params).items():
    arrays[f'checkpoint_saved/{name}'] = value
  for name, value in _flat_params(restored.params).items():
    arrays[f'checkpoint_restored/{name}'] = value
  arrays['checkpoint_local'] = np.asarray(tree['local'])

  # train_srm over both processes, checkpoints and metrics in one workdir.
  run = _synthetic_srm_run(mesh, workdir=os.path.join(out_dir, 'train_srm'))
  for name, value in _flat_params(run.params).items():
    arrays[f'synthetic/{name}'] = value
  results['synthetic_valid'] = run.valid
  results['synthetic_steps'] = int(run.loop.state.step)

  # train_llm over both processes: one tokenizer (process 0 trains and
  # saves it), checkpoints and metrics in one workdir.
  dataset, split = _beauty_slice()
  run = _llm_run(dataset, split, mesh, os.path.join(out_dir, 'train_llm'))
  for name, value in _flat_params(run.llm.params).items():
    arrays[f'llm/{name}'] = value
  arrays['llm_loss'] = np.asarray([r['train/loss'] for r in run.loop.history])

  _save(out_dir, f'multihost_{process_id}', results, arrays)
  jax.distributed.shutdown()


if __name__ == '__main__':
  if sys.argv[1] == 'mesh':
    mesh_checks(sys.argv[2])
  elif sys.argv[1] == 'train':
    train_checks(sys.argv[2])
  elif sys.argv[1] == 'multihost':
    multihost_checks(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
  else:
    raise SystemExit(
      f'unknown mode {sys.argv[1]!r}; expected mesh|train|multihost'
    )
