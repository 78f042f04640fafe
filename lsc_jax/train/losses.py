"""Losses for recommendation models, masked by a per-target weight.

All losses take logits with any leading shape `[...]` (one row per target:
`[batch]` for one target per history, `[batch, seq_len]` for next-item
training at every position) and a `mask` of the same leading shape. A target
with mask 0 contributes nothing: not to the sum, not to the count, and not a
NaN (masked rows are zeroed with `jnp.where`, never multiplied). The result is
the mean over targets with mask 1; an all-zero mask gives 0.

- `bce_with_negatives`: the LSC4Rec paper's SRM loss, binary cross-entropy
  over 1 positive and N sampled negatives, averaged over all 1 + N rows.
- `sampled_softmax`: cross-entropy of the positive against N sampled
  negatives; negatives equal to the positive ("accidental hits") are
  removed from the softmax.
- `full_cross_entropy`: cross-entropy over the whole catalogue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _masked_mean(per_target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `per_target [...]` over entries where `mask [...]` is nonzero."""
  if per_target.shape != mask.shape:
    raise ValueError(
      f'loss per target {per_target.shape} and mask {mask.shape} differ'
    )
  keep = mask > 0
  total = jnp.sum(jnp.where(keep, per_target, 0.0))
  count = jnp.sum(keep)
  return total / jnp.maximum(count, 1).astype(per_target.dtype)


def bce_with_negatives(
  positive_logits: jax.Array,
  negative_logits: jax.Array,
  mask: jax.Array,
  negative_is_positive: jax.Array | None = None,
) -> jax.Array:
  """Binary cross-entropy of 1 positive and N negatives per target.

  Args:
    positive_logits: `[...]` logit of each target item.
    negative_logits: `[..., num_negatives]` logits of sampled negatives.
    mask: `[...]`, 1 for real targets, 0 for padding.
    negative_is_positive: optional `[..., num_negatives]` booleans, True
      where a sampled negative is the target itself; such rows are left out
      (a target cannot be its own negative).

  Returns:
    Scalar: mean over real targets of the mean over their 1 + N rows (the
    paper's row-wise mean when every target has N valid negatives).
  """
  positive = optax.sigmoid_binary_cross_entropy(
    positive_logits, jnp.ones_like(positive_logits)
  )
  negative = optax.sigmoid_binary_cross_entropy(
    negative_logits, jnp.zeros_like(negative_logits)
  )
  if negative_is_positive is None:
    rows = 1 + negative_logits.shape[-1]
    per_target = (positive + negative.sum(axis=-1)) / rows
  else:
    keep = ~negative_is_positive
    rows = 1 + keep.sum(axis=-1)
    per_target = (positive + jnp.where(keep, negative, 0.0).sum(-1)) / rows
  return _masked_mean(per_target, mask)


def sampled_softmax(
  positive_logits: jax.Array,
  negative_logits: jax.Array,
  mask: jax.Array,
  negative_is_positive: jax.Array | None = None,
) -> jax.Array:
  """Softmax cross-entropy of the positive against sampled negatives.

  Args:
    positive_logits: `[...]`.
    negative_logits: `[..., num_negatives]`.
    mask: `[...]`, 1 for real targets.
    negative_is_positive: optional `[..., num_negatives]` booleans, True
      where a sampled negative is the target itself; those are left out of
      the softmax.

  Returns:
    Scalar mean over real targets.
  """
  if negative_is_positive is not None:
    negative_logits = jnp.where(negative_is_positive, -jnp.inf, negative_logits)
  logits = jnp.concatenate([positive_logits[..., None], negative_logits], -1)
  per_target = jax.nn.logsumexp(logits, axis=-1) - positive_logits
  return _masked_mean(per_target, mask)


def full_cross_entropy(
  logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> jax.Array:
  """Cross-entropy over the whole catalogue.

  Args:
    logits: `[..., num_items + 1]`; column 0 (padding) may be -inf.
    targets: `[...]` item ids in 1..num_items (anything where mask is 0).
      The caller checks ids first: an id outside the columns would be
      clamped by the gather.
    mask: `[...]`, 1 for real targets.

  Returns:
    Scalar mean over real targets.
  """
  safe_targets = jnp.where(mask > 0, targets, 1)
  target_logits = jnp.take_along_axis(logits, safe_targets[..., None], -1)
  per_target = jax.nn.logsumexp(logits, axis=-1) - target_logits[..., 0]
  return _masked_mean(per_target, mask)
