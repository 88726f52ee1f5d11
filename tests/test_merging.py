"""Merging: hand-computed TIES / DARE / SLERP, identities between methods, validation, sharding."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cl_jax import merging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def f32(*xs):
  return jnp.asarray(xs, jnp.float32)


# Shared hand-computed TIES example (values chosen so every step matters; see test_ties_hand_computed).
BASE = f32(1, 1, 1, 1, 1)
TAUS = [f32(0.5, -2.0, 0.1, 3.0, -0.2), f32(-1.0, -1.0, 0.4, -0.1, 0.3), f32(2.0, 0.3, -0.6, 1.0, 0.05)]
WEIGHTS = f32(1, 2, 1)


def test_task_vector_linear_task_arithmetic():
  base, a, b = f32(1, 2), f32(3, 2), f32(1, 6)
  np.testing.assert_allclose(merging.task_vector(a, base), [2, 0])
  # (1*[3,2] + 3*[1,6]) / 4
  np.testing.assert_allclose(merging.linear([a, b], f32(1, 3)), [1.5, 5.0])
  # base + 0.5 * (1*[2,0] + 3*[0,4])
  np.testing.assert_allclose(merging.task_arithmetic(base, [a, b], f32(1, 3), 0.5), [2.0, 8.0])


def test_ties_hand_computed():
  thetas = [BASE + t for t in TAUS]
  # density 0.6 of 5 entries keeps k = 3 per task vector:
  #   trim(tau1) = [0.5, -2, 0, 3, 0], trim(tau2) = [-1, -1, 0.4, 0, 0], trim(tau3) = [2, 0, -0.6, 1, 0]
  # weighted (w = 1, 2, 1) sum = [0.5, -4, 0.2, 4, 0] -> elected sign [+, -, +, +, 0]
  # agreeing weighted entries: [0.5 + 2, -2 - 2, 0.8, 3 + 1, 0], agreeing weight [2, 3, 2, 2, 0]
  out = merging.ties(BASE, thetas, WEIGHTS, density=0.6, lam=0.5, normalize=True)
  np.testing.assert_allclose(out, 1 + 0.5 * np.array([2.5 / 2, -4 / 3, 0.8 / 2, 4 / 2, 0]), rtol=1e-6)
  out = merging.ties(BASE, thetas, WEIGHTS, density=0.6, lam=0.5, normalize=False)
  np.testing.assert_allclose(out, 1 + 0.5 * np.array([2.5, -4, 0.8, 4, 0]), rtol=1e-6)


def test_ties_density_one_without_conflicts_is_task_arithmetic():
  rng = np.random.default_rng(0)
  base = jnp.asarray(rng.normal(size=(6, 7)), jnp.float32)
  mags = [jnp.asarray(np.abs(rng.normal(size=(6, 7))), jnp.float32) for _ in range(3)]
  sign = jnp.asarray(np.sign(rng.normal(size=(6, 7))), jnp.float32)  # shared: no sign conflicts
  thetas = [base + sign * m for m in mags]
  w = f32(0.5, 1.0, 2.0)
  ta = merging.task_arithmetic(base, thetas, w, 0.7)
  np.testing.assert_allclose(merging.ties(base, thetas, w, 1.0, 0.7, normalize=False), ta, rtol=1e-5)
  # normalize divides by the agreeing weight, here all of it: task arithmetic with weights / sum(w).
  np.testing.assert_allclose(merging.ties(base, thetas, w, 1.0, 0.7, normalize=True),
                             merging.task_arithmetic(base, thetas, w / w.sum(), 0.7), rtol=1e-5)
  # and with a conflict they differ (the test above can fail).
  flipped = [thetas[0], base - sign * mags[1], thetas[2]]
  assert not np.allclose(merging.ties(base, flipped, w, 1.0, 0.7, normalize=False),
                         merging.task_arithmetic(base, flipped, w, 0.7))


def test_trim_cl_jax_mode_keeps_ties_at_threshold():
  tau = f32(3, -1, 1, -1, 0.5, 2)
  # k = ceil(0.5 * 6) = 3: the third-largest magnitude is 1, held by three entries; all are kept.
  np.testing.assert_array_equal(merging.trim(tau, 0.5, mode="cl_jax"), [3, -1, 1, -1, 0, 2])
  np.testing.assert_array_equal(merging.trim(tau, 1 / 3, mode="cl_jax"), [3, 0, 0, 0, 0, 2])
  np.testing.assert_array_equal(merging.trim(tau, 1.0, mode="cl_jax"), tau)


def test_trim_mergekit_mode_keeps_exactly_k_ties_by_index():
  tau = f32(3, -1, 1, -1, 0.5, 2)
  # k = int(0.5 * 6) = 3: 3 and 2, then the first of the three entries tied at |1| (index 1).
  np.testing.assert_array_equal(merging.trim(tau, 0.5), [3, -1, 0, 0, 0, 2])
  # k = int(0.7 * 6) = int(4.2) = 4: two of the tied entries, indices 1 and 2.
  np.testing.assert_array_equal(merging.trim(tau, 0.7), [3, -1, 1, 0, 0, 2])
  # k = max(1, int(0.1 * 6)) = 1.
  np.testing.assert_array_equal(merging.trim(tau, 0.1), [3, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(merging.trim(tau, 1.0), tau)
  # Row-major index order across rows: all 12 magnitudes tie, k = int(0.5 * 12) = 6 keeps row 0 and half of row 1.
  x = jnp.asarray([[1, -1, 1, -1], [1, 1, -1, 1], [-1, 1, 1, 1]], jnp.float32)
  np.testing.assert_array_equal(merging.trim(x, 0.5) != 0, [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
  y = jnp.ones((2, 3, 4), jnp.float32).at[1, 2, 3].set(5.0)  # the largest last, then ties in flat order
  kept = np.asarray(merging.trim(y, 0.25) != 0).ravel()   # k = 6
  np.testing.assert_array_equal(np.flatnonzero(kept), [0, 1, 2, 3, 4, 23])


def test_num_kept_modes():
  assert merging.num_kept(1024, 0.4) == 409            # int(409.6), as mergekit
  assert merging.num_kept(1024, 0.4, mode="cl_jax") == 410
  assert merging.num_kept(10, 0.05) == 1                # max(1, int(0.5))
  assert merging.num_kept(10, 1.0) == 10
  tau = jax.random.normal(jax.random.key(0), (32, 32))
  assert int(jnp.sum(merging.trim(tau, 0.4) != 0)) == 409
  assert int(jnp.sum(merging.trim(tau, 0.4, mode="cl_jax") != 0)) == 410


def _np_mergekit_ties(base, thetas, weights, density, normalize):
  """An independent numpy transcription of mergekit's TIES semantics: magnitude sparsify keeping the
  int(density*n) largest |delta| (stable order for ties), sum consensus electing +1 on >= 0, masked weighted mean."""
  deltas = []
  for th in thetas:
    d = (th - base).astype(np.float64).ravel()
    k = max(1, int(density * d.size))
    keep = np.argsort(-np.abs(d.astype(np.float32)), kind="stable")[:k]
    m = np.zeros_like(d)
    m[keep] = 1
    deltas.append((d * m).reshape(base.shape))
  deltas = np.stack(deltas)
  w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * base.ndim)
  wd = deltas * w
  majority = np.where(wd.sum(0) >= 0, 1.0, -1.0)
  mask = np.sign(wd) == majority
  mixed = (wd * mask).sum(0)
  div = (w * mask).sum(0)
  div[div == 0] = 1
  if normalize:
    mixed = mixed / div
  return base + mixed


def test_ties_matches_numpy_mergekit_transcription_with_ties():
  rng = np.random.default_rng(1)
  base = rng.normal(size=(7, 9)).astype(np.float32)
  # magnitudes on a coarse grid (many exact ties), random signs, one entry where the weighted sum cancels
  thetas = [base + (rng.integers(-3, 4, size=(7, 9)) * 0.5).astype(np.float32) for _ in range(3)]
  w = [1.0, 2.0, 1.0]
  for density in (0.3, 0.45, 1.0):
    for normalize in (True, False):
      want = _np_mergekit_ties(base, thetas, w, density, normalize)
      got = merging.merge("ties", {"x": base}, [{"x": t} for t in thetas], weights=w, density=density,
                          normalize=normalize)["x"]
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{density} {normalize}")


def test_zero_weighted_sign_sum_elects_plus_one_in_mergekit_mode():
  base = f32(0, 0, 0)
  thetas = [f32(1, 2, 0), f32(-1, -1, 0)]  # entry 0: 1 - 1 = 0 exactly
  # mergekit: gamma = [+1, +1, +1]; entry 0 keeps model 0 alone (mean 1); entry 2 has no nonzero delta -> 0.
  np.testing.assert_allclose(merging.ties(base, thetas, f32(1, 1), 1.0), [1, 2, 0])
  np.testing.assert_allclose(merging.elect_sign([f32(1, 2, 0), f32(-1, -1, 0)]), [1, 1, 1])
  # cl_jax: gamma = [0, +1, 0]; entry 0 has no agreeing model -> 0.
  np.testing.assert_allclose(merging.ties(base, thetas, f32(1, 1), 1.0, mode="cl_jax"), [0, 2, 0])
  np.testing.assert_allclose(merging.elect_sign([f32(1, 2, 0), f32(-1, -1, 0)], mode="cl_jax"), [0, 1, 0])


def test_task_arithmetic_normalize():
  base, a, b = f32(1, 2), f32(3, 2), f32(1, 6)
  # base + 0.5 * (1*[2,0] + 3*[0,4]) / 4
  np.testing.assert_allclose(merging.task_arithmetic(base, [a, b], f32(1, 3), 0.5, normalize=True),
                             [1.25, 3.5])
  out = merging.merge("task_arithmetic", {"x": base}, [{"x": a}, {"x": b}], weights=[1, 3], lam=0.5,
                      normalize=True)
  np.testing.assert_allclose(out["x"], [1.25, 3.5])
  out = merging.merge("task_arithmetic", {"x": base}, [{"x": a}, {"x": b}], weights=[1, 3], lam=0.5)
  np.testing.assert_allclose(out["x"], [2.0, 8.0])  # mergekit's default: no normalization
  # weights summing to ~0: divide by 1, as mergekit does
  np.testing.assert_allclose(merging.task_arithmetic(base, [a, b], f32(1, -1), 1.0, normalize=True), [3, -2])


def test_merge_default_normalize_per_mode():
  base = {"x": f32(0, 0, 0, 0)}
  models = [{"x": f32(2, 4, 6, 8)}, {"x": f32(2, 4, 6, 8)}]
  # dare_ties: mergekit does not normalize by default (sum = 2 * tau / density); cl_jax does (mean = tau / density).
  mk = merging.merge("dare_ties", base, models, density=1.0)["x"]
  cj = merging.merge("dare_ties", base, models, density=1.0, mode="cl_jax")["x"]
  np.testing.assert_allclose(mk, [4, 8, 12, 16])
  np.testing.assert_allclose(cj, [2, 4, 6, 8])


@pytest.mark.parametrize("call, match", [
    (lambda: merging.trim(f32(1, 2), 0.0), "trim: density must be in"),
    (lambda: merging.trim(f32(1, 2), 1.5), "trim: density must be in"),
    (lambda: merging.dare(f32(1, 2), -0.2, key=jax.random.key(0)), "dare: density must be in"),
    (lambda: merging.ties(f32(1, 2), [f32(1, 2), f32(1, 2, 3)], f32(1, 1), 0.5), r"ties: thetas\[1\] has shape"),
    (lambda: merging.ties(f32(1, 2), [f32(1, 2)], f32(1, 1), 0.5), "weights must have shape"),
    (lambda: merging.task_arithmetic(f32(1, 2, 3), [f32(1, 2)], f32(1)), "task_arithmetic: thetas"),
    (lambda: merging.slerp(f32(1, 2), f32(1, 2, 3), 0.5), "slerp: theta_b has shape"),
    (lambda: merging.dare(f32(1, 2), 0.5, mask=jnp.ones((3,), bool)), "dare: mask has shape"),
    (lambda: merging.trim(f32(1, 2), 0.5, mode="torch"), "mode must be one of"),
    (lambda: merging.trim(f32(1, 2), 0.5, method="sample"), "needs mode='cl_jax'"),
])
def test_per_tensor_functions_validate(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_sampled_threshold_keeps_about_density():
  n = 3 * merging.EXACT_TOPK_MAX + 17  # above the exact cutoff: 'auto' samples
  x = jax.random.normal(jax.random.key(1), (n // 17, 17)) * jnp.linspace(0.1, 3.0, 17)  # per-column scales
  for density in (0.05, 0.2, 0.7):
    kept = float(jnp.mean(merging.trim(x, density, mode="cl_jax") != 0))
    sigma = np.sqrt(density * (1 - density) / merging.THRESHOLD_SAMPLE_SIZE)
    assert abs(kept - density) < 5 * sigma, (density, kept)
    exact = merging.magnitude_threshold(x, density, method="exact", mode="cl_jax")
    approx = merging.magnitude_threshold(x, density, mode="cl_jax")
    assert abs(float(approx) / float(exact) - 1) < 0.02


def test_dare_fixed_mask_hand_computed():
  tau = f32(1, -2, 3, -4)
  np.testing.assert_allclose(merging.dare(tau, 0.5, mask=jnp.array([1, 0, 1, 0], bool)), [2, 0, 6, 0])
  base = f32(1, 1, 1, 1)
  t1, t2 = f32(1, -2, 3, -4), f32(-1, 1, 1, 2)
  masks = [jnp.array([1, 0, 1, 1], bool), jnp.array([1, 1, 0, 1], bool)]
  # DARE at density 0.5: [2, 0, 6, -8] and [-2, 2, 0, 4]
  thetas = [base + t1, base + t2]
  out = merging.dare_linear(base, thetas, f32(1, 1), 0.5, masks=masks)
  np.testing.assert_allclose(out, 1 + np.array([0, 2, 6, -4]))
  # TIES on them: sum [0, 2, 6, -4] elects [+, +, +, -] (mergekit: +1 on a zero sum); entry 0 keeps model 0's 2.
  out = merging.dare_ties(base, thetas, f32(1, 1), 0.5, masks=masks)
  np.testing.assert_allclose(out, 1 + np.array([2, 2, 6, -8]))
  # cl_jax mode elects [0, +, +, -]; entry 0 has no agreeing model -> 0.
  out = merging.dare_ties(base, thetas, f32(1, 1), 0.5, masks=masks, mode="cl_jax")
  np.testing.assert_allclose(out, 1 + np.array([0, 2, 6, -8]))


def test_dare_random_mask_rate_unbiased_and_seeded():
  tau = jnp.ones((200, 500), jnp.float32)
  out = merging.dare(tau, 0.3, key=jax.random.key(7))
  kept = np.asarray(out != 0)
  assert abs(kept.mean() - 0.3) < 0.005
  np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.3, rtol=1e-6)
  assert abs(float(out.mean()) - 1) < 0.02  # E[DARE(tau)] = tau
  np.testing.assert_array_equal(out, merging.dare(tau, 0.3, key=jax.random.key(7)))
  assert not np.array_equal(out, merging.dare(tau, 0.3, key=jax.random.key(8)))


def test_slerp_hand_computed_and_endpoints():
  a, b = f32(2, 0), f32(0, 1)
  # angle pi/2: coefficients sin(2pi/6) = sqrt(3)/2 and sin(pi/6) = 1/2 on the raw vectors
  np.testing.assert_allclose(merging.slerp(a, b, 1 / 3), [np.sqrt(3), 0.5], rtol=1e-6)
  np.testing.assert_allclose(merging.slerp(f32(1, 0), f32(0, 1), 0.5), [0.5 ** 0.5] * 2, rtol=1e-6)
  np.testing.assert_allclose(merging.slerp(a, b, 0.0), a, atol=1e-7)
  np.testing.assert_allclose(merging.slerp(a, b, 1.0), b, atol=1e-7)


def test_slerp_colinear_falls_back_to_lerp():
  a = f32(1, 2, 3)
  np.testing.assert_allclose(merging.slerp(a, 2 * a, 0.25), 0.75 * a + 0.5 * a, rtol=1e-6)
  np.testing.assert_allclose(merging.slerp(f32(1, 0), f32(-1, 0), 0.25), [0.5, 0], atol=1e-7)  # antiparallel
  # angle 0.02 rad: |cos| = 0.9998 > 0.9995, so lerp; the sine formula would give 0.500012 per vector.
  b = f32(np.cos(0.02), np.sin(0.02))
  np.testing.assert_allclose(merging.slerp(f32(1, 0), b, 0.5), 0.5 * (f32(1, 0) + b), rtol=1e-7, atol=1e-9)
  b = f32(np.cos(0.1), np.sin(0.1))  # |cos| = 0.995: real slerp, off the chord
  np.testing.assert_allclose(merging.slerp(f32(1, 0), b, 0.5), [np.cos(0.05), np.sin(0.05)], rtol=1e-6)
  np.testing.assert_allclose(merging.slerp(f32(0, 0), f32(2, 4), 0.5), [1, 2], rtol=1e-6)  # zero vector
  assert np.all(np.isfinite(merging.slerp(a, a * (1 + 1e-7), 0.3)))


def _mlp_params(key, scale=1.0):
  ks = jax.random.split(key, 8)
  p = {f"dense_{i}": {"kernel": scale * jax.random.normal(ks[2 * i], (4, 4)),
                      "bias": scale * jax.random.normal(ks[2 * i + 1], (4,))} for i in range(3)}
  p["head"] = {"kernel": jax.random.normal(ks[6], (4, 2)), "bias": jnp.zeros((2,))}
  return p


def test_merge_tree_matches_per_tensor_functions():
  base = _mlp_params(jax.random.key(0))
  models = [jax.tree.map(lambda x, d: x + d, base, _mlp_params(jax.random.key(i), 0.1)) for i in (1, 2, 3)]
  w = [0.2, 0.3, 0.5]
  leaf = lambda tree: tree["dense_1"]["kernel"]
  ms = [leaf(m) for m in models]
  out = merging.merge("ties", base, models, weights=w, density=0.5, lam=1.2)
  np.testing.assert_allclose(leaf(out), merging.ties(leaf(base), ms, f32(*w), 0.5, 1.2), rtol=1e-6)
  out = merging.merge("task_arithmetic", base, models, weights=w, lam=0.5)
  np.testing.assert_allclose(leaf(out), merging.task_arithmetic(leaf(base), ms, f32(*w), 0.5), rtol=1e-6)
  out = merging.merge("linear", None, models)
  np.testing.assert_allclose(leaf(out), sum(ms) / 3, rtol=1e-6)
  d1 = merging.merge("dare_ties", base, models, weights=w, density=0.4, seed=3)
  d2 = merging.merge("dare_ties", base, models, weights=w, density=0.4, seed=3)
  d3 = merging.merge("dare_ties", base, models, weights=w, density=0.4, seed=4)
  jax.tree.map(np.testing.assert_array_equal, d1, d2)
  assert not np.array_equal(leaf(d1), leaf(d3))
  lin = merging.merge("dare", base, models, weights=w, density=0.4, seed=3)
  assert jax.tree.structure(lin) == jax.tree.structure(base)


def test_merge_slerp_endpoints_and_depth_schedule():
  a, b = _mlp_params(jax.random.key(1)), _mlp_params(jax.random.key(2))
  for t, want in ((0.0, a), (1.0, b)):
    out = merging.merge("slerp", None, [a, b], t=t)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), out, want)
  # three numbered layers with anchors [0, 1]: t = 0, 0.5, 1 over depth; the head has its own t.
  out = merging.merge("slerp", None, [a, b], t={"head": 0.25, "default": [0.0, 1.0]})
  for name, t in (("dense_0", 0.0), ("dense_1", 0.5), ("dense_2", 1.0), ("head", 0.25)):
    np.testing.assert_allclose(out[name]["kernel"], merging.slerp(a[name]["kernel"], b[name]["kernel"], t),
                               atol=1e-6)
  assert merging.resolve_t([0.0, 0.2, 1.0], ["l/0", "l/1", "l/2", "l/3", "l/4"]) == pytest.approx(
      {"l/0": 0.0, "l/1": 0.1, "l/2": 0.2, "l/3": 0.6, "l/4": 1.0})


def test_merge_preserves_dtype_and_int_leaves():
  base = {"w": jnp.ones((3,), jnp.bfloat16), "step": jnp.int32(5)}
  m = {"w": jnp.full((3,), 3.0, jnp.bfloat16), "step": jnp.int32(9)}
  out = merging.merge("task_arithmetic", base, [m], lam=0.5)
  assert out["w"].dtype == jnp.bfloat16 and int(out["step"]) == 5
  np.testing.assert_allclose(np.asarray(out["w"], np.float32), [2, 2, 2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="ties", density=0.0), "density"),
    (dict(method="ties", density=1.5), "density"),
    (dict(method="dare_ties", density=-0.1), "density"),
    (dict(method="slerp", t=1.2), "t must be in"),
    (dict(method="slerp", t={"default": [0.0, -0.5]}), "t must be in"),
    (dict(method="slerp", t=[0.0, 1.0]), "head"),  # a depth list cannot apply to the unnumbered head
    (dict(method="task_arithmetic", weights=[1.0]), "weights: got 1 weights for 2 models"),
    (dict(method="ties", weights=[1.0, -1.0]), "weights must be >= 0"),
    (dict(method="median"), "method must be one of"),
])
def test_merge_rejects_bad_parameters(kwargs, match):
  a, b = _mlp_params(jax.random.key(1)), _mlp_params(jax.random.key(2))
  kwargs = dict(kwargs)
  with pytest.raises(ValueError, match=match):
    merging.merge(kwargs.pop("method"), a, [a, b], **kwargs)


def test_merge_rejects_mismatched_trees_naming_the_path():
  a = _mlp_params(jax.random.key(1))
  missing = {k: v for k, v in a.items() if k != "dense_2"}
  with pytest.raises(ValueError, match="dense_2/bias"):
    merging.merge("linear", None, [a, missing])
  wrong = jax.tree.map(lambda x: x, a)
  wrong["head"]["kernel"] = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match=r"shape mismatch at 'head/kernel'"):
    merging.merge("ties", a, [a, wrong], density=0.5)
  with pytest.raises(ValueError, match="exactly two"):
    merging.merge("slerp", None, [a, a, a], t=0.5)
  with pytest.raises(ValueError, match="base"):
    merging.merge("ties", None, [a], density=0.5)



def test_a_new_method_is_one_table_entry(monkeypatch):
  """A toy method, magnitude top-k sparsifier + no consensus + weighted sum, added as one `METHODS` entry: `merge`
  and a merge run's settings read it, and its numbers are the ones worked out by hand."""
  from cl_jax import merge_run
  toy = merging.MergeMethod(sparsify="magnitude", consensus="none", settings=("density", "lam"))
  monkeypatch.setitem(merging.METHODS, "prune_sum", toy)
  base = {"x": f32(1, 1, 1, 1), "y": f32(0, 0)}
  a = {"x": f32(1.5, -2, 1.25, 4), "y": f32(2, -3)}   # tau_a: x [0.5, -3, 0.25, 3], y [2, -3]
  b = {"x": f32(0, 3.5, 3, 0.5), "y": f32(-1, 0.5)}   # tau_b: x [-1, 2.5, 2, -0.5], y [-1, 0.5]
  out = merging.merge("prune_sum", base, [a, b], weights=[1, 2], density=0.5, lam=0.5)
  # density 0.5 keeps k = int(0.5 * n) entries of each task vector, the largest |tau|:
  #   x (k = 2): [0, -3, 0, 3] and [0, 2.5, 2, 0];  y (k = 1): [0, -3] and [-1, 0]
  # no consensus, not normalized: m = 1 * first + 2 * second, theta = base + 0.5 * m
  #   x: m = [0, 2, 4, 3] -> [1, 2, 3, 2.5];  y: m = [-2, -3] -> [-1, -1.5]
  np.testing.assert_allclose(out["x"], [1, 2, 3, 2.5], rtol=1e-6)
  np.testing.assert_allclose(out["y"], [-1, -1.5], rtol=1e-6)
  # normalize divides m by sum_i w_i = 3 (no consensus: every weight takes part)
  out = merging.merge("prune_sum", base, [a, b], weights=[1, 2], density=0.5, lam=0.5, normalize=True)
  np.testing.assert_allclose(out["x"], 1 + 0.5 * np.array([0, 2, 4, 3]) / 3, rtol=1e-6)
  # TIES (sign consensus) on the same inputs drops the minority -3 at x[1]: m = [0, 5, 4, 3].
  ties = merging.merge("ties", base, [a, b], weights=[1, 2], density=0.5, lam=0.5, normalize=False)
  np.testing.assert_allclose(ties["x"], [1, 3.5, 3, 2.5], rtol=1e-6)
  # Its settings are checked, and a merge run passes exactly them on (plus weights and seed).
  with pytest.raises(ValueError, match="density must be in"):
    merging.merge("prune_sum", base, [a, b], density=0.0)
  c = merge_run.default_config()
  c.method, c.base, c.models, c.density, c.lam = "prune_sum", "base_ckpt", ["a", "b"], 0.25, 2.0
  merge_run.check_settings(c)
  assert merge_run.merge_kwargs(c) == dict(weights=None, seed=0, lam=2.0, density=0.25)
  c.density = 1.5
  with pytest.raises(ValueError, match="merge.density"):
    merge_run.check_settings(c)
  c.density, c.base = 0.5, ""
  with pytest.raises(ValueError, match="merge.base"):  # a task-vector method needs the base
    merge_run.check_settings(c)


