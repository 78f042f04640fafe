"""Tests for `lsc_jax.data.readers`: formats, detection and bad input."""

import json

import numpy as np
import pytest

from lsc_jax import data
from lsc_jax.data import readers


def _write(path, text):
  path.write_text(text, encoding='utf-8')
  return path


def test_read_p5_rows_and_lines(tmp_path):
  path = _write(tmp_path / 'sequential_data.txt', '3 5 2 5\n\n1 7 4\n')
  raw = readers.read(path)
  assert raw.format == 'p5'
  np.testing.assert_array_equal(raw.users, [3, 3, 3, 1, 1])
  np.testing.assert_array_equal(raw.items, [5, 2, 5, 7, 4])
  np.testing.assert_array_equal(raw.lines, [1, 1, 1, 3, 3])
  assert raw.timestamps is None and raw.sequence_order
  assert raw.item_text is None


def test_read_p5_titles_through_datamaps(tmp_path):
  _write(tmp_path / 'sequential_data.txt', '1 1 2 3\n')
  (tmp_path / 'datamaps.json').write_text(
    json.dumps({'id2item': {'1': 'A1', '2': 'B2', '3': 'C3'}})
  )
  # Quoted title with an embedded newline and tab, an empty title, and an
  # item (ZZ) that the data does not use.
  _write(
    tmp_path / 'Toy.item',
    'item_id:token\ttitle:token\tbrand:token\n'
    'A1\t"Cream \n Vanilla\t2 oz"\tX\n'
    'B2\t\tY\n'
    'C3\tLip Balm\tZ\n'
    'ZZ\tUnused\tW\n',
  )
  raw = readers.read(tmp_path)
  assert raw.item_text == {'1': 'Cream Vanilla 2 oz', '2': '', '3': 'Lip Balm'}
  assert raw.titles_normalised == 1


def test_read_pairs(tmp_path):
  path = _write(tmp_path / 'video.txt', '2 9\n1 4\n2 3\n')
  raw = readers.read(path)
  assert raw.format == 'pairs'
  np.testing.assert_array_equal(raw.users, [2, 1, 2])
  np.testing.assert_array_equal(raw.items, [9, 4, 3])


@pytest.mark.parametrize('delimiter', [',', '\t', ';', '|'])
def test_read_csv_detects_delimiter(tmp_path, delimiter):
  rows = [['userId', 'movieId', 'rating', 'timestamp'], ['7', '31', '2.5', '9']]
  text = '\n'.join(delimiter.join(r) for r in rows) + '\n'
  raw = readers.read(_write(tmp_path / 'r.txt', text))
  assert raw.format == 'csv'
  assert raw.users.dtype == np.int64 and raw.users.tolist() == [7]
  assert raw.items.tolist() == [31]
  assert raw.timestamps.tolist() == [9]
  assert not raw.sequence_order


def test_read_csv_recbole_names_and_string_ids(tmp_path):
  text = 'user_id:token\titem_id:token\ttimestamp:float\nu1\t007\t5\n'
  raw = readers.read(_write(tmp_path / 'x.inter', text))
  # '007' is not a canonical integer, so ids stay strings.
  assert raw.users.tolist() == ['u1'] and raw.items.tolist() == ['007']


def test_read_csv_without_timestamp_keeps_file_order(tmp_path):
  raw = readers.read(_write(tmp_path / 'x.csv', 'user,item\nb,x\na,y\n'))
  assert raw.timestamps is None and raw.sequence_order


def test_movielens_titles_from_movies_csv(tmp_path):
  _write(tmp_path / 'ratings.csv', 'userId,movieId,rating,timestamp\n1,2,4,5\n')
  _write(tmp_path / 'movies.csv', 'movieId,title,genres\n2,"A, B (1999)",X\n')
  raw = readers.read(tmp_path)
  assert raw.item_text == {'2': 'A, B (1999)'}
  assert raw.text_source == 'movies.csv'


@pytest.mark.parametrize(
  'name, text, expected',
  [
    ('sequential_data.txt', '1 2\n', 'p5'),
    ('a.txt', '1 2 3\n', 'p5'),
    ('a.txt', '\n1 2\n', 'pairs'),
    ('a.csv', 'user,item\n', 'csv'),
  ],
)
def test_detect_format(tmp_path, name, text, expected):
  fmt, _ = readers.detect_format(_write(tmp_path / name, text))
  assert fmt == expected


def _raises(path, *fragments, format='auto'):
  with pytest.raises(data.DataError) as info:
    readers.read(path, format=format)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_data_error_is_value_error():
  assert issubclass(data.DataError, ValueError)


