"""Tests of item identifiers and the CSR prefix trie."""

import numpy as np
import pytest

from lsc_jax import prompts
from lsc_jax.models import item_ids


def _ids(rows):
  return item_ids.from_token_rows(
    'text', rows, base_vocab_size=11, vocab_size=11, eos_id=1, pad_id=0
  )


def test_trie_structure_by_hand():
  # Items: 1 = [5], 2 = [5, 7], 3 = [6, 5], each followed by EOS (1).
  ids = _ids([[5], [5, 7], [6, 5]])
  trie = ids.trie
  # Nodes in creation order: 0 root, 1 '5', 2 '5 EOS' (item 1),
  # 3 '5 7', 4 '5 7 EOS' (item 2), 5 '6', 6 '6 5', 7 '6 5 EOS' (item 3).
  np.testing.assert_array_equal(trie.node_items, [0, 0, 1, 0, 2, 0, 0, 3])
  np.testing.assert_array_equal(trie.node_depth, [0, 1, 2, 2, 3, 1, 2, 3])
  # Edges per node: root {5, 6}; '5' {EOS, 7} (sorted); '5 7' {EOS};
  # '6' {5}; '6 5' {EOS}.
  np.testing.assert_array_equal(trie.offsets, [0, 2, 4, 4, 5, 5, 6, 7, 7])
  np.testing.assert_array_equal(trie.child_tokens, [5, 6, 1, 7, 1, 5, 1])
  np.testing.assert_array_equal(trie.child_nodes, [1, 5, 2, 3, 4, 6, 7])
  assert trie.widths == (2, 2, 1)
  assert trie.depth == 3 and trie.num_items == 3
  assert trie.item_of([5, 7, 1]) == 2
  assert trie.item_of([5, 1]) == 1
  assert trie.item_of([5, 7]) == 0  # a prefix, not a complete identifier
  assert trie.item_of([7]) == 0
  np.testing.assert_array_equal(ids.tokens[2], [5, 7, 1])
  np.testing.assert_array_equal(ids.lengths, [0, 2, 3, 3])
  np.testing.assert_array_equal(ids.prompt_tokens(3), [6, 5])


def test_duplicate_or_malformed_identifiers_are_rejected():
  with pytest.raises(ValueError, match='items 1 and 3 have the same'):
    _ids([[5, 7], [6], [5, 7]])
  tokens = np.array([[0, 0], [5, 1], [1, 5]], np.int32)
  with pytest.raises(ValueError, match='identifier of item 2'):
    item_ids.PrefixTrie.build(tokens, np.array([0, 2, 2]), eos_id=1)


def test_atomic_ids():
  num_items = 101
  ids = item_ids.atomic_ids(num_items, base_vocab_size=37)
  assert ids.vocab_size == 138
  assert ids.trie.widths == (101, 1)
  # Root, one node per item token, one terminal per item.
  assert ids.trie.num_nodes == 1 + 2 * num_items
  for item in (1, 50, 101):
    assert ids.trie.item_of([37 + item - 1, 1]) == item
    np.testing.assert_array_equal(ids.prompt_tokens(item), [37 + item - 1])
  with pytest.raises(ValueError, match='item 102 is not an item id'):
    ids.identifiers(np.array([1, 102]))
  with pytest.raises(ValueError, match='item 0 is not an item id'):
    ids.check_items(np.array([[3, 0]]), 'here')


def test_text_ids_decode_to_the_item_number():
  num_items = 997
  tokenizer = prompts.train_tokenizer(num_users=13, num_items=num_items)
  ids = item_ids.make_item_ids('text', num_items, tokenizer)
  assert ids.scheme == 'text' and ids.vocab_size == len(tokenizer)
  rng = np.random.default_rng(0)
  for item in rng.integers(1, num_items + 1, size=50).tolist() + [1, 997]:
    row = ids.tokens[item, : ids.lengths[item]]
    assert row[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row[:-1]).strip() == str(item)
    assert ids.trie.item_of(row.tolist()) == item
  # Memory stays linear in the number of items.
  assert ids.trie.num_nodes <= 1 + num_items * ids.max_len
  with pytest.raises(ValueError, match='Unknown item identifier scheme'):
    item_ids.make_item_ids('digits', 5, tokenizer)
