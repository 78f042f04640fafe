"""Tests on the built-in data: Beauty (P5) and MovieLens ml-latest-small."""

import json

import numpy as np
import pytest

from lsc_jax import data

BEAUTY_COUNTS = (22_363, 12_101, 198_502)


@pytest.fixture(scope='module')
def beauty_keep():
  return data.load('beauty', reindex='keep', verbose=False)


@pytest.fixture(scope='module')
def beauty_random():
  return data.load('beauty', reindex='random', seed=0, verbose=False)


@pytest.fixture(scope='module')
def movielens():
  return data.load('movielens', verbose=False)


def _counts(ds):
  return ds.num_users, ds.num_items, ds.num_interactions


def test_beauty_counts_printed(capsys):
  ds = data.load('beauty', reindex='random', seed=5)
  assert _counts(ds) == BEAUTY_COUNTS
  out = capsys.readouterr().out
  assert 'users 22,363, items 12,101, interactions 198,502' in out
  assert '7 empty' in out


def test_beauty_counts_both_reindex_modes(beauty_keep, beauty_random):
  assert _counts(beauty_keep) == BEAUTY_COUNTS
  assert _counts(beauty_random) == BEAUTY_COUNTS
  for ds in (beauty_keep, beauty_random):
    assert all(line.count('22,363') == 1 for line in ds.log)


def test_beauty_keep_is_the_file(beauty_keep):
  path = data.builtin_path('beauty') / 'sequential_data.txt'
  lines = path.read_text().splitlines()
  for u in (0, 1, 9_999, 22_362):
    user, *items = lines[u].split()
    assert beauty_keep.user_raw_ids[u] == user
    assert beauty_keep.sequences[u].tolist() == [int(i) for i in items]
  assert beauty_keep.item_raw_ids[:3] == ['<pad>', '1', '2']


def test_beauty_titles(beauty_keep, beauty_random):
  datamaps = json.loads(
    (data.builtin_path('beauty') / 'datamaps.json').read_text()
  )
  for ds in (beauty_keep, beauty_random):
    assert len(ds.item_text) == ds.num_items + 1 and ds.item_text[0] == ''
    assert sum(t == '' for t in ds.item_text[1:]) == 7
  # P5 item 1 is ASIN B004756YJA (checked by hand in Amazon_Beauty.item).
  assert datamaps['id2item']['1'] == 'B004756YJA'
  assert beauty_keep.item_text[1] == (
    'OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce'
  )
  # A title quoted over two lines in the file.
  p5_id = int(datamaps['item2id']['B0001ZYL3Q'])
  assert beauty_keep.item_text[p5_id] == (
    'TheraNeem Cream - Original Organix South 2 oz Cream Vanilla'
  )
  # Random ids carry their titles with them.
  new_id = beauty_random.item_raw_ids.index(str(p5_id))
  assert beauty_random.item_text[new_id] == beauty_keep.item_text[p5_id]


def _next_is_max_plus_one_rate(ds):
  split = data.positional_split(ds)
  history = data.histories(
    ds.sequences, split.test.users, split.test.positions, 256
  )
  guess = history.max(axis=1) + 1
  return float(np.mean(guess == split.test.targets(ds.sequences)))


def test_p5_id_leak_and_random_reindex(beauty_keep, beauty_random):
  chance = 1.0 / beauty_keep.num_items
  keep_rate = _next_is_max_plus_one_rate(beauty_keep)
  random_rate = _next_is_max_plus_one_rate(beauty_random)
  # Measured: keep 0.0441 (~530x chance), random 0.0001 (~1x chance).
  assert keep_rate > 100 * chance
  assert random_rate < 5 * chance


def test_beauty_positional_split_sizes(beauty_keep):
  split = data.positional_split(beauty_keep)
  n = beauty_keep.lengths()
  assert n.min() >= 5
  assert len(split.test) == len(split.valid) == 22_363
  assert len(split.srm_train) == int(np.sum(n - 3))
  # i_{n-4}..i_{n-2}, but never i_1 (min_history 1): 2 windows when n = 5.
  assert len(split.device_recent) == int(np.sum(np.minimum(n - 3, 3)))
  assert len(split.llm_train) == int(np.sum(np.maximum(n - 6, 0)))
  assert split.summary()['llm_train_users'] == int(np.sum(n >= 7))


def test_movielens_counts_before_and_after_kcore(movielens):
  read_line = movielens.log[0]
  assert 'users 610, items 9,724, interactions 100,836' in read_line
  # Default 5-core keeps every user and the 3,650 movies with >= 5 ratings.
  assert _counts(movielens) == (610, 3_650, 90_274)
  unfiltered = data.load(
    'ml-latest-small',
    min_user_interactions=0,
    min_item_interactions=0,
    verbose=False,
  )
  assert _counts(unfiltered) == (610, 9_724, 100_836)
  counts = np.bincount(np.concatenate(movielens.sequences))
  assert counts[1:].min() >= 5
  assert min(len(s) for s in movielens.sequences) >= 5


def test_movielens_titles_and_timestamps(movielens):
  toy_story = movielens.item_raw_ids.index('1')
  assert movielens.item_text[toy_story] == 'Toy Story (1995)'
  assert movielens.user_raw_ids[:3] == ['1', '2', '3']
  for ts in movielens.timestamps:
    assert ts.dtype == np.int64 and np.all(np.diff(ts) >= 0)
  valid_time, test_time = data.time_cuts_from_quantiles(movielens)
  split = data.time_split(movielens, valid_time=valid_time, test_time=test_time)
  assert len(split.test) > 0 and len(split.srm_train) > 0
  stamps = np.concatenate(movielens.timestamps)
  assert np.mean(stamps >= test_time) == pytest.approx(0.1, abs=0.01)
