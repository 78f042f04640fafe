"""lsc_jax: LSC4Rec device-cloud recommendation in JAX and Flax.

LSC4Rec (Lv et al., "Collaboration of Large Language Models and Small
Recommendation Models for Device-Cloud Recommendation", KDD 2025) lets a
cloud language model (a T5 encoder-decoder that generates candidate items)
and a small on-device recommendation model (SASRec, GRU4Rec or DIN) work
together. The subpackages are:

- `lsc_jax.data`: readers, preprocessing, device-cloud splits, batching.
- `lsc_jax.metrics`: tie-safe ranking metrics.
- `lsc_jax.models`: the on-device models and the T5 scorer.
- `lsc_jax.train`: train states, jitted steps, the training loop.
- `lsc_jax.collab`: cooperative training, per-device adaptation, fusion,
  the Kendall-tau request gate and the device-cloud simulation.
"""

__version__ = '0.1.0'
