"""T5 encoder-decoder in Flax linen, the backbone of the cloud LLM scorer.

LSC4Rec (Lv et al., KDD 2025) uses P5 on a T5-small backbone as its cloud
LLM. This module is a from-scratch T5 whose parameter tree maps one-to-one
onto Hugging Face T5 checkpoint names (see `lsc_jax.hf_import`):

  shared.weight                                   -> shared/embedding
  encoder.block.0.layer.0.SelfAttention.q.weight  -> encoder/block_0/layer_0/
                                                     SelfAttention/q/kernel
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                              -> .../SelfAttention/relative_attention_bias/
                                 embedding
  decoder.block.1.layer.2.DenseReluDense.wi_0.weight -> .../wi_0/kernel
  encoder.final_layer_norm.weight                 -> encoder/final_layer_norm/
                                                     weight
  lm_head.weight (untied models only)             -> lm_head/kernel

Linear kernels are stored `[in, out]` (the transpose of PyTorch's
`[out, in]`). What T5 does, and this module follows:

- relative position buckets, bidirectional in the encoder and causal in the
  decoder, computed by the first layer of each stack and shared by all;
- RMS layer norm (no mean subtraction, no bias);
- ReLU (T5) or gated-GELU (T5 v1.1, Flan-T5) feed forward;
- no 1/sqrt(d) attention scaling (T5 folds it into the initialisation);
- a tied LM head (the shared embedding, decoder output scaled by
  d_model**-0.5) or an untied `lm_head` without scaling.

The decoder has a cached incremental mode: the cache is an explicit pytree
of keys and values per layer with a fixed maximum length, so a beam search
built on `T5.decode_step` is jittable. Cross-attention keys and values are
kept once per encoder row; a decoder batch that is a multiple of the encoder
batch (beams, or candidates to score) shares them, which costs no accuracy
because cross-attention has no position bias.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers

Array = jax.Array

_ACTIVATIONS = {
  'relu': jax.nn.relu,
  'gelu': lambda x: jax.nn.gelu(x, approximate=False),
  'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
  'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
  'silu': jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Settings:
  """The hashable subset of a `transformers.T5Config` this model reads.

  `tie_word_embeddings` has T5's original meaning: True ties the LM head to
  the shared embedding and scales the decoder output by d_model**-0.5 (T5
  v1.0); False gives a separate `lm_head` without scaling (T5 v1.1 and
  Flan-T5). transformers 5 keeps this flag as `scale_decoder_outputs`.
  """

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_decoder_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = 'relu'
  is_gated_act: bool = False
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: str = 'float32'

  def __post_init__(self):
    if self.dense_act_fn not in _ACTIVATIONS:
      raise ValueError(
        f'T5Settings.dense_act_fn={self.dense_act_fn!r} is not supported; '
        f'expected one of {sorted(_ACTIVATIONS)}.'
      )
    for name in ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_heads'):
      if getattr(self, name) <= 0:
        raise ValueError(f'T5Settings.{name} must be positive.')

  @classmethod
  def from_config(cls, config: transformers.T5Config) -> T5Settings:
    """Reads a `transformers.T5Config` (either transformers 4 or 5)."""
    tied = getattr(config, 'scale_decoder_outputs', None)
    if tied is None:
      tied = config.tie_word_embeddings
    eos = config.eos_token_id
    if isinstance(eos, list | tuple):
      eos = eos[0]
    pad = 0 if config.pad_token_id is None else config.pad_token_id
    start = getattr(config, 'decoder_start_token_id', None)
    return cls(
      vocab_size=config.vocab_size,
      d_model=config.d_model,
      d_kv=config.d_kv,
      d_ff=config.d_ff,
      num_layers=config.num_layers,
      num_decoder_layers=config.num_decoder_layers or config.num_layers,
      num_heads=config.num_heads,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      dropout_rate=float(config.dropout_rate),
      layer_norm_epsilon=config.layer_norm_epsilon,
      dense_act_fn=config.dense_act_fn,
      is_gated_act=bool(config.is_gated_act),
      tie_word_embeddings=bool(tied),
      pad_token_id=pad,
      eos_token_id=1 if eos is None else int(eos),
      decoder_start_token_id=pad if start is None else int(start),
    )


def config_is_tied(config: transformers.T5Config) -> bool:
  """Whether a T5 config means a tied, scaled LM head (see `T5Settings`)."""
  return T5Settings.from_config(config).tie_word_embeddings


def make_config(
  *,
  vocab_size: int,
  d_model: int,
  d_kv: int,
  d_ff: int,
  num_layers: int,
  num_decoder_layers: int | None = None,
  num_heads: int,
  feed_forward_proj: str = 'relu',
  tie_word_embeddings: bool = True,
  dropout_rate: float = 0.1,
  relative_attention_num_buckets: int = 32,
  relative_attention_max_distance: int = 128,
) -> transformers.T5Config:
  """A `transformers.T5Config` with T5's special ids (pad 0, EOS 1)."""
  return transformers.T5Config(
    vocab_size=vocab_size,
    d_model=d_model,
    d_kv=d_kv,
    d_ff=d_ff,
    num_layers=num_layers,
    num_decoder_layers=num_decoder_layers,
    num_heads=num_heads,
    feed_forward_proj=feed_forward_proj,
    tie_word_embeddings=tie_word_embeddings,
    dropout_rate=dropout_rate,
    relative_attention_num_buckets=relative_attention_num_buckets,
    relative_attention_max_distance=relative_attention_max_distance,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
  )