@pytest.mark.parametrize("entry, match", [
    (dict(sparsify="magnitude"), "reads density"),
    (dict(sparsify="median"), "sparsify must be one of"),
    (dict(consensus="vote"), "consensus must be one of"),
    (dict(settings=("lambda",)), "settings are tuples of"),
    (dict(normalize="mergekit"), "settings are tuples of"),
    (dict(rescale=True), "needs a sparsifier"),
    (dict(per_tensor=lambda thetas, weights, t: thetas[0]), "its own function"),
])
def test_merge_method_entries_are_checked_where_written(entry, match):
  with pytest.raises(ValueError, match=match):
    merging.MergeMethod(**entry)


def test_table_entries_are_the_named_methods():
  """The parts each named method is made of (the decomposition the module docstring gives)."""
  m = merging.METHODS
  assert m["dare"] is m["dare_linear"]
  parts = {name: (e.sparsify, e.rescale, e.consensus, e.task_vectors, e.settings) for name, e in m.items()}
  assert parts["linear"] == ("none", False, "none", False, ("normalize",))
  assert parts["task_arithmetic"] == ("none", False, "none", True, ("lam",))
  assert parts["ties"] == ("magnitude", False, "sign", True, ("lam", "density", "normalize"))
  assert parts["dare_linear"] == ("random", True, "none", True, ("lam", "density"))
  assert parts["dare_ties"] == ("random", True, "sign", True, ("lam", "density", "normalize"))
  assert m["slerp"].per_tensor is not None and m["slerp"].num_models == 2 and m["slerp"].settings == ("t",)
  assert [n for n, e in m.items() if e.default_normalize("mergekit")] == ["linear", "ties"]
  assert [n for n, e in m.items() if e.default_normalize("cl_jax")] == ["linear", "ties", "dare_ties"]

