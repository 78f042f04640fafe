"""Tests of LLM training: loss, schedule, batches, checkpoints, a real run.

The end-to-end runs train the `smoke` T5 on a slice of the built-in Beauty
data with short prompts (5 history items, one compiled shape).
"""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from lsc_jax import checkpoint, data
from lsc_jax.models import llm as llm_lib
from lsc_jax.train import llm_steps

WINDOWS = 480


def test_seq2seq_loss_by_hand():
  logits = np.log(
    np.array(
      [
        [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]],
        [[0.2, 0.2, 0.6], [0.7, 0.2, 0.1], [0.5, 0.5, 0.0 + 1e-9]],
        [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05]],
      ],
      np.float32,
    )
  )
  targets = np.array([[0, 1, 2], [2, 0, 1], [1, 1, 1]])
  target_mask = np.array(
    [[True, True, False], [True, True, True], [True, True, True]]
  )
  rows = np.array([True, True, False])  # the last row is filler
  loss, accuracy = llm_steps.seq2seq_loss(logits, targets, target_mask, rows)
  row0 = -(np.log(0.5) + np.log(0.8)) / 2
  row1 = -(np.log(0.6) + np.log(0.7) + np.log(0.5)) / 3
  np.testing.assert_allclose(loss, (row0 + row1) / 2, rtol=1e-5)
  # Correct argmax: row 0 both tokens; row 1 tokens 0 and 1 (token 2 is a
  # tie between 0 and 1, argmax picks 0 != 1): 4 of 5.
  np.testing.assert_allclose(accuracy, 4 / 5, rtol=1e-6)


def test_learning_rate_schedule():
  config = llm_steps.LLMTrainConfig(learning_rate=2e-3, warmup_fraction=0.05)
  schedule = llm_steps.learning_rate_schedule(config, 200)
  values = {s: float(schedule(s)) for s in (0, 5, 10, 105, 200)}
  np.testing.assert_allclose(
    [values[0], values[5], values[10], values[105], values[200]],
    [0.0, 1e-3, 2e-3, 1e-3, 0.0],
    atol=1e-9,
  )


@pytest.mark.parametrize('multiplier', [1.0, 10.0])
def test_embedding_learning_rate_multiplier(multiplier):
  # Adam's first step moves every coordinate by the learning rate times the
  # sign of its gradient (zero parameters: no weight decay), so the shared
  # embedding must move `multiplier` times as far as everything else.
  config = llm_steps.LLMTrainConfig(
    learning_rate=1e-3,
    warmup_fraction=0.0,
    embedding_lr_multiplier=multiplier,
    adam_eps=1e-12,
  )
  params = {
    'params': {
      'shared': {'embedding': np.zeros((4, 3), np.float32)},
      'encoder': {'dense': {'kernel': np.zeros((3, 2), np.float32)}},
    }
  }
  grads = jax.tree.map(
    lambda x: (
      np.random.default_rng(x.size).normal(size=x.shape).astype(np.float32)
    ),
    params,
  )
  tx = llm_steps.make_optimizer(config, total_steps=100)
  updates, _ = tx.update(grads, tx.init(params), params)
  shared = updates['params']['shared']['embedding']
  dense = updates['params']['encoder']['dense']['kernel']
  g = grads['params']
  np.testing.assert_allclose(
    shared, -multiplier * 1e-3 * np.sign(g['shared']['embedding']), rtol=1e-4
  )
  np.testing.assert_allclose(
    dense, -1e-3 * np.sign(g['encoder']['dense']['kernel']), rtol=1e-4
  )


@pytest.mark.parametrize('tied', [True, False])
def test_the_fast_group_is_exactly_the_token_table(tied):
  from lsc_jax.models import t5

  config = t5.make_config(
    vocab_size=50, tie_word_embeddings=tied, **t5.T5_PRESETS['smoke']
  )
  shapes = jax.eval_shape(
    lambda: t5.init_params(t5.build_t5(config), jax.random.key(0))
  )
  paths = [
    jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
  ]
  fast = sorted(p for p in paths if llm_steps.is_embedding_parameter(p))
  want = ["['shared']['embedding']"] + (
    [] if tied else ["['lm_head']['kernel']"]
  )
  assert fast == sorted(want)
  # Relative-position tables are also called `embedding`; they stay slow.
  assert any('relative_attention_bias' in p for p in paths)
  assert llm_steps.train_config('cpu').embedding_lr_multiplier > 1.0
  assert llm_steps.train_config('t5-small').embedding_lr_multiplier == 1.0


@pytest.fixture(scope='module')
def beauty():
  dataset = data.load('beauty', verbose=False)
  split = data.positional_split(dataset, gap=2)
  return dataset, split


def _config(**overrides):
  base = llm_steps.train_config(
    'smoke', epochs=3, batch_size=16, max_history=5, log_every_seconds=1e9
  )
  return dataclasses.replace(base, **overrides)


