"""Tests for the device-cloud request simulation."""

import numpy as np
import pytest

from lsc_jax.collab import simulate


def _lists(num_users=37, k=11, seed=0, shift=0):
  rng = np.random.default_rng(seed)
  items = np.stack(
    [
      rng.permutation(np.arange(1, 60))[:k] + shift * 0
      for _ in range(num_users)
    ]
  ).astype(np.int32)
  items[::5, -3:] = 0  # some lists came back short
  llm = -np.sort(rng.random((num_users, k)), axis=1)[:, ::-1] * 0 - np.arange(
    k, dtype=np.float32
  )
  srm = rng.normal(size=(num_users, k)).astype(np.float32)
  return simulate.UserLists(items, llm.astype(np.float32), srm)


@pytest.fixture(scope='module')
def setting():
  stale = _lists(seed=1)
  fresh = _lists(seed=2)
  rng = np.random.default_rng(3)
  # Half of the targets are in the fresh list only, a few in the stale one.
  targets = np.where(
    rng.random(len(stale)) < 0.5, fresh.items[:, 0], stale.items[:, 2]
  )
  test_c = simulate.consistency(stale)
  valid_c = simulate.consistency(_lists(seed=4))
  lengths = rng.integers(1, 30, size=len(stale))
  return dict(
    stale=stale,
    fresh=fresh,
    targets=targets,
    history_lengths=lengths,
    test_consistency=test_c,
    valid_consistency=valid_c,
    alpha=0.5,
  )


def test_ratio_zero_is_no_request_and_one_is_always(setting):
  never = simulate.run_policy('never', 0.0, **setting)
  always = simulate.run_policy('always', 1.0, **setting)
  for policy in ('gate', 'gate_topk', 'random'):
    at0 = simulate.run_policy(policy, 0.0, **setting)
    at1 = simulate.run_policy(policy, 1.0, **setting)
    assert at0.metrics == never.metrics and at0.traffic.requests == 0
    assert at1.metrics == always.metrics
    assert at1.traffic.requests == len(setting['stale'])


def test_budgeted_policies_make_exactly_floor_rho_requests(setting):
  num_users = len(setting['stale'])
  for ratio in (0.05, 0.1, 0.2, 0.5):
    budget = int(np.floor(ratio * num_users + 1e-9))
    for policy in ('gate_topk', 'random'):
      run = simulate.run_policy(policy, ratio, **setting)
      assert run.traffic.requests == budget
    gated = simulate.run_policy('gate', ratio, **setting)
    assert gated.traffic.requests <= budget


def test_traffic_counts_bytes_by_hand():
  requests = np.array([True, False, True])
  lengths = np.array([4, 9, 6])
  t = simulate.traffic(requests, lengths, list_length=50)
  assert t.requests == 2
  assert t.bytes_up == (4 + 6) * 4
  assert t.bytes_down == 2 * 50 * 8
  assert t.llm_calls == 2 and t.srm_calls == 5


def test_topk_requests_go_to_least_consistent_users(setting):
  run_users = np.argsort(setting['test_consistency'])[:3]
  ratio = 3 / len(setting['stale'])
  stale, fresh = setting['stale'], setting['fresh']
  from lsc_jax.collab import request

  chosen = np.asarray(
    request.budgeted_topk_requests(setting['test_consistency'], ratio)
  )
  assert set(np.flatnonzero(chosen)) == set(run_users)
  mixed = stale.select(chosen, fresh)
  np.testing.assert_array_equal(mixed.items[run_users], fresh.items[run_users])


def test_alpha_ends_give_llm_and_srm_orders():
  items = np.array([[5, 6, 7, 8]], np.int32)
  srm = np.array([[0.1, 0.4, 0.3, 0.9]], np.float32)
  lists = simulate.UserLists(items, np.zeros((1, 4), np.float32), srm)
  # Target 8: last in the LLM's order, first in the SRM's.
  llm_only = simulate.list_metrics(lists, np.array([8]), alpha=1.0)
  srm_only = simulate.list_metrics(lists, np.array([8]), alpha=0.0)
  assert llm_only['hr@1'] == 0.0 and llm_only['mrr@20'] == pytest.approx(0.25)
  assert srm_only['hr@1'] == 1.0
  # A target missing from the list is a miss at every k.
  miss = simulate.list_metrics(lists, np.array([99]), alpha=0.5)
  assert miss['hr@20'] == 0.0


def test_consistency_is_kendall_of_beam_order_and_srm():
  scipy_stats = pytest.importorskip('scipy.stats')
  lists = _lists(num_users=5, seed=7)
  ours = simulate.consistency(lists)
  for u in range(5):
    v = lists.valid[u]
    expected = scipy_stats.kendalltau(
      -np.arange(11)[v], lists.srm_scores[u][v]
    ).statistic
    assert ours[u] == pytest.approx(expected, abs=1e-5)


