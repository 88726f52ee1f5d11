"""O-LoRA: the orthogonality penalty, slot freezing, and a short two-task run on digits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from cl_jax.losses import cross_entropy
from cl_jax.models import MLP, functional, lora
from cl_jax.strategies import LossContext, TaskData, TaskInfo
from cl_jax.strategies import olora as ol


def _orthonormal(d, r, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, r)))
  return jnp.asarray(q, jnp.float32)


def test_penalty_zero_for_orthogonal_positive_otherwise():
  q = _orthonormal(16, 8, 0)
  old = {"l": {"A": q[:, :4], "B": jnp.zeros((4, 3))}}
  new = {"l": {"A": q[:, 4:], "B": jnp.zeros((4, 3))}}
  assert float(ol.orthogonality_penalty([old], new)) < 1e-5
  same = {"l": {"A": q[:, :4] + 0.1 * q[:, 4:], "B": jnp.zeros((4, 3))}}
  # A_old^T (A_old + 0.1 A_perp) = I_4: the overlap is exactly 4.
  np.testing.assert_allclose(float(ol.orthogonality_penalty([old], same)), 4.0, rtol=1e-5)
  a = jnp.asarray([[1.0, 2.0], [0.0, -1.0]])
  b = jnp.asarray([[3.0], [4.0]])
  # a^T b = [[3], [6 - 4]] -> |3| + |2| = 5
  np.testing.assert_allclose(float(ol.overlap_l1(a, b)), 5.0)
  rnd = {"l": {"A": jax.random.normal(jax.random.key(0), (16, 4)), "B": jnp.zeros((4, 3))}}
  assert float(ol.orthogonality_penalty([old], rnd)) > 0.5


@pytest.fixture(scope="module")
def setup():
  model, base = functional(MLP(64, (16,), 10, rngs=nnx.Rngs(0)))
  spec = lora.LoraSpec(rank=2, alpha=2.0)
  params = ol.init_olora_params(base, 3, jax.random.key(1), spec)
  lm = lora.LoraModel(model, spec)
  return model, lm, spec, params


def _config(l1, l2=0.0):
  from cl_jax.models.lora import default_config as lora_config
  c = ml_collections.ConfigDict()
  c.olora = ol.default_config()
  c.lora = lora_config()
  c.olora.lambda1, c.olora.lambda2 = l1, l2
  return c


def test_strategy_loss_and_freezing(setup):
  _, lm, spec, params = setup
  apply = lm.bind(adapter=ol.slot_names(3))
  x = jax.random.normal(jax.random.key(2), (8, 64))
  batch = {"x": x, "y": jnp.arange(8) % 10, "task": jnp.ones((8,), jnp.int32)}

  def task_loss(p, b, ctx):
    return cross_entropy(apply(p, b["x"]), b["y"]).mean(), {}

  strat = ol.olora(_config(0.5, 0.1))
  state = strat.init(params, TaskInfo(3, 10, (64,)))
  state = strat.after_task(state, params, TaskData(None, None, None, 0), jax.random.key(0))
  np.testing.assert_array_equal(state["A_old"]["dense_0"][0], params["adapters"]["task_0"]["dense_0"]["A"])
  assert float(jnp.abs(state["A_old"]["dense_0"][1:]).max()) == 0
  loss_fn = strat.loss(task_loss)
  ctx = LossContext(state, jax.random.key(0), jnp.int32(1))
  total, aux = loss_fn(params, batch, ctx)
  base_loss, _ = task_loss(params, batch, ctx)
  ad = params["adapters"]
  ortho = ol.orthogonality_penalty([ad["task_0"]], ad["task_1"])
  norm = ol.norm_penalty(ad["task_1"])
  np.testing.assert_allclose(float(aux["olora_ortho"]), float(ortho), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(base_loss + 0.5 * ortho + 0.1 * norm), rtol=1e-5)
  assert float(ortho) > 0
  # At task 0 there is nothing to be orthogonal to.
  _, aux0 = loss_fn(params, batch, ctx._replace(task_index=jnp.int32(0)))
  assert float(aux0["olora_ortho"]) == 0.0
  # Gradients reach slot 1 only (under jit, with a traced task index).
  g = jax.jit(jax.grad(lambda p, t: loss_fn(p, batch, ctx._replace(task_index=t))[0]))(params, jnp.int32(1))
  for name in ("task_0", "task_2"):
    assert all(float(jnp.abs(l).max()) == 0 for l in jax.tree.leaves(g["adapters"][name]))
  assert all(float(jnp.abs(l).max()) == 0 for l in jax.tree.leaves(g["base"]))
  assert float(jnp.abs(g["adapters"]["task_1"]["dense_0"]["B"]).max()) > 0
  assert float(jnp.abs(g["adapters"]["task_1"]["dense_0"]["A"]).max()) > 0
  with pytest.raises(ValueError, match="lambda1"):
    ol.olora(_config(-1.0))


def _run_two_tasks(lm, params, l1):
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  apply = lm.bind(adapter=ol.slot_names(3))
  strat = ol.olora(_config(l1))
  state = strat.init(params, TaskInfo(2, 10, (64,)))

  def task_loss(p, b, ctx):
    return cross_entropy(apply(p, b["x"]), b["y"]).mean(), {}

  loss_fn = strat.loss(task_loss)
  for t, classes in enumerate([(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]):
    idx = np.isin(y, classes)
    batch = {"x": jnp.asarray(x[idx]), "y": jnp.asarray(y[idx])}
    opt = optax.adam(1e-2)  # fresh optimizer per task: no momentum left on frozen slots
    opt_state = opt.init(params)
    ctx = LossContext(state, jax.random.key(0), jnp.int32(t))

    @jax.jit
    def step(params, opt_state, ctx):
      g = jax.grad(lambda p: loss_fn(p, batch, ctx)[0])(params)
      upd, opt_state = opt.update(g, opt_state, params)
      return optax.apply_updates(params, upd), opt_state

    for _ in range(60):
      params, opt_state = step(params, opt_state, ctx)
    state = strat.after_task(state, params, TaskData(None, None, None, t), jax.random.key(0))
  return params


def test_olora_training_keeps_subspaces_apart(setup):
  _, lm, _, params = setup
  free = _run_two_tasks(lm, params, 0.0)
  orth = _run_two_tasks(lm, params, 1.0)
  # Slot 0 is trained identically in both runs (no penalty at task 0) and frozen afterwards.
  jax.tree.map(np.testing.assert_array_equal, free["adapters"]["task_0"], orth["adapters"]["task_0"])
  jax.tree.map(np.testing.assert_array_equal, free["base"], params["base"])
  # The unused slot stays the identity.
  assert float(jnp.abs(orth["adapters"]["task_2"]["dense_0"]["B"]).max()) == 0
  o_free = float(ol.orthogonality_penalty([free["adapters"]["task_0"]], free["adapters"]["task_1"]))
  o_orth = float(ol.orthogonality_penalty([orth["adapters"]["task_0"]], orth["adapters"]["task_1"]))
  assert o_orth < 0.25 * o_free, (o_orth, o_free)
