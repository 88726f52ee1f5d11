"""Optimizers from config, with optional frozen parameters."""
from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def build_optimizer(c, schedule: optax.Schedule, trainable=None) -> optax.GradientTransformation:
  """`optim.name` in sgd | momentum | adam | adamw with the given schedule, clipped by `optim.grad_clip` if > 0.

  `trainable`: a pytree of bools shaped like the params (True = trained). Frozen leaves go through
  `optax.set_to_zero()` inside `optax.multi_transform`, so they get no update and hold no optimizer state.
  """
  if c.name == "sgd":
    tx = optax.sgd(schedule)
  elif c.name == "momentum":
    tx = optax.sgd(schedule, momentum=c.momentum)
  elif c.name == "adam":
    tx = optax.adam(schedule, b1=c.b1, b2=c.b2)
  elif c.name == "adamw":
    tx = optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)
  else:
    raise ValueError(f"optim.name={c.name!r}: expected one of {OPTIMIZERS}")
  if c.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), tx)
  if trainable is not None:
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx
