"""Losses shared by the task loop and the strategies."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Masked logits are set to this rather than -inf so softmax and its gradient stay finite.
MASK_VALUE = -1e9


def apply_mask(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  return logits if mask is None else jnp.where(mask, logits, MASK_VALUE)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)
