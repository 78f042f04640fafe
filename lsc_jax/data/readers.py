"""Readers for the interaction files that `lsc_jax.data.load` accepts.

Each reader turns one file format into `RawInteractions`: one row per
interaction with the raw user id, the raw item id, an optional timestamp
and the 1-based line it came from. Readers validate as they go and raise
`DataError` naming the file, the line and what was expected; they never
drop or repair a row (blank lines are not rows and are skipped).

Formats (`detect_format` picks one from a path):

- `p5`: P5's `sequential_data.txt`, one user per line,
  `user_id item_id item_id ...`, positive integers, items in the user's
  chronological order. A user may appear on one line only. Titles come
  from `datamaps.json` (`id2item`: P5 item id -> ASIN) plus exactly one
  RecBole-style `*.item` file (tab-separated, header with an `item_id` and
  a `title` column) in the same directory, when both are there.
- `pairs`: SASRec-style `user item` lines, two positive integers per line;
  a user's lines may be spread over the file and their file order is the
  chronological order.
- `csv`: a delimited text file with a header row. The delimiter is the one
  of tab, comma, semicolon or `|` that splits the header into the most
  fields. Column names are matched case-insensitively after dropping a
  RecBole type suffix (`user_id:token` -> `user_id`):
  user column one of `USER_COLUMNS`, item column one of `ITEM_COLUMNS`,
  optional timestamp column one of `TIME_COLUMNS` (integer values, e.g.
  unix seconds). Other columns (ratings, ...) are ignored: every row is an
  interaction. Ids are stripped of surrounding spaces. MovieLens
  `ratings.csv` (userId, movieId, rating, timestamp) is this format; a
  `movies.csv` (movieId, title, ...) beside it gives titles.

Raw ids of the integer formats (`p5`, `pairs`) are int64. A csv id column
is read as int64 when every value is a plain decimal integer without
leading zeros (so ids sort numerically, as MovieLens ids should), otherwise
as strings (sorted by code point).

Titles are normalised: runs of whitespace (the Beauty item file has titles
with embedded newlines and tabs) become one space and the ends are
stripped. `RawInteractions.titles_normalised` counts the titles changed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np

USER_COLUMNS = (
  'user',
  'user_id',
  'userid',
  'user_idx',
  'uid',
  'reviewerid',
  'customer_id',
)
ITEM_COLUMNS = (
  'item',
  'item_id',
  'itemid',
  'item_idx',
  'iid',
  'movieid',
  'movie_id',
  'asin',
  'product_id',
  'productid',
  'business_id',
)
TIME_COLUMNS = (
  'timestamp',
  'time',
  'ts',
  'unix_time',
  'unix_timestamp',
  'unixreviewtime',
)
TITLE_COLUMNS = ('title', 'name', 'item_name')

FORMATS = ('p5', 'pairs', 'csv')

_P5_EXPECTED = (
  'P5 sequential data: one line per user, "user_id item_id item_id ...", '
  'positive integers separated by spaces'
)
_PAIRS_EXPECTED = '"user item" lines: two positive integers per line'
_CSV_EXPECTED = (
  'a header row naming the user, item and (optional) timestamp columns, '
  'separated by tab, comma, semicolon or |'
)
_INT_RE = re.compile(r'[+-]?[0-9]+')
_CANONICAL_INT_RE = re.compile(r'-?(?:0|[1-9][0-9]*)')
_SPACE_RE = re.compile(r'\s+')


class DataError(ValueError):
  """Malformed or missing input data; the message names file and line."""


@dataclasses.dataclass(frozen=True, eq=False)
class RawInteractions:
  """Interactions as read, one row per interaction, in file order.

  Attributes:
    source: the file read.
    format: one of `FORMATS`.
    users: `[num_rows]` raw user ids (int64, or str for some csv files).
    items: `[num_rows]` raw item ids (int64, or str for some csv files).
    timestamps: int64 `[num_rows]`, or None when the format has none.
    lines: int64 `[num_rows]`, the 1-based line each row came from.
    sequence_order: True when a user's rows are in chronological order in
      the file (formats without timestamps).
    item_text: title per raw item id, keyed by `str(raw_id)`; None when no
      title file was found.
    text_source: the file(s) the titles came from, or a reason why none.
    titles_normalised: how many titles had their whitespace normalised.
  """

  source: str
  format: str
  users: np.ndarray
  items: np.ndarray
  timestamps: np.ndarray | None
  lines: np.ndarray
  sequence_order: bool
  item_text: dict[str, str] | None = None
  text_source: str = ''
  titles_normalised: int = 0

  @property
  def num_rows(self) -> int:
    return len(self.users)


def _error(path, line: int | None, message: str) -> DataError:
  where = f'{path}' if line is None else f'{path}, line {line}'
  return DataError(f'{where}: {message}')


def _read_text(path: Path, expected: str) -> str:
  """Reads a UTF-8 file; a missing, unreadable or empty file is an error."""
  if not path.exists():
    raise _error(path, None, f'file does not exist; expected {expected}')
  if path.is_dir():
    raise _error(path, None, f'is a directory; expected a file with {expected}')
  data = path.read_bytes()
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b'\n') + 1
    raise _error(path, line, f'not valid UTF-8 text ({e.reason})') from None
  if text.startswith('\ufeff'):
    text = text[1:]
  if not text.strip():
    raise _error(path, None, f'file is empty; expected {expected}')
  return text


def _positive_ints(path, line_no: int, parts: list[str]) -> list[int]:
  joined = ''.join(parts)
  if not (joined.isascii() and joined.isdigit()):
    bad = next(p for p in parts if not (p.isascii() and p.isdigit()))
    raise _error(path, line_no, f'expected a positive integer id, got {bad!r}')
  ids = [int(p) for p in parts]
  if 0 in ids:
    raise _error(
      path, line_no, 'expected ids >= 1 (0 is reserved for padding), got 0'
    )
  return ids


def normalise_title(title: str) -> str:
  """Collapses whitespace runs to one space and strips the ends."""
  return _SPACE_RE.sub(' ', title).strip()


def read_p5(path) -> RawInteractions:
  """Reads P5 `sequential_data.txt` (and titles beside it, if any)."""
  path = Path(path)
  text = _read_text(path, _P5_EXPECTED)
  users: list[int] = []
  items: list[int] = []
  lines: list[int] = []
  first_line: dict[int, int] = {}
  for line_no, line in enumerate(text.splitlines(), 1):
    parts = line.split()
    if not parts:
      continue
    if len(parts) < 2:
      raise _error(
        path,
        line_no,
        'expected "user_id item_id [item_id ...]" (a user with at least '
        f'one item), got {line.strip()!r}',
      )
    ids = _positive_ints(path, line_no, parts)
    user = ids[0]
    if user in first_line:
      raise _error(
        path,
        line_no,
        f'user {user} already has a line (line {first_line[user]}); '
        'expected one line per user in P5 data',
      )
    first_line[user] = line_no
    users.extend([user] * (len(ids) - 1))
    items.extend(ids[1:])
    lines.extend([line_no] * (len(ids) - 1))

  item_text, text_source, normalised = _read_p5_titles(path.parent)
  return RawInteractions(
    source=str(path),
    format='p5',
    users=np.asarray(users, dtype=np.int64),
    items=np.asarray(items, dtype=np.int64),
    timestamps=None,
    lines=np.asarray(lines, dtype=np.int64),
    sequence_order=True,
    item_text=item_text,
    text_source=text_source,
    titles_normalised=normalised,
  )


def _read_p5_titles(directory: Path) -> tuple[dict | None, str, int]:
  """Titles keyed by P5 item id via `datamaps.json` and a `*.item` file."""
  datamaps_path = directory / 'datamaps.json'
  item_files = sorted(directory.glob('*.item'))
  if not datamaps_path.exists() or not item_files:
    return None, 'none (needs datamaps.json and a *.item file)', 0
  if len(item_files) > 1:
    names = ', '.join(p.name for p in item_files)
    raise _error(
      directory, None, f'expected one *.item title file, found {names}'
    )
  id2item = _read_id2item(datamaps_path)
  asin_titles, normalised = _read_item_file(item_files[0])
  titles = {
    p5_id: asin_titles[asin]
    for p5_id, asin in id2item.items()
    if asin in asin_titles
  }
  source = f'{datamaps_path.name} + {item_files[0].name}'
  return titles, source, normalised


def _read_id2item(path: Path) -> dict[str, str]:
  text = _read_text(path, 'a JSON object with an "id2item" map')
  try:
    datamaps = json.loads(text)
  except json.JSONDecodeError as e:
    raise _error(path, e.lineno, f'invalid JSON: {e.msg}') from None
  if not isinstance(datamaps, dict) or not isinstance(
    datamaps.get('id2item'), dict
  ):
    raise _error(
      path, 1, 'expected a JSON object with an "id2item" map (P5 id -> ASIN)'
    )
  id2item = {}
  for key, asin in datamaps['id2item'].items():
    if not (key.isascii() and key.isdigit()) or not isinstance(asin, str):
      raise _error(
        path,
        None,
        f'id2item entry {key!r}: {asin!r}; expected "integer id": "ASIN"',
      )
    id2item[str(int(key))] = asin
  return id2item


def _read_item_file(path: Path) -> tuple[dict[str, str], int]:
  """RecBole atomic item file: tab-separated, quoted fields may hold tabs
  and newlines. Returns {item_id: title}, titles normalised."""
  text = _read_text(path, 'a tab-separated item file with a header')
  reader = csv.reader(io.StringIO(text, newline=''), delimiter='\t')
  header = [_column_key(c) for c in next(reader)]
  if 'item_id' not in header:
    raise _error(path, 1, f'expected an item_id column, got {header}')
  title_col = next((header.index(c) for c in TITLE_COLUMNS if c in header), -1)
  if title_col < 0:
    raise _error(
      path, 1, f'expected a title column ({TITLE_COLUMNS}), got {header}'
    )
  id_col = header.index('item_id')
  titles: dict[str, str] = {}
  normalised = 0
  for row in reader:
    if not row:
      continue
    if len(row) != len(header):
      raise _error(
        path,
        reader.line_num,
        f'expected {len(header)} tab-separated fields, got {len(row)}',
      )
    key = row[id_col].strip()
    if key in titles:
      raise _error(path, reader.line_num, f'item {key!r} appears twice')
    title = normalise_title(row[title_col])
    normalised += title != row[title_col]
    titles[key] = title
  return titles, normalised


def read_pairs(path) -> RawInteractions:
  """Reads SASRec-style `user item` lines; file order is time order."""
  path = Path(path)
  text = _read_text(path, _PAIRS_EXPECTED)
  users: list[int] = []
  items: list[int] = []
  lines: list[int] = []
  for line_no, line in enumerate(text.splitlines(), 1):
    parts = line.split()
    if not parts:
      continue
    if len(parts) != 2:
      raise _error(
        path,
        line_no,
        f'expected "user item" (2 integers), got {len(parts)} fields: '
        f"{line.strip()!r} (for P5 data pass format='p5')",
      )
    user, item = _positive_ints(path, line_no, parts)
    users.append(user)
    items.append(item)
    lines.append(line_no)
  return RawInteractions(
    source=str(path),
    format='pairs',
    users=np.asarray(users, dtype=np.int64),
    items=np.asarray(items, dtype=np.int64),
    timestamps=None,
    lines=np.asarray(lines, dtype=np.int64),
    sequence_order=True,
    text_source='none (the pairs format has no titles)',
  )


def _column_key(name: str) -> str:
  """'userId' -> 'userid'; RecBole 'user_id:token' -> 'user_id'."""
  return name.strip().strip('"').split(':', 1)[0].strip().lower()


def _detect_delimiter(path: Path, header_line: str) -> str:
  best, best_fields = '', 1
  for delimiter in ('\t', ',', ';', '|'):
    fields = next(csv.reader([header_line], delimiter=delimiter))
    if len(fields) > best_fields:
      best, best_fields = delimiter, len(fields)
  if not best:
    raise _error(path, 1, f'expected {_CSV_EXPECTED}, got {header_line!r}')
  return best


def _find_column(path, header, names, role, required=True) -> int | None:
  keys = [_column_key(c) for c in header]
  found = [i for i, k in enumerate(keys) if k in names]
  if len(found) > 1:
    cols = ', '.join(repr(header[i]) for i in found)
    raise _error(path, 1, f'several {role} columns ({cols}); expected one')
  if not found:
    if required:
      raise _error(
        path,
        1,
        f'missing {role} column: expected one of {", ".join(names)} '
        f'(case-insensitive), got columns {header}',
      )
    return None
  return found[0]


def _id_array(values: list[str]) -> np.ndarray:
  """int64 when every id is a canonical decimal integer, else str."""
  if all(_CANONICAL_INT_RE.fullmatch(v) for v in values):
    return np.asarray([int(v) for v in values], dtype=np.int64)
  return np.asarray(values, dtype=np.str_)


def read_csv(path) -> RawInteractions:
  """Reads a delimited file with a header (see the module docstring)."""
  path = Path(path)
  text = _read_text(path, _CSV_EXPECTED)
  header_line = text.splitlines()[0]
  delimiter = _detect_delimiter(path, header_line)
  reader = csv.reader(io.StringIO(text, newline=''), delimiter=delimiter)
  header = next(reader)
  user_col = _find_column(path, header, USER_COLUMNS, 'user')
  item_col = _find_column(path, header, ITEM_COLUMNS, 'item')
  time_col = _find_column(path, header, TIME_COLUMNS, 'timestamp', False)

  users: list[str] = []
  items: list[str] = []
  times: list[int] = []
  lines: list[int] = []
  for row in reader:
    if not row or (len(row) == 1 and not row[0].strip()):
      continue
    line_no = reader.line_num
    if len(row) != len(header):
      raise _error(
        path,
        line_no,
        f'expected {len(header)} fields like the header, got {len(row)}',
      )
    user, item = row[user_col].strip(), row[item_col].strip()
    if not user or not item:
      role = 'user' if not user else 'item'
      raise _error(path, line_no, f'expected a {role} id, got an empty field')
    if time_col is not None:
      stamp = row[time_col].strip()
      if not _INT_RE.fullmatch(stamp):
        raise _error(
          path,
          line_no,
          f'expected an integer timestamp in column {header[time_col]!r}, '
          f'got {stamp!r}',
        )
      times.append(int(stamp))
    users.append(user)
    items.append(item)
    lines.append(line_no)
  if not users:
    raise _error(path, None, 'no interactions after the header row')

  item_text, text_source, normalised = None, 'none (no title file)', 0
  movies = path.parent / 'movies.csv'
  if _column_key(header[item_col]) in ('movieid', 'movie_id'):
    if movies.exists() and movies != path:
      item_text, normalised = _read_title_csv(movies)
      text_source = movies.name
  return RawInteractions(
    source=str(path),
    format='csv',
    users=_id_array(users),
    items=_id_array(items),
    timestamps=(
      None if time_col is None else np.asarray(times, dtype=np.int64)
    ),
    lines=np.asarray(lines, dtype=np.int64),
    sequence_order=time_col is None,
    item_text=item_text,
    text_source=text_source,
    titles_normalised=normalised,
  )


def _read_title_csv(path: Path) -> tuple[dict[str, str], int]:
  """MovieLens `movies.csv`-style titles: {item id: title}."""
  text = _read_text(path, 'a header naming an item id and a title column')
  header_line = text.splitlines()[0]
  reader = csv.reader(
    io.StringIO(text, newline=''),
    delimiter=_detect_delimiter(path, header_line),
  )
  header = next(reader)
  item_col = _find_column(path, header, ITEM_COLUMNS, 'item')
  title_col = _find_column(path, header, TITLE_COLUMNS, 'title')
  titles: dict[str, str] = {}
  normalised = 0
  for row in reader:
    if not row:
      continue
    if len(row) != len(header):
      raise _error(
        path,
        reader.line_num,
        f'expected {len(header)} fields like the header, got {len(row)}',
      )
    key = row[item_col].strip()
    if key in titles:
      raise _error(path, reader.line_num, f'item {key!r} appears twice')
    title = normalise_title(row[title_col])
    normalised += title != row[title_col]
    titles[key] = title
  return titles, normalised


def detect_format(path) -> tuple[str, Path]:
  """Which reader a path needs, and the interaction file to give it.

  A directory must hold `sequential_data.txt` (p5) or `ratings.csv` (csv).
  A file named `sequential_data.txt` is p5. Otherwise the first non-blank
  line decides: only integers, two of them -> pairs; more -> p5; anything
  else -> csv (a header row).
  """
  path = Path(path)
  if not path.exists():
    raise _error(
      path,
      None,
      'file does not exist; expected a built-in dataset name, a directory '
      'with sequential_data.txt or ratings.csv, or an interaction file',
    )
  if path.is_dir():
    for name, fmt in (('sequential_data.txt', 'p5'), ('ratings.csv', 'csv')):
      if (path / name).is_file():
        return fmt, path / name
    raise _error(
      path,
      None,
      'directory holds neither sequential_data.txt (P5) nor ratings.csv '
      '(MovieLens)',
    )
  if path.name == 'sequential_data.txt':
    return 'p5', path
  first = ''
  with path.open('rb') as f:
    for raw_line in f:
      first = raw_line.decode('utf-8', errors='replace').strip()
      if first:
        break
  if not first:
    raise _error(
      path,
      None,
      'file is empty; expected P5 lines, "user item" lines or a header row',
    )
  parts = first.lstrip('\ufeff').split()
  if all(p.isascii() and p.isdigit() for p in parts):
    if len(parts) == 2:
      return 'pairs', path
    if len(parts) > 2:
      return 'p5', path
    raise _error(
      path,
      1,
      'a single integer; expected "user item" or "user item item ..."',
    )
  return 'csv', path


def read(path, format: str = 'auto') -> RawInteractions:
  """Reads interactions from `path` with the given or detected format."""
  if format == 'auto':
    format, path = detect_format(path)
  elif format not in FORMATS:
    raise ValueError(
      f'format must be "auto" or one of {FORMATS}, got {format!r}'
    )
  elif Path(path).is_dir():
    _, path = detect_format(path)
  readers = {'p5': read_p5, 'pairs': read_pairs, 'csv': read_csv}
  return readers[format](path)