def test_prompt_batches_cover_each_window_once(beauty):
  dataset, split = beauty
  llm = llm_steps.build_untrained_llm(
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    preset='smoke',
    config=_config(),
  )
  users = split.llm_train.users[:101]
  positions = split.llm_train.positions[:101]
  batches = llm_steps.PromptBatches(
    llm.prompts, dataset.sequences, users, positions, batch_size=16, seed=3
  )
  assert batches.num_batches == 7
  epoch0 = list(batches.batches(0))
  assert len(epoch0) == 7
  assert sum(int(b['mask'].sum()) for b in epoch0) == 101
  base = llm.item_ids.base_vocab_size
  targets = sorted(
    int(t) - base + 1
    for b in epoch0
    for t, real in zip(b['targets'][:, 0], b['mask'], strict=True)
    if real
  )
  expected = sorted(
    int(dataset.sequences[u][p]) for u, p in zip(users, positions, strict=True)
  )
  assert targets == expected
  for b in epoch0:
    assert b['input_ids'].shape[1] % 16 == 0
    np.testing.assert_array_equal(b['target_mask'][b['mask']].sum(1), 2)
    assert not b['target_mask'][~b['mask']].any()
  again = list(batches.batches(0))
  for a, b in zip(epoch0, again, strict=True):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
  epoch1 = list(batches.batches(1))
  assert any(
    a['input_ids'].shape != b['input_ids'].shape
    or not np.array_equal(a['input_ids'], b['input_ids'])
    for a, b in zip(epoch0, epoch1, strict=True)
  )


def _train(beauty, workdir, epochs=3):
  dataset, split = beauty
  return llm_steps.train_llm(
    sequences=dataset.sequences,
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    split=split,
    preset='smoke',
    seed=5,
    workdir=str(workdir),
    # A separate embedding rate, as at the cpu preset: the optimizer state
    # then has two groups, which the resume below must restore exactly.
    config=_config(epochs=epochs, embedding_lr_multiplier=10.0),
    max_windows=WINDOWS,
    log=lambda message: None,
  )


def test_training_loss_falls_and_resume_is_exact(beauty, tmp_path):
  first = _train(beauty, tmp_path / 'run')
  losses = [h['train/loss'] for h in first.loop.history]
  assert len(losses) == 3
  assert losses[-1] < losses[0] - 1.0, losses
  assert os.path.exists(tmp_path / 'run' / 'metrics.jsonl')
  assert os.path.exists(tmp_path / 'run' / 'tokenizer' / 'tokenizer.json')

  # Lose the last epoch's checkpoint, as if the run had been killed there:
  # the rerun resumes after epoch 2 and must end with the same weights.
  steps = checkpoint.list_steps(str(tmp_path / 'run' / 'checkpoints'))
  assert len(steps) == 2
  shutil.rmtree(
    checkpoint.step_dir(str(tmp_path / 'run' / 'checkpoints'), steps[-1])
  )
  resumed = _train(beauty, tmp_path / 'run')
  assert resumed.loop.resumed_from_epoch == 2
  for a, b in zip(
    jax.tree.leaves(first.llm.params),
    jax.tree.leaves(resumed.llm.params),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # LLM-only metrics on a few stale test windows, checked by hand.
  dataset, split = beauty
  test = split.test.select(slice(0, 40))
  metrics = llm_steps.evaluate_llm(
    resumed.llm,
    dataset.sequences,
    test.users,
    test.positions,
    gap=2,
    num_candidates=20,
    beam_size=20,
    ks=(5, 10),
  )
  items, scores = llm_lib.generate_for_windows(
    resumed.llm,
    dataset.sequences,
    test.users,
    test.positions,
    gap=2,
    num_candidates=20,
    beam_size=20,
  )
  assert (np.diff(scores, axis=1) <= 1e-6).all()
  targets = test.targets(dataset.sequences)
  ranks = [
    list(row).index(t) + 1 if t in row else None
    for row, t in zip(items.tolist(), targets.tolist(), strict=True)
  ]
  for k in (5, 10):
    hits = [r is not None and r <= k for r in ranks]
    gains = [
      1 / np.log2(r + 1) if h else 0.0 for r, h in zip(ranks, hits, strict=True)
    ]
    assert metrics[f'hr@{k}'] == pytest.approx(np.mean(hits))
    assert metrics[f'ndcg@{k}'] == pytest.approx(np.mean(gains))
  assert metrics['recall@20'] == pytest.approx(
    np.mean([r is not None for r in ranks])
  )


def test_llm_state_checkpoint_round_trip(beauty, tmp_path):
  dataset, _ = beauty
  config = _config()
  llm = llm_steps.build_untrained_llm(
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    preset='smoke',
    config=config,
  )
  from lsc_jax.train import state as state_lib

  state = state_lib.create_train_state(
    llm.model.apply, llm.params, llm_steps.make_optimizer(config, 10), 7
  )
  state = state.replace(step=state.step + 3)
  checkpoint.save(str(tmp_path), 3, {'state': state}, metadata={'x': 1})
  fresh = state_lib.create_train_state(
    llm.model.apply,
    jax.tree.map(np.zeros_like, llm.params),
    llm_steps.make_optimizer(config, 10),
    0,
  )
  restored, meta, step = checkpoint.restore_latest(
    str(tmp_path), {'state': fresh}
  )
  assert step == 3 and meta['x'] == 1
  assert int(restored['state'].step) == 3
  for a, b in zip(
    jax.tree.leaves(state.params),
    jax.tree.leaves(restored['state'].params),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
    jax.random.key_data(restored['state'].key), jax.random.key_data(state.key)
  )
