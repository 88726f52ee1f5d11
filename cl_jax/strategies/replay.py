"""Experience replay from a fixed-capacity buffer that lives in the strategy state.

The buffer is device arrays of static shape, so drawing a replay batch is ordinary `jit` code:

  {'x': [capacity, ...] float32, 'y': [capacity] int32, 'task': [capacity] int32,
   'size': int32 number of valid slots (they are the first `size`), 'seen': int32 stream length so far}

It is filled either at each task boundary (`after_task`) from the task's training examples
(`replay.fill='task_end'`, the default), or online (`replay.fill='online'`): every train step offers its batch
to the buffer (the strategy's `update` hook, inside the jitted step), so the buffer holds current-task examples
too, as experience replay (ER) is usually run on a stream (e.g. Chaudhry et al. 2019, "On Tiny Episodic
Memories in Continual Learning"; Buzzega et al. 2020). Either way the examples are chosen by
  reservoir        reservoir sampling over the stream of all examples seen (Vitter 1985, Algorithm R):
                   after n examples every one of them is in the buffer with probability capacity / n;
  class_balanced   an equal share of the capacity for every (task, class) seen so far, a uniformly random
                   subset of each (as in the 'ER' baseline of van de Ven, Tuytelaars & Tolias 2022, which
                   keeps 100 examples per class: capacity 1000 with `replay.per_class=100`).

Each step draws `replay.batch_size` examples uniformly (with replacement) from the valid slots and
concatenates them to the current batch; per-example weights make the objective

  (mean ℓ over the current batch + w · mean ℓ over the replay batch) / (1 + w),   w = `replay.weight`,

and w = 0 while the buffer is empty. The task loss must honour `batch['weight']` (Σ wᵢℓᵢ / Σ wᵢ).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from cl_jax.sharding import shard_like_batch
from cl_jax.strategies.base import LossContext, StepInfo, Strategy

POLICIES = ("reservoir", "class_balanced")
FILLS = ("task_end", "online")
_GROUP_STRIDE = 1 << 16   # group id of (task, class) = task * stride + class


def default_config() -> ml_collections.ConfigDict:
  """The `replay` config section."""
  return ml_collections.ConfigDict(dict(
      capacity=1000,        # buffer slots (examples)
      policy="reservoir",   # reservoir | class_balanced
      batch_size=128,       # replayed examples per step
      weight=1.0,           # w: weight of the replay batch's mean loss relative to the current batch's
      per_class=-1,         # class_balanced: at most this many per (task, class); -1 = capacity / groups
      fill="task_end",      # task_end: the task's examples at its end | online: every step's batch, as it trains
  ))


@shard_like_batch
class ReplayBuffer(NamedTuple):
  """The buffer's arrays; `buffer['x']` works as for a dict. Sharded along the slot axis like a batch."""
  x: jax.Array
  y: jax.Array
  task: jax.Array
  size: jax.Array
  seen: jax.Array

  def __getitem__(self, key):
    return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


def empty_buffer(capacity: int, input_shape) -> ReplayBuffer:
  return ReplayBuffer(x=jnp.zeros((capacity, *input_shape), jnp.float32),
                      y=jnp.zeros((capacity,), jnp.int32), task=jnp.zeros((capacity,), jnp.int32),
                      size=jnp.zeros((), jnp.int32), seen=jnp.zeros((), jnp.int32))


def reservoir_winners(seen, capacity: int, n: int, rng) -> jax.Array:
  """Per buffer slot, which of n new examples (stream indices seen..seen+n) ends there; -1: none.

  Algorithm R: the example with stream index g goes to slot g while g < capacity, else to slot
  j ~ U{0..g} if j < capacity. The buffer after the whole stream only needs, per slot, the last example
  written there, so all draws happen at once and a scatter-max picks each slot's winner.
  """
  g = seen + jnp.arange(n, dtype=jnp.int32)
  j = jax.random.randint(rng, (n,), 0, g + 1)
  slot = jnp.where(g < capacity, g, j)
  return jnp.full((capacity,), -1, jnp.int32).at[slot].max(jnp.arange(n, dtype=jnp.int32), mode="drop")


@jax.jit
def reservoir_add(buffer: dict, x, y, task, rng) -> dict:
  """Feeds examples x[0..n) to reservoir sampling (`reservoir_winners`), in order, all at once."""
  capacity, n = buffer["y"].shape[0], x.shape[0]
  winner = reservoir_winners(buffer["seen"], capacity, n, rng)
  return _write(buffer, winner, x, y, task, size=jnp.minimum(buffer["seen"] + n, capacity))


