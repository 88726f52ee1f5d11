"""Learning-rate schedules as config data, built with `optax.join_schedules`.

  constant  linear warmup over `warmup_fraction` of the steps, then `lr` (with warmup_fraction=0, the classic
            default: `lr` from the first step)
  cosine    linear warmup over `warmup_fraction` of the steps, then cosine decay to `end_lr_fraction * lr`
  wsd       warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024): linear warmup over
            `warmup_fraction`, constant `lr` until the last `decay_fraction` of the steps, then decay
            (`decay_shape` linear or cosine) to `end_lr_fraction * lr`. The stable fraction is what remains.

`scope='task'` restarts the schedule at every task (count modulo steps_per_task); `scope='global'` spans the
whole run (num_tasks * steps_per_task steps).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

KINDS = ("constant", "cosine", "wsd")


def check_schedule(c) -> None:
  if c.schedule not in KINDS:
    raise ValueError(f"optim.schedule={c.schedule!r}: expected one of {KINDS}")
  if not c.lr > 0:
    raise ValueError(f"optim.lr={c.lr}: must be positive")
  for key in ("warmup_fraction", "decay_fraction", "end_lr_fraction"):
    if not 0.0 <= c[key] <= 1.0:
      raise ValueError(f"optim.{key}={c[key]}: must be in [0, 1]")
  if c.warmup_fraction + (c.decay_fraction if c.schedule == "wsd" else 0.0) > 1.0:
    raise ValueError(f"optim.warmup_fraction + optim.decay_fraction = "
                     f"{c.warmup_fraction + c.decay_fraction}: exceeds 1")
  if c.decay_shape not in ("linear", "cosine"):
    raise ValueError(f"optim.decay_shape={c.decay_shape!r}: expected 'linear' or 'cosine'")
  if c.scope not in ("task", "global"):
    raise ValueError(f"optim.scope={c.scope!r}: expected 'task' or 'global'")


def wsd_schedule(lr: float, total_steps: int, warmup_fraction: float, decay_fraction: float,
                 end_lr_fraction: float = 0.0, decay_shape: str = "linear") -> optax.Schedule:
  """Warmup-stable-decay: 0 -> lr over the warmup, lr during the stable phase, lr -> end over the decay."""
  warmup = int(round(warmup_fraction * total_steps))
  decay = int(round(decay_fraction * total_steps))
  stable = total_steps - warmup - decay
  end = lr * end_lr_fraction
  if decay_shape == "cosine":
    decay_fn = optax.cosine_decay_schedule(lr, max(decay, 1), alpha=end_lr_fraction)
  else:
    decay_fn = optax.linear_schedule(lr, end, max(decay, 1))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr), decay_fn],
      boundaries=[warmup, warmup + stable])


def cosine_schedule(lr: float, total_steps: int, warmup_fraction: float, end_lr_fraction: float) -> optax.Schedule:
  warmup = int(round(warmup_fraction * total_steps))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)),
       optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), alpha=end_lr_fraction)],
      boundaries=[warmup])


def constant_schedule(lr: float, total_steps: int, warmup_fraction: float = 0.0) -> optax.Schedule:
  """0 -> lr linearly over the warmup, then lr; no warmup: lr from the first step."""
  warmup = int(round(warmup_fraction * total_steps))
  if warmup == 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def build_schedule(c, steps_per_task: int, num_tasks: int) -> optax.Schedule:
  """The schedule an `optim` config section names; a function of the optimizer's step count."""
  check_schedule(c)
  total = steps_per_task if c.scope == "task" else steps_per_task * num_tasks
  if c.schedule == "constant":
    base = constant_schedule(c.lr, total, c.warmup_fraction)
  elif c.schedule == "cosine":
    base = cosine_schedule(c.lr, total, c.warmup_fraction, c.end_lr_fraction)
  else:
    base = wsd_schedule(c.lr, total, c.warmup_fraction, c.decay_fraction, c.end_lr_fraction, c.decay_shape)
  if c.scope == "task":
    return lambda count: base(jnp.mod(count, steps_per_task))
  return base
