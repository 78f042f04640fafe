"""Experiment binaries: absl flags, a config, one call into `lsc_jax`."""
