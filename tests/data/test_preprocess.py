"""Tests for `lsc_jax.data.preprocess`: dedupe, order, k-core, re-index."""

import collections

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from lsc_jax import data
from lsc_jax.data import preprocess


def _write(path, text):
  path.write_text(text, encoding='utf-8')
  return path


def _assert_same_dataset(a, b):
  assert a.num_items == b.num_items
  assert a.user_raw_ids == b.user_raw_ids
  assert a.item_raw_ids == b.item_raw_ids
  assert a.item_text == b.item_text
  assert len(a.sequences) == len(b.sequences)
  for x, y in zip(a.sequences, b.sequences, strict=True):
    np.testing.assert_array_equal(x, y)
  assert (a.timestamps is None) == (b.timestamps is None)
  if a.timestamps is not None:
    for x, y in zip(a.timestamps, b.timestamps, strict=True):
      np.testing.assert_array_equal(x, y)


_SMALL_CSV = 'user,item,timestamp\nb,x,1\nb,y,2\na,z,3\na,y,1\na,y,1\na,w,3\n'


def test_csv_dedupe_order_and_keep_ids(tmp_path):
  path = _write(tmp_path / 'small.csv', _SMALL_CSV)
  lines = []
  ds = data.load(
    path,
    reindex='keep',
    min_user_interactions=0,
    min_item_interactions=0,
    log_fn=lines.append,
  )
  # Users in raw id order; a's duplicate (y, 1) dropped; the tie at t=3 is
  # broken by item id (w before z); keep ids by first appearance: y w z x.
  assert ds.user_raw_ids == ['a', 'b']
  assert ds.item_raw_ids == ['<pad>', 'y', 'w', 'z', 'x']
  assert [s.tolist() for s in ds.sequences] == [[1, 2, 3], [4, 1]]
  assert [t.tolist() for t in ds.timestamps] == [[1, 3, 3], [1, 2]]
  assert ds.num_interactions == 5 and ds.num_users == 2
  assert '1 exact duplicate' in lines[1]
  assert '1 same-timestamp pairs' in lines[2]


def test_numeric_ids_order_numerically(tmp_path):
  path = _write(
    tmp_path / 'n.csv', 'user,item,timestamp\n10,10,1\n9,9,1\n9,10,1\n'
  )
  ds = data.load(
    path,
    reindex='keep',
    min_user_interactions=0,
    min_item_interactions=0,
    verbose=False,
  )
  assert ds.user_raw_ids == ['9', '10']
  assert ds.item_raw_ids == ['<pad>', '9', '10']
  assert [s.tolist() for s in ds.sequences] == [[1, 2], [2]]


def test_verbose_prints_one_line_per_step(tmp_path, capsys):
  data.load(
    _write(tmp_path / 's.csv', _SMALL_CSV),
    min_user_interactions=0,
    min_item_interactions=0,
  )
  out = capsys.readouterr().out.strip().splitlines()
  steps = ['read', 'dedupe', 'order', 'k-core', 'reindex']
  assert len(out) == len(steps)
  for line, step in zip(out, steps, strict=True):
    assert f' {step}: users ' in line
    assert 'items' in line and 'interactions' in line


def test_repeats_without_timestamps_are_kept(tmp_path):
  path = _write(tmp_path / 'p.txt', '1 2\n1 3\n1 2\n1 2\n')
  ds = data.load(
    path,
    reindex='keep',
    min_user_interactions=0,
    min_item_interactions=0,
    verbose=False,
  )
  assert ds.sequences[0].tolist() == [1, 2, 1, 1]


def test_p5_keep_renumbers_survivors_in_id_order(tmp_path):
  path = _write(tmp_path / 'sequential_data.txt', '1 9 2 5\n2 5 9\n')
  ds = data.load(path, reindex='keep', verbose=False)
  # P5 default: no k-core; ids 2, 5, 9 become 1, 2, 3 in order.
  assert ds.item_raw_ids == ['<pad>', '2', '5', '9']
  assert [s.tolist() for s in ds.sequences] == [[3, 1, 2], [2, 3]]


def test_random_reindex_is_a_seeded_permutation_of_keep(tmp_path):
  rng = np.random.default_rng(3)
  lines = [f'{u} {i}' for u in range(1, 30) for i in rng.integers(1, 50, 7)]
  path = _write(tmp_path / 'p.txt', '\n'.join(lines))
  kwargs = dict(min_user_interactions=0, min_item_interactions=0)
  keep = data.load(path, reindex='keep', verbose=False, **kwargs)
  rand = data.load(path, reindex='random', seed=7, verbose=False, **kwargs)
  again = data.load(path, reindex='random', seed=7, verbose=False, **kwargs)
  other = data.load(path, reindex='random', seed=8, verbose=False, **kwargs)
  _assert_same_dataset(rand, again)
  mapping = {}
  for k, r in zip(keep.sequences, rand.sequences, strict=True):
    for a, b in zip(k.tolist(), r.tolist(), strict=True):
      assert mapping.setdefault(a, b) == b
  assert sorted(mapping.values()) == list(range(1, keep.num_items + 1))
  assert any(a != b for a, b in mapping.items())
  for a, b in mapping.items():
    assert rand.item_raw_ids[b] == keep.item_raw_ids[a]
  assert any(
    not np.array_equal(x, y)
    for x, y in zip(rand.sequences, other.sequences, strict=True)
  )


