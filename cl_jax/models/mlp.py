"""Multi-layer perceptron with a single head or one head per task (task-incremental multi-head)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

INITS = ("lecun", "torch", "xavier")


def linear(fan_in: int, fan_out: int, init: str, rngs: nnx.Rngs) -> nnx.Linear:
  """A dense layer with Flax's default init ('lecun': kernel N(0, 1/fan_in) truncated, bias 0) or PyTorch's
  `nn.Linear` default ('torch': kernel and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. kaiming_uniform with
  a = sqrt(5)), for reproducing results of PyTorch code, whose forgetting can depend on the init scale; or 'xavier'
  (Glorot & Bengio 2010 uniform: kernel U(±sqrt(6 / (fan_in + fan_out))), bias 0: the init of mammoth's MNIST MLP,
  Buzzega et al. 2020)."""
  if init == "lecun":
    return nnx.Linear(fan_in, fan_out, rngs=rngs)
  if init == "xavier":
    return nnx.Linear(fan_in, fan_out, kernel_init=nnx.initializers.glorot_uniform(), rngs=rngs)
  if init != "torch":
    raise ValueError(f"model.init={init!r}: expected one of {INITS}")
  bound = 1.0 / float(fan_in) ** 0.5
  uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return nnx.Linear(fan_in, fan_out, kernel_init=uniform, bias_init=uniform, rngs=rngs)


class MLP(nnx.Module):
  """`in -> hidden... -> out` with ReLU.

  With `num_heads > 1` the last layer is a stack of heads of `num_outputs` units each and the head is
  chosen per example by its task id: the multi-head architecture of task-incremental learning
  (van de Ven & Tolias 2019). Layers are named `dense_0..dense_{n-1}` and `head` so parameter paths
  stay stable strings (LoRA targets and checkpoint keys match on them).
  """

  def __init__(self, in_features: int, hidden: Sequence[int], num_outputs: int, *,
               num_heads: int = 1, init: str = "lecun", rngs: nnx.Rngs):
    self.num_hidden = len(hidden)
    self.num_heads = num_heads
    sizes = [in_features, *hidden]
    for i in range(len(hidden)):
      setattr(self, f"dense_{i}", linear(sizes[i], sizes[i + 1], init, rngs))
    self.head = linear(sizes[-1], num_outputs * num_heads, init, rngs)
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