# Architecture sizes. `cpu` is about 2.1M parameters with a 13k vocabulary
# (one token per Beauty item), 1.7M of them in the shared embedding; one
# decoder layer suffices for identifiers of one or a few tokens, and the
# encoder, which reads the prompts, is most of the compute. It has no
# dropout: at this size, trained for a few epochs, T5's 0.1 slowed learning
# several-fold in a copy-the-last-item check (and costs a third of a CPU
# step in random bits); `t5-small` keeps the paper's 0.1.
T5_PRESETS: dict[str, dict[str, Any]] = {
  'smoke': dict(
    d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0
  ),
  'cpu': dict(
    d_model=128,
    d_kv=32,
    d_ff=256,
    num_layers=2,
    num_decoder_layers=1,
    num_heads=4,
    dropout_rate=0.0,
  ),
  't5-small': dict(
    d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, dropout_rate=0.1
  ),
}


def llm_config(preset: str, vocab_size: int) -> transformers.T5Config:
  """The T5 config of a size preset (`smoke`, `cpu`, `t5-small`)."""
  if preset not in T5_PRESETS:
    raise ValueError(
      f'Unknown LLM size preset {preset!r}; expected one of '
      f'{sorted(T5_PRESETS)}.'
    )
  return make_config(vocab_size=vocab_size, **T5_PRESETS[preset])


