"""A small CNN: two conv blocks and a dense layer, single- or multi-head like the MLP."""
from __future__ import annotations

import jax
from flax import nnx

from cl_jax.models.mlp import select_head


class CNN(nnx.Module):
  """conv(3x3, c1) -> relu -> maxpool 2 -> conv(3x3, c2) -> relu -> maxpool 2 -> dense -> relu -> head.

  Inputs are (B, H, W) or (B, H, W, C); 1-D inputs (B, L) are treated as (B, L, 1) width-1 images.
  """

  def __init__(self, input_shape, channels=(32, 64), hidden: int = 128, num_outputs: int = 10, *,
               num_heads: int = 1, rngs: nnx.Rngs):
    shape = tuple(input_shape)
    if len(shape) == 1:
      shape = (shape[0], 1, 1)
    elif len(shape) == 2:
      shape = (*shape, 1)
    self.input_rank = len(tuple(input_shape))
    c_in = shape[-1]
    self.conv_0 = nnx.Conv(c_in, channels[0], (3, 3), rngs=rngs)
    self.conv_1 = nnx.Conv(channels[0], channels[1], (3, 3), rngs=rngs)
    h = max(shape[0] // 4, 1)
    w = max(shape[1] // 4, 1)
    self.pool_w = shape[1] >= 4
    if not self.pool_w:
      w = shape[1]
    self.dense_0 = nnx.Linear(h * w * channels[1], hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_outputs * num_heads, rngs=rngs)
    self.num_heads = num_heads
    self.num_outputs = num_outputs

  def features(self, x: jax.Array) -> jax.Array:
    if x.ndim == 2:
      x = x[:, :, None, None]
    elif x.ndim == 3:
      x = x[..., None]
    window = (2, 2) if self.pool_w else (2, 1)
    x = nnx.max_pool(jax.nn.relu(self.conv_0(x)), window, strides=window)
    x = nnx.max_pool(jax.nn.relu(self.conv_1(x)), window, strides=window)
    return jax.nn.relu(self.dense_0(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array, task: jax.Array | None = None) -> jax.Array:
    return select_head(self.head(self.features(x)), task, self.num_heads, self.num_outputs)
