"""Memory aware synapses (Aljundi et al. 2018, "Memory Aware Synapses: Learning what (not) to forget").

After each task the importance of every parameter is the mean absolute gradient of the squared l2 norm of the
network's output over the task's training data (no labels needed):

  Ω_t,i = 1/N Σ_n | ∂ ‖f(x_n; θ)‖²₂ / ∂θ_i |,

with f the logits the task is trained on (the scenario's logit mask applied: masked classes count 0), one gradient
per example as in the paper. On a language model an example is a sequence and f(x_n) its next-token logits at
every position, [L, V]: the squared norm sums over positions and vocabulary. Importances add up over tasks, Ω = Σ_t Ω_t, the anchor θ* is the latest task's final
params, and later tasks train on

  L(θ) + λ Σ_i Ω_i (θ_i − θ*_i)².

State: {'importance': Ω, 'anchor': θ*} (params-shaped float32 trees).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cl_jax.strategies.base import LossContext, Strategy
from cl_jax.strategies.fisher import _chunk
from cl_jax.strategies.ewc import weighted_quadratic


def default_config() -> ml_collections.ConfigDict:
  """The `mas` config section."""
  return ml_collections.ConfigDict(dict(
      lam=1.0,            # λ: penalty strength
      num_examples=-1,    # examples of each task the importance averages over; -1 = all
      chunk_size=64,      # per-example gradients computed this many at a time (memory, not numbers)
  ))


@functools.partial(jax.jit, static_argnames=("learner", "chunk_size"))
def mas_importance(learner, params, x, task, task_index, chunk_size: int = 64):
  """1/N Σ_n |∂‖f(x_n)‖²/∂θ| (see the module docstring), scanned over chunks of per-example gradients."""
  xs, ts, ws = _chunk(chunk_size, x, task)

  def example(xn, tn, wn):
    def sq_norm(p):
      logits = learner.apply(p, xn[None], tn[None])
      mask = learner.logit_mask(tn[None], task_index)
      if mask is not None:
        logits = jnp.where(mask, logits, 0.0)
      return jnp.sum(jnp.square(logits.astype(jnp.float32)))
    return jax.tree.map(lambda g: wn * jnp.abs(g.astype(jnp.float32)), jax.grad(sq_norm)(params))

  def chunk_step(acc, chunk):
    g = jax.vmap(example)(*chunk)
    return jax.tree.map(lambda a, gi: a + gi.sum(0), acc, g), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, _ = jax.lax.scan(chunk_step, zeros, (xs, ts, ws))
  return jax.tree.map(lambda t: t / x.shape[0], total)


def mas_penalty(params, state) -> jax.Array:
  """Σ_i Ω_i (θ_i − θ*_i)² (multiply by λ)."""
  return weighted_quadratic(params, state["importance"], state["anchor"])


def check_config(config) -> None:
  """Raises ValueError naming the bad `mas.*` key."""
  mc = config.mas
  lam, num, chunk = float(mc.lam), int(mc.num_examples), int(mc.chunk_size)
  if lam < 0:
    raise ValueError(f"mas.lam={lam}: expected a non-negative penalty strength")
  if num == 0 or num < -1:
    raise ValueError(f"mas.num_examples={num}: expected a positive count or -1 (all)")
  if chunk < 1:
    raise ValueError(f"mas.chunk_size={chunk}: expected a positive chunk size")


def mas(config, learner) -> Strategy:
  """MAS from `config.mas`; see the module docstring."""
  check_config(config)
  lam, num, chunk = float(config.mas.lam), int(config.mas.num_examples), int(config.mas.chunk_size)

  def init(params, task_info):
    del task_info
    return dict(importance=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                anchor=jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params))

  def loss(loss_fn):
    def mas_loss(params, batch, ctx: LossContext):
      value, aux = loss_fn(params, batch, ctx)
      penalty = lam * mas_penalty(params, ctx.strategy_state)
      return value + penalty, {**aux, "mas_penalty": penalty}
    return mas_loss

  def after_task(state, params, task_data, rng):
    n = len(task_data.y)
    idx = np.arange(n)
    if 0 < num < n:  # a fixed random subset of the task
      idx = np.sort(np.asarray(jax.random.choice(rng, n, (num,), replace=False)))
    x = jnp.asarray(task_data.x[idx])
    if not jnp.issubdtype(x.dtype, jnp.integer):  # token ids (an LM's input) stay integers
      x = x.astype(jnp.float32)
    task = jnp.asarray(task_data.task[idx], jnp.int32)
    omega = mas_importance(learner, params, x, task, jnp.int32(task_data.task_index), chunk_size=min(chunk, len(idx)))
    return dict(importance=jax.tree.map(jnp.add, state["importance"], omega),
                anchor=jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params))

  return Strategy(init=init, loss=loss, after_task=after_task, name="mas")
