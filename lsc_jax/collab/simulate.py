"""Device-cloud simulation at test time: cached lists, re-ranking, requests.

LSC4Rec's inference (Lv et al., KDD 2025), per user:

1. The device holds a candidate list that the cloud LLM generated from a
   *stale* history (it lacks the newest g interactions), with the LLM's
   order.
2. The device SRM scores those candidates with the *fresh* history; the
   final score fuses both (`lsc_jax.collab.fusion.fuse`).
3. The device measures how consistent the two orders are
   (`lsc_jax.collab.gate`). When consistency is low it requests a fresh list,
   which the LLM generates from the fresh history; the SRM re-scores it and
   the fused fresh list replaces the cached one. A budget caps the share of
   users who request.

Every list the cloud could send is precomputed (`UserLists` for the stale
and the fresh history), so a request policy only selects, per user, which
of the two lists is ranked. Traffic and compute are counted per request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lsc_jax import metrics as metrics_lib
from lsc_jax.collab import fusion, gate, request

# Bytes of one item id and of one score on the wire (int32, float32).
ID_BYTES = 4
SCORE_BYTES = 4


@dataclasses.dataclass(frozen=True)
class UserLists:
  """One candidate list per user, scored by both models.

  Attributes:
    items: int32 `[num_users, K]` candidates in the LLM's order; 0 marks an
      empty slot.
    llm_scores: float32 `[num_users, K]` the LLM's sequence log-probability
      of each candidate.
    srm_scores: float32 `[num_users, K]` the SRM's logits with the fresh
      history.
  """

  items: np.ndarray
  llm_scores: np.ndarray
  srm_scores: np.ndarray

  def __post_init__(self):
    shapes = {self.items.shape, self.llm_scores.shape, self.srm_scores.shape}
    if len(shapes) != 1 or self.items.ndim != 2:
      raise ValueError(
        'UserLists: items, llm_scores and srm_scores must share one '
        f'[num_users, K] shape, got {sorted(shapes)}'
      )
    for name in ('llm_scores', 'srm_scores'):
      values = getattr(self, name)
      bad = ~np.isfinite(values) & (self.items > 0)
      if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(
          f'UserLists.{name}: {int(bad.sum())} non-finite scores of real '
          f'candidates (first in row {row})'
        )

  @property
  def valid(self) -> np.ndarray:
    return self.items > 0

  def __len__(self) -> int:
    return self.items.shape[0]

  def select(self, take_other: np.ndarray, other: UserLists) -> UserLists:
    """Row u from `other` where `take_other[u]`, else from self."""
    pick = np.asarray(take_other, bool)[:, None]
    return UserLists(
      np.where(pick, other.items, self.items),
      np.where(pick, other.llm_scores, self.llm_scores),
      np.where(pick, other.srm_scores, self.srm_scores),
    )


def beam_order_scores(lists: UserLists) -> np.ndarray:
  """`-slot` per candidate: the LLM's beam order as a score, higher first."""
  k = lists.items.shape[1]
  return np.broadcast_to(-np.arange(k, dtype=np.float32), lists.items.shape)


def consistency(lists: UserLists, measure: str = 'kendall') -> np.ndarray:
  """Per-user consistency of the LLM order and the SRM scores.

  Higher means the two agree more. `'kendall'` is Kendall's tau-b between
  the beam order and the SRM scores over the valid slots; `'footrule'` is
  the negated mean absolute rank displacement of the official code.
  """
  values = gate.consistency(
    beam_order_scores(lists), lists.srm_scores, lists.valid, measure=measure
  )
  return np.asarray(values, np.float64)


def fused_scores(
  lists: UserLists,
  *,
  alpha: float,
  llm_score: str = 'rank',
  normalisation: str = 'sigmoid',
) -> np.ndarray:
  """`alpha * LLM + (1 - alpha) * SRM` per candidate (-inf on empty slots)."""
  llm = beam_order_scores(lists) if llm_score == 'rank' else lists.llm_scores
  return np.asarray(
    fusion.fuse(
      llm,
      lists.srm_scores,
      lists.valid,
      alpha=alpha,
      llm_score=llm_score,
      normalisation=normalisation,
    )
  )


