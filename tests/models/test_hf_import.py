"""Parity of `lsc_jax.models.t5` with transformers' PyTorch T5.

A small random T5 is written in Hugging Face format by transformers itself,
read with `lsc_jax.hf_import.load_t5`, and its logits compared with the
PyTorch model's on the same inputs, for the ReLU/tied (T5 v1.0) and
gated-GELU/untied (T5 v1.1, Flan-T5) variants. torch is only the reference
implementation here; these tests are skipped without it.
"""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lsc_jax import hf_import
from lsc_jax.models import t5

torch = pytest.importorskip(
  'torch', reason='torch is the reference implementation for T5 parity'
)
transformers = pytest.importorskip('transformers')

VOCAB = 53


def _hf_config(feed_forward_proj: str, tied: bool):
  return transformers.T5Config(
    vocab_size=VOCAB,
    d_model=26,
    d_kv=7,
    d_ff=41,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    feed_forward_proj=feed_forward_proj,
    tie_word_embeddings=tied,
    dropout_rate=0.0,
    decoder_start_token_id=0,
  )


def _inputs():
  rng = np.random.default_rng(7)
  input_ids = rng.integers(2, VOCAB, size=(3, 29))
  mask = np.ones((3, 29), bool)
  mask[1, 17:] = False
  mask[2, 5:] = False
  input_ids[~mask] = 0
  decoder_ids = rng.integers(2, VOCAB, size=(3, 11))
  decoder_ids[:, 0] = 0
  return input_ids, mask, decoder_ids


def _torch_logits(model, input_ids, mask, decoder_ids):
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(input_ids),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      decoder_input_ids=torch.tensor(decoder_ids),
    )
  return out.logits.numpy()


def _our_logits(config, params, input_ids, mask, decoder_ids):
  model = t5.build_t5(config)
  return np.asarray(
    model.apply({'params': params}, input_ids, mask, decoder_ids)
  )


def _write_relu_tied(directory):
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(_hf_config('relu', True))
  model.eval()
  model.save_pretrained(directory)
  return model


def _write_gated_untied(directory):
  """transformers 5 always ties T5's head, so untie it by hand and write
  the state dict (with a separate lm_head.weight) ourselves."""
  torch.manual_seed(1)
  model = transformers.T5ForConditionalGeneration(
    _hf_config('gated-gelu', False)
  )
  model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 26))
  model.eval()
  model.config.save_pretrained(directory)
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  assert 'lm_head.weight' in tensors
  save_file(tensors, os.path.join(directory, 'model.safetensors'))
  return model


@pytest.mark.parametrize(
  'writer', [_write_relu_tied, _write_gated_untied], ids=['relu', 'gated']
)
def test_logits_match_transformers(tmp_path, writer):
  torch_model = writer(tmp_path)
  config, params = hf_import.load_t5(str(tmp_path))
  settings = t5.T5Settings.from_config(config)
  gated = writer is _write_gated_untied
  assert settings.is_gated_act == gated
  assert settings.tie_word_embeddings == (not gated)
  assert ('lm_head' in params) == gated

  inputs = _inputs()
  expected = _torch_logits(torch_model, *inputs)
  got = _our_logits(config, params, *inputs)
  assert got.shape == (3, 11, VOCAB)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_untied_config_without_lm_head_uses_shared(tmp_path, caplog):
  # What transformers 5 writes for an untied config: no lm_head.weight, and
  # its own model runs with the shared table as the head, unscaled.
  torch.manual_seed(2)
  model = transformers.T5ForConditionalGeneration(
    _hf_config('gated-gelu', False)
  )
  model.eval()
  model.save_pretrained(tmp_path)
  assert 'lm_head.weight' not in load_file(tmp_path / 'model.safetensors')
  with caplog.at_level('WARNING'):
    config, params = hf_import.load_t5(str(tmp_path))
  assert 'lm_head.weight' in caplog.text
  inputs = _inputs()
  np.testing.assert_allclose(
    _our_logits(config, params, *inputs),
    _torch_logits(model, *inputs),
    atol=1e-4,
    rtol=1e-4,
  )


def test_export_round_trip_sharded_and_read_by_transformers(tmp_path):
  source = tmp_path / 'source'
  _write_relu_tied(source)
  config, params = hf_import.load_t5(str(source))

  exported = tmp_path / 'exported'
  hf_import.export_t5(params, config, str(exported), max_shard_bytes=20_000)
  shards = [f for f in os.listdir(exported) if f.endswith('.safetensors')]
  assert len(shards) > 1
  assert (exported / 'model.safetensors.index.json').exists()

  config2, params2 = hf_import.load_t5(str(exported))
  assert t5.T5Settings.from_config(config2) == t5.T5Settings.from_config(config)
  flat1 = jax.tree_util.tree_leaves_with_path(params)
  flat2 = dict(jax.tree_util.tree_leaves_with_path(params2))
  for path, leaf in flat1:
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat2[path]))

  torch_model = transformers.T5ForConditionalGeneration.from_pretrained(
    str(exported)
  )
  torch_model.eval()
  inputs = _inputs()
  np.testing.assert_allclose(
    _our_logits(config, params, *inputs),
    _torch_logits(torch_model, *inputs),
    atol=1e-4,
    rtol=1e-4,
  )


def _mutate(directory, change):
  path = os.path.join(directory, 'model.safetensors')
  tensors = load_file(path)
  change(tensors)
  save_file(tensors, path, {'format': 'pt'})


def test_bad_checkpoints_name_the_tensor(tmp_path):
  _write_relu_tied(tmp_path)
  name = 'decoder.block.2.layer.1.EncDecAttention.k.weight'

  _mutate(tmp_path, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=f'missing tensor {name!r}'):
    hf_import.load_t5(str(tmp_path))

  def wrong_shape(tensors):
    tensors[name] = np.zeros((26, 21), np.float32)

  _mutate(tmp_path, wrong_shape)
  with pytest.raises(ValueError, match=rf'{name}.*has shape \(26, 21\)'):
    hf_import.load_t5(str(tmp_path))

  _write_relu_tied(tmp_path)
  extra = 'decoder.block.9.layer.0.SelfAttention.q.weight'
  _mutate(tmp_path, lambda t: t.__setitem__(extra, np.zeros((21, 26))))
  with pytest.raises(ValueError, match=extra):
    hf_import.load_t5(str(tmp_path))


def test_untied_head_in_a_tied_config_is_an_error(tmp_path):
  _write_relu_tied(tmp_path)

  def add_head(tensors):
    tensors['lm_head.weight'] = tensors['shared.weight'] + 1.0

  _mutate(tmp_path, add_head)
  with pytest.raises(ValueError, match='lm_head.weight'):
    hf_import.load_t5(str(tmp_path))


def test_resize_vocab_keeps_rows(tmp_path):
  _write_gated_untied(tmp_path)
  config, params = hf_import.load_t5(str(tmp_path))
  config2, params2 = hf_import.resize_vocab(
    params, config, 61, jax.random.key(0)
  )
  assert config2.vocab_size == 61
  assert not t5.config_is_tied(config2)
  shared = np.asarray(params2['shared']['embedding'])
  head = np.asarray(params2['lm_head']['kernel'])
  assert shared.shape == (61, 26) and head.shape == (26, 61)
  np.testing.assert_array_equal(
    shared[:VOCAB], np.asarray(params['shared']['embedding'])
  )
  np.testing.assert_array_equal(
    head[:, :VOCAB], np.asarray(params['lm_head']['kernel'])
  )
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['vocab_size'] == VOCAB
