"""The diagonal Fisher: closed forms, the dense path against the vmap reference, batched cancellation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cl_jax.models import MLP, functional
from cl_jax.strategies.base import Learner
from cl_jax.strategies.fisher import dense_layout, fisher_diagonal


def _no_mask(task, task_index):
  del task, task_index
  return None


def _logreg_data(n=37, d=5, c=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, size=n).astype(np.int32)
  w = rng.normal(size=(d, c)).astype(np.float32)
  b = rng.normal(size=(c,)).astype(np.float32)
  return x, y, np.zeros(n, np.int32), w, b


def _logreg_closed_form(x, w, b):
  """Exact Fisher of softmax regression: F = E_x[diag(p) − ppᵀ ⊗ x xᵀ], whose diagonal is
  F_W[d, c] = mean_n x_{nd}² p_{nc}(1 − p_{nc}) and F_b[c] = mean_n p_{nc}(1 − p_{nc})."""
  z = x.astype(np.float64) @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  v = p * (1 - p)
  return (x.astype(np.float64) ** 2).T @ v / len(x), v.mean(0)


@pytest.mark.parametrize("method", ["vmap", "dense"])
def test_exact_fisher_of_logistic_regression_is_its_closed_form(method):
  x, y, t, w, b = _logreg_data()
  if method == "dense":   # an MLP with no hidden layer: the dense path applies
    params = {"head": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
    apply = lambda p, x, task: x @ p["head"]["kernel"] + p["head"]["bias"]
  else:                   # names the dense path does not recognise: the vmap path
    params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    apply = lambda p, x, task: x @ p["w"] + p["b"]
  learner = Learner(apply, _no_mask)
  fisher = fisher_diagonal(learner, params, x, y, t, 0, kind="exact", method=method, chunk_size=8)
  fw, fb = _logreg_closed_form(x, w, b)
  got_w, got_b = ((fisher["head"]["kernel"], fisher["head"]["bias"]) if method == "dense"
                  else (fisher["w"], fisher["b"]))
  np.testing.assert_allclose(got_w, fw, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(got_b, fb, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["empirical", "predicted"])
def test_one_label_fisher_of_logistic_regression_is_its_closed_form(kind):
  """The squared gradient at one label per example: the true one (empirical Fisher) or the predicted one (the
  paper code's Fisher, van de Ven & Tolias 2019)."""
  x, y, t, w, b = _logreg_data()
  params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
  learner = Learner(lambda p, x, task: x @ p["w"] + p["b"], _no_mask)
  fisher = fisher_diagonal(learner, params, x, y, t, 0, kind=kind, chunk_size=16)
  z = x.astype(np.float64) @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  assert np.mean(p.argmax(1) != y) > 0.2   # the two kinds differ on these data
  label = y if kind == "empirical" else p.argmax(1)
  err = (p - np.eye(3)[label]) ** 2   # per-example gradient wrt logits is p − e_label
  np.testing.assert_allclose(fisher["w"], (x.astype(np.float64) ** 2).T @ err / len(x), rtol=2e-5)
  np.testing.assert_allclose(fisher["b"], err.mean(0), rtol=2e-5)


def _mlp_learner(num_heads, mask_kind):
  model, params = functional(MLP(12, (16, 8), 3, num_heads=num_heads, rngs=nnx.Rngs(1)))

  def logit_mask(task, task_index):
    if mask_kind == "class":    # classes 0..task_index seen
      return jnp.broadcast_to(jnp.arange(3) <= task_index, (task.shape[0], 3))
    if mask_kind == "task":     # each example sees its own task's class and the next
      c = jnp.arange(3)[None]
      return (c == task[:, None] % 3) | (c == (task[:, None] + 1) % 3)
    return None

  return Learner(model.apply, logit_mask), params


@pytest.mark.parametrize("kind,num_heads,mask_kind", [
    ("exact", 1, "class"), ("empirical", 1, "class"), ("sampled", 1, "class"),
    ("exact", 2, "task"), ("sampled", 2, "task"), ("exact", 1, None), ("predicted", 2, "task")])
def test_dense_path_equals_vmap_path(kind, num_heads, mask_kind):
  learner, params = _mlp_learner(num_heads, mask_kind)
  rng = np.random.default_rng(2)
  n = 45   # not a multiple of the chunk size: padding must not count
  x = rng.normal(size=(n, 3, 4)).astype(np.float32)
  task = rng.integers(0, num_heads, size=n).astype(np.int32)
  y = rng.integers(0, 2, size=n).astype(np.int32)
  if mask_kind == "task":
    y = (task + rng.integers(0, 2, size=n)) % 3
  assert dense_layout(learner, params, x[:8], task[:8], 1) is not None
  common = dict(kind=kind, rng=jax.random.key(3), chunk_size=16)
  dense = fisher_diagonal(learner, params, x, y, task, 1, method="dense", **common)
  ref = fisher_diagonal(learner, params, x, y, task, 1, method="vmap", **common)
  for path, d in jax.tree_util.tree_leaves_with_path(dense):
    r = _get(ref, path)
    np.testing.assert_allclose(d, r, rtol=1e-4, atol=1e-8, err_msg=str(path))
  total = sum(float(jnp.sum(v)) for v in jax.tree.leaves(ref))
  assert total > 1e-3   # a non-trivial Fisher, so equality means something


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_dense_path_declines_a_model_it_does_not_reproduce():
  learner, params = _mlp_learner(1, None)
  # Same parameter names, different function (tanh): the probe must catch it and decline.
  def other_apply(p, x, task):
    h = x.reshape(x.shape[0], -1)
    for i in range(2):
      h = jnp.tanh(h @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]
  other = Learner(other_apply, learner.logit_mask)
  x = np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32)
  t = np.zeros(8, np.int32)
  assert dense_layout(learner, params, x, t, 0) is not None
  assert dense_layout(other, params, x, t, 0) is None
  with pytest.raises(ValueError, match="method='dense'"):
    fisher_diagonal(other, params, x, np.zeros(8, np.int32), t, 0, method="dense")


