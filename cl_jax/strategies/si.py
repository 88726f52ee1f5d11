"""Synaptic intelligence (Zenke, Poole & Ganguli 2017, "Continual learning through synaptic intelligence").

While task μ trains, every step adds each parameter's share of the loss decrease along the training path,

  ω_i += -g_i · Δθ_i        (g: the step's gradient of the task loss, Δθ = θ_after − θ_before the update),

an online estimate of the path integral -∫ g dθ. At the end of the task the importance grows by

  Ω_i += ω_i / (Δ_i² + ξ),   Δ = θ(end of μ) − θ(end of μ−1),

ω is reset and the anchor θ* moves to the task's final params. Later tasks train on

  L(θ) + c Σ_i Ω_i (θ_i − θ*_i)².

g is the gradient the optimizer applied (after any `grads` hook) minus the gradient of SI's own penalty,
2cΩ(θ − θ*), so ω integrates the unregularised loss as in the paper (other strategies' terms in a chain stay in).
The path integral is updated in the train step through the strategy's `update` hook.

On an LM's continual pre-training the general task is the base's own pre-training: the LM runner runs SI's update
hook in that phase (Ω = 0, so the penalty is 0 there) and starts the adaptation's SI from its state (`with_path`), so
the consolidation at the general task's end weighs the path from the initialisation to the base.

State (params-shaped float32 trees): {'omega': ω, 'importance': Ω, 'anchor': θ*}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from cl_jax.strategies.base import LossContext, StepInfo, Strategy
from cl_jax.strategies.ewc import weighted_quadratic


def default_config() -> ml_collections.ConfigDict:
  """The `si` config section."""
  return ml_collections.ConfigDict(dict(
      c=1.0,      # c: penalty strength (Zenke et al. use 0.1 on Permuted MNIST, 1 on Split MNIST)
      xi=0.1,     # ξ: damping of Ω = ω / (Δ² + ξ); keeps Ω bounded where a parameter barely moved
  ))


def si_penalty(params, state) -> jax.Array:
  """Σ_i Ω_i (θ_i − θ*_i)² (multiply by c)."""
  return weighted_quadratic(params, state["importance"], state["anchor"])


def accumulate_path(state, step: StepInfo, c: float):
  """ω += -(g − 2cΩ(θ_old − θ*)) · (θ_new − θ_old): one step of the path integral; pure."""
  def one(w, g, old, new, imp, anchor):
    old32 = old.astype(jnp.float32)
    task_grad = g.astype(jnp.float32) - 2.0 * c * imp * (old32 - anchor)
    return w - task_grad * (new.astype(jnp.float32) - old32)
  omega = jax.tree.map(one, state["omega"], step.grads, step.old_params, step.new_params, state["importance"],
                       state["anchor"])
  return {**state, "omega": omega}


def consolidate(state, params, xi: float):
  """Ω += ω / (Δ² + ξ) with Δ = θ − θ*; θ* ← θ; ω ← 0 (end of a task); pure."""
  params = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
  importance = jax.tree.map(lambda imp, w, p, a: imp + w / (jnp.square(p - a) + xi),
                            state["importance"], state["omega"], params, state["anchor"])
  return dict(omega=jax.tree.map(jnp.zeros_like, state["omega"]), importance=importance, anchor=params)


def with_path(chain_state, names, path_state):
  """The initial state of the chain of strategies `names` with SI's entry replaced by `path_state`: SI's state at
  the end of an earlier training of the same params (an LM's pre-training), so that the consolidation at the first
  task boundary weighs the path of that training (ω, and the anchor at its start) instead of an empty one."""
  names = list(names)
  if len(names) == 1:
    return path_state
  return tuple(path_state if name == "si" else state for name, state in zip(names, chain_state))


def check_config(config) -> None:
  """Raises ValueError naming the bad `si.*` key."""
  c, xi = float(config.si.c), float(config.si.xi)
  if c < 0:
    raise ValueError(f"si.c={c}: expected a non-negative penalty strength")
  if xi <= 0:
    raise ValueError(f"si.xi={xi}: expected a positive damping (Ω = ω / (Δ² + ξ) divides by it)")


def si(config, learner) -> Strategy:
  """Synaptic intelligence from `config.si`; see the module docstring."""
  del learner
  check_config(config)
  c, xi = float(config.si.c), float(config.si.xi)

  def init(params, task_info):
    del task_info
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
    return dict(omega=jax.tree.map(zeros, params), importance=jax.tree.map(zeros, params),
                anchor=jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params))

  def loss(loss_fn):
    def si_loss(params, batch, ctx: LossContext):
      value, aux = loss_fn(params, batch, ctx)
      penalty = c * si_penalty(params, ctx.strategy_state)
      return value + penalty, {**aux, "si_penalty": penalty}
    return si_loss

  def update(state, step: StepInfo):
    return accumulate_path(state, step, c)

  def after_task(state, params, task_data, rng):
    del task_data, rng
    return consolidate(state, params, xi)

  return Strategy(init=init, loss=loss, after_task=after_task, name="si", update=update)
