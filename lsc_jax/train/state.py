"""Train state and optimizers shared by every model in `lsc_jax`.

`TrainState` is flax's `TrainState` (step, params, optimizer state, apply
function) plus a PRNG `key`. A step never consumes or splits that key; it
derives its randomness as `fold_in(key, step)` (see `step_key`), so a resumed
run draws exactly the keys an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """Flax `TrainState` with a base PRNG `key` (a typed JAX key array)."""

  key: jax.Array

  def step_key(self) -> jax.Array:
    """The key of the current step: `fold_in(key, step)`."""
    return jax.random.fold_in(self.key, self.step)


def create_train_state(
  apply_fn: Callable[..., Any],
  params: Any,
  tx: optax.GradientTransformation,
  seed: int,
) -> TrainState:
  """Builds a `TrainState` at step 0.

  Args:
    apply_fn: the model's apply function (e.g. `model.apply`).
    params: the parameter pytree (as returned by `model.init`).
    tx: the optax optimizer.
    seed: the run's seed. The base key is `fold_in(key(seed), 1)`, so it
      differs from an initialisation key `key(seed)`; per-step keys are
      `fold_in(base_key, step)`.
  """
  return TrainState.create(
    apply_fn=apply_fn,
    params=params,
    tx=tx,
    key=jax.random.fold_in(jax.random.key(seed), 1),
  ).replace(step=jnp.zeros((), jnp.int32))


def make_optimizer(
  learning_rate: float,
  weight_decay: float = 0.0,
  clip_norm: float | None = None,
) -> optax.GradientTransformation:
  """Adam (or AdamW when `weight_decay > 0`), optionally clipped.

  Args:
    learning_rate: constant learning rate or an optax schedule.
    weight_decay: decoupled weight decay (AdamW); 0 gives plain Adam, the
      LSC4Rec paper's SRM optimizer.
    clip_norm: clip gradients to this global norm first (None: no clipping).
  """
  if weight_decay < 0:
    raise ValueError(f'weight_decay must be >= 0, got {weight_decay}')
  if weight_decay > 0:
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
  else:
    opt = optax.adam(learning_rate)
  if clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
  return opt
