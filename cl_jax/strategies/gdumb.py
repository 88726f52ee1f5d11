"""GDumb (Prabhu, Torr & Dokania 2020, "GDumb: A Simple Approach that Questions Our Progress in Continual Learning").

GDumb does not learn from the stream. It only keeps a memory of `gdumb.capacity` examples, filled greedily and
class-balanced as the stream goes by (every train step, through the strategy's `update` hook; per example, in order;
`buffer.greedy_balanced_add`):

  the example's class c joins the classes seen, and with k = capacity // (number of classes seen)
  - while the memory has room, the example is stored;
  - else, if c holds fewer than k examples, it replaces a uniformly random example of the largest class;
  - else it is dropped.

Before every evaluation (at each task end) a model is trained from scratch — from the run's initial params — on the
memory alone: `gdumb.epochs` epochs of SGD with momentum 0.9 and a cosine-decayed learning rate `gdumb.lr`, batches of
`gdumb.batch_size` drawn without replacement within an epoch (`buffer.epoch_order`), masked cross-entropy with the
logit mask of the current task (class-IL: every class seen). The evaluator scores that model through the strategy's
`predict` hook. The stream model itself receives no gradient (the strategy's loss is 0), so it stays at its initial
params.

"Class" is (task, label), so task- and domain-incremental scenarios, whose labels repeat across tasks, balance per task
and label. The paper's cutmix augmentation and warm restarts are left out.

State: {'memory': the rehearsal strategies' one `buffer.Buffer` (sharded along its slots), 'counts': int32 [groups]
(members per class), 'seen': bool [groups] (classes the stream has shown), 'init': θ₀, 'model': the params trained
on the memory}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cl_jax.losses import cross_entropy
from cl_jax.strategies import buffer as buffer_lib
from cl_jax.strategies.base import StepInfo, Strategy


def default_config() -> ml_collections.ConfigDict:
  """The `gdumb` config section."""
  return ml_collections.ConfigDict(dict(
      capacity=500,      # memory slots (examples)
      epochs=30,         # epochs over the memory when retraining from scratch at each task end
      batch_size=32,     # retraining batch size
      lr=0.05,           # retraining peak learning rate (SGD, momentum 0.9, cosine decay to 0)
  ))


def check_config(config) -> None:
  """Raises ValueError naming the bad `gdumb.*` key."""
  gc = config.gdumb
  for key in ("capacity", "epochs", "batch_size"):
    if int(gc[key]) < 1:
      raise ValueError(f"gdumb.{key}={gc[key]}: expected a positive integer")
  if not float(gc.lr) > 0:
    raise ValueError(f"gdumb.lr={gc.lr}: expected a positive learning rate")


def gdumb(config, learner) -> Strategy:
  """GDumb from `config.gdumb`; see the module docstring."""
  check_config(config)
  gc = config.gdumb
  capacity, epochs, batch_size, lr = int(gc.capacity), int(gc.epochs), int(gc.batch_size), float(gc.lr)
  num_tasks = int(config.scenario.num_tasks)

  def init(params, task_info):
    groups = int(task_info.num_tasks) * int(task_info.num_outputs)
    def copy(tree):
      return jax.tree.map(lambda p: jnp.array(p, copy=True), tree)

    memory = buffer_lib.empty(capacity, tuple(task_info.input_shape))
    return dict(memory=memory, counts=jnp.zeros((groups,), jnp.int32), seen=jnp.zeros((groups,), bool),
                init=copy(params), model=copy(params))

  def loss(loss_fn):
    def no_stream_learning(params, batch, ctx):
      value, aux = loss_fn(params, batch, ctx)
      return 0.0 * value, {**aux, "gdumb_memory": ctx.strategy_state["memory"].size.astype(jnp.float32)}
    return no_stream_learning

  def update(state, step: StepInfo):
    b = step.batch
    examples = {"x": b["x"].astype(jnp.float32), "y": b["y"].astype(jnp.int32), "task": b["task"].astype(jnp.int32)}
    memory, counts, seen = buffer_lib.greedy_balanced_add(state["memory"], state["counts"], state["seen"], examples,
                                                          step.rng, state["counts"].shape[0] // num_tasks)
    return {**state, "memory": memory, "counts": counts, "seen": seen}

  def after_task(state, params, task_data, rng):
    del params
    model = retrain(state["init"], state["memory"], jnp.int32(task_data.task_index), rng)
    return {**state, "model": model}

  @jax.jit
  def retrain(init_params, memory, task_index, rng):
    num_batches = jnp.maximum((memory.size + batch_size - 1) // batch_size, 1)
    total = epochs * num_batches
    def schedule(s):
      return 0.5 * lr * (1 + jnp.cos(jnp.pi * s / total))

    opt = optax.sgd(schedule, momentum=0.9)

    def batch_loss(p, idx, weight):
      logits = learner.logits(p, memory.x[idx], memory.task[idx], task_index)
      ce = cross_entropy(logits, memory.y[idx])
      return jnp.sum(weight * ce) / jnp.maximum(jnp.sum(weight), 1.0)

    def step(s, carry):
      p, opt_state = carry
      epoch, b = s // num_batches, s % num_batches
      order = buffer_lib.epoch_order(memory, jax.random.fold_in(rng, epoch))   # valid slots shuffled, padding last
      pos = b * batch_size + jnp.arange(batch_size)
      idx = order[jnp.minimum(pos, capacity - 1)]
      weight = (pos < memory.size).astype(jnp.float32)
      grads = jax.grad(batch_loss)(p, idx, weight)
      updates, opt_state = opt.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state

    params, _ = jax.lax.fori_loop(0, total, step, (init_params, opt.init(init_params)))
    return params

  def predict(state, params, x, task, task_index):
    del params
    return learner.logits(state["model"], x, task, task_index)

  return Strategy(init=init, loss=loss, after_task=after_task, name="gdumb", update=update, predict=predict)