def list_metrics(
  lists: UserLists,
  targets: np.ndarray,
  *,
  alpha: float,
  llm_score: str = 'rank',
  normalisation: str = 'sigmoid',
  ks: Sequence[int] = (1, 5, 10, 20),
  reduce: bool = True,
) -> dict[str, float] | dict[str, np.ndarray]:
  """HR/NDCG/MRR/Precision of the fused ranking of each user's list.

  A target outside its list is a miss. Duplicate candidates are not
  expected (lists come from a trie-constrained beam search); if one
  appears, only its first slot counts as the target. `reduce=False` gives
  float64 `[num_users]` values per metric instead of their means.
  """
  scores = fused_scores(
    lists, alpha=alpha, llm_score=llm_score, normalisation=normalisation
  )
  labels = (lists.items == np.asarray(targets)[:, None]) & lists.valid
  first = np.zeros_like(labels)
  rows = np.flatnonzero(labels.any(axis=1))
  first[rows, np.argmax(labels[rows], axis=1)] = True
  result = metrics_lib.ranking_metrics(
    scores, first, ks, lists.valid, reduce=reduce
  )
  if not reduce:
    return {k: np.asarray(v, np.float64) for k, v in result.values.items()}
  return {k: float(v) for k, v in result.values.items()}


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """Mean over users of a per-user difference `a - b`, with a 95% interval.

  The interval is mean +- 1.96 standard errors of that mean (users are
  independent, so this normal approximation holds at thousands of users).
  An interval that contains 0 means the two are not told apart.
  """

  mean: float
  low: float
  high: float
  users: int

  @property
  def separated(self) -> bool:
    return self.low > 0.0 or self.high < 0.0