def test_batched_fisher_cancels_where_per_example_does_not():
  """Two examples whose gradients are exact opposites: x and −x with the same label at W = 0.
  Per example each squared gradient is v²/4; their batch mean gradient is 0."""
  v = np.array([1.0, -2.0, 3.0], np.float32)
  x = np.stack([v, -v])
  y = np.zeros(2, np.int32)
  t = np.zeros(2, np.int32)
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}
  learner = Learner(lambda p, x, task: x @ p["w"] + p["b"], _no_mask)
  empirical = fisher_diagonal(learner, params, x, y, t, 0, kind="empirical")
  batched = fisher_diagonal(learner, params, x, y, t, 0, kind="batched", batch_size=2)
  np.testing.assert_allclose(empirical["w"], np.stack([v ** 2 / 4] * 2, 1), rtol=1e-6)
  np.testing.assert_allclose(batched["w"], 0.0, atol=1e-12)
  # Batch size 1 is the empirical Fisher again.
  single = fisher_diagonal(learner, params, x, y, t, 0, kind="batched", batch_size=1)
  np.testing.assert_allclose(single["w"], empirical["w"], rtol=1e-6)


def test_sampled_fisher_is_an_unbiased_estimate_of_the_exact_one():
  x, y, t, w, b = _logreg_data(n=1, c=3, seed=4)
  x, y, t = np.repeat(x, 4000, 0), np.repeat(y, 4000), np.repeat(t, 4000)
  params = {"head": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
  learner = Learner(lambda p, x, task: x @ p["head"]["kernel"] + p["head"]["bias"], _no_mask)
  exact = fisher_diagonal(learner, params, x, y, t, 0, kind="exact")
  sampled = fisher_diagonal(learner, params, x, y, t, 0, kind="sampled", rng=jax.random.key(0))
  empirical = fisher_diagonal(learner, params, x, y, t, 0, kind="empirical")
  # Bias Fisher of class c: (p_c − [ŷ = c])², mean p_c(1 − p_c), variance below; 4.5σ of a 4000-mean.
  p = np.asarray(jax.nn.softmax(x[0] @ w + b), np.float64)
  var = p * (1 - p) ** 4 + (1 - p) * p ** 4 - (p * (1 - p)) ** 2
  np.testing.assert_allclose(exact["head"]["bias"], p * (1 - p), rtol=1e-5)
  assert np.all(np.abs(sampled["head"]["bias"] - p * (1 - p)) < 4.5 * np.sqrt(var / 4000))
  # The empirical one (always the same label here) is a different quantity.
  assert np.abs(empirical["head"]["bias"] - exact["head"]["bias"]).max() > 0.1 * exact["head"]["bias"].max()


def test_num_samples_averages_over_a_subset():
  x, y, t, w, b = _logreg_data(n=50)
  params = {"head": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
  learner = Learner(lambda p, x, task: x @ p["head"]["kernel"] + p["head"]["bias"], _no_mask)
  key = jax.random.key(5)
  sub = fisher_diagonal(learner, params, x, y, t, 0, kind="exact", num_samples=10, rng=key)
  keep = np.asarray(jax.random.permutation(jax.random.split(key)[0], 50)[:10])
  fw, fb = _logreg_closed_form(x[keep], w, b)
  np.testing.assert_allclose(sub["head"]["kernel"], fw, rtol=2e-5, atol=1e-7)
  with pytest.raises(ValueError, match="num_samples"):
    fisher_diagonal(learner, params, x, y, t, 0, num_samples=0)
  with pytest.raises(ValueError, match="kind='bogus'"):
    fisher_diagonal(learner, params, x, y, t, 0, kind="bogus")
