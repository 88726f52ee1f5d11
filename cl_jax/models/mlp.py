"""Multi-layer perceptron with a single head or one head per task (task-incremental multi-head)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
  """`in -> hidden... -> out` with ReLU.

  With `num_heads > 1` the last layer is a stack of heads of `num_outputs` units each and the head is
  chosen per example by its task id: the multi-head architecture of task-incremental learning
  (van de Ven & Tolias 2019). Layers are named `dense_0..dense_{n-1}` and `head` so parameter paths
  stay stable strings (LoRA targets and checkpoint keys match on them).
  """

  def __init__(self, in_features: int, hidden: Sequence[int], num_outputs: int, *,
               num_heads: int = 1, rngs: nnx.Rngs):
    self.num_hidden = len(hidden)
    self.num_heads = num_heads
    sizes = [in_features, *hidden]
    for i in range(len(hidden)):
      setattr(self, f"dense_{i}", nnx.Linear(sizes[i], sizes[i + 1], rngs=rngs))
    self.head = nnx.Linear(sizes[-1], num_outputs * num_heads, rngs=rngs)
    self.num_outputs = num_outputs

  def features(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for i in range(self.num_hidden):
      x = jax.nn.relu(getattr(self, f"dense_{i}")(x))
    return x

  def __call__(self, x: jax.Array, task: jax.Array | None = None) -> jax.Array:
    logits = self.head(self.features(x))
    return select_head(logits, task, self.num_heads, self.num_outputs)


def select_head(logits: jax.Array, task: jax.Array | None, num_heads: int, num_outputs: int) -> jax.Array:
  """Picks each example's head out of `num_heads` stacked heads (a no-op for one head)."""
  if num_heads == 1:
    return logits
  if task is None:
    raise ValueError("a multi-head model needs the task id of every example")
  logits = logits.reshape(logits.shape[0], num_heads, num_outputs)
  return jnp.take_along_axis(logits, task[:, None, None].astype(jnp.int32), axis=1)[:, 0]