def paired_difference(a: np.ndarray, b: np.ndarray) -> PairedDifference:
  """`PairedDifference` of two per-user metric arrays of the same users."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
    raise ValueError(
      f'paired_difference needs two [users] arrays of the same length >= 2, '
      f'got {a.shape} and {b.shape}'
    )
  bad = ~(np.isfinite(a) & np.isfinite(b))
  if bad.any():
    raise ValueError(
      f'paired_difference: {int(bad.sum())} non-finite per-user values '
      f'(first at user {int(np.flatnonzero(bad)[0])})'
    )
  d = a - b
  mean = float(d.mean())
  half = 1.96 * float(d.std(ddof=1)) / float(np.sqrt(len(d)))
  return PairedDifference(mean, mean - half, mean + half, len(d))


def choose_alpha(
  lists: UserLists,
  targets: np.ndarray,
  *,
  grid: Sequence[float],
  metric: str = 'ndcg@10',
  llm_score: str = 'rank',
  normalisation: str = 'sigmoid',
) -> tuple[float, dict[float, float]]:
  """The fusion weight of `grid` with the best `metric` on these lists.

  Meant for validation users: the test split never chooses a setting. Ties
  go to the smaller alpha (the SRM sees the fresher history).

  Returns:
    (best alpha, {alpha: metric value} for every alpha of the grid).

  Raises:
    ValueError: if the grid is empty or holds a value outside [0, 1].
  """
  grid = sorted(float(a) for a in grid)
  if not grid or grid[0] < 0.0 or grid[-1] > 1.0:
    raise ValueError(f'alpha grid must be non-empty in [0, 1], got {grid}')
  k = int(metric.split('@')[1])
  curve = {
    alpha: list_metrics(
      lists,
      targets,
      alpha=alpha,
      llm_score=llm_score,
      normalisation=normalisation,
      ks=(k,),
    )[metric]
    for alpha in grid
  }
  best = max(grid, key=lambda a: (curve[a], -a))
  return best, curve


@dataclasses.dataclass(frozen=True)
class Traffic:
  """What requests cost.

  Attributes:
    requests: users who requested a fresh list.
    bytes_up: history ids sent to the cloud.
    bytes_down: candidate ids and scores sent back.
    llm_calls: LLM generations run for requests.
    srm_calls: SRM list scorings on devices (every user scores its cached
      list; a requesting user scores the fresh list too).
  """

  requests: int
  bytes_up: int
  bytes_down: int
  llm_calls: int
  srm_calls: int


def traffic(
  requests: np.ndarray, history_lengths: np.ndarray, list_length: int
) -> Traffic:
  """Counts bytes and calls for a boolean `[num_users]` request vector."""
  requests = np.asarray(requests, bool)
  n = int(requests.sum())
  return Traffic(
    requests=n,
    bytes_up=int(np.asarray(history_lengths)[requests].sum()) * ID_BYTES,
    bytes_down=n * list_length * (ID_BYTES + SCORE_BYTES),
    llm_calls=n,
    srm_calls=len(requests) + n,
  )


def random_expectation(never: dict, always: dict, share: float) -> dict:
  """Metrics expected when a random `share` of the users request.

  `never` and `always` hold the metrics with no user and with every user
  requesting, as means or as per-user arrays. A mean over users is linear
  and each user requests with probability `share`, so the expectation (per
  user, or of the mean) interpolates between the two exactly.
  """
  return {key: never[key] + share * (always[key] - never[key]) for key in never}


@dataclasses.dataclass(frozen=True)
class RequestRun:
  """Metrics and costs of one request policy at one budget.

  Attributes:
    policy: the policy's name (see `run_policy`).
    ratio: the budget, a share of the users.
    metrics: mean HR/NDCG/MRR/Precision@k over the users.
    traffic: what the requests cost.
    requests: bool `[num_users]`, who requested a fresh list.
    expected_metrics: for 'random' only, the metrics' expectation over every
      draw of the same number of users (one seeded draw, `metrics`, differs
      from it by sampling noise); None for the other policies.
    expected_traffic: for 'random' only, the traffic's expectation over
      those draws (only the history bytes sent up depend on the draw;
      rounded to whole bytes); None for the other policies.
  """

  policy: str
  ratio: float
  metrics: dict[str, float]
  traffic: Traffic
  requests: np.ndarray
  expected_metrics: dict[str, float] | None = None
  expected_traffic: Traffic | None = None


def run_policy(
  policy: str,
  ratio: float,
  *,
  stale: UserLists,
  fresh: UserLists,
  targets: np.ndarray,
  history_lengths: np.ndarray,
  test_consistency: np.ndarray,
  valid_consistency: np.ndarray | None = None,
  alpha: float,
  llm_score: str = 'rank',
  normalisation: str = 'sigmoid',
  seed: int = 0,
  ks: Sequence[int] = (1, 5, 10, 20),
) -> RequestRun:
  """Simulates one request policy at budget `ratio` on the test users.

  Policies:
    'gate': the Kendall (or other) consistency gate with a threshold
      calibrated on validation users so that a share `ratio` of them
      request, applied to test users and capped at the budget
      floor(ratio * num_users).
    'gate_topk': exactly floor(ratio * num_users) requests, the least
      consistent test users.
    'random': the same budget, uniformly random users (seeded).
    'never', 'always': the two ends.

  Returns:
    A `RequestRun`.
  """
  num_users = len(stale)
  if policy == 'gate':
    if valid_consistency is None:
      raise ValueError("policy 'gate' needs valid_consistency")
    threshold = request.calibrate_threshold(valid_consistency, ratio)
    requests = request.threshold_requests(
      test_consistency, threshold, rho=ratio, seed=seed
    )
  elif policy == 'gate_topk':
    requests = request.budgeted_topk_requests(
      test_consistency, ratio, seed=seed
    )
  elif policy == 'random':
    requests = request.random_requests(num_users, ratio, seed)
  elif policy == 'never':
    requests = request.never_requests(num_users)
  elif policy == 'always':
    requests = request.always_requests(num_users)
  else:
    raise ValueError(f'unknown request policy {policy!r}')
  requests = np.asarray(requests, bool)

  def metrics_of(lists):
    return list_metrics(
      lists,
      targets,
      alpha=alpha,
      llm_score=llm_score,
      normalisation=normalisation,
      ks=ks,
    )

  list_length = stale.items.shape[1]
  spent = traffic(requests, history_lengths, list_length)
  expected = expected_spent = None
  if policy == 'random':
    # Every user is among the k requesters with probability k / n.
    share = requests.sum() / max(num_users, 1)
    expected = {
      key: float(value)
      for key, value in random_expectation(
        metrics_of(stale), metrics_of(fresh), share
      ).items()
    }
    everyone = traffic(np.ones(num_users, bool), history_lengths, list_length)
    expected_spent = dataclasses.replace(
      spent, bytes_up=int(round(share * everyone.bytes_up))
    )
  return RequestRun(
    policy=policy,
    ratio=ratio,
    metrics=metrics_of(stale.select(requests, fresh)),
    traffic=spent,
    requests=requests,
    expected_metrics=expected,
    expected_traffic=expected_spent,
  )
