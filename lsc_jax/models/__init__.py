"""Models: the on-device recommendation models (SRMs) and the LLM scorer.

The SRMs (SASRec, GRU4Rec, DIN) share one interface, see `registry`.
"""

from lsc_jax.models.din import DIN
from lsc_jax.models.gru4rec import GRU4Rec
from lsc_jax.models.registry import (
  PRESETS,
  SRM_NAMES,
  SRMConfig,
  get_srm_config,
  make_srm,
  srm_from_config,
)
from lsc_jax.models.sasrec import SASRec
from lsc_jax.models.srm import check_item_ids, oov_id

__all__ = [
  'DIN',
  'GRU4Rec',
  'PRESETS',
  'SASRec',
  'SRMConfig',
  'SRM_NAMES',
  'check_item_ids',
  'get_srm_config',
  'make_srm',
  'oov_id',
  'srm_from_config',
]
