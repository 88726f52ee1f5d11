"""Task routing: Mahalanobis vs Euclidean prototypes by hand, entropy routing, and class-IL on digits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cl_jax import routing
from cl_jax.losses import cross_entropy
from cl_jax.models import MLP, functional


def test_mahalanobis_by_hand():
  means = jnp.asarray([[0.0, 0.0], [3.0, 0.3]])
  prec = jnp.diag(jnp.asarray([1 / 100.0, 1 / 0.01]))
  x = jnp.asarray([[1.0, 0.3]])
  np.testing.assert_allclose(routing.mahalanobis_sq(x, means, prec), [[0.01 + 9.0, 0.04]], rtol=1e-5)
  maha = routing.Prototypes(means, jnp.asarray([0, 1], jnp.int32), prec)
  eucl = maha._replace(precision=jnp.eye(2))
  assert int(routing.route_prototypes(maha, x)[0]) == 1  # the y-offset is 3 sigma, the x-offset 0.2 sigma
  assert int(routing.route_prototypes(eucl, x)[0]) == 0


def test_fit_prototypes_on_anisotropic_gaussians():
  rng = np.random.default_rng(0)
  scale = np.asarray([5.0, 0.2])
  centers = {0: [(0, 0), (0, 1.0)], 1: [(0, 0.5), (0, 1.5)]}  # tasks interleave along the thin axis
  feats, labels, test_x, test_t = [], [], [], []
  for t, cs in centers.items():
    f = np.concatenate([rng.normal(size=(200, 2)) * scale + c for c in cs])
    feats.append(f)
    labels.append(np.repeat([0, 1], 200) + 2 * t)
    test_x.append(np.concatenate([rng.normal(size=(100, 2)) * scale + c for c in cs]))
    test_t.append(np.full(200, t))
  x, t = np.concatenate(test_x), np.concatenate(test_t)
  maha = routing.fit_prototypes(feats, labels, shrinkage=0.0)
  eucl = routing.fit_prototypes(feats, labels, metric="euclidean")
  assert maha.means.shape == (4, 2) and list(np.asarray(maha.task_of)) == [0, 0, 1, 1]
  acc_m = float(np.mean(np.asarray(routing.route_prototypes(maha, x)) == t))
  acc_e = float(np.mean(np.asarray(routing.route_prototypes(eucl, x)) == t))
  assert acc_m > 0.75 and acc_m > acc_e + 0.15, (acc_m, acc_e)
  # Per-task spaces: identical spaces give identical routes as the tied model when covariances match.
  per = routing.fit_prototypes(feats, labels, shrinkage=0.0, per_task=True)
  acc_p = float(np.mean(np.asarray(routing.route_prototypes(per, [x, x])) == t))
  assert acc_p > 0.75
  with pytest.raises(ValueError, match="metric"):
    routing.fit_prototypes(feats, labels, metric="cosine")


def test_entropy_routing_and_predictions():
  logits = jnp.asarray([[[5.0, 0.0, 0.0, 0.0], [1.0, 1.0, 9.0, 9.0]],    # specialist 0 (classes 0, 1)
                        [[0.0, 0.0, 1.0, 1.1], [0.0, 0.0, 8.0, 0.0]]])   # specialist 1 (classes 2, 3)
  masks = jnp.asarray([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
  # Example 0: specialist 0 is sure (5 vs 0), specialist 1 is not (1 vs 1.1) -> 0.
  # Example 1: specialist 0 sees 1 vs 1 within its classes (max entropy) -> 1, even though its raw
  # logits outside its classes are large: the mask matters.
  route = routing.route_entropy(logits, masks)
  assert list(np.asarray(route)) == [0, 1]
  np.testing.assert_allclose(routing.masked_entropy(jnp.zeros((1, 2)), None), [np.log(2)], rtol=1e-6)
  assert list(np.asarray(routing.routed_predictions(logits, route, masks))) == [0, 2]
  rep = routing.evaluate_routing(logits, route, jnp.asarray([0, 1]), jnp.asarray([0, 3]), masks)
  assert rep.routing_accuracy == 1.0 and rep.class_il_accuracy == 0.5 and rep.task_il_accuracy == 0.5


def test_routing_turns_task_il_specialists_into_class_il_on_digits():
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(y))
  tr, te = perm[:1400], perm[1400:]
  task = y // 2
  # Task-IL specialists: one multi-head MLP, head k over task k's two classes.
  model, params = functional(MLP(64, (64,), 2, num_heads=5, rngs=nnx.Rngs(0)))
  opt = optax.adam(1e-2)
  state = opt.init(params)
  xb, yb, tb = jnp.asarray(x[tr]), jnp.asarray(y[tr] % 2), jnp.asarray(task[tr])

  @jax.jit
  def step(params, state):
    g = jax.grad(lambda p: cross_entropy(model.apply(p, xb, tb), yb).mean())(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  for _ in range(150):
    params, state = step(params, state)
  xt = jnp.asarray(x[te])
  # [T, B, 2] local logits -> [T, B, 10] global logits (task k's head on classes 2k, 2k+1).
  local = jnp.stack([model.apply(params, xt, jnp.full((len(te),), k, jnp.int32)) for k in range(5)])
  glob = jnp.full((5, len(te), 10), -1e9).at[jnp.arange(5)[:, None], :, (2 * jnp.arange(5))[:, None] + jnp.arange(2)].set(
      jnp.transpose(local, (0, 2, 1)))
  masks = jnp.repeat(jnp.eye(5, dtype=bool), 2, axis=1)
  protos = routing.fit_prototypes([x[tr][task[tr] == k] for k in range(5)],
                                  [y[tr][task[tr] == k] for k in range(5)], shrinkage=0.2)
  route_p = routing.route_prototypes(protos, xt)
  rep_p = routing.evaluate_routing(glob, route_p, task[te], y[te], masks)
  rep_e = routing.evaluate_routing(glob, routing.route_entropy(glob, masks), task[te], y[te], masks)
  assert rep_p.task_il_accuracy > 0.95
  assert rep_p.routing_accuracy > 0.93, rep_p
  assert rep_p.class_il_accuracy <= rep_p.routing_accuracy + 1e-6
  assert rep_p.class_il_accuracy > 0.92
  assert rep_e.routing_accuracy > 0.3  # better than chance (0.2) but weaker: specialists are overconfident
  # A perfect router recovers the task-IL accuracy.
  perfect = routing.evaluate_routing(glob, jnp.asarray(task[te]), task[te], y[te], masks)
  assert perfect.class_il_accuracy == pytest.approx(perfect.task_il_accuracy)
