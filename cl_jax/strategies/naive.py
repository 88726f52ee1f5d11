"""Naive fine-tuning: train on each task in turn with nothing against forgetting (the lower bound)."""
from cl_jax.strategies.base import Strategy


def naive(config=None, learner=None) -> Strategy:
  del config, learner
  return Strategy(name="naive")
