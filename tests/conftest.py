"""Shared test fixtures. Tests run on CPU; sharding tests start a subprocess with 8 fake devices."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MNIST_NPZ = os.path.join(ROOT, "..", "shared", "data", "mnist.npz")


def tiny_config(strategy="naive", kind="class", steps=60, **overrides):
  """Split Digits, 5 tasks, a small MLP: a real run in a few seconds."""
  from cl_jax.config import set_overrides
  from cl_jax.kinds import base_config
  c = base_config()
  c.strategy = strategy
  c.data.name = "digits"
  c.scenario.kind = kind
  c.model.hidden = [64]
  c.train.steps_per_task = steps
  c.train.batch_size = 32
  c.train.log_every_steps = 10
  c.eval.every_steps = 0
  c.checkpoint.every_steps = 0
  set_overrides(c, overrides)
  return c


def metrics_bytes(workdir) -> bytes:
  """A run's metrics.jsonl, byte for byte: what resumed runs are compared on."""
  with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
    return f.read()


@pytest.fixture
def mnist_path():
  if not os.path.exists(MNIST_NPZ):
    pytest.skip("../shared/data/mnist.npz is not present")
  return MNIST_NPZ
