"""Device-cloud collaboration: fusion, consistency gate, request policy.

- `fusion`: mix the cloud LLM's and the device SRM's candidate scores.
- `gate`: per-user consistency of the two orders (Kendall's tau-b, or the
  official code's rank displacement).
- `request`: which users ask the cloud for a fresh list, under a budget.
"""

from lsc_jax.collab.fusion import (
  NORMALISATIONS,
  OFFICIAL_FUSIONS,
  fuse,
  llm_ranks,
  normalise,
  official_fusion,
)
from lsc_jax.collab.gate import (
  consistency,
  footrule_displacement,
  kendall_tau,
)
from lsc_jax.collab.request import (
  always_requests,
  budgeted_topk_requests,
  calibrate_threshold,
  never_requests,
  random_requests,
  request_budget,
  threshold_requests,
)

__all__ = [
  'NORMALISATIONS',
  'OFFICIAL_FUSIONS',
  'always_requests',
  'budgeted_topk_requests',
  'calibrate_threshold',
  'consistency',
  'footrule_displacement',
  'fuse',
  'kendall_tau',
  'llm_ranks',
  'never_requests',
  'normalise',
  'official_fusion',
  'random_requests',
  'request_budget',
  'threshold_requests',
]
