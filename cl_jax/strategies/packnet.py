"""PackNet (Mallya & Lazebnik 2018, "PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning").

Task-incremental only (`scenario.kind='task'`): every weight belongs to at most one task, and a task's prediction uses
only the weights of that task and of the tasks before it. State: `owner`, an int32 tree shaped like the params,
0 = free, k = claimed by task k (1-based), and `tasks`, the number of tasks finished.

  train task t   forward pass with the weights usable by t (claimed by tasks ≤ t, plus every free one); the gradient
                 of claimed weights is zeroed before the optimizer (the `grads` hook), so earlier tasks' weights never
                 move, and the optimizer state is reset at every task boundary so no momentum moves them either;
  end of task t  prune: of the free weights of each tensor, the (1 − `packnet.prune`) fraction with the largest |w| is
                 claimed by task t (exactly k = round((1 − prune) · free) of them, ties by flat index); the rest stay
                 free for later tasks. Tensors with fewer than two axes (biases) are claimed whole by the first task,
                 as PackNet fixes biases after it;
  predict task i the weights claimed by tasks 1..i+1 (and, for a task not trained yet, the free ones), through the
                 strategy's `predict` hook (and the same masking in the training loss).

Training masks with the task being trained (`ctx.task_index`); prediction runs one masked forward pass per task and
gives each example the one of its own task (evaluation batches may mix tasks). Simplifications: the paper's
post-pruning re-training epochs are left out, and released weights start the next task from their current values
rather than from 0 (earlier tasks never see them either way).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from cl_jax.strategies.base import LossContext, Strategy


def default_config() -> ml_collections.ConfigDict:
  """The `packnet` config section."""
  return ml_collections.ConfigDict(dict(
      prune=0.5,   # fraction of each task's free weights released for later tasks at its end
  ))


def usable(owner, task_id, tasks_done):
  """bool: which weights task `task_id` (0-based) uses, given `tasks_done` finished tasks (module docstring)."""
  return ((owner >= 1) & (owner <= task_id + 1)) | ((owner == 0) & (task_id >= tasks_done))


def masked_params(params, state, task_id):
  return jax.tree.map(lambda p, o: jnp.where(usable(o, task_id, state["tasks"]), p, jnp.zeros_like(p)),
                      params, state["owner"])


def claim(state, params, prune: float):
  """End of a task: the task claims the largest (1 − prune) share of each tensor's free weights; pure (jittable)."""
  t = state["tasks"] + 1

  def one(p, o):
    free = o == 0
    if p.ndim < 2:   # biases: claimed whole by the first task
      return jnp.where(free & (t == 1), t, o)
    n_free = jnp.sum(free)
    k = jnp.round((1.0 - prune) * n_free).astype(jnp.int32)
    mag = jnp.where(free, jnp.abs(p.astype(jnp.float32)), -1.0)
    keep = _dynamic_topk(mag, k) & free
    return jnp.where(keep, t, o)

  return dict(owner=jax.tree.map(one, params, state["owner"]), tasks=t)


def _dynamic_topk(values, k):
  """Exactly k entries with the largest values (ties by flat index) for a traced k: one stable sort (unlike
  `cl_jax.merging.topk_mask`, whose k is static)."""
  flat = values.reshape(-1)
  order = jnp.argsort(-flat, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(flat.shape[0]))
  return (rank < k).reshape(values.shape)


def check_config(config) -> None:
  """Raises ValueError naming the bad `packnet.*` key (or the scenario it cannot run)."""
  prune = float(config.packnet.prune)
  if not 0.0 < prune < 1.0:
    raise ValueError(f"packnet.prune={prune}: expected a fraction in (0, 1) of each task's weights to release")
  kind = config.scenario.get("kind", "task") if "scenario" in config else "task"
  if kind != "task":
    raise ValueError(f"scenario.kind={kind!r}: PackNet masks weights per task and needs the task id; use "
                     "scenario.kind='task'")


def packnet(config, learner) -> Strategy:
  """PackNet from `config.packnet`; see the module docstring."""
  check_config(config)
  prune = float(config.packnet.prune)
  num_tasks = int(config.scenario.num_tasks)

  def init(params, task_info):
    del task_info
    return dict(owner=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.int32), params), tasks=jnp.zeros((), jnp.int32))

  def loss(loss_fn):
    def packnet_loss(params, batch, ctx: LossContext):
      return loss_fn(masked_params(params, ctx.strategy_state, ctx.task_index), batch, ctx)
    return packnet_loss

  def grads(state, g, params, batch, ctx, loss_fn):
    del params, batch, ctx, loss_fn
    return jax.tree.map(lambda gi, o: jnp.where(o == 0, gi, jnp.zeros_like(gi)), g, state["owner"])

  claim_jit = jax.jit(claim, static_argnames=("prune",))

  def after_task(state, params, task_data, rng):
    del task_data, rng
    return claim_jit(state, params, prune=prune)

  def predict(state, params, x, task, task_index):
    per_task = jnp.stack([learner.logits(masked_params(params, state, j), x, task, task_index)
                          for j in range(num_tasks)])                      # [T, B, C]
    return jnp.take_along_axis(per_task, task.astype(jnp.int32)[None, :, None], axis=0)[0]

  return Strategy(init=init, loss=loss, after_task=after_task, name="packnet", grads=grads, predict=predict,
                  reset_optimizer=True)
