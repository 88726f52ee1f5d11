"""The Strategy type: a continual-learning method as a composable transform of the task loss.

In the spirit of `optax.GradientTransformation`, a strategy is a tuple of pure functions:

  init(params, task_info) -> strategy_state
      The strategy's pytree (Fisher, anchors, teacher params, replay buffer, ...). It lives in the train
      state, is sharded like the params it mirrors and is saved in every checkpoint.
  loss(loss_fn) -> loss_fn'
      Wraps a loss `loss_fn(params, batch, ctx) -> (loss, aux)`: adds a penalty (EWC), a distillation
      term (LwF), or extends the batch (replay). `ctx.strategy_state` is this strategy's own state.
  after_task(strategy_state, params, task_data, rng) -> strategy_state
      Runs at each task boundary, outside the step: compute a Fisher, snapshot a teacher, fill a buffer.
  train_tasks(task_index) -> tuple of task indices whose training data the task trains on.
      The current task for every strategy but `joint`, which trains on all tasks seen so far.
  prepare(model, params, task_info, rng) -> (apply, params, trainable)   (optional)
      For strategies that change the model itself (O-LoRA's adapter slots): called once before training;
      returns the `apply` the Learner uses, the params to train, and a bool pytree of which params the
      optimizer updates (None: all). Frozen params get no optimizer state.
  reset_optimizer
      True to re-initialise the optimizer state at every task boundary (so momentum from task t cannot move
      params that are frozen from task t+1 on).

Step hooks (optional; None, the default, is a no-op and costs nothing in the step):

  grads(strategy_state, grads, params, batch, ctx, loss_fn) -> grads
      Runs inside the jitted step between the gradient and the optimizer: the optimizer applies what it returns
      (A-GEM's projection). `batch` is the step's batch, `ctx` the loss context with this strategy's own state,
      `loss_fn` the step's full (wrapped) loss.
  update(strategy_state, step: StepInfo) -> strategy_state
      Runs inside the jitted step after the optimizer: a per-step state update (SI's path integral, an online
      reservoir buffer, DER's stored logits). `StepInfo` holds the batch, the gradient the optimizer applied,
      the params before and after the update, the loss's aux (the task loss puts the current batch's
      unmasked logits under '_raw_logits'), an rng of its own and the task index.
  predict(strategy_state, params, x, task, task_index) -> logits [B, C]
      Replaces `learner.logits` at evaluation (iCaRL's nearest-mean-of-exemplars classifier, GDumb's model
      trained on its memory); the evaluator takes the argmax of what it returns.

`chain(a, b, c)` composes strategies: states become a tuple, losses nest (a outermost), after_task runs
each in order, train_tasks is the union; `grads` hooks run in chain order (each on the previous one's output),
`update` hooks each on their own state; at most one strategy in a chain may `predict` (or `prepare`).
A new strategy is one new file in this folder that returns a `Strategy` and registers a `StrategyEntry`
(builder, default config sections, check_config, recorded sections) in `cl_jax.strategies.REGISTRY`.

The order of a chain matters where one strategy changes the batch and another reads it: each loss transform sees
the batch its outer neighbour hands it. In `replay+lwf`, replay (outermost) appends the replayed examples first,
so LwF's distillation term is the mean over current and replayed examples; in `lwf+replay`, distillation wraps
the replay-extended task loss but computes its own term on the current batch only. The task loss is the same in
both (tests/test_chain_order.py). Penalties on the params alone (EWC) do not depend on the order.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

Params = Any
Batch = dict  # {'x': float [B, ...], 'y': int32 [B], 'task': int32 [B]}


class LossContext(NamedTuple):
  """What a loss sees besides params and batch; a pytree, so it passes through jit."""
  strategy_state: Any
  rng: jax.Array
  task_index: jax.Array  # int32 scalar: the task being trained (class-IL masks depend on it)


LossFn = Callable[[Params, Batch, LossContext], tuple[jax.Array, dict]]


class Learner(NamedTuple):
  """The model as strategies see it: raw logits plus the scenario's logit mask.

  `apply(params, x, task) -> logits [B, C]`; `logit_mask(task [B], task_index) -> bool [B, C]` or None
  (class-IL: classes seen up to `task_index`; task-IL single-head: the example's own task's classes).
  """
  apply: Callable
  logit_mask: Callable

  def logits(self, params, x, task, task_index):
    from cl_jax.losses import apply_mask
    return apply_mask(self.apply(params, x, task), self.logit_mask(task, task_index))


class TaskData(NamedTuple):
  """One task's training split as host arrays, handed to `after_task`."""
  x: np.ndarray
  y: np.ndarray
  task: np.ndarray  # int32 task id per example
  task_index: int


class TaskInfo(NamedTuple):
  """Static facts about the scenario that a strategy's `init` may size its state from.

  `label_shape` is the shape of one example's target: () for a class label, (L,) for a language model's next tokens
  (a buffer that keeps targets, A-GEM's memory, sizes its label slots from it). `input_dtype`: what the model reads
  ('float32' features, 'int32' token ids), for a strategy that runs the model on a probe input at `init` (DER).
  """
  num_tasks: int
  num_outputs: int
  input_shape: tuple
  label_shape: tuple = ()
  input_dtype: str = "float32"