SHARDED_SCRIPT = textwrap.dedent("""
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from cl_jax import merging
  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  spec = {"big": NamedSharding(mesh, P("fsdp", None)), "mat": NamedSharding(mesh, P(None, "fsdp")),
          "bias": NamedSharding(mesh, P())}
  def params(seed):
    k = jax.random.split(jax.random.key(seed), 3)
    # 'big' is above the exact top-k cutoff, so cl_jax mode's sampled threshold runs on a sharded tensor; its
    # values sit on a grid of 1/4, so mergekit mode's index tie-break at the threshold runs across shards.
    p = {"big": jnp.round(4 * jax.random.normal(k[0], (merging.EXACT_TOPK_MAX // 64 + 8, 128))) / 4,
         "mat": jax.random.normal(k[1], (8, 16)), "bias": jax.random.normal(k[2], (5,))}
    return {n: jax.device_put(x, spec[n]) for n, x in p.items()}
  base, models = params(0), [params(i) for i in (1, 2, 3)]
  host = lambda t: jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), t)
  runs = {"linear": dict(), "task_arithmetic": dict(lam=0.5), "ties": dict(density=0.2),
          "dare_linear": dict(density=0.5), "dare_ties": dict(density=0.5)}
  for method, kw in runs.items():
    out = merging.merge(method, base, models, **kw)
    for n in spec:
      assert out[n].sharding == base[n].sharding, (method, n, out[n].sharding)
    if method not in ("ties", "dare_ties"):
      continue
    # the sampled threshold and the DARE masks must not depend on the sharding
    ref = merging.merge(method, host(base), [host(m) for m in models], **kw)
    for n in spec:
      np.testing.assert_allclose(np.asarray(out[n]), np.asarray(ref[n]), rtol=1e-5, atol=1e-6,
                                 err_msg=method + "/" + n)
  out = merging.merge("slerp", None, models[:2], t=0.3)
  for n in spec:
    assert out[n].sharding == models[0][n].sharding, ("slerp", n)
  # mergekit mode's trim of a sharded tensor with many ties: exactly int(0.2 n) kept, the same entries as on one device
  tau = models[0]["big"] - base["big"]
  trimmed = jax.jit(lambda x: merging.trim(x, 0.2))(tau)
  assert int(jnp.sum(trimmed != 0)) == int(0.2 * tau.size), (int(jnp.sum(trimmed != 0)), tau.size)
  np.testing.assert_array_equal(np.asarray(trimmed), np.asarray(merging.trim(host({"t": tau})["t"], 0.2)))
  # cl_jax mode's sampled threshold on the sharded 'big' tensor
  out = merging.merge("ties", base, models, density=0.2, mode="cl_jax")
  ref = merging.merge("ties", host(base), [host(m) for m in models], density=0.2, mode="cl_jax")
  for n in spec:
    np.testing.assert_allclose(np.asarray(out[n]), np.asarray(ref[n]), rtol=1e-5, atol=1e-6, err_msg=n)

  # Trees mixing sharded and single-device leaves: the base has a sharded leaf, one on device 3 and one on
  # device 0; the models are placed differently again (one all on device 5, one sharded another way).
  dev = jax.devices()
  mixed = {"big": base["big"], "mat": jax.device_put(np.asarray(base["mat"]), dev[3]),
           "bias": jax.device_put(np.asarray(base["bias"]), dev[0])}
  other = {"big": NamedSharding(mesh, P(None, "fsdp")), "mat": NamedSharding(mesh, P("data", None)),
           "bias": NamedSharding(mesh, P())}
  mixed_models = [jax.tree.map(lambda x: jax.device_put(np.asarray(x), dev[5]), models[0]),
                  {n: jax.device_put(np.asarray(x), other[n]) for n, x in models[1].items()}, models[2]]
  for method in ("linear", "ties", "dare_ties"):
    kw = runs[method]
    out = merging.merge(method, mixed, mixed_models, **kw)
    ref = merging.merge(method, host(base), [host(m) for m in models], **kw)
    placed_like = mixed_models[0] if method == "linear" else mixed  # linear ignores the base
    for n in spec:
      assert out[n].sharding == placed_like[n].sharding, (method, n, out[n].sharding)
      np.testing.assert_allclose(np.asarray(out[n]), np.asarray(ref[n]), rtol=1e-5, atol=1e-6,
                                 err_msg="mixed " + method + "/" + n)
  out = merging.merge("slerp", None, [mixed, mixed_models[1]], t=0.3)
  ref = merging.merge("slerp", None, [host(base), host(models[1])], t=0.3)
  for n in spec:
    assert out[n].sharding == mixed[n].sharding, ("slerp mixed", n)
    np.testing.assert_allclose(np.asarray(out[n]), np.asarray(ref[n]), rtol=1e-5, atol=1e-6)
  print("SHARDED_OK")
""")


def test_merge_of_sharded_and_mixed_params():
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr


def test_kth_largest_matches_sort():
  x = jnp.abs(jax.random.normal(jax.random.key(3), (37, 11))).at[0, 0].set(0.0).at[1, 1].set(jnp.inf)
  srt = np.sort(np.asarray(x).ravel())[::-1]
  for k in (1, 2, 5, 200, 406, 407):
    assert float(merging.kth_largest(x, k)) == srt[k - 1], k
