"""Model merging on params pytrees: task vectors, linear, task arithmetic, TIES, DARE, SLERP.

Every method is a small pure per-tensor function whose parameters are named after its paper
(`weights`, `lam`, `density`, `t`), plus one pytree-level entry point, `merge(method, base, models,
**params)`, which validates everything before any work and runs the whole tree in one `jax.jit` whose
outputs keep the reference tree's shardings (the base's, or the first model's when there is no base).

Notation: theta_base is the shared starting point, theta_i the fine-tuned models, w_i their weights,
tau_i = theta_i - theta_base their task vectors (Ilharco et al. 2023, "Editing models with task
arithmetic").

  linear            theta = sum_i w_i theta_i / sum_i w_i                     (model soup / weighted mean)
  task_arithmetic   theta = theta_base + lam * sum_i w_i tau_i                (Ilharco et al. 2023)
  ties              trim -> elect sign -> disjoint merge   (Yadav et al. 2023, "TIES-Merging")
  dare_linear       task arithmetic on DARE-sparsified tau_i (Yu et al. 2024, "Language models are
  dare_ties         TIES with DARE in place of the trim     Super Mario", DARE)
  slerp             spherical interpolation of two models with per-path t (Shoemake 1985)

Arithmetic runs in float32 (or wider, if the inputs are wider) and results are cast back to the
reference leaf's dtype. Non-floating leaves (step counters, int tables) are copied from the reference.
"""
from __future__ import annotations

import functools
import math
import numbers
import re
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = Any

# Tensors with at most this many entries get an exact top-k threshold (a sort of |x|); larger ones a
# sort-free estimate from a random sample (see `magnitude_threshold`).
EXACT_TOPK_MAX = 1 << 17
THRESHOLD_SAMPLE_SIZE = 1 << 16
# |cos(angle)| above this counts as colinear for SLERP; sin(angle) is then too small to divide by.
SLERP_COLINEAR_DOT = 0.9995

METHODS = ("linear", "task_arithmetic", "ties", "dare", "dare_linear", "dare_ties", "slerp")


def _compute_dtype(*xs) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


# ------------------------------------------------------------------------------------------------
# Per-tensor functions (pure, jittable; `thetas`/`taus` are sequences of same-shaped arrays)
# ------------------------------------------------------------------------------------------------

def task_vector(theta_ft: jax.Array, theta_base: jax.Array) -> jax.Array:
  """tau = theta_ft - theta_base (Ilharco et al. 2023)."""
  return theta_ft - theta_base


def linear(thetas: Sequence[jax.Array], weights: jax.Array, normalize: bool = True) -> jax.Array:
  """Weighted average `sum_i w_i theta_i / sum_i w_i` (a plain weighted sum with normalize=False)."""
  dt = _compute_dtype(*thetas)
  out = sum(weights[i].astype(dt) * thetas[i].astype(dt) for i in range(len(thetas)))
  if normalize:
    out = out / jnp.sum(weights).astype(dt)
  return out


def task_arithmetic(theta_base: jax.Array, thetas: Sequence[jax.Array], weights: jax.Array,
                    lam: float | jax.Array = 1.0) -> jax.Array:
  """`theta_base + lam * sum_i w_i (theta_i - theta_base)` (Ilharco et al. 2023)."""
  dt = _compute_dtype(theta_base, *thetas)
  base = theta_base.astype(dt)
  taus = [t.astype(dt) - base for t in thetas]
  return base + jnp.asarray(lam, dt) * linear(taus, weights, normalize=False)


def num_kept(size: int, density: float) -> int:
  """k = ceil(density * n), at least 1: how many entries a trim to `density` keeps."""
  return max(1, min(size, math.ceil(density * size - 1e-9)))