def test_error_p5_malformed_line(tmp_path):
  path = _write(tmp_path / 'sequential_data.txt', '1 2 3\n\n2\n')
  _raises(path, str(path), 'line 3', 'at least one item')


def test_error_p5_non_integer_id(tmp_path):
  path = _write(tmp_path / 'sequential_data.txt', '1 2 3\n2 4 x5\n')
  _raises(path, str(path), 'line 2', 'positive integer', "'x5'")


def test_error_p5_zero_id(tmp_path):
  path = _write(tmp_path / 'sequential_data.txt', '1 2 0\n')
  _raises(path, 'line 1', '0 is reserved for padding')


def test_error_p5_user_on_two_lines(tmp_path):
  path = _write(tmp_path / 'sequential_data.txt', '1 2 3\n2 4\n1 5\n')
  _raises(path, 'line 3', 'line 1', 'one line per user')


def test_error_pairs_wrong_field_count(tmp_path):
  path = _write(tmp_path / 'p.txt', '1 2\n1 3\n1 4 5\n')
  _raises(path, str(path), 'line 3', '"user item"', format='pairs')


def test_error_pairs_non_integer(tmp_path):
  path = _write(tmp_path / 'p.txt', '1 2\n1 -3\n')
  _raises(path, 'line 2', 'positive integer', "'-3'")


def test_error_empty_file(tmp_path):
  path = _write(tmp_path / 'sequential_data.txt', '\n  \n')
  _raises(path, str(path), 'empty')
  path = _write(tmp_path / 'x.csv', '')
  with pytest.raises(data.DataError, match='empty'):
    data.load(path, verbose=False)


def test_error_csv_missing_column(tmp_path):
  path = _write(tmp_path / 'x.csv', 'user_id,rating,timestamp\n1,2,3\n')
  _raises(path, str(path), 'line 1', 'missing item column', 'movieId'.lower())


def test_error_csv_wrong_field_count(tmp_path):
  path = _write(tmp_path / 'x.csv', 'user,item,timestamp\n1,2,3\n1,2\n')
  _raises(path, 'line 3', 'expected 3 fields')


def test_error_csv_bad_timestamp(tmp_path):
  path = _write(tmp_path / 'x.csv', 'user,item,timestamp\n1,2,3\n1,2,3.5\n')
  _raises(path, 'line 3', 'integer timestamp', "'3.5'")


def test_error_csv_empty_id(tmp_path):
  path = _write(tmp_path / 'x.csv', 'user,item\n1,2\n,2\n')
  _raises(path, 'line 3', 'user id')


def test_error_csv_header_only(tmp_path):
  path = _write(tmp_path / 'x.csv', 'user,item,timestamp\n')
  _raises(path, 'no interactions')


def test_error_csv_ambiguous_columns(tmp_path):
  path = _write(tmp_path / 'x.csv', 'user,uid,item\n1,2,3\n')
  _raises(path, 'line 1', 'several user columns')


def test_error_file_does_not_exist(tmp_path):
  missing = tmp_path / 'nothing.csv'
  with pytest.raises(data.DataError, match='does not exist') as info:
    data.load(missing, verbose=False)
  assert str(missing) in str(info.value)


def test_error_directory_without_data(tmp_path):
  with pytest.raises(data.DataError, match='neither sequential_data.txt'):
    data.load(tmp_path, verbose=False)


def test_error_unknown_builtin_name():
  with pytest.raises(data.DataError, match='unknown built-in') as info:
    data.load('beaty', verbose=False)
  assert 'beauty' in str(info.value)


def test_error_item_file_bad_row(tmp_path):
  _write(tmp_path / 'sequential_data.txt', '1 1\n')
  (tmp_path / 'datamaps.json').write_text(json.dumps({'id2item': {'1': 'A'}}))
  bad = _write(tmp_path / 'b.item', 'item_id:token\ttitle:token\nA\tx\ty\n')
  _raises(tmp_path, str(bad), 'line 2', 'expected 2 tab-separated fields')


def test_error_datamaps_invalid_json(tmp_path):
  _write(tmp_path / 'sequential_data.txt', '1 1\n')
  bad = _write(tmp_path / 'datamaps.json', '{\n"id2item": [\n')
  _write(tmp_path / 'b.item', 'item_id:token\ttitle:token\nA\tx\n')
  _raises(tmp_path, str(bad), 'invalid JSON')


def test_error_not_utf8(tmp_path):
  path = tmp_path / 'sequential_data.txt'
  path.write_bytes(b'1 2 3\n2 \xff\n')
  _raises(path, 'line 2', 'UTF-8')
