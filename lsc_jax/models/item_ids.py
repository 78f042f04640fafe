"""Item identifiers as token sequences, and a prefix trie over them.

The cloud LLM of LSC4Rec (Lv et al., KDD 2025) names an item by generating
its identifier. Two schemes:

- `atomic` (the CPU default): one new token per item, appended after the
  tokenizer's vocabulary (item i is token `base_vocab_size + i - 1`); the
  identifier is `[item token, EOS]`. The same token writes the item in the
  prompt, so the model reads and writes items with one embedding row.
- `text` (the paper's, inherited from P5): the item id as decimal text,
  split by the tokenizer (e.g. SentencePiece '▁12', '34'), then EOS.

Every identifier ends with EOS, so no identifier is a prefix of another and
the complete paths of the trie are exactly the valid items. `PrefixTrie`
stores the trie in CSR form (per node a sorted run of (token, child)
edges), small enough for jit even with one root edge per item: a dense
`[num_nodes, vocab]` table would be 12k x 13k entries for Beauty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

SCHEMES = ('atomic', 'text')


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixTrie:
  """A token trie over item identifiers, in CSR form.

  Node 0 is the root; node `n`'s edges are `offsets[n]:offsets[n + 1]` of
  `child_tokens` (sorted) and `child_nodes`. A node reached by EOS is
  terminal: `node_items[node]` is its item (0 for other nodes).

  Attributes:
    offsets: int32 `[num_nodes + 1]`.
    child_tokens: int32 `[num_edges]`.
    child_nodes: int32 `[num_edges]`.
    node_items: int32 `[num_nodes]`.
    node_depth: int32 `[num_nodes]` (root 0).
    widths: per depth d, the most children of any node at depth d; the
      beam search gathers this many edges per beam at step d.
  """

  offsets: np.ndarray
  child_tokens: np.ndarray
  child_nodes: np.ndarray
  node_items: np.ndarray
  node_depth: np.ndarray
  widths: tuple[int, ...]

  @property
  def num_nodes(self) -> int:
    return len(self.node_items)

  @property
  def depth(self) -> int:
    """The longest identifier, in tokens (EOS included)."""
    return len(self.widths)

  @property
  def num_items(self) -> int:
    return int((self.node_items > 0).sum())

  def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, child nodes) of `node`."""
    start, end = self.offsets[node], self.offsets[node + 1]
    return self.child_tokens[start:end], self.child_nodes[start:end]

  def walk(self, tokens: Sequence[int]) -> int:
    """The node after `tokens` from the root, or -1 if it leaves the trie."""
    node = 0
    for token in tokens:
      edge_tokens, edge_nodes = self.children(node)
      i = np.searchsorted(edge_tokens, token)
      if i == len(edge_tokens) or edge_tokens[i] != token:
        return -1
      node = int(edge_nodes[i])
    return node

  def item_of(self, tokens: Sequence[int]) -> int:
    """The item whose identifier is exactly `tokens` (EOS included), or 0."""
    node = self.walk(tokens)
    return 0 if node < 0 else int(self.node_items[node])

  def arrays(self) -> dict[str, jnp.ndarray]:
    """The trie as jax arrays, for use inside jit."""
    return {
      'offsets': jnp.asarray(self.offsets),
      'child_tokens': jnp.asarray(self.child_tokens),
      'child_nodes': jnp.asarray(self.child_nodes),
      'node_items': jnp.asarray(self.node_items),
    }

  @classmethod
  def build(
    cls, tokens: np.ndarray, lengths: np.ndarray, eos_id: int
  ) -> PrefixTrie:
    """Builds the trie of items 1..num_items.

    Args:
      tokens: int32 `[num_items + 1, max_len]`, row i the identifier of item
        i (row 0 unused), padded after `lengths[i]`.
      lengths: int32 `[num_items + 1]`.
      eos_id: the EOS token every identifier ends with (and nothing else
        contains).

    Raises:
      ValueError: naming the items, if an identifier does not end with EOS,
        contains EOS earlier, or two items share an identifier.
    """
    edges: list[dict[int, int]] = [{}]
    depth = [0]
    node_item = [0]
    for item in range(1, len(tokens)):
      row = tokens[item, : lengths[item]].tolist()
      if not row or row[-1] != eos_id or eos_id in row[:-1]:
        raise ValueError(
          f'identifier of item {item} is {row}; it must end with EOS '
          f'({eos_id}) and contain no other EOS.'
        )
      node = 0
      for token in row:
        child = edges[node].get(token)
        if child is None:
          child = len(edges)
          edges[node][token] = child
          edges.append({})
          depth.append(depth[node] + 1)
          node_item.append(0)
        node = child
      if node_item[node]:
        raise ValueError(
          f'items {node_item[node]} and {item} have the same identifier {row}.'
        )
      node_item[node] = item

    counts = np.array([len(e) for e in edges], np.int64)
    offsets = np.zeros(len(edges) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    child_tokens = np.zeros(offsets[-1], np.int32)
    child_nodes = np.zeros(offsets[-1], np.int32)
    for node, children in enumerate(edges):
      pairs = sorted(children.items())
      start = offsets[node]
      for j, (token, child) in enumerate(pairs):
        child_tokens[start + j] = token
        child_nodes[start + j] = child
    depth_array = np.asarray(depth, np.int32)
    max_depth = int(depth_array.max())
    widths = tuple(
      int(counts[depth_array == d].max()) for d in range(max_depth)
    )
    return cls(
      offsets=offsets.astype(np.int32),
      child_tokens=child_tokens,
      child_nodes=child_nodes,
      node_items=np.asarray(node_item, np.int32),
      node_depth=depth_array,
      widths=widths,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ItemIds:
  """Token identifiers of items 1..num_items and their trie.

  Attributes:
    scheme: 'atomic' or 'text'.
    num_items: items are 1..num_items (0 is padding, never valid).
    base_vocab_size: the tokenizer's vocabulary size.
    vocab_size: the model's vocabulary: `base_vocab_size + num_items` for
      atomic ids, `base_vocab_size` for text ids.
    eos_id, pad_id: the tokenizer's EOS and padding tokens.
    tokens: int32 `[num_items + 1, max_len]`, the identifier of each item
      (EOS included) padded with `pad_id`; row 0 is all padding.
    lengths: int32 `[num_items + 1]` (0 for row 0).
    trie: the prefix trie of all identifiers.
  """

  scheme: str
  num_items: int
  base_vocab_size: int
  vocab_size: int
  eos_id: int
  pad_id: int
  tokens: np.ndarray
  lengths: np.ndarray
  trie: PrefixTrie

  @property
  def max_len(self) -> int:
    return self.tokens.shape[1]

  def prompt_tokens(self, item: int) -> np.ndarray:
    """The tokens that write `item` inside a prompt (no EOS)."""
    return self.tokens[item, : self.lengths[item] - 1]

  def check_items(self, items: np.ndarray, where: str) -> None:
    """Raises ValueError if any item is outside 1..num_items."""
    items = np.asarray(items)
    bad = (items < 1) | (items > self.num_items)
    if bad.any():
      first = items[bad].ravel()[0]
      raise ValueError(
        f'{where}: item {first} is not an item id in 1..{self.num_items} '
        f'({int(bad.sum())} such entries).'
      )

  def identifiers(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Identifier tokens `[..., max_len]` and lengths `[...]` of `items`."""
    items = np.asarray(items)
    self.check_items(items, 'ItemIds.identifiers')
    return self.tokens[items], self.lengths[items]


def from_token_rows(
  scheme: str,
  rows: list[list[int]],
  *,
  base_vocab_size: int,
  vocab_size: int,
  eos_id: int,
  pad_id: int,
) -> ItemIds:
  """`ItemIds` from the identifier tokens of items 1..len(rows) (EOS is
  appended to each row)."""
  num_items = len(rows)
  max_len = max(len(r) for r in rows) + 1
  tokens = np.full((num_items + 1, max_len), pad_id, np.int32)
  lengths = np.zeros(num_items + 1, np.int32)
  for item, row in enumerate(rows, start=1):
    tokens[item, : len(row)] = row
    tokens[item, len(row)] = eos_id
    lengths[item] = len(row) + 1
  trie = PrefixTrie.build(tokens, lengths, eos_id)
  return ItemIds(
    scheme=scheme,
    num_items=num_items,
    base_vocab_size=base_vocab_size,
    vocab_size=vocab_size,
    eos_id=eos_id,
    pad_id=pad_id,
    tokens=tokens,
    lengths=lengths,
    trie=trie,
  )


def atomic_ids(
  num_items: int, base_vocab_size: int, *, eos_id: int = 1, pad_id: int = 0
) -> ItemIds:
  """One appended token per item: item i is token `base_vocab_size + i - 1`."""
  if num_items < 1:
    raise ValueError(f'num_items must be >= 1, got {num_items}.')
  rows = [[base_vocab_size + i] for i in range(num_items)]
  return from_token_rows(
    'atomic',
    rows,
    base_vocab_size=base_vocab_size,
    vocab_size=base_vocab_size + num_items,
    eos_id=eos_id,
    pad_id=pad_id,
  )


def text_ids(num_items: int, tokenizer) -> ItemIds:
  """The item id as decimal text split by `tokenizer` (P5's identifiers).

  Args:
    num_items: items are 1..num_items.
    tokenizer: a `transformers` tokenizer with `eos_token_id` and
      `pad_token_id`.
  """
  if num_items < 1:
    raise ValueError(f'num_items must be >= 1, got {num_items}.')
  texts = [str(i) for i in range(1, num_items + 1)]
  encoded = tokenizer(texts, add_special_tokens=False)['input_ids']
  for item, row in enumerate(encoded, start=1):
    if not row:
      raise ValueError(f'the tokenizer writes item {item} as no tokens.')
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in row:
      raise ValueError(
        f'the tokenizer writes item {item} with the unknown token: {row}.'
      )
  return from_token_rows(
    'text',
    [list(r) for r in encoded],
    base_vocab_size=len(tokenizer),
    vocab_size=len(tokenizer),
    eos_id=tokenizer.eos_token_id,
    pad_id=tokenizer.pad_token_id,
  )


def make_item_ids(scheme: str, num_items: int, tokenizer) -> ItemIds:
  """`atomic_ids` or `text_ids` for a tokenizer."""
  if scheme == 'atomic':
    return atomic_ids(
      num_items,
      len(tokenizer),
      eos_id=tokenizer.eos_token_id,
      pad_id=tokenizer.pad_token_id,
    )
  if scheme == 'text':
    return text_ids(num_items, tokenizer)
  raise ValueError(
    f'Unknown item identifier scheme {scheme!r}; expected one of {SCHEMES}.'
  )
