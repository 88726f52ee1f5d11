"""Task routing: choose the specialist (a LoRA adapter, a progressive column, a fine-tuned model) for an
input that comes without a task label -- turning a library of task-IL specialists into a class-IL system.

The class-IL prediction for x is the routed specialist's prediction within its own task's classes:

    t_hat(x) = route(x),     y_hat(x) = argmax_{c in C_{t_hat}} logits_{t_hat}(x)_c,

so end-to-end accuracy <= routing accuracy x task-IL accuracy (equality when errors are independent).

Two routers, both pure functions of arrays:

* Prototypes (`fit_prototypes` / `route_prototypes`): class means mu_c of features of each task's
  training data and one covariance Sigma shared by all classes (tied, shrunk towards its mean
  eigenvalue); a test feature goes to the task of the nearest class mean under the Mahalanobis distance
  (x - mu_c)^T Sigma^-1 (x - mu_c) (Lee et al. 2018, "A simple unified framework for detecting
  out-of-distribution samples"; `metric='euclidean'` is nearest class mean). With `per_task=True` each
  task k keeps its own feature space (e.g. its specialist's features) and covariance, and distances are
  compared across tasks -- the Mahalanobis distance is scale-free, which is what makes that fair.
* Entropy (`route_entropy`): the specialist whose prediction over its own classes is most confident,
  argmin_k H(softmax(logits_k(x) restricted to C_k)). Needs no statistics, only K forward passes.

Prototype statistics use only task k's training data, seen while task k is trained: no data from
earlier tasks is stored, only means and a covariance.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax.losses import MASK_VALUE


class Prototypes(NamedTuple):
  """means: [M, D] class means; task_of: int32 [M] each mean's task; precision: [D, D] (tied), or
  [T, D, D] with per_task; for per-task features `means`/`precision` are stacked per task ([T, Mt, D])."""
  means: jax.Array
  task_of: jax.Array
  precision: jax.Array


def shrunk_precision_from_scatter(scatter: np.ndarray, dof: float, shrinkage: float) -> np.ndarray:
  """((1 - s) S + s (tr S / D) I)^-1 with S = scatter / dof: Ledoit-Wolf-style shrinkage keeps it invertible
  when D ~ N. `scatter` is the sum of centered outer products (pooled within-class: sum_c sum_i (x - mu_c)(..)^T)."""
  d = scatter.shape[0]
  cov = np.asarray(scatter, np.float64) / max(dof, 1.0)
  cov = (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
  return np.linalg.inv(cov + 1e-6 * np.eye(d))


def _shrunk_precision(centered: np.ndarray, shrinkage: float) -> np.ndarray:
  return shrunk_precision_from_scatter(centered.T @ centered, centered.shape[0] - 1, shrinkage)


def fit_prototypes(features: Sequence[np.ndarray], labels: Sequence[np.ndarray], *, metric: str = "mahalanobis",
                   shrinkage: float = 0.1, per_task: bool = False) -> Prototypes:
  """Class means and a tied covariance from each task's training features.

  features[k]: [N_k, D] features of task k's training inputs (per_task: in task k's own feature space);
  labels[k]: [N_k] their class labels (any ids; means are taken per distinct label within the task).
  """
  if metric not in ("mahalanobis", "euclidean"):
    raise ValueError(f"metric={metric!r}: expected 'mahalanobis' or 'euclidean'")
  if not 0.0 <= shrinkage <= 1.0:
    raise ValueError(f"shrinkage={shrinkage}: expected a value in [0, 1]")
  if len(features) != len(labels) or not features:
    raise ValueError(f"features and labels: need one array per task, got {len(features)} and {len(labels)}")
  means, task_of, centered = [], [], []
  for k, (f, y) in enumerate(zip(features, labels)):
    f = np.asarray(f, np.float64).reshape(len(f), -1)
    y = np.asarray(y)
    if len(f) != len(y):
      raise ValueError(f"task {k}: {len(f)} features but {len(y)} labels")
    mk, ck = [], []
    for c in np.unique(y):
      fc = f[y == c]
      mk.append(fc.mean(0))
      ck.append(fc - fc.mean(0))
    means.append(np.stack(mk))
    task_of.append(np.full(len(mk), k, np.int32))
    centered.append(np.concatenate(ck))
  d = means[0].shape[1]
  if per_task:
    m = max(len(mk) for mk in means)
    # Pad tasks with fewer classes by repeating a mean (a duplicate never changes a min).
    stacked = np.stack([np.concatenate([mk, np.repeat(mk[-1:], m - len(mk), 0)]) for mk in means])
    if metric == "euclidean":
      prec = np.stack([np.eye(mk.shape[1]) for mk in means])
    else:
      prec = np.stack([_shrunk_precision(ck, shrinkage) for ck in centered])
    return Prototypes(jnp.asarray(stacked, jnp.float32), jnp.arange(len(means), dtype=jnp.int32),
                      jnp.asarray(prec, jnp.float32))
  prec = np.eye(d) if metric == "euclidean" else _shrunk_precision(np.concatenate(centered), shrinkage)
  return Prototypes(jnp.asarray(np.concatenate(means), jnp.float32), jnp.asarray(np.concatenate(task_of)),
                    jnp.asarray(prec, jnp.float32))


def mahalanobis_sq(x: jax.Array, means: jax.Array, precision: jax.Array) -> jax.Array:
  """[B, M] squared distances (x_b - mu_m)^T P (x_b - mu_m)."""
  diff = x[:, None, :] - means[None, :, :]
  return jnp.einsum("bmd,de,bme->bm", diff, precision, diff)


def prototype_scores(protos: Prototypes, features) -> jax.Array:
  """[B, T] per-task score: minus the smallest squared distance to one of that task's class means.

  `features`: [B, D] (shared space) or a sequence of T arrays [B, D_k] (per-task spaces)."""
  if protos.precision.ndim == 3:
    per = [jnp.min(mahalanobis_sq(jnp.asarray(f, jnp.float32).reshape(f.shape[0], -1), protos.means[k],
                                  protos.precision[k]), axis=1) for k, f in enumerate(features)]
    return -jnp.stack(per, axis=1)
  x = jnp.asarray(features, jnp.float32)
  d = mahalanobis_sq(x.reshape(x.shape[0], -1), protos.means, protos.precision)
  num_tasks = int(np.max(np.asarray(protos.task_of))) + 1
  onehot = protos.task_of[None, :, None] == jnp.arange(num_tasks)[None, None, :]
  return -jnp.min(jnp.where(onehot, d[:, :, None], jnp.inf), axis=1)


def route_prototypes(protos: Prototypes, features) -> jax.Array:
  """int32 [B]: the task of the nearest class mean."""
  return jnp.argmax(prototype_scores(protos, features), axis=1).astype(jnp.int32)


def masked_entropy(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  """H(softmax(logits restricted to mask)) per example; logits [..., C], mask broadcastable bool [..., C]."""
  if mask is not None:
    logits = jnp.where(mask, logits, MASK_VALUE)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def route_entropy(logits_per_task: jax.Array, task_masks: jax.Array | None = None) -> jax.Array:
  """int32 [B]: argmin_k entropy of specialist k over its own classes.

  logits_per_task: [T, B, C] (specialist k's logits); task_masks: bool [T, C], C_k of each specialist
  (None when every specialist has its own head of only its classes)."""
  masks = None if task_masks is None else task_masks[:, None, :]
  return jnp.argmin(masked_entropy(logits_per_task, masks), axis=0).astype(jnp.int32)


def routed_predictions(logits_per_task: jax.Array, route: jax.Array, task_masks: jax.Array | None = None) -> jax.Array:
  """int32 [B]: the routed specialist's argmax over its own classes."""
  logits = jnp.take_along_axis(logits_per_task, route[None, :, None], axis=0)[0]
  if task_masks is not None:
    logits = jnp.where(task_masks[route], logits, MASK_VALUE)
  return jnp.argmax(logits, -1).astype(jnp.int32)


class RoutingReport(NamedTuple):
  routing_accuracy: float     # P(t_hat = t)
  task_il_accuracy: float     # specialist accuracy given the true task
  class_il_accuracy: float    # end to end: routed specialist's prediction correct
  oracle_class_il: float      # = task_il_accuracy: what a perfect router would give

  def as_dict(self):
    return {k: float(v) for k, v in self._asdict().items()}


def evaluate_routing(logits_per_task, route, true_task, labels, task_masks=None) -> RoutingReport:
  """Routing accuracy and the class-IL accuracy it buys, from the specialists' logits [T, B, C]."""
  route = jnp.asarray(route)
  true_task = jnp.asarray(true_task, jnp.int32)
  labels = jnp.asarray(labels)
  routed = routed_predictions(logits_per_task, route, task_masks)
  oracle = routed_predictions(logits_per_task, true_task, task_masks)
  r_acc = float(jnp.mean(route == true_task))
  o_acc = float(jnp.mean(oracle == labels))
  return RoutingReport(r_acc, o_acc, float(jnp.mean(routed == labels)), o_acc)


__all__ = ["Prototypes", "fit_prototypes", "shrunk_precision_from_scatter", "mahalanobis_sq", "prototype_scores", "route_prototypes",
           "masked_entropy", "route_entropy", "routed_predictions", "RoutingReport", "evaluate_routing"]
