"""Optimizers from config, with optional frozen parameters."""
from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def build_optimizer(c, schedule: optax.Schedule, trainable=None) -> optax.GradientTransformation:
  """`optim.name` in sgd | momentum | adam | adamw with the given schedule, clipped by `optim.grad_clip` if > 0.

  `optim.weight_decay` (wd > 0): adamw decays the weights decoupled from the gradient (Loshchilov & Hutter 2019,
  optax.adamw); sgd / momentum / adam add the L2 term's gradient to the (clipped) gradient before the update,
  g + wd * theta, as torch.optim's `weight_decay` does: the gradient of a loss term (wd / 2) * sum(theta^2). A
  reference that adds `lam * sum(theta^2)` to its loss (mammoth's `wd_reg`) is wd = 2 * lam.

  `trainable`: a pytree of bools shaped like the params (True = trained). Frozen leaves go through
  `optax.set_to_zero()` inside `optax.multi_transform`, so they get no update and hold no optimizer state.
  """
  decay = float(c.get("weight_decay", 0.0) or 0.0)
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
  if decay > 0 and c.name != "adamw":  # coupled L2: before the optimizer's own transform (momentum, Adam moments)
    tx = optax.chain(optax.add_decayed_weights(decay), tx)
  if c.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), tx)
  if trainable is not None:
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx
