"""Tests of prompt assembly and the prompt tokenizer."""

import numpy as np
import pytest

from lsc_jax import prompts
from lsc_jax.models import item_ids

NUM_USERS, NUM_ITEMS = 29, 997


@pytest.fixture(scope='module')
def tokenizer():
  return prompts.train_tokenizer(NUM_USERS, NUM_ITEMS)


def test_special_tokens_and_whole_template_words(tokenizer):
  assert tokenizer.pad_token_id == 0
  assert tokenizer.eos_token_id == 1
  pieces = tokenizer.tokenize('Can you recommend the next possible item')
  assert pieces == [
    '▁Can', '▁you', '▁recommend', '▁the', '▁next', '▁possible', '▁item'
  ]  # fmt: skip


@pytest.mark.parametrize('template', sorted(prompts.TEMPLATES))
@pytest.mark.parametrize('separator', prompts.SEPARATORS)
def test_assembly_equals_tokenizing_the_text(tokenizer, template, separator):
  ids = item_ids.make_item_ids('text', NUM_ITEMS, tokenizer)
  builder = prompts.PromptBuilder(tokenizer, ids, max_history=None)
  rng = np.random.default_rng(len(template))
  for length in (0, 1, 7):
    history = rng.integers(1, NUM_ITEMS + 1, size=length)
    user = int(rng.integers(0, NUM_USERS))
    got = builder.build(user, history, template=template, separator=separator)
    text = prompts.render_text(template, user, history, separator)
    expected = tokenizer(text)['input_ids']
    if expected[-1] != tokenizer.eos_token_id:
      expected = expected + [tokenizer.eos_token_id]
    assert got.tolist() == expected, text


def test_atomic_prompt_writes_item_tokens_in_order(tokenizer):
  ids = item_ids.make_item_ids('atomic', NUM_ITEMS, tokenizer)
  builder = prompts.PromptBuilder(tokenizer, ids, max_history=None)
  history = np.array([5, 997, 1, 5])
  got = builder.build(3, history, separator=' -> ')
  base = len(tokenizer)
  item_positions = np.flatnonzero(got >= base)
  np.testing.assert_array_equal(got[item_positions] - base + 1, history)
  # The rest is the template with a one-token placeholder per item.
  text = prompts.render_text(prompts.TEST_TEMPLATE, 3, [7, 7, 7, 7], ' -> ')
  reference = tokenizer(text)['input_ids']
  seven = tokenizer('7', add_special_tokens=False)['input_ids']
  assert len(seven) == 1
  expected = [t if t != seven[0] else -1 for t in reference]
  replaced = [t if t < base else -1 for t in got.tolist()]
  if expected[-1] != tokenizer.eos_token_id:
    expected.append(tokenizer.eos_token_id)
  assert replaced == expected


def test_history_limits(tokenizer):
  ids = item_ids.make_item_ids('atomic', NUM_ITEMS, tokenizer)
  base = len(tokenizer)
  builder = prompts.PromptBuilder(tokenizer, ids, max_history=3)
  got = builder.build(0, np.arange(1, 11))
  np.testing.assert_array_equal(got[got >= base] - base + 1, [8, 9, 10])

  full = prompts.PromptBuilder(tokenizer, ids, max_history=None)
  length_of = lambda n: len(full.build(0, np.arange(1, n + 1)))
  # Each further atomic item costs one item token and one separator token.
  assert length_of(5) - length_of(4) == 2
  tight = prompts.PromptBuilder(
    tokenizer, ids, max_history=None, max_prompt_tokens=length_of(4)
  )
  got = tight.build(0, np.arange(1, 11))
  np.testing.assert_array_equal(got[got >= base] - base + 1, [7, 8, 9, 10])
  assert tight.truncated == 1

  with pytest.raises(ValueError, match='prompt history of user 4.*item 998'):
    full.build(4, np.array([3, 998]))
  with pytest.raises(ValueError, match='Unknown template'):
    full.build(4, np.array([3]), template='9-9')


def test_build_many_and_padding(tokenizer):
  ids = item_ids.make_item_ids('atomic', NUM_ITEMS, tokenizer)
  builder = prompts.PromptBuilder(tokenizer, ids)
  sequences = [np.array([3, 4, 5]), np.array([9])]
  many = builder.build_many(np.array([0, 1, 0]), np.array([2, 1, 0]), sequences)
  assert many[0].tolist() == builder.build(0, [3, 4]).tolist()
  assert many[1].tolist() == builder.build(1, [9]).tolist()
  assert many[2].tolist() == builder.build(0, []).tolist()
  with pytest.raises(ValueError, match='history end 2 of user 1'):
    builder.build_many(np.array([1]), np.array([2]), sequences)
  padded, mask = prompts.pad_prompts(many, 48, rows=5)
  assert padded.shape == mask.shape == (5, 48)
  assert mask.sum() == sum(len(p) for p in many)
  assert not mask[3:].any()
  assert prompts.bucket_length(17) == 32 and prompts.bucket_length(1) == 16


def test_tokenizer_saved_and_reloaded(tmp_path):
  first = prompts.load_or_train_tokenizer(
    num_users=5, num_items=31, workdir=str(tmp_path)
  )
  assert (tmp_path / 'tokenizer' / 'tokenizer.json').exists()
  second = prompts.load_or_train_tokenizer(
    num_users=5, num_items=31, workdir=str(tmp_path)
  )
  assert second.get_vocab() == first.get_vocab()
  text = prompts.render_text('2-1', 4, [3, 17, 31])
  assert second(text)['input_ids'] == first(text)['input_ids']
