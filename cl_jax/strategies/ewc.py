"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018).

EWC adds, after tasks 1..t−1, the quadratic penalty

  Ω(θ) = λ/2 Σ_{k<t} Σ_i F_{k,i} (θ_i − θ*_{k,i})²

with F_k the diagonal Fisher at the end of task k (`cl_jax.strategies.fisher`) and θ*_k the params
there. A sum of diagonal quadratics is one diagonal quadratic, so the state does not grow with the
number of tasks and Ω is still exactly the sum above:

  Σ_k F_k (θ − θ*_k)² = A (θ − m)² + c,   A = Σ_k F_k,   m = Σ_k F_k θ*_k / A,
  and adding a task k: c += A F_k / (A + F_k) · (m − θ*_k)²   (elementwise, summed into a scalar).

Online EWC (Schwarz et al. 2018, "Progress & Compress") keeps one running Fisher and only the latest
anchor: F ← γ F + F_t, θ* ← θ_t, Ω(θ) = λ/2 Σ_i F_i (θ_i − θ*_i)².

State (a dict pytree shaped like the params twice, plus one scalar):
  {'fisher': A or F, 'anchor': m or θ*, 'const': c (always 0 online), 'tasks': number consolidated}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from cl_jax.strategies import fisher as fisher_lib
from cl_jax.strategies.base import LossContext, Strategy


def default_config() -> ml_collections.ConfigDict:
  """The `ewc` config section."""
  return ml_collections.ConfigDict(dict(
      lam=100.0,      # λ: penalty strength; its best value depends on fisher.kind by orders of magnitude
      online=False,   # True: online EWC (one running Fisher, latest anchor); also strategy 'online_ewc'
      gamma=1.0,      # online EWC decay γ of the running Fisher
  ))


def weighted_quadratic(params, weights, anchor) -> jax.Array:
  """Σ_i w_i (θ_i − θ*_i)² over a params pytree, in float32: the penalty shape EWC, SI and MAS share."""
  quad = jax.tree.map(lambda p, w, a: jnp.sum(w * jnp.square(p.astype(jnp.float32) - a)), params, weights, anchor)
  return sum(jax.tree.leaves(quad))


def ewc_penalty(params, state) -> jax.Array:
  """Σ_i A_i (θ_i − m_i)² + c: twice the unscaled penalty (multiply by λ/2)."""
  return weighted_quadratic(params, state["fisher"], state["anchor"]) + state["const"]


def consolidate(state, params, task_fisher, *, online: bool, gamma: float):
  """Adds a finished task (its Fisher and params) to the EWC state; pure."""
  # A fresh float32 copy: the train step donates its state, and one buffer may not be donated twice.
  params = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
  tasks = state["tasks"] + 1
  if online:
    fisher = jax.tree.map(lambda f, ft: gamma * f + ft, state["fisher"], task_fisher)
    return dict(fisher=fisher, anchor=params, const=jnp.zeros((), jnp.float32), tasks=tasks)

  def merge(a, m, f, p):
    total = a + f
    safe = jnp.where(total > 0, total, 1.0)
    # The Fisher-weighted mean of the anchors; where no task has any curvature keep the latest params.
    anchor = jnp.where(total > 0, (a * m + f * p) / safe, p)
    gap = jnp.sum(jnp.where(total > 0, a * f / safe * jnp.square(m - p), 0.0))
    return anchor, gap

  merged = jax.tree.map(merge, state["fisher"], state["anchor"], task_fisher, params)
  is_pair = lambda t: isinstance(t, tuple)
  anchor = jax.tree.map(lambda t: t[0], merged, is_leaf=is_pair)
  gap = sum(jax.tree.leaves(jax.tree.map(lambda t: t[1], merged, is_leaf=is_pair)))
  fisher = jax.tree.map(jnp.add, state["fisher"], task_fisher)
  return dict(fisher=fisher, anchor=anchor, const=state["const"] + gap, tasks=tasks)


def check_config(config) -> None:
  """Raises ValueError naming the bad `ewc.*` / `fisher.*` key (run before anything is written)."""
  fisher_lib.validate_config(config.fisher)
  lam, gamma = float(config.ewc.lam), float(config.ewc.gamma)
  if lam < 0:
    raise ValueError(f"ewc.lam={lam}: expected a non-negative penalty strength")
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"ewc.gamma={gamma}: expected a decay in [0, 1]")


def ewc(config, learner, *, online: bool | None = None) -> Strategy:
  """EWC (or online EWC) from `config.ewc` and `config.fisher`; see the module docstring."""
  check_config(config)
  ewc_config, fisher_config = config.ewc, config.fisher
  online = bool(ewc_config.online) if online is None else online
  lam, gamma = float(ewc_config.lam), float(ewc_config.gamma)

  def init(params, task_info):
    del task_info
    return dict(fisher=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                anchor=jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params),
                const=jnp.zeros((), jnp.float32), tasks=jnp.zeros((), jnp.int32))

  def loss(loss_fn):
    def ewc_loss(params, batch, ctx: LossContext):
      value, aux = loss_fn(params, batch, ctx)
      penalty = 0.5 * lam * ewc_penalty(params, ctx.strategy_state)
      return value + penalty, {**aux, "ewc_penalty": penalty}
    return ewc_loss

  def after_task(state, params, task_data, rng):
    task_fisher = fisher_lib.fisher_diagonal(
        learner, params, task_data.x, task_data.y, task_data.task, task_data.task_index,
        kind=fisher_config.kind, rng=rng, num_samples=int(fisher_config.num_samples),
        chunk_size=int(fisher_config.chunk_size), batch_size=int(fisher_config.batch_size),
        method=fisher_config.method)
    return consolidate(state, params, task_fisher, online=online, gamma=gamma)

  return Strategy(init=init, loss=loss, after_task=after_task,
                  name="online_ewc" if online else "ewc")


def online_ewc(config, learner) -> Strategy:
  """Online EWC whatever `ewc.online` says (so a config can name it as a strategy)."""
  return ewc(config, learner, online=True)


# `cl_jax.config.validate` calls a builder's `check_config` before the workdir is touched.
ewc.check_config = check_config
online_ewc.check_config = check_config
# The config sections a run's results.json should record with this strategy (λ with the Fisher kind).
ewc.config_sections = online_ewc.config_sections = ("ewc", "fisher")