def _random_csv_rows(seed):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(400):
    user = f'u{rng.integers(0, 25)}'
    item = f'i{rng.integers(0, 40)}'
    rows.append(f'{user},{item},{rng.integers(0, 30)}')
  rows += rows[:20]  # exact duplicates
  return rows


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('reindex', ['keep', 'random'])
def test_order_invariance_of_generic_csv(tmp_path, seed, reindex):
  rows = _random_csv_rows(seed)
  shuffled = list(np.random.default_rng(100 + seed).permutation(rows))
  a = _write(tmp_path / 'a.csv', 'user,item,timestamp\n' + '\n'.join(rows))
  b = _write(tmp_path / 'b.csv', 'user,item,timestamp\n' + '\n'.join(shuffled))
  kwargs = dict(reindex=reindex, seed=seed, verbose=False)
  ds_a, ds_b = data.load(a, **kwargs), data.load(b, **kwargs)
  assert ds_a.num_interactions > 0
  _assert_same_dataset(ds_a, ds_b)


def _kcore_reference(users, items, k_user, k_item, seed):
  """Removes one failing user or item at a time, in random order."""
  rng = np.random.default_rng(seed)
  alive = set(range(len(users)))
  while True:
    uc = collections.Counter(users[r] for r in alive)
    ic = collections.Counter(items[r] for r in alive)
    failing = [('u', u) for u, c in uc.items() if c < k_user]
    failing += [('i', i) for i, c in ic.items() if c < k_item]
    if not failing:
      return alive
    kind, value = failing[rng.integers(len(failing))]
    column = users if kind == 'u' else items
    alive = {r for r in alive if column[r] != value}


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
  rows=st.lists(
    st.tuples(st.integers(0, 11), st.integers(0, 13)), min_size=0, max_size=80
  ),
  k_user=st.integers(0, 5),
  k_item=st.integers(0, 5),
)
def test_kcore_reaches_the_unique_fixed_point(rows, k_user, k_item):
  users = np.array([r[0] for r in rows], dtype=np.int64)
  items = np.array([r[1] for r in rows], dtype=np.int64)
  keep, _ = data.kcore_filter(
    users, items, min_user_interactions=k_user, min_item_interactions=k_item
  )
  # Fixed point: every remaining user and item meets its threshold.
  if keep.any():
    assert min(collections.Counter(users[keep]).values()) >= k_user
    assert min(collections.Counter(items[keep]).values()) >= k_item
  # And it is the k-core: any removal order reaches the same rows.
  expected = _kcore_reference(users, items, k_user, k_item, seed=len(rows))
  assert set(np.flatnonzero(keep).tolist()) == expected


def test_kcore_cascades_over_rounds():
  # Item 9 has 1 interaction; removing it leaves user 0 with 1 < 2.
  users = np.array([0, 0, 1, 1, 2, 2])
  items = np.array([9, 1, 1, 2, 1, 2])
  keep, rounds = data.kcore_filter(
    users, items, min_user_interactions=2, min_item_interactions=2
  )
  assert keep.tolist() == [False, False, True, True, True, True]
  assert rounds == 2


def test_default_kcore_is_five_for_csv(tmp_path):
  # Users 1..5 rate items 1..5: every count is 5. User 6 rates 2 items and
  # item 6 has 4 ratings: both fall below the default threshold of 5.
  rows = [f'{u},{i},{i}' for u in range(1, 6) for i in range(1, 6)]
  rows += ['6,1,1', '6,2,2'] + [f'{u},6,9' for u in range(1, 5)]
  path = _write(tmp_path / 'k.csv', 'user,item,timestamp\n' + '\n'.join(rows))
  ds = data.load(path, reindex='keep', verbose=False)
  assert ds.user_raw_ids == ['1', '2', '3', '4', '5']
  assert ds.item_raw_ids == ['<pad>', '1', '2', '3', '4', '5']
  assert ds.num_interactions == 25


def test_everything_filtered_is_an_error(tmp_path):
  path = _write(tmp_path / 'k.csv', 'user,item,timestamp\n1,2,3\n')
  with pytest.raises(data.DataError, match='no interactions left'):
    data.load(path, verbose=False)


def test_bad_reindex_mode(tmp_path):
  path = _write(tmp_path / 'p.txt', '1 2\n')
  with pytest.raises(ValueError, match='reindex'):
    data.load(path, reindex='shuffle', verbose=False)


def test_natural_codes_and_first_appearance():
  unique, codes = preprocess.natural_codes(np.array([10, 9, 10, 100]))
  assert unique.tolist() == [9, 10, 100] and codes.tolist() == [1, 0, 1, 2]
  codes = preprocess.first_appearance_codes(np.array(['c', 'a', 'c', 'b']))
  assert codes.tolist() == [0, 1, 0, 2]


def test_dataset_validate_names_the_broken_invariant():
  with pytest.raises(ValueError, match=r'sequences\[1\] holds item ids'):
    data.Dataset.from_sequences([[1, 2], [0, 3]], num_items=3)
  with pytest.raises(ValueError, match=r'timestamps\[0\] are not'):
    data.Dataset.from_sequences([[1, 2]], timestamps=[[5, 4]])
  ds = data.Dataset.from_sequences([[3, 1], [2]])
  assert (ds.num_users, ds.num_items, ds.num_interactions) == (2, 3, 3)
  assert ds.lengths().tolist() == [2, 1]
  np.testing.assert_array_equal(ds.flat.items, [3, 1, 2])
  np.testing.assert_array_equal(ds.flat.offsets, [0, 2, 3])
