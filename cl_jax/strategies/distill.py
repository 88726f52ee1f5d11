"""Knowledge distillation from the previous model: Learning without Forgetting (and its token-level LM form).

At the end of every task the params are snapshot as the teacher (Li & Hoiem 2016, "Learning without
Forgetting"). While training task t the loss gains, on the current batch,

  α · T² · KL( softmax(z_teacher / T) ‖ softmax(z_student / T) )

(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"; T² keeps the gradient scale
independent of T), averaged over the batch. Which logits are distilled follows the scenario:
  class / domain   the classes seen before task t (`learner.logits(..., task_index=t-1)`): in class-IL
                   the old classes' logits only, so the new classes are free to be learned;
  task             every previous task k < t through its own head / class subset, averaged over k:
                   LwF's one term per old task (costs one forward pass per task; see benchmarks).

Shape-generic: logits may be [B, C] (a classifier) or [B, L, V] (a language model's next-token logits); the KL is
taken over the last axis and averaged over every other position, weighted by `batch['mask']` when the batch has
one (the LM's per-target mask; see `cl_jax.eval.evaluator` for the convention). On an LM run the teacher is the
base (the snapshot after task 1, general pre-training): token-level distillation to the pre-adaptation model.

State: {'teacher': params pytree, 'tasks': int32 number of tasks finished (0: no teacher yet)}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from cl_jax.losses import distillation_loss  # noqa: F401  (T² KL per example; re-exported for callers)
from cl_jax.strategies.base import LossContext, Strategy


def default_config() -> ml_collections.ConfigDict:
  """The `distill` config section (strategies 'distill' and its alias 'lwf')."""
  return ml_collections.ConfigDict(dict(
      alpha=1.0,         # α: weight of the distillation term
      temperature=2.0,   # T: softmax temperature of teacher and student (van de Ven & Tolias 2019: 2)
      # How the task loss and the distillation term combine while training task t (1-based):
      #   constant    L_task + α · KD
      #   tasks_seen  (1/t) · L_task + α · (1 - 1/t) · KD: the weighting of van de Ven & Tolias 2019's code (the
      #               current task counts as one task among t), so distillation grows with the tasks behind it
      weighting="constant",
  ))


def mean_over_positions(values: jax.Array, batch) -> jax.Array:
  """The mean of per-position values [B, ...], weighted by `batch['mask']` (same shape) when present."""
  mask = batch.get("mask") if hasattr(batch, "get") else None
  if mask is None:
    return jnp.mean(values)
  w = mask.astype(jnp.float32)
  return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def _copy(params):
  # A fresh buffer: the train step donates its state, and one buffer may not be donated twice.
  return jax.tree.map(lambda p: jnp.array(p, copy=True), params)


WEIGHTINGS = ("constant", "tasks_seen")


def check_config(config) -> None:
  """Raises ValueError naming the bad `distill.*` key."""
  if float(config.distill.alpha) < 0:
    raise ValueError(f"distill.alpha={config.distill.alpha}: expected a non-negative weight")
  if float(config.distill.temperature) <= 0:
    raise ValueError(f"distill.temperature={config.distill.temperature}: expected a positive temperature")
  if config.distill.get("weighting", "constant") not in WEIGHTINGS:
    raise ValueError(f"distill.weighting={config.distill.weighting!r}: expected one of {WEIGHTINGS}")


def distill(config, learner) -> Strategy:
  """LwF-style distillation from the previous task's params; see the module docstring."""
  check_config(config)
  alpha, temperature = float(config.distill.alpha), float(config.distill.temperature)
  by_tasks = config.distill.get("weighting", "constant") == "tasks_seen"
  kind = config.scenario.kind if "scenario" in config and "kind" in config.scenario else "class"
  per_task = kind == "task"
  num_tasks = int(config.scenario.num_tasks) if per_task else 0

  def init(params, task_info):
    del task_info
    return dict(teacher=_copy(params), tasks=jnp.zeros((), jnp.int32))

  def term(params, teacher, batch, task, previous):
    x = batch["x"]
    student = learner.logits(params, x, task, previous)
    target = jax.lax.stop_gradient(learner.logits(teacher, x, task, previous))
    return mean_over_positions(distillation_loss(student, target, temperature), batch)

  def loss(loss_fn):
    def distill_loss(params, batch, ctx: LossContext):
      value, aux = loss_fn(params, batch, ctx)
      state = ctx.strategy_state
      previous = jnp.maximum(ctx.task_index - 1, 0)
      x, task = batch["x"], batch["task"]
      if per_task:
        # One term per finished task k, through task k's head / classes; unfinished ones weigh 0.
        terms = jnp.stack([term(params, state["teacher"], batch, jnp.full_like(task, k), previous)
                           for k in range(num_tasks)])
        done = (jnp.arange(num_tasks) < state["tasks"]).astype(jnp.float32)
        kd = jnp.sum(terms * done) / jnp.maximum(done.sum(), 1.0)
      else:
        raw = aux.get("_raw_logits")
        if raw is not None and raw.shape[0] == x.shape[0]:
          # The task loss already ran the student on this batch: reuse its logits (one forward and one
          # backward pass through the network instead of two).
          from cl_jax.losses import apply_mask
          student = apply_mask(raw, learner.logit_mask(task, previous))
          target = jax.lax.stop_gradient(learner.logits(state["teacher"], x, task, previous))
          kd = mean_over_positions(distillation_loss(student, target, temperature), batch)
        else:
          kd = term(params, state["teacher"], batch, task, previous)
      kd = jnp.where(state["tasks"] > 0, kd, 0.0)
      if by_tasks:  # t = tasks finished + 1; on the first task (no teacher) this is the task loss alone
        new_share = 1.0 / (state["tasks"].astype(jnp.float32) + 1.0)
        return new_share * value + alpha * (1.0 - new_share) * kd, {**aux, "distill_loss": kd}
      return value + alpha * kd, {**aux, "distill_loss": kd}
    return distill_loss

  def after_task(state, params, task_data, rng):
    del task_data, rng
    return dict(teacher=_copy(params), tasks=state["tasks"] + 1)

  return Strategy(init=init, loss=loss, after_task=after_task, name="distill")


# `cl_jax.config.validate` calls a builder's `check_config` before the workdir is touched.
distill.check_config = check_config
distill.config_sections = ("distill",)   # what results.json should record (also under the name 'lwf')
