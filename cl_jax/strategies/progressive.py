"""Progressive networks as a strategy (Rusu et al. 2016): one MLP column per task, laterals from earlier columns.

`prepare` replaces the scenario's model by a `cl_jax.models.progressive.ProgressiveNet` with one column per task,
all built up front (hidden sizes from `model.hidden`), so the params keep one structure for the whole run. Each
example runs through its own task's column; earlier columns enter through `stop_gradient`, so training task t
reaches column t only, and `reset_optimizer` clears Adam's moments at every boundary: earlier tasks' outputs are
unchanged bit for bit (zero forgetting by construction).

Routing (`progressive.router`, an evaluation option; `cl_jax.routing`): without it the evaluator uses the example's
task label to pick the column (task-IL numbers). With `prototypes` the strategy's `predict` picks the column without
the label: the task of the nearest class mean under the Mahalanobis distance with a tied, shrunk covariance of the
inputs (Lee et al. 2018), fitted from each task's training data in `after_task` (means and a covariance only, no
stored examples); with `entropy`, the column whose prediction over its own classes is most confident. The routed
column's prediction, restricted to its task's classes, is the answer, so the accuracy matrix is then class-IL.

State: {'sum': [C, D] per-class input sums, 'count': [C], 'outer': [D, D] sum of x x^T, 'task_of': int32 [C],
'precision': [D, D]} (zeros until the first task ends; unused without a router).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cl_jax.losses import MASK_VALUE
from cl_jax.strategies.base import Strategy

ROUTERS = ("none", "prototypes", "entropy")


def default_config() -> ml_collections.ConfigDict:
  """The `progressive` section."""
  return ml_collections.ConfigDict(dict(
      router="none",     # none (task label picks the column) | prototypes | entropy (no label: class-IL)
      shrinkage=0.1,     # prototypes: covariance shrinkage towards its mean eigenvalue, in [0, 1]
  ))


def check_config(config) -> None:
  """Raises ValueError naming the bad key."""
  p = config.progressive
  if p.router not in ROUTERS:
    raise ValueError(f"progressive.router={p.router!r}: expected one of {ROUTERS}")
  if not 0.0 <= float(p.shrinkage) <= 1.0:
    raise ValueError(f"progressive.shrinkage={p.shrinkage}: expected a value in [0, 1]")
  if config.model.name != "mlp":
    raise ValueError(f"model.name={config.model.name!r}: progressive columns are MLPs; use model.name='mlp'")


def _precision(state_np: dict, shrinkage: float) -> np.ndarray:
  """Inverse of the shrunk pooled within-class covariance from the running sums."""
  from cl_jax.routing import shrunk_precision_from_scatter
  seen = state_np["count"] > 0
  n = float(state_np["count"].sum())
  means = state_np["sum"][seen] / state_np["count"][seen, None]
  scatter = state_np["outer"] - (means.T * state_np["count"][seen]) @ means
  return shrunk_precision_from_scatter(scatter, max(n - int(seen.sum()), 1.0), shrinkage)


def progressive(config, learner) -> Strategy:
  """See the module docstring."""
  check_config(config)
  router, shrinkage = config.progressive.router, float(config.progressive.shrinkage)
  hidden = tuple(int(h) for h in config.model.hidden)

  def prepare(model, params, task_info, rng):
    del model, params
    from cl_jax.models import progressive as prog
    spec = prog.ProgressiveSpec(int(np.prod(task_info.input_shape)), hidden, int(task_info.num_outputs))
    seed = int(jax.random.randint(rng, (), 0, 2 ** 31 - 1))
    pmodel, pparams = prog.build_progressive(spec, seed=seed, num_columns=int(task_info.num_tasks))
    return pmodel.apply, pparams, None

  def init(params, task_info):
    del params
    c, d = int(task_info.num_outputs), int(np.prod(task_info.input_shape))
    return dict(sum=jnp.zeros((c, d), jnp.float32), count=jnp.zeros((c,), jnp.float32),
                outer=jnp.zeros((d, d), jnp.float32), task_of=jnp.zeros((c,), jnp.int32),
                precision=jnp.eye(d, dtype=jnp.float32))

  def after_task(state, params, task_data, rng):
    del params, rng
    if router == "none":
      return state
    s = jax.tree.map(lambda a: np.array(a, np.float64 if a.dtype == jnp.float32 else a.dtype), state)
    x = np.asarray(task_data.x, np.float64).reshape(len(task_data.x), -1)
    y = np.asarray(task_data.y)
    np.add.at(s["sum"], y, x)
    np.add.at(s["count"], y, 1.0)
    s["outer"] += x.T @ x
    s["task_of"][y] = np.asarray(task_data.task)
    s["precision"] = _precision(s, shrinkage)
    return jax.tree.map(lambda a, old: jnp.asarray(a, old.dtype), s, state)

  def task_classes(state, tasks):
    """bool [B, C]: the classes of each example's (routed) task, as seen in training."""
    return (state["task_of"][None, :] == tasks[:, None]) & (state["count"][None, :] > 0)

  def route(state, params, x, num_tasks):
    if router == "entropy":
      from cl_jax.routing import masked_entropy
      b = x.shape[0]
      ent = jnp.stack([masked_entropy(learner.apply(params, x, jnp.full((b,), k, jnp.int32)),
                                      task_classes(state, jnp.full((b,), k, jnp.int32)))
                       for k in range(num_tasks)])
      return jnp.argmin(ent, axis=0).astype(jnp.int32)
    from cl_jax.routing import mahalanobis_sq
    means = state["sum"] / jnp.maximum(state["count"], 1.0)[:, None]
    d = mahalanobis_sq(x.reshape(x.shape[0], -1).astype(jnp.float32), means, state["precision"])
    d = jnp.where(state["count"][None, :] > 0, d, jnp.inf)
    return state["task_of"][jnp.argmin(d, axis=1)]

  num_tasks = int(config.scenario.num_tasks)

  def predict(state, params, x, task, task_index):
    del task
    routed = route(state, params, x, num_tasks)
    return jnp.where(task_classes(state, routed), learner.apply(params, x, routed), MASK_VALUE)

  return Strategy(init=init, after_task=after_task, name="progressive", prepare=prepare, reset_optimizer=True,
                  predict=None if router == "none" else predict)


progressive.check_config = check_config
progressive.config_sections = ("progressive",)

__all__ = ["progressive", "default_config", "check_config", "ROUTERS"]