def test_non_finite_scores_of_real_candidates_are_rejected():
  items = np.array([[1, 2, 0]], np.int32)
  srm = np.array([[0.1, np.nan, np.nan]], np.float32)
  with pytest.raises(ValueError, match='srm_scores: 1 non-finite'):
    simulate.UserLists(items, np.zeros((1, 3), np.float32), srm)


def test_choose_alpha_follows_the_stronger_signal():
  items = np.array([[5, 6, 7, 8]], np.int32)
  srm = np.array([[0.1, 0.4, 0.3, 0.9]], np.float32)
  lists = simulate.UserLists(items, np.zeros((1, 4), np.float32), srm)
  grid = (0.9, 0.1, 0.5)
  # Target 8: the SRM's first, the LLM's last: the smallest weight wins.
  best, curve = simulate.choose_alpha(lists, np.array([8]), grid=grid)
  assert best == 0.1
  assert sorted(curve) == [0.1, 0.5, 0.9]
  for alpha, value in curve.items():
    expected = simulate.list_metrics(lists, np.array([8]), alpha=alpha)
    assert value == expected['ndcg@10']
  # Target 5: the LLM's first, the SRM's last: a large enough weight wins,
  # and of the winners the smallest.
  best, curve = simulate.choose_alpha(
    lists, np.array([5]), grid=grid, metric='ndcg@1'
  )
  assert curve[0.1] == 0.0 and curve[0.9] == 1.0
  assert best == min(a for a, v in curve.items() if v == 1.0)
  with pytest.raises(ValueError, match='alpha grid'):
    simulate.choose_alpha(lists, np.array([5]), grid=(0.5, 1.5))


def test_random_expectation_is_the_mean_over_every_draw():
  # Seven users at ratio 0.3, a budget of floor(2.1) = 2: average the
  # metrics of all 21 possible pairs of requesting users, independently of
  # the closed form.
  import itertools

  stale, fresh = _lists(num_users=7, seed=5), _lists(num_users=7, seed=6)
  targets = np.where(
    np.arange(7) % 2 == 0, fresh.items[:, 1], stale.items[:, 0]
  )
  kwargs = dict(targets=targets, alpha=0.3, ks=(1, 5))
  lengths = np.arange(1, 8)
  setting = dict(
    stale=stale,
    fresh=fresh,
    history_lengths=lengths,
    test_consistency=np.arange(7.0),
    **kwargs,
  )
  run = simulate.run_policy('random', 0.3, **setting)
  draws, bytes_up = [], []
  for pair in itertools.combinations(range(7), 2):
    requests = np.isin(np.arange(7), pair)
    draws.append(simulate.list_metrics(stale.select(requests, fresh), **kwargs))
    bytes_up.append(simulate.traffic(requests, lengths, 11).bytes_up)
  for key, value in run.expected_metrics.items():
    assert value == pytest.approx(np.mean([d[key] for d in draws]), abs=1e-6)
  assert run.metrics in draws  # the seeded draw is one of them
  assert run.traffic.requests == run.expected_traffic.requests == 2
  assert run.expected_traffic.bytes_up == round(np.mean(bytes_up))
  gate = simulate.run_policy('gate_topk', 0.3, **setting)
  assert gate.expected_metrics is None and gate.expected_traffic is None


def test_paired_difference_matches_scipy_standard_error():
  from scipy import stats

  rng = np.random.default_rng(8)
  a = (rng.random(500) < 0.2) * rng.random(500)
  b = (rng.random(500) < 0.1) * rng.random(500)
  diff = simulate.paired_difference(a, b)
  half = 1.96 * stats.sem(a - b)
  assert diff.mean == pytest.approx(np.mean(a) - np.mean(b))
  assert diff.low == pytest.approx(diff.mean - half)
  assert diff.high == pytest.approx(diff.mean + half)
  assert diff.users == 500 and diff.separated is (diff.low > 0)
  assert all(type(v) is float for v in (diff.mean, diff.low, diff.high))
  same = simulate.paired_difference(a, a)
  assert same.mean == same.low == same.high == 0.0 and not same.separated
  with pytest.raises(ValueError, match='same length'):
    simulate.paired_difference(a, b[:-1])
  with pytest.raises(ValueError, match='non-finite.*user 3'):
    simulate.paired_difference(a, np.where(np.arange(500) == 3, np.nan, b))


def test_per_user_metrics_average_to_the_reported_ones(setting):
  kwargs = dict(targets=setting['targets'], alpha=0.5)
  means = simulate.list_metrics(setting['stale'], **kwargs)
  per_user = simulate.list_metrics(setting['stale'], **kwargs, reduce=False)
  assert set(per_user) == set(means)
  for key, values in per_user.items():
    assert values.shape == (len(setting['stale']),)
    assert values.mean() == pytest.approx(means[key])
