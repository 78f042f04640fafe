"""Tests for cooperative training of the SRM inside LLM candidate lists."""

import jax.numpy as jnp
import numpy as np
import pytest

from lsc_jax.collab import cooperative
from lsc_jax.data.splits import Windows
from lsc_jax.models import make_srm
from lsc_jax.train import srm_steps


def test_training_lists_layout_and_labels():
  sequences = [np.array([3, 4, 5, 6], np.int32), np.array([7, 8, 9], np.int32)]
  windows = Windows(np.array([0, 1]), np.array([3, 2]))  # targets 6 and 9
  llm = np.array([[6, 11, 0], [12, 13, 14]], np.int32)
  lists = cooperative.build_training_lists(
    sequences, windows, llm, num_items=40, max_len=3, num_negatives=5, seed=0
  )
  assert lists.candidates.shape == (2, 1 + 3 + 5)
  np.testing.assert_array_equal(lists.candidates[:, 0], [6, 9])
  np.testing.assert_array_equal(lists.candidates[:, 1:4], llm)
  # The LLM's correct guess (6 in slot 1) is a second positive; slot 3 is
  # empty and never a label.
  np.testing.assert_array_equal(lists.labels[0, :4], [1, 1, 0, 0])
  np.testing.assert_array_equal(lists.history, [[3, 4, 5], [0, 7, 8]])
  for row in range(2):
    negatives = set(lists.candidates[row, 4:])
    assert not negatives & (
      set(lists.history[row]) | {0, lists.candidates[row, 0]}
    )


def test_list_losses_by_hand():
  logits = jnp.array([[2.0, 1.0, 0.5, -1.0]])
  labels = jnp.array([[True, True, False, False]])
  valid = jnp.array([[True, True, True, False]])
  mask = jnp.ones(1)
  bce = cooperative.list_loss(logits, labels, valid, mask, 'bce')

  def cross_entropy(logit, label):
    return -(
      label * np.log(1 / (1 + np.exp(-logit)))
      + (1 - label) * np.log(1 - 1 / (1 + np.exp(-logit)))
    )

  expected = np.mean(
    [cross_entropy(2.0, 1), cross_entropy(1.0, 1), cross_entropy(0.5, 0)]
  )
  assert float(bce) == pytest.approx(float(expected), rel=1e-6)
  # Listwise: slot 1 repeats the target and is left out; slot 3 is empty.
  listwise = cooperative.list_loss(logits, labels, valid, mask, 'listwise')
  expected = np.log(np.exp(2.0) + np.exp(0.5)) - 2.0
  assert float(listwise) == pytest.approx(expected, rel=1e-6)
  # A filler row contributes nothing.
  both = cooperative.list_loss(
    jnp.concatenate([logits, logits * 7]),
    jnp.concatenate([labels, labels]),
    jnp.concatenate([valid, valid]),
    jnp.array([1.0, 0.0]),
    'listwise',
  )
  assert float(both) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize('loss', ['bce', 'listwise'])
def test_cooperative_training_learns_to_rank_inside_lists(loss):
  # Synthetic task: the next item is always (last item + 1) mod 40.
  rng = np.random.default_rng(0)
  num_items, num_users = 41, 211
  sequences = []
  for _ in range(num_users):
    start = rng.integers(1, num_items)
    sequences.append(((start + np.arange(6)) % num_items + 1).astype(np.int32))
  windows = Windows(np.arange(num_users), np.full(num_users, 5))
  llm = np.stack(
    [
      rng.choice(np.arange(1, num_items + 1), 7, replace=False)
      for _ in range(num_users)
    ]
  ).astype(np.int32)
  lists = cooperative.build_training_lists(
    sequences,
    windows,
    llm,
    num_items=num_items,
    max_len=5,
    num_negatives=4,
    seed=0,
  )
  model = make_srm(
    'gru4rec', num_items=num_items, preset='smoke', max_len=5, dropout_rate=0.0
  )
  params = srm_steps.init_params(model, 5, seed=0)
  targets = lists.candidates[:, 0]
  evaluate = cooperative.make_list_evaluator(
    model, lists.history, lists.candidates[:, 1:9].copy(), targets
  )
  config = cooperative.CooperativeConfig(
    loss=loss, epochs=40, batch_size=32, learning_rate=1e-2, patience=None
  )
  result = cooperative.train_cooperative(
    model, params, lists, config, evaluate=None, seed=0, log=lambda _: None
  )
  losses = [h['train/loss'] for h in result.history]
  assert losses[-1] < 0.7 * losses[0]
  # Inside [target | LLM list] the trained model puts the target first.
  probe = cooperative.make_list_evaluator(
    model, lists.history, lists.candidates[:, :8], targets
  )
  trained, initial = probe(result.best_params), probe(params)
  assert trained['hr@1'] > 0.8, (trained, initial)
  assert initial['hr@1'] < 0.5
  del evaluate
