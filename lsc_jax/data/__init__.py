"""Data layer: readers, preprocessing, device-cloud splits and batching.

`load` reads a built-in dataset ('beauty', 'ml-latest-small') or a file
and returns a `Dataset`; `positional_split` / `time_split` cut it into the
per-user windows that the cloud LLM and the on-device models train and are
evaluated on; `histories`, `sample_negatives` and `iterate_batches` turn
windows into fixed-shape numpy batches.
"""

from lsc_jax.data.batching import (
  FlatSequences,
  count_batches,
  flatten,
  histories,
  iterate_batches,
  sample_negatives,
)
from lsc_jax.data.dataset import Dataset
from lsc_jax.data.preprocess import builtin_path, kcore_filter, load
from lsc_jax.data.readers import DataError, RawInteractions
from lsc_jax.data.splits import (
  DeviceCloudSplit,
  Windows,
  positional_split,
  time_cuts_from_quantiles,
  time_split,
)

__all__ = [
  'DataError',
  'Dataset',
  'DeviceCloudSplit',
  'FlatSequences',
  'RawInteractions',
  'Windows',
  'builtin_path',
  'count_batches',
  'flatten',
  'histories',
  'iterate_batches',
  'kcore_filter',
  'load',
  'positional_split',
  'sample_negatives',
  'time_cuts_from_quantiles',
  'time_split',
]
