"""Experience replay from a fixed-capacity buffer that lives in the strategy state.

The buffer is the rehearsal strategies' one `buffer.Buffer` (inputs, labels, task ids, the number of valid slots
`size` and the stream length `seen`; no extra fields), device arrays of static shape, so drawing a replay batch is
ordinary `jit` code.

It is filled either at each task boundary (`after_task`) from the task's training examples
(`replay.fill='task_end'`, the default), or online (`replay.fill='online'`): every train step offers its batch
to the buffer (the strategy's `update` hook, inside the jitted step), so the buffer holds current-task examples
too, as experience replay (ER) is usually run on a stream (e.g. Chaudhry et al. 2019, "On Tiny Episodic
Memories in Continual Learning"; Buzzega et al. 2020). Either way the examples are chosen by one of the
buffer's insertion policies:
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

import jax
import jax.numpy as jnp
import ml_collections

from cl_jax.strategies import buffer as buffer_lib
from cl_jax.strategies.base import LossContext, StepInfo, Strategy

POLICIES = ("reservoir", "class_balanced")
FILLS = ("task_end", "online")


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


# The type of replay's and A-GEM's state (A-GEM's annotations name it so): the rehearsal strategies' one buffer.
ReplayBuffer = buffer_lib.Buffer


def empty_buffer(capacity: int, input_shape, label_shape=()) -> buffer_lib.Buffer:
  """An empty `buffer.Buffer` of inputs, labels (one target of `label_shape` each) and task ids; no extra fields."""
  return buffer_lib.empty(capacity, input_shape, label_shape=label_shape)


def reservoir_add(buffer: buffer_lib.Buffer, x, y, task, rng) -> buffer_lib.Buffer:
  """Feeds examples x[0..n) to reservoir sampling (`buffer.reservoir_add`), in order, all at once."""
  return buffer_lib.reservoir_add(buffer, {"x": x, "y": y, "task": task}, rng)


def class_balanced_add(buffer: buffer_lib.Buffer, x, y, task, rng, per_class: int = -1) -> buffer_lib.Buffer:
  """Re-selects the buffer from its contents plus x[0..n): a uniform random subset of q examples per (task, class)
  seen, q = capacity // groups (capped at `per_class` when positive); `buffer.balanced_add` by class."""
  return buffer_lib.balanced_add(buffer, {"x": x, "y": y, "task": task}, rng, per_group=per_class, by="class")


def sample_replay_batch(buffer: buffer_lib.Buffer, rng, batch_size: int) -> dict:
  """`batch_size` examples drawn uniformly with replacement from the valid slots (slot 0 if empty)."""
  drawn = buffer_lib.sample(buffer, rng, batch_size)
  return {"x": drawn["x"], "y": drawn["y"], "task": drawn["task"]}


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
