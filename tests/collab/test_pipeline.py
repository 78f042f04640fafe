"""End-to-end test: every LSC4Rec stage at the smoke preset on real data."""

import dataclasses
import json
import os

import numpy as np
import pytest

from lsc_jax.collab import pipeline, request


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lsc4rec_smoke'))
  config = pipeline.PipelineConfig(
    **dict(
      pipeline.PRESETS['smoke'],
      max_users=250,
      workdir=workdir,
      # 0.15 of the users is not a whole number: budgets round down.
      ratios=(0.0, 0.1, 0.15, 0.2, 1.0),
    )
  )
  lines = []
  results = pipeline.run(config, log=lines.append)
  return config, results, lines


def _rows(results, policy):
  return {r['ratio']: r for r in results['rows'] if r.get('policy') == policy}


def test_outputs_are_written_and_table_is_complete(smoke_run):
  config, results, _ = smoke_run
  for name in ('results.json', 'results.md', 'request_curve.png'):
    assert os.path.getsize(os.path.join(config.workdir, name)) > 0
  with open(os.path.join(config.workdir, 'results.json')) as f:
    assert json.load(f)['rows'] == json.loads(json.dumps(results['rows']))
  names = [r['name'] for r in results['rows']]
  assert 'LLM only (stale list)' in names
  for stage in pipeline.SRM_STAGES:
    assert f'SRM only, re-ranks stale list ({stage})' in names
  for row in results['rows']:
    for k in (1, 5, 10, 20):
      for metric in ('hr', 'ndcg', 'mrr'):
        value = row['metrics'][f'{metric}@{k}']
        assert 0.0 <= value <= 1.0
      assert row['metrics'][f'ndcg@{k}'] <= row['metrics'][f'hr@{k}'] + 1e-9
  table = open(os.path.join(config.workdir, 'results.md')).read()
  assert table.count('\n|') >= len(results['rows'])


def test_ratio_zero_is_fusion_and_ratio_one_is_always_request(smoke_run):
  config, results, _ = smoke_run
  final = results['final_srm']
  fusion = next(
    r
    for r in results['rows']
    if r['name'] == pipeline.fusion_row_name(results['alpha'], final)
  )
  at_one = []
  for policy in ('gate', 'gate_topk', 'random'):
    rows = _rows(results, policy)
    assert rows[0.0]['metrics'] == fusion['metrics']
    assert rows[0.0]['traffic']['requests'] == 0
    assert rows[1.0]['traffic']['requests'] == results['num_test_users']
    at_one.append(rows[1.0]['metrics'])
  assert at_one[0] == at_one[1] == at_one[2]
  # The expectation over random draws is exact at both ends and, at any
  # budget, the no-request value moved by the requesting share of the gap
  # to every user requesting.
  expected = _rows(results, 'random_expected')
  assert expected[0.0]['metrics'] == pytest.approx(fusion['metrics'])
  assert expected[1.0]['metrics'] == pytest.approx(at_one[0])
  users = results['num_test_users']
  for ratio in config.ratios:
    share = request.request_budget(users, ratio) / users
    for key, value in expected[ratio]['metrics'].items():
      never, always = fusion['metrics'][key], at_one[0][key]
      assert value == pytest.approx(never + share * (always - never))


def test_paired_comparisons_agree_with_the_table(smoke_run):
  config, results, lines = smoke_run
  by_name = {r['name']: r['metrics'] for r in results['rows']}
  final = results['final_srm']
  fusion = by_name[pipeline.fusion_row_name(results['alpha'], final)]
  srm = by_name[f'SRM only, re-ranks stale list ({final})']
  llm = by_name['LLM only (stale list)']
  expected = _rows(results, 'random_expected')
  gate = _rows(results, 'gate')
  seen = set()
  for c in results['comparisons']:
    assert c['low'] <= c['mean'] <= c['high']
    assert c['users'] == results['num_test_users']
    metric = c['metric']
    assert c['separated'] == (c['low'] > 0 or c['high'] < 0)
    if c['name'] == 'fusion - SRM only':
      want = fusion[metric] - srm[metric]
    elif c['name'] == 'fusion - LLM only':
      want = fusion[metric] - llm[metric]
    elif c['name'] == 'gate - random (expected)':
      ratio = c['ratio']
      want = gate[ratio]['metrics'][metric] - expected[ratio]['metrics'][metric]
    else:
      continue
    assert c['mean'] == pytest.approx(want, abs=1e-7)
    seen.add((c['name'], metric, c.get('ratio')))
  assert ('fusion - SRM only', 'ndcg@5', None) in seen
  assert ('fusion - LLM only', 'ndcg@10', None) in seen
  assert {r for n, m, r in seen if n.startswith('gate')} == {0.1, 0.15, 0.2}


