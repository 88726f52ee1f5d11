"""Averaged gradient episodic memory, A-GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM").

An episodic memory of past tasks' examples (the replay buffer of `cl_jax.strategies.replay`, filled at each task
boundary) constrains every step: with g the step's gradient and g_ref the gradient of the task loss (masked
cross-entropy, the logit mask of the current task) on `agem.batch_size` examples drawn from the memory,

  g̃ = g − (gᵀ g_ref / g_refᵀ g_ref) g_ref   if gᵀ g_ref < 0,   else g̃ = g,

so to first order the step does not increase the average loss on the memory. The dot products run over all
parameters at once. The projection happens in the train step through the strategy's `grads` hook, before the
optimizer; nothing is projected while the memory is empty.

Shape-generic: the reference loss is the mean cross-entropy over every target of the drawn examples, so on a
language model (logits [B, L, V], targets [B, L]) it is the mean next-token loss on the remembered sequences. The
memory's label slots take the shape `TaskInfo.label_shape` (() for a class label, (L,) for next tokens), and its
inputs go to the model in the dtype of the step's own batch (token ids stay integers). Token targets have no class
to balance on, so a language model fills the memory with `agem.policy='reservoir'`.

State: the rehearsal strategies' one `buffer.Buffer` (inputs, labels, task ids).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from cl_jax.strategies import buffer as buffer_lib, replay as replay_lib
from cl_jax.strategies.base import Strategy

_MEMORY_STREAM = 0xA6E1


def default_config() -> ml_collections.ConfigDict:
  """The `agem` config section."""
  return ml_collections.ConfigDict(dict(
      capacity=1000,             # episodic memory slots (examples), over all tasks
      batch_size=256,            # memory examples behind each reference gradient (Chaudhry et al. use 256)
      # How the memory is filled at task ends: class_balanced | reservoir | task_quota (capacity // num_tasks
      # random examples of each task, the memory full only after the last task: mammoth's A-GEM, Buzzega et al.
      # 2020, whose `end_task` stores `buffer_size // N_TASKS` examples of the task just learned).
      policy="class_balanced",
  ))


def mean_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over every target of -log softmax(logits)[target]: logits [..., C], integer targets [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1))


def empty_memory(capacity: int, task_info) -> buffer_lib.Buffer:
  """An empty memory whose label slots have the shape of one example's target (`TaskInfo.label_shape`)."""
  return buffer_lib.empty(capacity, tuple(task_info.input_shape), label_shape=tuple(task_info.label_shape))


def tree_vdot(a, b) -> jax.Array:
  """Σ over every leaf of a · b (float32)."""
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def project(grads, ref_grads, active=True):
  """A-GEM's projection of `grads` against `ref_grads` (see the module docstring); identity where not `active`."""
  dot = tree_vdot(grads, ref_grads)
  norm = tree_vdot(ref_grads, ref_grads)
  coef = jnp.where(active & (dot < 0) & (norm > 0), dot / jnp.where(norm > 0, norm, 1.0), 0.0)
  return jax.tree.map(lambda g, r: (g.astype(jnp.float32) - coef * r.astype(jnp.float32)).astype(g.dtype),
                      grads, ref_grads)


def check_config(config) -> None:
  """Raises ValueError naming the bad `agem.*` key."""
  ac = config.agem
  capacity, batch_size, policy = int(ac.capacity), int(ac.batch_size), ac.policy
  if capacity < 1:
    raise ValueError(f"agem.capacity={capacity}: expected a positive number of examples")
  if batch_size < 1:
    raise ValueError(f"agem.batch_size={batch_size}: expected a positive batch size")
  if policy not in POLICIES:
    raise ValueError(f"agem.policy={policy!r}: expected one of {POLICIES}")
  if policy == "task_quota" and capacity < _num_tasks(config):
    raise ValueError(f"agem.capacity={capacity}: the task_quota policy stores capacity // scenario.num_tasks "
                     f"examples per task; need at least one per task ({_num_tasks(config)} tasks)")


POLICIES = (*replay_lib.POLICIES, "task_quota")


def _num_tasks(config) -> int:
  scenario = config.get("scenario") if hasattr(config, "get") else None
  if scenario is None or "num_tasks" not in scenario:
    raise ValueError("agem.policy='task_quota' needs scenario.num_tasks (the quota is capacity // num_tasks)")
  return int(scenario.num_tasks)


def agem(config, learner) -> Strategy:
  """A-GEM from `config.agem`; see the module docstring."""
  check_config(config)
  ac = config.agem
  capacity, batch_size, policy = int(ac.capacity), int(ac.batch_size), ac.policy
  quota = capacity // _num_tasks(config) if policy == "task_quota" else -1

  def init(params, task_info):
    del params
    return empty_memory(capacity, task_info)

  def reference_loss(params, memory, task_index):
    logits = learner.logits(params, memory["x"], memory["task"], task_index)
    return mean_cross_entropy(logits, memory["y"])

  def grads(memory, g, params, batch, ctx, loss_fn):
    del loss_fn
    drawn = replay_lib.sample_replay_batch(memory, jax.random.fold_in(ctx.rng, _MEMORY_STREAM), batch_size)
    drawn["x"] = drawn["x"].astype(batch["x"].dtype)  # the buffer keeps float32; an LM reads token ids
    g_ref = jax.grad(reference_loss)(params, drawn, ctx.task_index)
    return project(g, g_ref, memory["size"] > 0)

  def after_task(memory, params, task_data, rng):
    del params
    x, y, task = (jnp.asarray(task_data.x, jnp.float32), jnp.asarray(task_data.y, jnp.int32),
                  jnp.asarray(task_data.task, jnp.int32))
    if policy == "reservoir":
      return replay_lib.reservoir_add(memory, x, y, task, rng)
    if policy == "task_quota":  # a uniformly random quota of this task; earlier tasks keep theirs
      return buffer_lib.balanced_add(memory, {"x": x, "y": y, "task": task}, rng, per_group=quota, by="task")
    return replay_lib.class_balanced_add(memory, x, y, task, rng)

  return Strategy(init=init, after_task=after_task, name="agem", grads=grads)
