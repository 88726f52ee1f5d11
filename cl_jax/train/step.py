"""The pure train step and the base task loss."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from cl_jax.losses import accuracy, apply_mask, cross_entropy
from cl_jax.strategies.base import Learner, LossContext, LossFn, StepInfo, Strategy
from cl_jax.train.state import TrainState


def task_loss(learner: Learner) -> LossFn:
  """Mean masked cross-entropy of the batch; `batch['weight']`, if present, weights examples.

  The unmasked logits go out in aux as `_raw_logits` so that an outer strategy (distillation) can reuse this
  forward pass instead of running the student again; aux keys starting with '_' are not logged.
  """

  def loss_fn(params, batch, ctx: LossContext):
    raw = learner.apply(params, batch["x"], batch["task"])
    logits = apply_mask(raw, learner.logit_mask(batch["task"], ctx.task_index))
    ce = cross_entropy(logits, batch["y"])
    if "weight" in batch:
      w = batch["weight"].astype(jnp.float32)
      loss = jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-8)
    else:
      loss = jnp.mean(ce)
    return loss, {"task_loss": loss, "accuracy": accuracy(logits, batch["y"]), "_raw_logits": raw}

  return loss_fn


# Folded into the step's key for the strategy's `update` hook, so it never shares a stream with the loss's.
_UPDATE_STREAM = 0x7D3A


def accumulated_value_and_grad(loss_fn: LossFn, grad_accum: int):
  """`value_and_grad(loss_fn, has_aux=True)` over `grad_accum` micro-batches, one `lax.scan` step each.

  The batch's rows are split into k = grad_accum interleaved micro-batches (micro-batch i = rows i, i+k, ...,
  so each keeps the batch's sharding over the devices) and

    loss = 1/k sum_i loss(params, batch_i),   grads = 1/k sum_i grad loss(params, batch_i)

  with aux values averaged the same way ('_' aux keys, per-example outputs, are dropped). For a loss that is a
  mean over equally weighted examples this is the one-big-batch update at 1/k of its activation memory. The
  micro-batches' keys are `fold_in(ctx.rng, i)`.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum <= 1:
    return grad_fn
  k = int(grad_accum)

  def split(x):
    if x.ndim == 0 or x.shape[0] % k:
      raise ValueError(f"train.grad_accum={k}: the batch's leading dimension {x.shape[:1]} is not divisible by it")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  def accumulated(params, batch, ctx: LossContext):
    micro = jax.tree.map(split, batch)

    def one(carry, xs):
      i, mb = xs
      (loss, aux), grads = grad_fn(params, mb, ctx._replace(rng=jax.random.fold_in(ctx.rng, i)))
      aux = {n: v for n, v in aux.items() if not n.startswith("_")}
      return jax.tree.map(lambda c, x: c + x.astype(c.dtype), carry, (loss, aux, grads)), None

    (loss0, aux0), grads0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), ctx)
    aux0 = {n: v for n, v in aux0.items() if not n.startswith("_")}
    # Sums in float32 whatever the params' dtype (k bf16 additions would round k times).
    wide = lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32))
    (loss, aux, grads), _ = jax.lax.scan(one, jax.tree.map(wide, (loss0, aux0, grads0)), (jnp.arange(k), micro))
    mean = lambda total, like: (total / k).astype(like.dtype)
    return (mean(loss, loss0), jax.tree.map(mean, aux, aux0)), jax.tree.map(mean, grads, grads0)

  return accumulated


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: Callable,
                    log_norms: bool = True, strategy: Strategy | None = None, grad_accum: int = 1):
  """`train_step(state, batch) -> (state, metrics)`, pure; jit it with shardings (see `compile_train_step`).

  loss -> gradient -> `strategy.grads` (if any: e.g. A-GEM's projection) -> optimizer -> `strategy.update`
  (if any: per-step strategy state such as SI's path integral or an online replay buffer). `loss_fn` is the
  strategy-wrapped loss (`strategy.loss(task_loss(learner))`); without `strategy` no hook runs.
  Metrics (big_vision style): loss and the loss's aux values, the learning rate, and (with `log_norms`) the
  l2 norms of the gradient, the params and the update: three extra passes over the params, which for a small
  model on CPU cost a noticeable share of the step (`benchmarks/step_throughput.py` measures it).
  `grad_accum` > 1 accumulates the gradient over that many micro-batches (`accumulated_value_and_grad`).
  """
  value_and_grad = accumulated_value_and_grad(loss_fn, grad_accum)
  grads_hook = strategy.grads if strategy is not None else None
  update_hook = strategy.update if strategy is not None else None

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(state.rng)
    ctx = LossContext(state.strategy_state, step_rng, state.task_index)
    (loss, aux), grads = value_and_grad(state.params, batch, ctx)
    if grads_hook is not None:
      grads = grads_hook(state.strategy_state, grads, state.params, batch, ctx, loss_fn)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    strategy_state = state.strategy_state
    if update_hook is not None:
      info = StepInfo(batch, grads, state.params, params, aux, jax.random.fold_in(step_rng, _UPDATE_STREAM),
                      state.task_index)
      strategy_state = update_hook(strategy_state, info)
    metrics = {
        "loss": loss,
        **{k: v for k, v in aux.items() if not k.startswith("_")},
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
    }
    if log_norms:
      metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                     update_norm=optax.tree.norm(updates))
    new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                               strategy_state=strategy_state)
    return new_state, metrics

  return train_step


def compile_train_step(train_step, state_sharding, batch_sharding, replicated):
  """jit with explicit shardings; the state is donated so its buffers are reused in place."""
  return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)


def with_finite_flag(train_step):
  """Adds `_finite` to the step's metrics: whether every updated param is finite (one fused reduction).

  A sum over all params is non-finite iff some param is (inf + -inf is nan), so one pass tells it.
  """
  def step(state, batch):
    new, metrics = train_step(state, batch)
    total = sum(jnp.sum(p.astype(jnp.float32)) for p in jax.tree.leaves(new.params))
    return new, {**metrics, "_finite": jnp.isfinite(total)}
  return step


def compile_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: Callable, strategy: Strategy,
                 state_sharding, mesh, *, log_norms: bool = True, grad_accum: int = 1, under_mesh: bool = False):
  """The one way every kind compiles its step: (step, multi_step), both jitted with the state donated.

  step(state, batch) -> (state, metrics) runs `make_train_step` with the strategy's hooks (`grads`, `update`) and
  the finite-params flag the loop's divergence check reads; multi_step(state, batches [K, B, ...]) runs K steps in
  one `lax.scan` (compiled on first use). `under_mesh`: traced under `jax.set_mesh(mesh)`, so a model that pins
  its FSDP shardings inside (the transformer's `constrain`) sees the mesh.
  """
  from cl_jax import sharding
  step = with_finite_flag(make_train_step(loss_fn, optimizer, schedule, log_norms=log_norms, strategy=strategy,
                                          grad_accum=grad_accum))
  rep = sharding.replicated(mesh)
  single = compile_train_step(step, state_sharding, sharding.batch_sharding(mesh), rep)
  multi = compile_train_step(lambda s, b: jax.lax.scan(step, s, b), state_sharding,
                             sharding.batch_sharding(mesh, stacked=True), rep)
  if not under_mesh:
    return single, multi

  def on_mesh(compiled):
    def call(state, batch):
      with jax.set_mesh(mesh):
        return compiled(state, batch)
    return call
  return on_mesh(single), on_mesh(multi)