def test_request_counts_match_the_budget(smoke_run):
  config, results, _ = smoke_run
  users = results['num_test_users']
  for ratio in config.ratios:
    budget = request.request_budget(users, ratio)
    assert _rows(results, 'gate_topk')[ratio]['traffic']['requests'] == budget
    assert _rows(results, 'random')[ratio]['traffic']['requests'] == budget
    assert _rows(results, 'gate')[ratio]['traffic']['requests'] <= budget
    down = _rows(results, 'random')[ratio]['traffic']['bytes_down']
    assert down == budget * config.num_candidates * 8


def test_rerun_reuses_finished_stages(smoke_run):
  config, results, _ = smoke_run
  lines = []
  again = pipeline.run(config, log=lines.append)
  assert not any('finished in' in line for line in lines)
  assert not any('compiling llm_train_step' in line for line in lines)
  np.testing.assert_equal(
    [r['metrics'] for r in again['rows']],
    [r['metrics'] for r in results['rows']],
  )


def test_bad_settings_are_rejected(tmp_path):
  with pytest.raises(ValueError, match='alpha'):
    pipeline.PipelineConfig(alpha=1.5, workdir=str(tmp_path))
  with pytest.raises(ValueError, match='final_srm'):
    pipeline.PipelineConfig(final_srm='best', workdir=str(tmp_path))
  with pytest.raises(ValueError, match='adapt_devices'):
    dataclasses.replace(
      pipeline.PipelineConfig(workdir=str(tmp_path)),
      final_srm='adapted',
      adapt_devices=False,
    )


def test_alpha_is_the_best_of_the_grid_on_validation(smoke_run):
  config, results, _ = smoke_run
  assert config.alpha is None
  curve = {float(a): v for a, v in results['alpha_validation'].items()}
  assert sorted(curve) == sorted(config.alpha_grid)
  best = max(curve.values())
  assert curve[results['alpha']] == best
  assert results['alpha'] == min(a for a, v in curve.items() if v == best)


def test_a_finished_workdir_refuses_other_stage_settings(smoke_run):
  config, _, _ = smoke_run
  # Fusion and gate settings may change on a finished workdir ...
  pipeline.check_workdir_config(
    dataclasses.replace(config, alpha=0.3, consistency='footrule')
  )
  # ... settings that cached stages were built with may not.
  with pytest.raises(ValueError, match=r'seed: 0 -> 7.*new workdir'):
    pipeline.check_workdir_config(dataclasses.replace(config, seed=7))
  with pytest.raises(ValueError, match='adapt'):
    pipeline.check_workdir_config(
      dataclasses.replace(
        config, adapt=dataclasses.replace(config.adapt, num_steps=9)
      )
    )
  # The LLM settings a preset resolves to are recorded too, so an override
  # (or a changed preset) names the resolved field.
  with pytest.raises(
    ValueError, match=r"llm_training: .*'embedding_lr_multiplier': 3\.0"
  ):
    pipeline.check_workdir_config(
      dataclasses.replace(config, llm_embedding_lr_multiplier=3.0)
    )


@pytest.mark.parametrize(
  'srm, dataset, max_users',
  [('gru4rec', 'beauty', 150), ('din', 'ml-latest-small', 40)],
)
def test_other_srms_and_movielens_run_end_to_end(
  srm, dataset, max_users, tmp_path
):
  config = pipeline.PipelineConfig(
    **dict(
      pipeline.PRESETS['smoke'],
      srm=srm,
      dataset=dataset,
      max_users=max_users,
      workdir=str(tmp_path),
      ratios=(0.0, 0.1, 1.0),
    )
  )
  results = pipeline.run(config, log=lambda line: None)
  assert results['num_test_users'] == max_users
  assert results['config']['srm'] == srm
  final = results['final_srm']
  fusion = next(
    r['metrics']
    for r in results['rows']
    if r['name'] == pipeline.fusion_row_name(results['alpha'], final)
  )
  always = _rows(results, 'random')[1.0]['metrics']
  for policy in ('gate', 'gate_topk', 'random', 'random_expected'):
    rows = _rows(results, policy)
    assert rows[0.0]['metrics'] == pytest.approx(fusion)
    assert rows[1.0]['metrics'] == pytest.approx(always)
  budget = request.request_budget(max_users, 0.1)
  assert _rows(results, 'gate_topk')[0.1]['traffic']['requests'] == budget
  assert os.path.getsize(tmp_path / 'results.md') > 0
