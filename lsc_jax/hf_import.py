"""Reading and writing Hugging Face T5 checkpoints for `lsc_jax.models.t5`.

A Hugging Face T5 directory holds `config.json` and either
`model.safetensors` or several shards listed by
`model.safetensors.index.json`. `load_t5` reads one with `safetensors.numpy`
(no torch), transposes the Linear weights into Flax's `[in, out]` kernels and
returns `(config, params)`; `export_t5` writes the same format, which
`transformers.T5ForConditionalGeneration.from_pretrained` reads.

Every tensor the model needs must be present with its exact shape; any other
tensor is an error, except the copies Hugging Face keeps of tied weights
(`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`, and
`lm_head.weight` of a tied model), which must equal `shared.weight`, and
`decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight`,
which some old checkpoints carry and T5 never uses.

One documented fallback: transformers 5 always ties T5's LM head and so
writes no `lm_head.weight`, even for an untied (v1.1 style) config. Such a
checkpoint loads with `lm_head` copied from `shared.weight`, which is the
model transformers 5 itself runs; a warning says so.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from safetensors.numpy import load_file, save_file

from lsc_jax.models import t5

_SINGLE_FILE = 'model.safetensors'
_INDEX_FILE = 'model.safetensors.index.json'
_UNUSED_TENSORS = (
  'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',
)
_TIED_COPIES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
_NUMBERED = re.compile(r'^(block|layer)_(\d+)$')

log = logging.getLogger(__name__)


def hf_name(path: tuple[str, ...]) -> str:
  """The Hugging Face tensor name of a Flax parameter path.

  ('encoder', 'block_0', 'layer_0', 'SelfAttention', 'q', 'kernel') ->
  'encoder.block.0.layer.0.SelfAttention.q.weight'.
  """
  parts = []
  for part in path[:-1]:
    match = _NUMBERED.match(part)
    parts.append(f'{match[1]}.{match[2]}' if match else part)
  leaf = path[-1]
  if leaf not in ('kernel', 'embedding', 'weight'):
    raise ValueError(f'Unexpected T5 parameter leaf {leaf!r} in {path}.')
  return '.'.join([*parts, 'weight'])


def _flat(params: Any) -> dict[tuple[str, ...], Any]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat[tuple(k.key for k in path)] = leaf
  return flat


def _unflat(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = leaf
  return tree


def params_to_hf(params: Any) -> dict[str, np.ndarray]:
  """Flax T5 params -> {Hugging Face name: float32 array in HF layout}."""
  out = {}
  for path, leaf in _flat(params).items():
    value = np.asarray(leaf, dtype=np.float32)
    if path[-1] == 'kernel':
      value = value.T
    out[hf_name(path)] = np.ascontiguousarray(value)
  return out


def expected_shapes(config: transformers.T5Config) -> dict:
  """{Flax path: shape} of every parameter of the model of `config`."""
  model = t5.build_t5(config)
  shapes = jax.eval_shape(lambda: t5.init_params(model, jax.random.key(0)))
  return {path: tuple(leaf.shape) for path, leaf in _flat(shapes).items()}


def hf_shapes(config: transformers.T5Config) -> dict[str, tuple[int, ...]]:
  """{Hugging Face name: shape in the HF layout} for the model of `config`."""
  out = {}
  for path, shape in expected_shapes(config).items():
    out[hf_name(path)] = shape[::-1] if path[-1] == 'kernel' else shape
  return out


def params_from_hf(
  tensors: dict[str, np.ndarray],
  config: transformers.T5Config,
  *,
  source: str = '<tensors>',
) -> dict:
  """{Hugging Face name: array} -> Flax params for the model of `config`.

  Raises:
    ValueError: naming `source` and the tensor, when one is missing, has
      the wrong shape, or is not part of a T5 model of this config.
  """
  tied = t5.config_is_tied(config)
  tensors = dict(tensors)
  flat = {}
  for path, shape in expected_shapes(config).items():
    name = hf_name(path)
    if name == 'lm_head.weight' and name not in tensors:
      log.warning(
        '%s has no lm_head.weight although the config is untied; using a '
        'copy of shared.weight (transformers 5 writes T5 models this way).',
        source,
      )
      tensors[name] = tensors.get('shared.weight')
    value = tensors.pop(name, None)
    if value is None:
      raise ValueError(f'{source}: missing tensor {name!r} (shape {shape}).')
    value = np.asarray(value, dtype=np.float32)
    hf_shape = shape[::-1] if path[-1] == 'kernel' else shape
    if value.shape != hf_shape:
      raise ValueError(
        f'{source}: tensor {name!r} has shape {value.shape}; the config '
        f'needs {hf_shape}.'
      )
    flat[path] = jnp.asarray(value.T if path[-1] == 'kernel' else value)

  shared = np.asarray(flat[('shared', 'embedding')])
  copies = list(_TIED_COPIES) + (['lm_head.weight'] if tied else [])
  for name in copies:
    if name in tensors:
      value = np.asarray(tensors.pop(name), dtype=np.float32)
      if value.shape != shared.shape or not np.array_equal(value, shared):
        raise ValueError(
          f'{source}: tensor {name!r} should be a tied copy of shared.weight '
          f'but differs from it (the config says tie_word_embeddings='
          f'{tied}).'
        )
  for name in _UNUSED_TENSORS:
    tensors.pop(name, None)
  if tensors:
    raise ValueError(
      f'{source}: unexpected tensors not in a T5 model of this config: '
      f'{sorted(tensors)[:10]}'
    )
  return _unflat(flat)


def _read_tensors(directory: str) -> tuple[dict[str, np.ndarray], str]:
  single = os.path.join(directory, _SINGLE_FILE)
  index = os.path.join(directory, _INDEX_FILE)
  if os.path.exists(single):
    return load_file(single), single
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      part = load_file(os.path.join(directory, shard))
      for name, value in part.items():
        if weight_map.get(name) != shard:
          raise ValueError(
            f'{os.path.join(directory, shard)}: tensor {name!r} is not '
            f'listed for this shard in {index}.'
          )
        tensors[name] = value
    missing = set(weight_map) - set(tensors)
    if missing:
      raise ValueError(f'{index}: listed tensors not found: {sorted(missing)}')
    return tensors, index
  raise FileNotFoundError(
    f'{directory}: expected {_SINGLE_FILE} or {_INDEX_FILE} (PyTorch .bin '
    'checkpoints are not read; convert them to safetensors).'
  )


def load_t5(directory: str) -> tuple[transformers.T5Config, dict]:
  """Reads a local Hugging Face T5 directory.

  Returns:
    (`transformers.T5Config`, Flax params for `t5.build_t5(config)`).
  """
  config_path = os.path.join(directory, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{directory}: no config.json')
  config = transformers.T5Config.from_pretrained(directory)
  tensors, source = _read_tensors(directory)
  return config, params_from_hf(tensors, config, source=source)


def export_t5(
  params: Any,
  config: transformers.T5Config,
  directory: str,
  *,
  max_shard_bytes: int | None = None,
) -> None:
  """Writes params and config as a Hugging Face T5 directory.

  The config keeps T5's meaning of `tie_word_embeddings` (also written as
  `scale_decoder_outputs` for transformers 5). With `max_shard_bytes`, the
  tensors are split over several files with an index, as Hugging Face does
  for large models.
  """
  tied = t5.config_is_tied(config)
  expected = hf_shapes(config)
  tensors = params_to_hf(params)
  for name, shape in expected.items():
    got = tensors.get(name)
    if got is None:
      raise ValueError(f'export_t5: params lack {name!r}.')
    if got.shape != shape:
      raise ValueError(
        f'export_t5: {name!r} has shape {got.shape}, the config needs {shape}.'
      )
  extra = set(tensors) - set(expected)
  if extra:
    raise ValueError(f'export_t5: params have unknown tensors {sorted(extra)}')

  os.makedirs(directory, exist_ok=True)
  config_dict = config.to_dict()
  config_dict['tie_word_embeddings'] = tied
  config_dict['scale_decoder_outputs'] = tied
  config_dict.setdefault('decoder_start_token_id', config.pad_token_id or 0)
  config_dict['architectures'] = ['T5ForConditionalGeneration']
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config_dict, f, indent=2, sort_keys=True)

  metadata = {'format': 'pt'}
  if max_shard_bytes is None:
    save_file(tensors, os.path.join(directory, _SINGLE_FILE), metadata)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    file_name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(directory, file_name), metadata)
    weight_map.update({name: file_name for name in shard})
  total = int(sum(x.nbytes for x in tensors.values()))
  with open(os.path.join(directory, _INDEX_FILE), 'w') as f:
    json.dump(
      {'metadata': {'total_size': total}, 'weight_map': weight_map},
      f,
      indent=2,
      sort_keys=True,
    )


def resize_vocab(
  params: Any,
  config: transformers.T5Config,
  vocab_size: int,
  key: jax.Array,
) -> tuple[transformers.T5Config, dict]:
  """Truncates or extends the vocabulary (e.g. t5-small plus item tokens).

  Kept rows are unchanged; new rows of `shared` (and an untied `lm_head`)
  are drawn as T5 initialises them (normal, std 1). Returns the new config
  and params.
  """
  old = config.vocab_size
  new_config = transformers.T5Config.from_dict(
    {
      **config.to_dict(),
      'vocab_size': vocab_size,
      'tie_word_embeddings': t5.config_is_tied(config),
    }
  )
  flat = _flat(params)

  def fit(table: jax.Array, axis: int, subkey: jax.Array) -> jax.Array:
    if vocab_size <= old:
      return jax.lax.slice_in_dim(table, 0, vocab_size, axis=axis)
    shape = list(table.shape)
    shape[axis] = vocab_size - old
    extra = jax.random.normal(subkey, shape, table.dtype)
    return jnp.concatenate([table, extra], axis=axis)

  flat[('shared', 'embedding')] = fit(
    flat[('shared', 'embedding')], 0, jax.random.fold_in(key, 0)
  )
  if ('lm_head', 'kernel') in flat:
    flat[('lm_head', 'kernel')] = fit(
      flat[('lm_head', 'kernel')], 1, jax.random.fold_in(key, 1)
    )
  return new_config, _unflat(flat)