def kth_largest(values: jax.Array, k: int) -> jax.Array:
  """The k-th largest of non-negative float32 `values` (any shape), exactly, without sorting.

  Non-negative IEEE floats order like their bit patterns read as unsigned ints, so a bisection on
  the bits, v* = max{v : #(bits >= v) >= k}, finds it in 31 counting passes (one fused compare-and-sum
  each; a sort of |x| is much slower on CPU and GPU alike, and approx_max_k is only fast on TPU).
  """
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)

  def step(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(bits >= mid, dtype=jnp.int32) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  # Invariant: #(bits >= lo) >= k > #(bits >= hi); |x| has the sign bit clear, so hi = 2^31 works.
  lo, _ = jax.lax.fori_loop(0, 31, step, (jnp.uint32(0), jnp.uint32(1 << 31)))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def magnitude_threshold(x: jax.Array, density: float, *, method: str = "auto",
                        sample_size: int = THRESHOLD_SAMPLE_SIZE, key: jax.Array | None = None) -> jax.Array:
  """A magnitude t such that keeping `|x| >= t` keeps the top `density` fraction of x's entries.

  method='exact': t is the k-th largest |x|, k = ceil(density * n), found by bit bisection
    (`kth_largest`: 31 passes over x). Entries tied with t are all kept, so exactly k are kept unless
    ties straddle t, and then a few more: the result does not depend on the order of entries, which a
    "first k" tie-break would.
  method='sample': for large tensors, one pass. t is the same order statistic of |x| at s = sample_size
    positions drawn uniformly with replacement from a fixed key (one gather of s entries, indexed per
    axis so a sharded x is never reshaped), found by bisection on the sample. The kept fraction is
    density within about sqrt(density (1 - density) / s) (one standard deviation; 0.16 % of n at
    density 0.2 and s = 2^16), with ties at t kept as above.
  method='auto': exact for n <= EXACT_TOPK_MAX entries, sample above.
  """
  n = int(np.prod(x.shape)) if x.ndim else 1
  if method == "auto":
    method = "exact" if n <= EXACT_TOPK_MAX else "sample"
  if method == "exact":
    return kth_largest(jnp.abs(x), num_kept(n, density))
  if method != "sample":
    raise ValueError(f"magnitude_threshold: method must be 'auto', 'exact' or 'sample', got {method!r}")
  key = jax.random.key(0) if key is None else key
  keys = jax.random.split(key, max(x.ndim, 1))
  idx = tuple(jax.random.randint(keys[d], (sample_size,), 0, x.shape[d]) for d in range(x.ndim))
  sample = jnp.abs(x[idx] if x.ndim else jnp.broadcast_to(x, (sample_size,)))
  return kth_largest(sample, num_kept(sample_size, density))


def trim(tau: jax.Array, density: float, *, method: str = "auto") -> jax.Array:
  """TIES step 1 (Yadav et al. 2023): zero all but the top `density` fraction of tau by magnitude.

  `tau * [|tau| >= t]` with t from `magnitude_threshold` (ties at t kept). density=1 is the identity.
  """
  if density >= 1.0:
    return tau
  t = magnitude_threshold(tau, density, method=method)
  return jnp.where(jnp.abs(tau) >= t, tau, jnp.zeros_like(tau))


def dare_mask(key: jax.Array, density: float, shape: Sequence[int]) -> jax.Array:
  """Bernoulli(density) keep-mask of DARE (Yu et al. 2024)."""
  return jax.random.bernoulli(key, density, tuple(shape))


def dare(tau: jax.Array, density: float, *, key: jax.Array | None = None,
         mask: jax.Array | None = None) -> jax.Array:
  """DARE (Yu et al. 2024): drop each entry with probability 1 - density, rescale survivors by 1/density.

  `tau * m / density`, m ~ Bernoulli(density) drawn from `key`, or the given boolean `mask`. The
  rescale keeps E[DARE(tau)] = tau, so the merged model's expected output is unchanged.
  """
  if density >= 1.0 and mask is None:
    return tau
  if mask is None:
    if key is None:
      raise ValueError("dare: give a `key` (or a fixed `mask`)")
    mask = dare_mask(key, density, tau.shape)
  return jnp.where(mask, tau / jnp.asarray(density, tau.dtype), jnp.zeros_like(tau))


def elect_sign(weighted_taus: Sequence[jax.Array]) -> jax.Array:
  """TIES step 2: gamma = sgn(sum_i w_i tau_i), the sign of the total weighted mass per entry."""
  return jnp.sign(sum(weighted_taus))


def disjoint_merge(taus: Sequence[jax.Array], weights: jax.Array, normalize: bool = True) -> jax.Array:
  """TIES steps 2-3 on (already trimmed) task vectors.

  gamma = sgn(sum_i w_i tau_i); A_i = [sgn(w_i tau_i) = gamma and tau_i != 0];
  tau_m = sum_i A_i w_i tau_i, divided by sum_i A_i w_i with `normalize` (the paper's mean over the
  agreeing models, weighted). Entries where no model agrees (gamma = 0) are 0.
  """
  dt = _compute_dtype(*taus)
  wt = [weights[i].astype(dt) * taus[i].astype(dt) for i in range(len(taus))]
  gamma = elect_sign(wt)
  agree = [(jnp.sign(x) == gamma) & (x != 0) for x in wt]
  num = sum(jnp.where(a, x, 0) for a, x in zip(agree, wt))
  if not normalize:
    return num
  den = sum(jnp.where(a, weights[i].astype(dt), 0) for i, a in enumerate(agree))
  return jnp.where(den != 0, num / jnp.where(den != 0, den, 1), 0)


def ties(theta_base: jax.Array, thetas: Sequence[jax.Array], weights: jax.Array, density: float,
         lam: float | jax.Array = 1.0, normalize: bool = True, *, threshold: str = "auto") -> jax.Array:
  """TIES-Merging (Yadav et al. 2023): theta_base + lam * disjoint_merge(trim(tau_i, density)).

  Trim each tau_i = theta_i - theta_base to its top-`density` magnitudes (per tensor), elect the sign
  per entry from the weighted sum, and merge the weighted entries agreeing with it (see `trim` and
  `disjoint_merge`). With density=1 and no sign conflicts and normalize=False this is task arithmetic.
  """
  dt = _compute_dtype(theta_base, *thetas)
  base = theta_base.astype(dt)
  taus = [trim(t.astype(dt) - base, density, method=threshold) for t in thetas]
  return base + jnp.asarray(lam, dt) * disjoint_merge(taus, weights, normalize)


def dare_linear(theta_base: jax.Array, thetas: Sequence[jax.Array], weights: jax.Array, density: float,
                lam: float | jax.Array = 1.0, normalize: bool = False, *,
                keys: Sequence[jax.Array] | None = None, masks: Sequence[jax.Array] | None = None) -> jax.Array:
  """DARE + task arithmetic: theta_base + lam * sum_i w_i DARE(tau_i) (Yu et al. 2024).

  With `normalize` the sum is divided by sum_i w_i (a weighted mean of the sparsified task vectors).
  """
  dt = _compute_dtype(theta_base, *thetas)
  base = theta_base.astype(dt)
  taus = _dare_all([t.astype(dt) - base for t in thetas], density, keys, masks)
  return base + jnp.asarray(lam, dt) * linear(taus, weights, normalize=normalize)


def dare_ties(theta_base: jax.Array, thetas: Sequence[jax.Array], weights: jax.Array, density: float,
              lam: float | jax.Array = 1.0, normalize: bool = True, *,
              keys: Sequence[jax.Array] | None = None, masks: Sequence[jax.Array] | None = None) -> jax.Array:
  """DARE-TIES: TIES sign election and disjoint merge on DARE-sparsified task vectors (Yu et al. 2024)."""
  dt = _compute_dtype(theta_base, *thetas)
  base = theta_base.astype(dt)
  taus = _dare_all([t.astype(dt) - base for t in thetas], density, keys, masks)
  return base + jnp.asarray(lam, dt) * disjoint_merge(taus, weights, normalize)


def _dare_all(taus, density, keys, masks):
  if masks is not None:
    return [dare(t, density, mask=m) for t, m in zip(taus, masks)]
  if keys is None:
    raise ValueError("dare: give `keys` (one per model) or fixed `masks`")
  return [dare(t, density, key=k) for t, k in zip(taus, keys)]


def slerp(theta_a: jax.Array, theta_b: jax.Array, t: float | jax.Array,
          colinear_dot: float = SLERP_COLINEAR_DOT) -> jax.Array:
  """Spherical linear interpolation (Shoemake 1985) of two tensors seen as flat float32 vectors.

  Omega = arccos(<a, b> / (|a| |b|)); slerp = sin((1-t) Omega)/sin(Omega) a + sin(t Omega)/sin(Omega) b.
  When |cos Omega| > colinear_dot (or either vector is zero) sin(Omega) is ~0 and the formula is
  ill-conditioned, so it falls back to lerp = (1-t) a + t b (the limit as Omega -> 0). Reductions run
  over all axes, so a sharded tensor is never reshaped. t=0 gives a and t=1 gives b.
  """
  out_dtype = jnp.result_type(theta_a, theta_b)
  dt = _compute_dtype(theta_a, theta_b)
  a, b = theta_a.astype(dt), theta_b.astype(dt)
  t = jnp.asarray(t, dt)
  na, nb = jnp.sqrt(jnp.sum(a * a)), jnp.sqrt(jnp.sum(b * b))
  degenerate = (na == 0) | (nb == 0)
  cos = jnp.sum(a * b) / jnp.where(degenerate, 1, na * nb)
  colinear = degenerate | (jnp.abs(cos) > colinear_dot)
  omega = jnp.arccos(jnp.clip(cos, -1, 1))
  sin = jnp.where(colinear, 1, jnp.sin(omega))
  ca = jnp.where(colinear, 1 - t, jnp.sin((1 - t) * omega) / sin)
  cb = jnp.where(colinear, t, jnp.sin(t * omega) / sin)
  return (ca * a + cb * b).astype(out_dtype)


# ------------------------------------------------------------------------------------------------
# Pytree level
# ------------------------------------------------------------------------------------------------

def path_str(path) -> str:
  """'dense_0/kernel' for a key path (dict keys, sequence indices and attributes joined by '/')."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def task_vectors(base: Params, models: Sequence[Params]) -> list[Params]:
  """[theta_i - theta_base] as params pytrees."""
  return [jax.tree.map(task_vector, m, base) for m in models]


_LAYER_RE = re.compile(r"(?:^|[/_.])(\d+)(?=$|[/_.])")


def layer_index(path: str) -> int | None:
  """The layer number of a param path: the first integer that is a whole path component or suffix
  ('dense_3/kernel' -> 3, 'layers/11/attn/q' -> 11, 'head/bias' -> None)."""
  m = _LAYER_RE.search(path)
  return int(m.group(1)) if m else None


def _interp_gradient(anchors: Sequence[float], pos: float) -> float:
  """mergekit-style gradient: anchors spread evenly over [0, 1], linear in between."""
  if len(anchors) == 1:
    return float(anchors[0])
  x = pos * (len(anchors) - 1)
  lo = min(int(math.floor(x)), len(anchors) - 2)
  f = x - lo
  return float(anchors[lo] * (1 - f) + anchors[lo + 1] * f)


def resolve_t(t_spec, paths: Sequence[str]) -> dict[str, float]:
  """Per-path interpolation factor from a SLERP t schedule.

  t_spec is a number (every tensor), a list of anchors (a gradient over depth: anchors spread evenly
  over the numbered layers 0..L-1, L = 1 + the largest layer index in the tree, linearly interpolated,
  like mergekit's gradient lists), or a dict {regex: number or list}, the first pattern that
  `re.search`es a path winning, with key 'default' for the rest. A list can only apply to numbered
  layers: an unnumbered path (embedding, head) under a list is an error naming it; give it a pattern.
  """
  spec = dict(t_spec) if isinstance(t_spec, Mapping) else {"default": t_spec}
  default = spec.pop("default", None)
  idx = {p: layer_index(p) for p in paths}
  numbered = [i for i in idx.values() if i is not None]
  depth = max(numbered) + 1 if numbered else 1
  out = {}
  for p in paths:
    value = next((v for pat, v in spec.items() if re.search(pat, p)), default)
    if value is None:
      raise ValueError(f"t: no pattern matches param path {p!r} and there is no 'default'")
    if isinstance(value, (int, float, np.floating, np.integer)):
      out[p] = float(value)
    else:
      if idx[p] is None:
        raise ValueError(f"t: a per-layer list applies to {p!r}, which has no layer number; "
                         "give it its own pattern in the t dict")
      out[p] = _interp_gradient(list(value), idx[p] / max(depth - 1, 1))
  return out


def _check_unit(name: str, value, lo_open: bool) -> None:
  vals = value if isinstance(value, (list, tuple)) else [value]
  if not vals:
    raise ValueError(f"{name}: an empty list")
  for v in vals:
    ok = isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v)
    ok = ok and ((0 < v <= 1) if lo_open else (0 <= v <= 1))
    if not ok:
      rng = "(0, 1]" if lo_open else "[0, 1]"
      raise ValueError(f"{name} must be in {rng}, got {value!r}")


def _flatten(tree, what: str):
  leaves, treedef = jax.tree.flatten_with_path(tree)
  return {path_str(p): x for p, x in leaves}, treedef


def check_compatible(trees: Sequence[Params], names: Sequence[str]) -> None:
  """ValueError naming the first path where the trees differ in structure or shape."""
  ref, ref_def = _flatten(trees[0], names[0])
  for tree, name in zip(trees[1:], names[1:]):
    other, other_def = _flatten(tree, name)
    for p in ref:
      if p not in other:
        raise ValueError(f"{name} has no param {p!r} that {names[0]} has")
    for p in other:
      if p not in ref:
        raise ValueError(f"{name} has a param {p!r} that {names[0]} lacks")
    if other_def != ref_def:
      raise ValueError(f"{name} and {names[0]} have the same paths but different tree types: "
                       f"{other_def} vs {ref_def}")
    for p, x in ref.items():
      if tuple(np.shape(other[p])) != tuple(np.shape(x)):
        raise ValueError(f"shape mismatch at {p!r}: {names[0]} {tuple(np.shape(x))}, "
                         f"{name} {tuple(np.shape(other[p]))}")


def _leaf_key(seed: jax.Array, path: str, i: int) -> jax.Array:
  # crc32 of the path: a stable per-tensor stream, so masks do not depend on tree order or other leaves.
  path_id = zlib.crc32(path.encode()) & 0x7FFFFFFF
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), path_id), i)


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


@functools.lru_cache(maxsize=128)
def _merge_fn(method: str, paths: tuple, treedef, static: tuple, sharding_leaves: tuple) -> Callable:
  """One jitted function per (method, tree, static params, shardings): the whole tree in one program."""
  st = dict(static)
  out_shardings = jax.tree.unflatten(treedef, list(sharding_leaves))

  def per_leaf(path, ref, base, thetas, weights, lam, t, seed):
    if not _is_float(ref):
      return ref
    if method == "linear":
      out = linear(thetas, weights, st["normalize"])
    elif method == "task_arithmetic":
      out = task_arithmetic(base, thetas, weights, lam)
    elif method == "ties":
      out = ties(base, thetas, weights, st["density"], lam, st["normalize"], threshold=st["threshold"])
    elif method in ("dare", "dare_linear", "dare_ties"):
      keys = [_leaf_key(seed, path, i) for i in range(len(thetas))]
      if method == "dare_ties":
        out = dare_ties(base, thetas, weights, st["density"], lam, st["normalize"], keys=keys)
      else:
        out = dare_linear(base, thetas, weights, st["density"], lam, st["normalize"], keys=keys)
    elif method == "slerp":
      out = slerp(thetas[0], thetas[1], t)
    else:
      raise AssertionError(method)
    return out.astype(ref.dtype)

  def run(base, models, weights, lam, ts, seed):
    refs = jax.tree.leaves(base if base is not None else models[0])
    bases = jax.tree.leaves(base) if base is not None else [None] * len(refs)
    model_leaves = [jax.tree.leaves(m) for m in models]
    outs = [per_leaf(p, refs[j], bases[j], [ml[j] for ml in model_leaves], weights, lam, ts[j], seed)
            for j, p in enumerate(paths)]
    return jax.tree.unflatten(treedef, outs)

  return jax.jit(run, out_shardings=out_shardings)


def merge(method: str, base: Params | None, models: Sequence[Params], *, weights: Sequence[float] | None = None,
          lam: float = 1.0, density: float = 1.0, normalize: bool | None = None, t=None, seed: int = 0,
          threshold: str = "auto") -> Params:
  """Merge fine-tuned `models` (params pytrees, sharded or not) into one params pytree.

  method: 'linear' (weights, normalize=True; base unused), 'task_arithmetic' (weights, lam), 'ties'
  (weights, density, lam, normalize=True, threshold), 'dare_linear' or its alias 'dare' (weights,
  density, lam, normalize=False, seed), 'dare_ties' (weights, density, lam, normalize=True, seed),
  'slerp' (exactly two models, t: number, depth gradient list or {regex: ...} dict, see `resolve_t`; base unused).
  weights default to 1 per model (so 'linear' is the plain mean). See the per-tensor functions for
  the formulas. Everything is validated before any computation: an unknown method, trees that differ
  (the offending path is named), density outside (0, 1], t outside [0, 1], a weight count that is not
  the model count, or negative weights for the sign-electing methods raise ValueError.
  The result has the reference tree's structure, dtypes and shardings (base, or models[0] when base
  is None or unused).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  models = list(models)
  if not models:
    raise ValueError("models: need at least one model to merge")
  needs_base = method not in ("linear", "slerp")
  if needs_base and base is None:
    raise ValueError(f"base: method {method!r} merges task vectors and needs the base params")
  if method == "slerp" and len(models) != 2:
    raise ValueError(f"models: slerp interpolates exactly two models, got {len(models)}")
  if weights is None:
    weights = [1.0] * len(models)
  weights = [float(w) for w in weights]
  if len(weights) != len(models):
    raise ValueError(f"weights: got {len(weights)} weights for {len(models)} models")
  if not all(math.isfinite(w) for w in weights):
    raise ValueError(f"weights must be finite, got {weights}")
  if method in ("ties", "dare_ties") and any(w < 0 for w in weights):
    raise ValueError(f"weights must be >= 0 for {method} (sign election), got {weights}")
  if method == "linear" and (normalize is None or normalize) and sum(weights) == 0:
    raise ValueError(f"weights sum to 0; linear cannot normalize by them: {weights}")
  if isinstance(lam, bool) or not (isinstance(lam, numbers.Real) and math.isfinite(lam)):
    raise ValueError(f"lam must be a finite number, got {lam!r}")
  if method in ("ties", "dare", "dare_linear", "dare_ties"):
    _check_unit("density", density, lo_open=True)
  if threshold not in ("auto", "exact", "sample"):
    raise ValueError(f"threshold must be 'auto', 'exact' or 'sample', got {threshold!r}")

  trees = ([base] if needs_base else []) + models
  names = (["base"] if needs_base else []) + [f"models[{i}]" for i in range(len(models))]
  check_compatible(trees, names)
  ref = trees[0]
  flat, treedef = jax.tree.flatten_with_path(ref)
  paths = tuple(path_str(p) for p, _ in flat)

  if method == "slerp":
    if t is None:
      raise ValueError("t: slerp needs an interpolation factor t")
    for spec in (t.values() if isinstance(t, Mapping) else [t]):
      _check_unit("t", list(spec) if isinstance(spec, (list, tuple)) else spec, lo_open=False)
    tmap = resolve_t(t, paths)
    ts = [jnp.float32(tmap[p]) for p in paths]
  else:
    ts = [None] * len(paths)

  if normalize is None:
    normalize = method in ("linear", "ties", "dare_ties")
  static = (("density", float(density)), ("normalize", bool(normalize)), ("threshold", threshold))
  # Outputs are placed like the reference tree's leaves: elementwise merges of sharded params stay
  # sharded, with no gather to one device.
  to_array = lambda tree: jax.tree.map(jnp.asarray, tree)
  ref = to_array(ref)
  shardings = tuple(x.sharding for x in jax.tree.leaves(ref))
  fn = _merge_fn(method, paths, treedef, static, shardings)
  base_arr = to_array(base) if needs_base else None
  return fn(base_arr, [to_array(m) for m in models], jnp.asarray(weights, jnp.float32),
            jnp.float32(lam), ts, jnp.uint32(seed))