@functools.partial(jax.jit, static_argnames=("per_class",))
def class_balanced_add(buffer: dict, x, y, task, rng, per_class: int = -1) -> dict:
  """Re-selects the buffer from its contents plus x[0..n): a uniform random subset of q examples per
  (task, class) seen, q = capacity // groups (capped at `per_class` when positive)."""
  capacity, n = buffer["y"].shape[0], x.shape[0]
  valid = jnp.concatenate([jnp.arange(capacity) < buffer["size"], jnp.ones((n,), bool)])
  group = jnp.concatenate([buffer["task"] * _GROUP_STRIDE + buffer["y"],
                           task.astype(jnp.int32) * _GROUP_STRIDE + y.astype(jnp.int32)])
  group = jnp.where(valid, group, jnp.iinfo(jnp.int32).max)
  # Random priorities: the top q of a group are a uniform subset of it, and the buffer's old members
  # (already a uniform subset) stay uniform when their group's share shrinks.
  priority = jax.random.uniform(rng, group.shape)
  order = jnp.lexsort((-priority, group))
  sorted_group = group[order]
  rank = jnp.arange(group.shape[0]) - jnp.searchsorted(sorted_group, sorted_group, side="left")
  num_groups = jnp.sum((rank == 0) & valid[order])
  quota = capacity // jnp.maximum(num_groups, 1)
  if per_class > 0:
    quota = jnp.minimum(quota, per_class)
  keep = valid[order] & (rank < quota)
  chosen = order[jnp.argsort(~keep, stable=True)[:capacity]]   # kept candidates first
  size = jnp.minimum(keep.sum(), capacity).astype(jnp.int32)
  old = dict(x=buffer["x"], y=buffer["y"], task=buffer["task"])
  pick = lambda old_a, new_a: jnp.concatenate([old_a, new_a.astype(old_a.dtype)])[chosen]
  return ReplayBuffer(x=pick(old["x"], x), y=pick(old["y"], y), task=pick(old["task"], task),
                      size=size, seen=buffer["seen"] + n)


def _write(buffer, winner, x, y, task, size):
  take = winner >= 0
  src = jnp.maximum(winner, 0)
  put = lambda old, new: jnp.where(take.reshape(-1, *[1] * (old.ndim - 1)), new[src].astype(old.dtype),
                                   old)
  return ReplayBuffer(x=put(buffer["x"], x), y=put(buffer["y"], y), task=put(buffer["task"], task),
                      size=size.astype(jnp.int32), seen=buffer["seen"] + x.shape[0])


def sample_replay_batch(buffer: dict, rng, batch_size: int) -> dict:
  """`batch_size` examples drawn uniformly with replacement from the valid slots (slot 0 if empty)."""
  idx = jax.random.randint(rng, (batch_size,), 0, jnp.maximum(buffer["size"], 1))
  return dict(x=buffer["x"][idx], y=buffer["y"][idx], task=buffer["task"][idx])


def check_config(config) -> None:
  """Raises ValueError naming the bad `replay.*` key."""
  rc = config.replay
  capacity, batch_size, weight = int(rc.capacity), int(rc.batch_size), float(rc.weight)
  policy, per_class = rc.policy, int(rc.per_class)
  if policy not in POLICIES:
    raise ValueError(f"replay.policy={policy!r}: expected one of {POLICIES}")
  if capacity < 1:
    raise ValueError(f"replay.capacity={capacity}: expected a positive number of examples")
  if batch_size < 1:
    raise ValueError(f"replay.batch_size={batch_size}: expected a positive batch size")
  if weight < 0:
    raise ValueError(f"replay.weight={weight}: expected a non-negative weight")
  if per_class == 0 or per_class < -1:
    raise ValueError(f"replay.per_class={per_class}: expected a positive count or -1")
  fill = rc.get("fill", "task_end")
  if fill not in FILLS:
    raise ValueError(f"replay.fill={fill!r}: expected one of {FILLS}")


def replay(config, learner) -> Strategy:
  """Experience replay from `config.replay`; see the module docstring."""
  del learner
  check_config(config)
  rc = config.replay
  capacity, batch_size, weight = int(rc.capacity), int(rc.batch_size), float(rc.weight)
  policy, per_class = rc.policy, int(rc.per_class)
  online = rc.get("fill", "task_end") == "online"

  def init(params, task_info):
    del params
    return empty_buffer(capacity, tuple(task_info.input_shape))

  def loss(loss_fn):
    def replay_loss(params, batch, ctx: LossContext):
      buffer = ctx.strategy_state
      extra = set(batch) - {"x", "y", "task", "weight"}
      if extra:
        raise ValueError(f"replay: batch keys {sorted(extra)} have no counterpart in the buffer")
      # A stream of its own: other strategies may draw from ctx.rng too.
      replayed = sample_replay_batch(buffer, jax.random.fold_in(ctx.rng, 0x5E9A7), batch_size)
      current = batch["y"].shape[0]
      cur_w = batch.get("weight", jnp.ones((current,), jnp.float32))
      rep_w = jnp.where(buffer["size"] > 0, weight * current / batch_size, 0.0)
      merged = {k: jnp.concatenate([batch[k], replayed[k].astype(batch[k].dtype)])
                for k in ("x", "y", "task")}
      merged["weight"] = jnp.concatenate([cur_w, jnp.full((batch_size,), rep_w, jnp.float32)])
      value, aux = loss_fn(params, merged, ctx)
      return value, {**aux, "replay_size": buffer["size"].astype(jnp.float32)}
    return replay_loss

  def add(buffer, x, y, task, rng):
    x, y, task = x.astype(jnp.float32), y.astype(jnp.int32), task.astype(jnp.int32)
    if policy == "reservoir":
      return reservoir_add(buffer, x, y, task, rng)
    return class_balanced_add(buffer, x, y, task, rng, per_class=per_class)

  def after_task(buffer, params, task_data, rng):
    del params
    if online:
      return buffer
    return add(buffer, jnp.asarray(task_data.x), jnp.asarray(task_data.y), jnp.asarray(task_data.task), rng)

  def update(buffer, step: StepInfo):
    return add(buffer, step.batch["x"], step.batch["y"], step.batch["task"], step.rng)

  return Strategy(init=init, loss=loss, after_task=after_task, name="replay", update=update if online else None)


# `cl_jax.config.validate` calls a builder's `check_config` before the workdir is touched.
replay.check_config = check_config
replay.config_sections = ("replay",)   # what results.json should record