def relative_position_bucket(
  relative_position: Array,
  *,
  bidirectional: bool,
  num_buckets: int,
  max_distance: int,
) -> Array:
  """T5's bucket of each relative position (memory minus query position).

  Half of the buckets (per direction, if bidirectional) hold exact small
  distances, the rest grow logarithmically up to `max_distance`; anything
  farther shares the last bucket. A causal decoder only sees the past, so
  future positions all map to bucket 0.

  Args:
    relative_position: int32 `[query_len, key_len]`.

  Returns:
    int32 `[query_len, key_len]` in `[0, num_buckets)`.
  """
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)

  max_exact = num_buckets // 2
  is_small = distance < max_exact
  safe = jnp.maximum(distance, 1).astype(jnp.float32)
  large = max_exact + (
    jnp.log(safe / max_exact)
    / math.log(max_distance / max_exact)
    * (num_buckets - max_exact)
  ).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, distance, large)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class T5LayerNorm(nn.Module):
  """RMS norm: `x / sqrt(mean(x**2) + eps) * weight`, computed in float32."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param('weight', nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(variance + self.eps) * weight).astype(x.dtype)


class T5Attention(nn.Module):
  """Multi-head attention without scaling; optional relative position bias.

  Queries `[batch, query_len, num_heads, d_kv]` attend to keys of the same
  batch, or, for cross-attention with a grouped decoder batch, to keys of
  `[batch // group, key_len, num_heads, d_kv]` (see `cross_attend`).
  """

  settings: T5Settings
  has_relative_bias: bool = False
  bidirectional: bool = True

  def setup(self):
    s = self.settings
    inner = s.num_heads * s.d_kv
    dtype = jnp.dtype(s.dtype)
    dense = lambda features, std: nn.Dense(
      features, use_bias=False, kernel_init=_normal(std), dtype=dtype
    )
    self.q = dense(inner, (s.d_model * s.d_kv) ** -0.5)
    self.k = dense(inner, s.d_model**-0.5)
    self.v = dense(inner, s.d_model**-0.5)
    self.o = dense(s.d_model, inner**-0.5)
    self.attention_dropout = nn.Dropout(s.dropout_rate)
    if self.has_relative_bias:
      self.relative_attention_bias = nn.Embed(
        s.relative_attention_num_buckets,
        s.num_heads,
        embedding_init=_normal(s.d_model**-0.5),
      )

  def _split(self, x: Array) -> Array:
    s = self.settings
    return x.reshape(*x.shape[:-1], s.num_heads, s.d_kv)

  def project_query(self, x: Array) -> Array:
    """`[batch, len, d_model]` -> `[batch, len, num_heads, d_kv]`."""
    return self._split(self.q(x))

  def project_key_value(self, x: Array) -> tuple[Array, Array]:
    """`[batch, len, d_model]` -> keys, values `[batch, len, heads, d_kv]`."""
    return self._split(self.k(x)), self._split(self.v(x))

  def position_bias(self, query_positions: Array, key_positions: Array):
    """Relative position bias `[1, num_heads, query_len, key_len]`."""
    s = self.settings
    relative = key_positions[None, :] - query_positions[:, None]
    buckets = relative_position_bucket(
      relative,
      bidirectional=self.bidirectional,
      num_buckets=s.relative_attention_num_buckets,
      max_distance=s.relative_attention_max_distance,
    )
    values = self.relative_attention_bias(buckets)  # [q, k, heads]
    return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

  def attend(
    self,
    query: Array,
    key: Array,
    value: Array,
    *,
    bias: Array | None,
    mask: Array | None,
    deterministic: bool,
  ) -> Array:
    """Attention of `[b, q, h, d]` queries on `[b, k, h, d]` keys.

    `bias` broadcasts to `[b, h, q, k]`; `mask` (True = may attend)
    broadcasts to `[b, h, q, k]`. Returns `[b, q, d_model]`.
    """
    scores = jnp.einsum('bqhd,bkhd->bhqk', query, key).astype(jnp.float32)
    if bias is not None:
      scores = scores + bias
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = self.attention_dropout(weights, deterministic=deterministic)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(value.dtype), value)
    return self.o(out.reshape(*out.shape[:2], -1))

  def cross_attend(
    self,
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array,
    deterministic: bool,
  ) -> Array:
    """Cross-attention of a decoder batch that is `group` x encoder batch.

    Decoder row `r` belongs to encoder row `r // group`. The group axis is
    folded into the query length, which is exact because cross-attention
    has neither position bias nor a causal mask.

    Args:
      query: `[batch * group, query_len, heads, d_kv]`.
      key, value: `[batch, key_len, heads, d_kv]`.
      mask: bool `[batch, key_len]`, True for real encoder tokens.

    Returns:
      `[batch * group, query_len, d_model]`.
    """
    batch = key.shape[0]
    rows, length = query.shape[:2]
    if rows % batch:
      raise ValueError(
        f'Decoder batch {rows} is not a multiple of the encoder batch {batch}.'
      )
    group = rows // batch
    folded = query.reshape(batch, group * length, *query.shape[2:])
    out = self.attend(
      folded,
      key,
      value,
      bias=None,
      mask=mask[:, None, None, :],
      deterministic=deterministic,
    )
    return out.reshape(rows, length, -1)


class T5LayerSelfAttention(nn.Module):
  """Pre-norm self-attention sub-layer with a residual connection."""

  settings: T5Settings
  has_relative_bias: bool = False
  bidirectional: bool = True

  def setup(self):
    self.SelfAttention = T5Attention(
      self.settings, self.has_relative_bias, self.bidirectional
    )
    self.layer_norm = T5LayerNorm(self.settings.layer_norm_epsilon)
    self.dropout = nn.Dropout(self.settings.dropout_rate)

  def __call__(self, hidden, *, bias, mask, deterministic, cache=None):
    """Returns (hidden, new (keys, values) cache entry or None).

    With `cache = (keys, values, index)` (`[batch, max_len, heads, d_kv]`
    and a scalar position), the new keys and values are written at `index`
    and attention runs over the whole fixed-length cache.
    """
    attention = self.SelfAttention
    normed = self.layer_norm(hidden)
    query = attention.project_query(normed)
    key, value = attention.project_key_value(normed)
    new_cache = None
    if cache is not None:
      cached_key, cached_value, index = cache
      key = jax.lax.dynamic_update_slice(
        cached_key, key.astype(cached_key.dtype), (0, index, 0, 0)
      )
      value = jax.lax.dynamic_update_slice(
        cached_value, value.astype(cached_value.dtype), (0, index, 0, 0)
      )
      new_cache = (key, value)
    out = attention.attend(
      query, key, value, bias=bias, mask=mask, deterministic=deterministic
    )
    return hidden + self.dropout(out, deterministic=deterministic), new_cache


class T5LayerCrossAttention(nn.Module):
  """Pre-norm encoder-decoder attention sub-layer with a residual."""

  settings: T5Settings

  def setup(self):
    self.EncDecAttention = T5Attention(self.settings)
    self.layer_norm = T5LayerNorm(self.settings.layer_norm_epsilon)
    self.dropout = nn.Dropout(self.settings.dropout_rate)

  def key_value(self, encoder_hidden: Array) -> tuple[Array, Array]:
    return self.EncDecAttention.project_key_value(encoder_hidden)

  def __call__(self, hidden, *, key, value, mask, deterministic):
    attention = self.EncDecAttention
    query = attention.project_query(self.layer_norm(hidden))
    out = attention.cross_attend(
      query, key, value, mask=mask, deterministic=deterministic
    )
    return hidden + self.dropout(out, deterministic=deterministic)


class T5DenseActDense(nn.Module):
  """`wo(act(wi(x)))` (T5 v1.0, ReLU)."""

  settings: T5Settings

  def setup(self):
    s = self.settings
    dtype = jnp.dtype(s.dtype)
    self.wi = nn.Dense(
      s.d_ff, use_bias=False, kernel_init=_normal(s.d_model**-0.5), dtype=dtype
    )
    self.wo = nn.Dense(
      s.d_model, use_bias=False, kernel_init=_normal(s.d_ff**-0.5), dtype=dtype
    )
    self.dropout = nn.Dropout(s.dropout_rate)

  def __call__(self, x, *, deterministic):
    hidden = _ACTIVATIONS[self.settings.dense_act_fn](self.wi(x))
    return self.wo(self.dropout(hidden, deterministic=deterministic))


class T5DenseGatedActDense(nn.Module):
  """`wo(act(wi_0(x)) * wi_1(x))` (T5 v1.1 / Flan-T5, gated-GELU)."""

  settings: T5Settings

  def setup(self):
    s = self.settings
    dtype = jnp.dtype(s.dtype)
    self.wi_0 = nn.Dense(
      s.d_ff, use_bias=False, kernel_init=_normal(s.d_model**-0.5), dtype=dtype
    )
    self.wi_1 = nn.Dense(
      s.d_ff, use_bias=False, kernel_init=_normal(s.d_model**-0.5), dtype=dtype
    )
    self.wo = nn.Dense(
      s.d_model, use_bias=False, kernel_init=_normal(s.d_ff**-0.5), dtype=dtype
    )
    self.dropout = nn.Dropout(s.dropout_rate)

  def __call__(self, x, *, deterministic):
    gate = _ACTIVATIONS[self.settings.dense_act_fn](self.wi_0(x))
    hidden = gate * self.wi_1(x)
    return self.wo(self.dropout(hidden, deterministic=deterministic))


class T5LayerFF(nn.Module):
  """Pre-norm feed-forward sub-layer with a residual connection."""

  settings: T5Settings

  def setup(self):
    s = self.settings
    if s.is_gated_act:
      self.DenseReluDense = T5DenseGatedActDense(s)
    else:
      self.DenseReluDense = T5DenseActDense(s)
    self.layer_norm = T5LayerNorm(s.layer_norm_epsilon)
    self.dropout = nn.Dropout(s.dropout_rate)

  def __call__(self, hidden, *, deterministic):
    out = self.DenseReluDense(
      self.layer_norm(hidden), deterministic=deterministic
    )
    return hidden + self.dropout(out, deterministic=deterministic)


class T5Block(nn.Module):
  """One encoder block (self-attention, FF) or decoder block (+ cross)."""

  settings: T5Settings
  is_decoder: bool
  has_relative_bias: bool = False

  def setup(self):
    s = self.settings
    layers = [
      T5LayerSelfAttention(
        s, self.has_relative_bias, bidirectional=not self.is_decoder
      )
    ]
    if self.is_decoder:
      layers.append(T5LayerCrossAttention(s))
    layers.append(T5LayerFF(s))
    self.layer = layers


class T5Stack(nn.Module):
  """The encoder or the decoder: blocks and a final RMS norm."""

  settings: T5Settings
  is_decoder: bool
  embed: nn.Module

  def setup(self):
    s = self.settings
    count = s.num_decoder_layers if self.is_decoder else s.num_layers
    self.block = [
      T5Block(s, self.is_decoder, has_relative_bias=(i == 0))
      for i in range(count)
    ]
    self.final_layer_norm = T5LayerNorm(s.layer_norm_epsilon)
    self.dropout = nn.Dropout(s.dropout_rate)

  def _bias(self, query_positions: Array, key_positions: Array) -> Array:
    attention = self.block[0].layer[0].SelfAttention
    return attention.position_bias(query_positions, key_positions)

  def encode(self, input_ids: Array, mask: Array, deterministic: bool):
    """`[batch, len]` ids and bool mask -> `[batch, len, d_model]`."""
    length = input_ids.shape[1]
    positions = jnp.arange(length)
    bias = self._bias(positions, positions)
    attend_mask = mask[:, None, None, :]
    hidden = self.dropout(self.embed(input_ids), deterministic=deterministic)
    for block in self.block:
      hidden, _ = block.layer[0](
        hidden, bias=bias, mask=attend_mask, deterministic=deterministic
      )
      hidden = block.layer[-1](hidden, deterministic=deterministic)
    hidden = self.final_layer_norm(hidden)
    return self.dropout(hidden, deterministic=deterministic)

  def cross_key_values(self, encoder_hidden: Array) -> list[dict]:
    """Per decoder layer cross-attention keys/values of the encoder output."""
    out = []
    for block in self.block:
      key, value = block.layer[1].key_value(encoder_hidden)
      out.append({'cross_key': key, 'cross_value': value})
    return out

  def decode(
    self,
    decoder_input_ids: Array,
    *,
    cross: list[dict],
    encoder_mask: Array,
    deterministic: bool,
    self_cache: list[dict] | None = None,
    index: Array | None = None,
  ):
    """Runs the decoder on `[batch * group, len]` ids.

    Without a cache, positions are `0..len-1` with a causal mask. With
    `self_cache` (per layer 'key'/'value' `[rows, max_len, heads, d_kv]`)
    and a scalar `index`, positions are `index..index+len-1` and the
    inputs attend to all cached positions up to their own.

    Returns:
      (hidden `[rows, len, d_model]`, updated self cache or None).
    """
    length = decoder_input_ids.shape[1]
    if self_cache is None:
      query_positions = jnp.arange(length)
      key_positions = query_positions
    else:
      query_positions = index + jnp.arange(length)
      key_positions = jnp.arange(self_cache[0]['key'].shape[1])
    bias = self._bias(query_positions, key_positions)
    causal = key_positions[None, :] <= query_positions[:, None]
    causal = causal[None, None]

    hidden = self.dropout(
      self.embed(decoder_input_ids), deterministic=deterministic
    )
    new_cache = [] if self_cache is not None else None
    for i, block in enumerate(self.block):
      layer_cache = None
      if self_cache is not None:
        layer_cache = (self_cache[i]['key'], self_cache[i]['value'], index)
      hidden, updated = block.layer[0](
        hidden,
        bias=bias,
        mask=causal,
        deterministic=deterministic,
        cache=layer_cache,
      )
      if updated is not None:
        new_cache.append({'key': updated[0], 'value': updated[1]})
      hidden = block.layer[1](
        hidden,
        key=cross[i]['cross_key'],
        value=cross[i]['cross_value'],
        mask=encoder_mask,
        deterministic=deterministic,
      )
      hidden = block.layer[2](hidden, deterministic=deterministic)
    hidden = self.final_layer_norm(hidden)
    return self.dropout(hidden, deterministic=deterministic), new_cache


class T5(nn.Module):
  """T5 for conditional generation (encoder, decoder, LM head).

  Methods (call with `model.apply(params, ..., method=...)`):
    `__call__`: teacher-forced logits, the training forward pass.
    `encode`: encoder output for prompts.
    `decode`: teacher-forced logits given an encoder output.
    `init_cache`, `decode_step`: incremental decoding for generation.

  Dropout is active when `deterministic=False` and needs a 'dropout' rng.
  """

  settings: T5Settings

  def setup(self):
    s = self.settings
    dtype = jnp.dtype(s.dtype)
    self.shared = nn.Embed(
      s.vocab_size, s.d_model, embedding_init=_normal(1.0), dtype=dtype
    )
    self.encoder = T5Stack(s, is_decoder=False, embed=self.shared)
    self.decoder = T5Stack(s, is_decoder=True, embed=self.shared)
    if not s.tie_word_embeddings:
      self.lm_head = nn.Dense(
        s.vocab_size, use_bias=False, kernel_init=_normal(1.0), dtype=dtype
      )

  def _logits(self, hidden: Array) -> Array:
    s = self.settings
    if s.tie_word_embeddings:
      hidden = hidden * (s.d_model**-0.5)
      logits = self.shared.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return logits.astype(jnp.float32)

  def encode(
    self, input_ids: Array, attention_mask: Array, deterministic: bool = True
  ) -> Array:
    """Prompts `[batch, src_len]` (mask True = token) -> `[batch, src_len,
    d_model]`."""
    return self.encoder.encode(
      input_ids, attention_mask.astype(bool), deterministic
    )

  def decode(
    self,
    decoder_input_ids: Array,
    encoder_hidden: Array,
    attention_mask: Array,
    deterministic: bool = True,
  ) -> Array:
    """Teacher-forced logits `[batch * group, tgt_len, vocab]`.

    `decoder_input_ids` `[batch * group, tgt_len]` starts with the decoder
    start token; rows `g*i .. g*i+g-1` read encoder row `i`.
    """
    cross = self.decoder.cross_key_values(encoder_hidden)
    hidden, _ = self.decoder.decode(
      decoder_input_ids,
      cross=cross,
      encoder_mask=attention_mask.astype(bool),
      deterministic=deterministic,
    )
    return self._logits(hidden)

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array,
    decoder_input_ids: Array,
    deterministic: bool = True,
  ) -> Array:
    """Logits `[batch, tgt_len, vocab]` (float32) for a seq2seq batch."""
    encoder_hidden = self.encode(input_ids, attention_mask, deterministic)
    return self.decode(
      decoder_input_ids, encoder_hidden, attention_mask, deterministic
    )

  def init_cache(
    self, encoder_hidden: Array, decoder_rows: int, max_length: int
  ) -> dict:
    """An empty decoding cache.

    Args:
      encoder_hidden: `[batch, src_len, d_model]`.
      decoder_rows: the decoder batch, a multiple of `batch`.
      max_length: the most decoder positions (including the start token).

    Returns:
      {'index': int32 scalar, 'layers': per layer {'key', 'value':
      `[decoder_rows, max_length, heads, d_kv]`, 'cross_key',
      'cross_value': `[batch, src_len, heads, d_kv]`}}.
    """
    s = self.settings
    shape = (decoder_rows, max_length, s.num_heads, s.d_kv)
    layers = []
    for cross in self.decoder.cross_key_values(encoder_hidden):
      zeros = jnp.zeros(shape, cross['cross_key'].dtype)
      layers.append(dict(cross, key=zeros, value=zeros))
    return {'index': jnp.zeros((), jnp.int32), 'layers': layers}

  def decode_step(
    self, tokens: Array, cache: dict, attention_mask: Array
  ) -> tuple[Array, dict]:
    """One incremental decoder step.

    Args:
      tokens: int32 `[decoder_rows]`, the tokens at position
        `cache['index']` (the start token first).
      cache: from `init_cache` or a previous step.
      attention_mask: bool `[batch, src_len]` of the encoder input.

    Returns:
      (logits float32 `[decoder_rows, vocab]`, the advanced cache).
    """
    layers = cache['layers']
    self_cache = [{'key': x['key'], 'value': x['value']} for x in layers]
    hidden, updated = self.decoder.decode(
      tokens[:, None],
      cross=layers,
      encoder_mask=attention_mask.astype(bool),
      deterministic=True,
      self_cache=self_cache,
      index=cache['index'],
    )
    new_layers = [
      dict(old, key=new['key'], value=new['value'])
      for old, new in zip(layers, updated, strict=True)
    ]
    logits = self._logits(hidden[:, 0])
    return logits, {'index': cache['index'] + 1, 'layers': new_layers}


def build_t5(config: transformers.T5Config | T5Settings) -> T5:
  """A `T5` module from a `transformers.T5Config` (or `T5Settings`)."""
  if isinstance(config, T5Settings):
    return T5(config)
  return T5(T5Settings.from_config(config))


def init_params(model: T5, key: Array) -> dict:
  """Random parameters (T5's initialisation scales) for `model`."""
  ids = jnp.ones((1, 3), jnp.int32)
  mask = jnp.ones((1, 3), bool)
  variables = jax.jit(model.init)(key, ids, mask, ids[:, :2])
  return variables['params']


def shift_right(targets: Array, start_token: int) -> Array:
  """Decoder inputs `[batch, len]`: start token, then targets[:, :-1]."""
  start = jnp.full((targets.shape[0], 1), start_token, targets.dtype)
  return jnp.concatenate([start, targets[:, :-1]], axis=1)


def count_params(params: Any) -> int:
  """Total number of parameter entries in a pytree."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