class StepInfo(NamedTuple):
  """What a strategy's `update` hook sees of one train step (all traced values inside the jitted step)."""
  batch: Batch             # the step's batch, before any strategy extended it
  grads: Params            # the gradient the optimizer applied (after every `grads` hook)
  old_params: Params       # params before the step's update
  new_params: Params       # params after it
  aux: dict                # the loss's aux; '_raw_logits' holds the current batch's unmasked logits first
  rng: jax.Array           # a key of the hook's own (independent of the loss's ctx.rng)
  task_index: jax.Array    # int32 scalar


class PredictingLearner(NamedTuple):
  """The learner an evaluator uses for a strategy with a `predict` hook: `logits` calls the hook; its params are the
  pair (params, strategy_state) (see `evaluation_learner` / `evaluation_params`)."""
  learner: Any
  predict: Callable

  def logits(self, params_and_state, x, task, task_index):
    params, strategy_state = params_and_state
    return self.predict(strategy_state, params, x, task, task_index)


def evaluation_learner(learner, strategy):
  """What an evaluator calls `.logits(params, x, task, task_index)` on: the learner, or the strategy's `predict`."""
  return learner if getattr(strategy, "predict", None) is None else PredictingLearner(learner, strategy.predict)


def evaluation_params(strategy, state):
  """The params to hand that evaluation learner: `state.params`, or (params, strategy_state) with `predict`."""
  return state.params if getattr(strategy, "predict", None) is None else (state.params, state.strategy_state)


def current_task_only(task_index: int) -> tuple[int, ...]:
  return (task_index,)


def _keep_state(state, params, task_data, rng):
  del params, task_data, rng
  return state


def _identity_loss(loss_fn: LossFn) -> LossFn:
  return loss_fn


def _no_state(params, task_info):
  del params, task_info
  return ()


class Strategy(NamedTuple):
  init: Callable[[Params, TaskInfo], Any] = _no_state
  loss: Callable[[LossFn], LossFn] = _identity_loss
  after_task: Callable[[Any, Params, TaskData, jax.Array], Any] = _keep_state
  train_tasks: Callable[[int], Sequence[int]] = current_task_only
  name: str = "naive"
  prepare: Callable | None = None
  reset_optimizer: bool = False
  grads: Callable | None = None      # (strategy_state, grads, params, batch, ctx, loss_fn) -> grads
  update: Callable | None = None     # (strategy_state, StepInfo) -> strategy_state
  predict: Callable | None = None    # (strategy_state, params, x, task, task_index) -> logits


def chain(*strategies: Strategy) -> Strategy:
  """Composes strategies; the first one's loss transform is the outermost."""
  if len(strategies) == 1:
    return strategies[0]

  def init(params, task_info):
    return tuple(s.init(params, task_info) for s in strategies)

  def loss(loss_fn: LossFn) -> LossFn:
    wrapped = loss_fn
    for i in reversed(range(len(strategies))):
      wrapped = _lift(strategies[i].loss, wrapped, i)
    return wrapped

  def after_task(state, params, task_data, rng):
    rngs = jax.random.split(rng, len(strategies))
    return tuple(s.after_task(st, params, task_data, r) for s, st, r in zip(strategies, state, rngs))

  def train_tasks(task_index):
    return tuple(sorted({t for s in strategies for t in s.train_tasks(task_index)}))

  prepares = [s.prepare for s in strategies if s.prepare is not None]
  if len(prepares) > 1:
    raise ValueError("strategy: at most one strategy in a chain may change the model (prepare); got "
                     f"{[s.name for s in strategies if s.prepare is not None]}")

  predicts = [(i, s.predict) for i, s in enumerate(strategies) if s.predict is not None]
  if len(predicts) > 1:
    raise ValueError("strategy: at most one strategy in a chain may replace the evaluation classifier (predict); "
                     f"got {[strategies[i].name for i, _ in predicts]}")
  grad_hooks = [(i, s.grads) for i, s in enumerate(strategies) if s.grads is not None]
  update_hooks = {i: s.update for i, s in enumerate(strategies) if s.update is not None}

  def grads(state, g, params, batch, ctx, loss_fn):
    for i, hook in grad_hooks:
      g = hook(state[i], g, params, batch, ctx._replace(strategy_state=state[i]), loss_fn)
    return g

  def update(state, step: StepInfo):
    keys = jax.random.split(step.rng, len(strategies))
    return tuple(update_hooks[i](st, step._replace(rng=keys[i])) if i in update_hooks else st
                 for i, st in enumerate(state))

  def predict(state, params, x, task, task_index):
    i, hook = predicts[0]
    return hook(state[i], params, x, task, task_index)

  return Strategy(init, loss, after_task, train_tasks, "+".join(s.name for s in strategies),
                  prepares[0] if prepares else None, any(s.reset_optimizer for s in strategies),
                  grads if grad_hooks else None, update if update_hooks else None, predict if predicts else None)


def _lift(transform, inner: LossFn, index: int) -> LossFn:
  """Runs strategy `index`'s transform with its own state, handing the full tuple on to `inner`."""

  def lifted(params, batch, ctx: LossContext):
    full = ctx.strategy_state

    def inner_with_full_state(p, b, c: LossContext):
      return inner(p, b, c._replace(strategy_state=full))

    return transform(inner_with_full_state)(params, batch, ctx._replace(strategy_state=full[index]))

  return lifted
