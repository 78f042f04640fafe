"""Training: train states, losses, jitted steps and a generic loop.

- `state`: `TrainState` (flax's, plus a PRNG key) and optimizers.
- `losses`: masked BCE with negatives, sampled softmax, full cross-entropy.
- `loop`: `train_loop`, model-agnostic (epochs, progress, early stopping,
  checkpoints, exact resume) and `CompiledStep` (one compile per shape).
- `srm_steps`: on-device model batches, steps, full-ranking evaluation and
  `train_srm`.
"""

from lsc_jax.train.loop import (
  CompiledStep,
  LoopConfig,
  LoopResult,
  NonFiniteLossError,
  train_loop,
)
from lsc_jax.train.state import TrainState, create_train_state, make_optimizer

__all__ = [
  'CompiledStep',
  'LoopConfig',
  'LoopResult',
  'NonFiniteLossError',
  'TrainState',
  'create_train_state',
  'make_optimizer',
  'train_loop',
]
