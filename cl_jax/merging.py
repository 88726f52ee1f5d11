"""Model merging on params pytrees: task vectors, linear, task arithmetic, TIES, DARE, SLERP.

Every method is one entry of the table `METHODS` (name -> `MergeMethod`): which parts of one per-tensor pipeline it
uses, which settings it reads (parameters named after its paper: `weights`, `lam`, `density`, `t`) and how they are
checked. `merge(method, base, models, **settings)` reads the entry, validates everything before any work and runs
the whole tree in one `jax.jit` whose outputs keep the reference tree's shardings (the base's, or the first model's
when there is no base). A merge run (`cl_jax.merge_run`) reads the same entry to check its config and to pick the
settings it passes on. Adding a method is adding an entry.

Notation: theta_base is the shared starting point, theta_i the fine-tuned models, w_i their weights,
tau_i = theta_i - theta_base their task vectors (Ilharco et al. 2023, "Editing models with task
arithmetic"). The pipeline, per tensor:

  tau_i'  = sparsify(tau_i, density) [/ density]   none | magnitude top-k (the TIES trim) | random drop (DARE);
                                                    the division is `rescale` (DARE's, which keeps E[tau_i'] = tau_i)
  m       = consensus(w_i tau_i')                  none: sum_i w_i tau_i' | sign: TIES's elected-sign disjoint sum
            [/ the weights that took part]         `normalize`: sum_i w_i, or the weight agreeing with the sign
  theta   = theta_base + lam * m                   (a method without task vectors returns m of the theta_i)

  linear            no task vectors, no sparsifier, no consensus: sum_i w_i theta_i / sum_i w_i (model soup)
  task_arithmetic   theta_base + lam * sum_i w_i tau_i                           (Ilharco et al. 2023)
  ties              magnitude trim -> sign election -> disjoint merge   (Yadav et al. 2023, "TIES-Merging")
  dare_linear       task arithmetic on DARE-sparsified tau_i (Yu et al. 2024, "Language models are
  dare_ties         TIES with DARE in place of the trim     Super Mario", DARE); 'dare' is dare_linear
  slerp             outside the pipeline: its own per-tensor function, spherical interpolation of two
                    models with per-path t (Shoemake 1985)

Two modes (`mode=`), which differ only where the papers leave a choice open:

  'mergekit' (the default) follows mergekit's (arcee-ai/mergekit) generalized task arithmetic and sparsification,
    so numbers can be checked against it:
    - the TIES trim keeps exactly k = max(1, int(density * n)) entries per tensor (int truncates: n=1024,
      density=0.4 keeps 409), the k largest |tau|; entries tied at the k-th magnitude are kept in flat
      (row-major) index order until k are kept, so the result is deterministic (mergekit's argsort leaves the
      order of ties unspecified);
    - the elected sign is +1 where the weighted sum is exactly 0 (gamma = +1 if sum_i w_i tau_i >= 0 else -1);
    - `normalize` divides task arithmetic / DARE-linear by sum_i w_i (1 when |sum_i w_i| < 1e-8), and TIES /
      DARE-TIES by the agreeing weight; defaults as in mergekit: True for linear and ties, False for
      task_arithmetic, dare_linear and dare_ties.
  'cl_jax' (this module's earlier behaviour): the trim keeps every entry with |tau| >= t, t the k-th largest
    magnitude with k = ceil(density * n), so ties at t may keep a few more than k and the result does not depend
    on the order of entries (and tensors above EXACT_TOPK_MAX entries may use a sampled threshold,
    `threshold='sample'`); a zero weighted sum elects no sign (the entry is 0); normalize defaults to True for
    linear, ties and dare_ties.
DARE's random drop is Bernoulli(density) with the 1/density rescale in both modes (mergekit's `rescale=True`);
its random stream is JAX's, so masks match mergekit's only in distribution.

Stacked transformer params (`stacked_blocks/...` [L, ...], `cl_jax.models.scan_layout`) are merged per layer slice: each
slice is the tensor the per-block layout's `block_{l}/...` would be (per-layer top-k, SLERP angles and t, DARE
masks), so both layouts merge to the same numbers.

Arithmetic runs in float32 (or wider, if the inputs are wider) and results are cast back to the
reference leaf's dtype. Non-floating leaves (step counters, int tables) are copied from the reference.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax.models.scan_layout import layer_axes, layer_path, path_str

Params = Any

# Tensors with at most this many entries get an exact top-k threshold (a sort of |x|); larger ones a
# sort-free estimate from a random sample (see `magnitude_threshold`).
EXACT_TOPK_MAX = 1 << 17
THRESHOLD_SAMPLE_SIZE = 1 << 16
# |cos(angle)| above this counts as colinear for SLERP; sin(angle) is then too small to divide by.
SLERP_COLINEAR_DOT = 0.9995

MODES = ("mergekit", "cl_jax")
# mergekit replaces a |sum of weights| below this by 1 before dividing (task arithmetic, DARE-linear).
WEIGHT_SUM_EPS = 1e-8


def _compute_dtype(*xs) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _check_mode(mode: str, fn: str) -> None:
  if mode not in MODES:
    raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")


def _check_density(density, fn: str) -> None:
  """0 < density <= 1 for a concrete number (a traced density cannot be checked and is taken as given)."""
  if isinstance(density, jax.core.Tracer):
    return
  d = np.asarray(density)
  if d.ndim != 0 or not np.issubdtype(d.dtype, np.number) or isinstance(density, bool):
    raise ValueError(f"{fn}: density must be a number in (0, 1], got {density!r}")
  if not (np.isfinite(d) and 0 < float(d) <= 1):
    raise ValueError(f"{fn}: density must be in (0, 1], got {float(d)!r}")


def _check_shapes(fn: str, named: Sequence[tuple[str, Any]]) -> None:
  """ValueError naming the first argument whose shape differs from the first one's."""
  (n0, x0), *rest = named
  for name, x in rest:
    if tuple(np.shape(x)) != tuple(np.shape(x0)):
      raise ValueError(f"{fn}: {name} has shape {tuple(np.shape(x))}, {n0} has {tuple(np.shape(x0))}")


def _check_models(fn: str, thetas: Sequence[Any], weights, base=None, base_name: str = "theta_base") -> None:
  if len(thetas) == 0:
    raise ValueError(f"{fn}: need at least one tensor to merge")
  named = ([(base_name, base)] if base is not None else []) + [(f"thetas[{i}]", t) for i, t in enumerate(thetas)]
  _check_shapes(fn, named)
  if weights is not None and tuple(np.shape(weights)) != (len(thetas),):
    raise ValueError(f"{fn}: weights must have shape ({len(thetas)},), one per tensor, got "
                     f"{tuple(np.shape(weights))}")


def _weight_divisor(weights: jax.Array, dt) -> jax.Array:
  """sum_i w_i, or 1 where |sum_i w_i| < WEIGHT_SUM_EPS (mergekit's guard against dividing by ~0)."""
  total = jnp.sum(weights).astype(dt)
  return jnp.where(jnp.abs(total) < WEIGHT_SUM_EPS, jnp.ones_like(total), total)


# ------------------------------------------------------------------------------------------------
# Per-tensor functions (pure, jittable; `thetas`/`taus` are sequences of same-shaped arrays)
# ------------------------------------------------------------------------------------------------

def task_vector(theta_ft: jax.Array, theta_base: jax.Array) -> jax.Array:
  """tau = theta_ft - theta_base (Ilharco et al. 2023)."""
  _check_shapes("task_vector", [("theta_base", theta_base), ("theta_ft", theta_ft)])
  return theta_ft - theta_base


def linear(thetas: Sequence[jax.Array], weights: jax.Array, normalize: bool = True) -> jax.Array:
  """Weighted average `sum_i w_i theta_i / sum_i w_i` (a plain weighted sum with normalize=False).

  With normalize, a |sum_i w_i| below WEIGHT_SUM_EPS divides by 1 instead (as mergekit does); `merge` rejects
  weights summing to 0 for 'linear' before that can happen.
  """
  _check_models("linear", thetas, weights)
  dt = _compute_dtype(*thetas)
  out = sum(weights[i].astype(dt) * thetas[i].astype(dt) for i in range(len(thetas)))
  if normalize:
    out = out / _weight_divisor(weights, dt)
  return out


def num_kept(size: int, density: float, mode: str = "mergekit") -> int:
  """How many entries a trim to `density` keeps out of `size`.

  mode='mergekit': k = max(1, int(density * size)) (int truncates: 1024 entries at density 0.4 keep 409);
  mode='cl_jax': k = ceil(density * size), at least 1 (410 there).
  """
  _check_mode(mode, "num_kept")
  _check_density(density, "num_kept")
  if mode == "mergekit":
    return max(1, min(size, int(float(density) * size)))
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


def _flat_cumsum(c: jax.Array) -> jax.Array:
  """Inclusive cumulative sum of `c` in row-major (flat index) order, without reshaping: the running sum
  along the last axis plus everything in the rows before (a sharded tensor is never flattened)."""
  if c.ndim <= 1:
    return jnp.cumsum(c)
  rows = jnp.sum(c, axis=-1)
  before = _flat_cumsum(rows) - rows
  return jnp.cumsum(c, axis=-1) + before[..., None]


def topk_mask(x: jax.Array, k: int) -> jax.Array:
  """Boolean mask of exactly k entries of x with the largest |x|, ties broken by flat index order.

  t = the k-th largest |x| (`kth_largest`); every |x| > t is kept, then entries with |x| = t in row-major
  index order until k are kept. Magnitudes are compared in float32.
  """
  n = int(np.prod(x.shape)) if x.ndim else 1
  if k >= n:
    return jnp.ones(x.shape, bool)
  mag = jnp.abs(x).astype(jnp.float32)
  t = kth_largest(mag, k)
  at_least = mag >= t

  def break_ties():  # only when entries tied at t straddle the k-th place (rare for trained weights)
    above, tied = mag > t, mag == t
    room = k - jnp.sum(above, dtype=jnp.int32)
    return above | (tied & (_flat_cumsum(tied.astype(jnp.int32)) <= room))

  return jax.lax.cond(jnp.sum(at_least, dtype=jnp.int32) == k, lambda: at_least, break_ties)


def magnitude_threshold(x: jax.Array, density: float, *, method: str = "auto",
                        sample_size: int = THRESHOLD_SAMPLE_SIZE, key: jax.Array | None = None,
                        mode: str = "mergekit") -> jax.Array:
  """A magnitude t such that keeping `|x| >= t` keeps the top `density` fraction of x's entries.

  method='exact': t is the k-th largest |x|, k = num_kept(n, density, mode), found by bit bisection
    (`kth_largest`: 31 passes over x). Keeping `|x| >= t` keeps exactly k entries unless ties straddle t
    (then a few more; `topk_mask` keeps exactly k).
  method='sample': for large tensors, one pass. t is the same order statistic of |x| at s = sample_size
    positions drawn uniformly with replacement from a fixed key (one gather of s entries, indexed per
    axis so a sharded x is never reshaped), found by bisection on the sample. The kept fraction is
    density within about sqrt(density (1 - density) / s) (one standard deviation; 0.16 % of n at
    density 0.2 and s = 2^16), with ties at t kept as above.
  method='auto': exact for n <= EXACT_TOPK_MAX entries, sample above.
  """
  _check_density(density, "magnitude_threshold")
  n = int(np.prod(x.shape)) if x.ndim else 1
  if method == "auto":
    method = "exact" if n <= EXACT_TOPK_MAX else "sample"
  if method == "exact":
    return kth_largest(jnp.abs(x), num_kept(n, density, mode))
  if method != "sample":
    raise ValueError(f"magnitude_threshold: method must be 'auto', 'exact' or 'sample', got {method!r}")
  key = jax.random.key(0) if key is None else key
  keys = jax.random.split(key, max(x.ndim, 1))
  idx = tuple(jax.random.randint(keys[d], (sample_size,), 0, x.shape[d]) for d in range(x.ndim))
  sample = jnp.abs(x[idx] if x.ndim else jnp.broadcast_to(x, (sample_size,)))
  return kth_largest(sample, num_kept(sample_size, density, mode))


def trim(tau: jax.Array, density: float, *, method: str = "auto", mode: str = "mergekit") -> jax.Array:
  """TIES step 1 (Yadav et al. 2023): zero all but the top `density` fraction of tau by magnitude.

  mode='mergekit': keeps exactly k = max(1, int(density * n)) entries, the largest |tau|, ties at the k-th
    magnitude broken by flat index order (lower index kept; `topk_mask`). method must be 'auto' or 'exact'.
  mode='cl_jax': `tau * [|tau| >= t]` with t from `magnitude_threshold` (k = ceil(density * n); every entry
    tied with t kept; method 'sample' or 'auto' uses a sampled t above EXACT_TOPK_MAX entries).
  density=1 is the identity in both.
  """
  _check_mode(mode, "trim")
  _check_density(density, "trim")
  if method not in ("auto", "exact", "sample"):
    raise ValueError(f"trim: method must be 'auto', 'exact' or 'sample', got {method!r}")
  if density >= 1.0:
    return tau
  if mode == "mergekit":
    if method == "sample":
      raise ValueError("trim: method='sample' keeps about, not exactly, k entries; it needs mode='cl_jax'")
    n = int(np.prod(tau.shape)) if tau.ndim else 1
    return jnp.where(topk_mask(tau, num_kept(n, density, mode)), tau, jnp.zeros_like(tau))
  t = magnitude_threshold(tau, density, method=method, mode=mode)
  return jnp.where(jnp.abs(tau) >= t, tau, jnp.zeros_like(tau))


def dare_mask(key: jax.Array, density: float, shape: Sequence[int]) -> jax.Array:
  """Bernoulli(density) keep-mask of DARE (Yu et al. 2024)."""
  _check_density(density, "dare_mask")
  return jax.random.bernoulli(key, density, tuple(shape))


def dare(tau: jax.Array, density: float, *, key: jax.Array | None = None,
         mask: jax.Array | None = None) -> jax.Array:
  """DARE (Yu et al. 2024): drop each entry with probability 1 - density, rescale survivors by 1/density.

  `tau * m / density`, m ~ Bernoulli(density) drawn from `key`, or the given boolean `mask`. The
  rescale keeps E[DARE(tau)] = tau, so the merged model's expected output is unchanged.
  """
  _check_density(density, "dare")
  if mask is not None:
    _check_shapes("dare", [("tau", tau), ("mask", mask)])
  if density >= 1.0 and mask is None:
    return tau
  if mask is None:
    if key is None:
      raise ValueError("dare: give a `key` (or a fixed `mask`)")
    mask = dare_mask(key, density, tau.shape)
  return jnp.where(mask, tau / jnp.asarray(density, tau.dtype), jnp.zeros_like(tau))


def elect_sign(weighted_taus: Sequence[jax.Array], mode: str = "mergekit") -> jax.Array:
  """TIES step 2: the sign of the total weighted mass per entry, s = sum_i w_i tau_i.

  mode='mergekit': gamma = +1 where s >= 0, else -1 (a tie elects +1); mode='cl_jax': gamma = sgn(s) (0 on a tie).
  """
  _check_mode(mode, "elect_sign")
  total = sum(weighted_taus)
  if mode == "mergekit":
    return jnp.where(total >= 0, jnp.ones_like(total), -jnp.ones_like(total))
  return jnp.sign(total)


def disjoint_merge(taus: Sequence[jax.Array], weights: jax.Array, normalize: bool = True,
                   mode: str = "mergekit") -> jax.Array:
  """TIES steps 2-3 on (already trimmed) task vectors.

  gamma = elect_sign(w_i tau_i); A_i = [sgn(w_i tau_i) = gamma and tau_i != 0];
  tau_m = sum_i A_i w_i tau_i, divided by sum_i A_i w_i with `normalize` (the paper's mean over the
  agreeing models, weighted). Entries where no model agrees are 0.
  """
  _check_models("disjoint_merge", taus, weights)
  dt = _compute_dtype(*taus)
  wt = [weights[i].astype(dt) * taus[i].astype(dt) for i in range(len(taus))]
  gamma = elect_sign(wt, mode)
  agree = [(jnp.sign(x) == gamma) & (x != 0) for x in wt]
  num = sum(jnp.where(a, x, 0) for a, x in zip(agree, wt))
  if not normalize:
    return num
  den = sum(jnp.where(a, weights[i].astype(dt), 0) for i, a in enumerate(agree))
  return jnp.where(den != 0, num / jnp.where(den != 0, den, 1), 0)


def slerp(theta_a: jax.Array, theta_b: jax.Array, t: float | jax.Array,
          colinear_dot: float = SLERP_COLINEAR_DOT) -> jax.Array:
  """Spherical linear interpolation (Shoemake 1985) of two tensors seen as flat float32 vectors.

  Omega = arccos(<a, b> / (|a| |b|)); slerp = sin((1-t) Omega)/sin(Omega) a + sin(t Omega)/sin(Omega) b.
  When |cos Omega| > colinear_dot (or either vector is zero) sin(Omega) is ~0 and the formula is
  ill-conditioned, so it falls back to lerp = (1-t) a + t b (the limit as Omega -> 0). Reductions run
  over all axes, so a sharded tensor is never reshaped. t=0 gives a and t=1 gives b.
  """
  _check_shapes("slerp", [("theta_a", theta_a), ("theta_b", theta_b)])
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
# Methods as parts: the pipeline's parts, the `MergeMethod` entry, the table
# ------------------------------------------------------------------------------------------------

# Sparsifiers, fn(tau, density, *, key, mask, rescale, threshold, mode) -> tau'. Each is called on one model's task
# vector; `key` / `mask` are that model's random stream or fixed mask (only the random drop reads them).

def _keep_all(tau, density, *, key, mask, rescale, threshold, mode):
  """No sparsifier: tau' = tau."""
  del density, key, mask, rescale, threshold, mode
  return tau


def _magnitude_top_k(tau, density, *, key, mask, rescale, threshold, mode):
  """The TIES trim (`trim`): the top-`density` fraction of |tau| per tensor; `rescale` divides survivors by density."""
  del key, mask
  out = trim(tau, density, method=threshold, mode=mode)
  return out / jnp.asarray(density, out.dtype) if rescale else out


def _random_drop(tau, density, *, key, mask, rescale, threshold, mode):
  """DARE's drop: keep each entry with probability density (drawn from `key`, or the fixed boolean `mask`); with
  `rescale` the survivors are divided by density (`dare`), so E[tau'] = tau."""
  del threshold, mode
  if rescale:
    return dare(tau, density, key=key, mask=mask)
  if mask is None:
    if density >= 1.0:
      return tau
    mask = dare_mask(key, density, tau.shape)
  return jnp.where(mask, tau, jnp.zeros_like(tau))


SPARSIFIERS: dict[str, Callable] = {"none": _keep_all, "magnitude": _magnitude_top_k, "random": _random_drop}


# Consensus, fn(taus, weights, normalize, mode) -> m: how the (sparsified) weighted vectors become one.

def _weighted_sum(taus, weights, normalize, mode):
  """No consensus: m = sum_i w_i tau_i, divided by sum_i w_i with `normalize` (`linear`)."""
  del mode
  return linear(taus, weights, normalize)


CONSENSUS: dict[str, Callable] = {"none": _weighted_sum, "sign": disjoint_merge}


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


# The settings a method can read, each with its check, fn(label, value) raising ValueError that names `label`.
# Their order is the order a merge run passes (and results.json records) them in.

def _check_lam(label: str, lam) -> None:
  if isinstance(lam, bool) or not (isinstance(lam, numbers.Real) and math.isfinite(lam)):
    raise ValueError(f"{label} must be a finite number, got {lam!r}")


def _check_density_setting(label: str, density) -> None:
  _check_unit(label, density, lo_open=True)


def _check_normalize(label: str, normalize) -> None:
  if normalize not in (None, True, False):
    raise ValueError(f"{label} must be True, False or None (the method's default), got {normalize!r}")


def _check_t(label: str, t) -> None:
  """A number, a list of anchors over depth, or a {regex: number or list} dict (see `resolve_t`), all in [0, 1]."""
  if t is None:
    raise ValueError(f"{label}: give an interpolation factor t in [0, 1]")
  for spec in (t.values() if isinstance(t, Mapping) else [t]):
    _check_unit(label, list(spec) if isinstance(spec, (list, tuple)) else spec, lo_open=False)


SETTINGS: dict[str, Callable[[str, Any], None]] = {
    "lam": _check_lam,                  # the scale of the merged task vector (Ilharco et al. 2023's lambda)
    "density": _check_density_setting,  # the sparsifier's kept fraction, in (0, 1]
    "normalize": _check_normalize,      # divide by the weights that took part (None: the method's default)
    "t": _check_t,                      # SLERP's interpolation factor(s), in [0, 1]
}


def check_setting(name: str, value, label: str | None = None) -> None:
  """ValueError naming `label` (default `name`) when `value` is not a valid value of setting `name`."""
  SETTINGS[name](label or name, value)


@dataclasses.dataclass(frozen=True)
class MergeMethod:
  """One merge method as parts of the per-tensor pipeline (see the module docstring); the values of `METHODS`.

  sparsify: a key of SPARSIFIERS: 'none', 'magnitude' (the TIES trim: the top-`density` |tau| per tensor) or
    'random' (DARE's Bernoulli(density) drop). A sparsifier reads `density`, so 'density' must be in `settings`.
  rescale: divide the sparsifier's survivors by density (DARE's rescale; needs a sparsifier).
  consensus: a key of CONSENSUS: 'none' (a weighted sum) or 'sign' (TIES's sign election and disjoint merge,
    which needs weights >= 0).
  normalize: the modes (of MODES) in which `normalize=None` means True: divide by the weights that took part
    (sum_i w_i without consensus, the weight agreeing with the elected sign with it).
  task_vectors: merge tau_i = theta_i - theta_base (needs a base; the result is theta_base + lam * m). False
    merges the models themselves (no base, no lam).
  settings: the names of SETTINGS the method reads, kept in SETTINGS order. `merge` checks these; a merge run
    checks and passes on exactly these from its `merge.*` section (`merge` also takes `normalize` for every
    pipeline method, listed or not).
  per_tensor: a method outside the pipeline, as its own function fn(thetas, weights, t) -> tensor (SLERP); it
    takes neither sparsifier nor consensus nor task vectors.
  num_models: the exact number of models it merges (None: any number from 1).
  """
  sparsify: str = "none"
  consensus: str = "none"
  normalize: tuple[str, ...] = ()
  rescale: bool = False
  task_vectors: bool = True
  settings: tuple[str, ...] = ()
  per_tensor: Callable | None = None
  num_models: int | None = None

  def __post_init__(self):
    # An entry is checked where it is written, so a bad one fails at import (or in the test adding it), not
    # halfway through a merge.
    if self.sparsify not in SPARSIFIERS:
      raise ValueError(f"MergeMethod: sparsify must be one of {tuple(SPARSIFIERS)}, got {self.sparsify!r}")
    if self.consensus not in CONSENSUS:
      raise ValueError(f"MergeMethod: consensus must be one of {tuple(CONSENSUS)}, got {self.consensus!r}")
    bad = [s for s in self.settings if s not in SETTINGS] + [m for m in self.normalize if m not in MODES]
    if isinstance(self.settings, str) or isinstance(self.normalize, str) or bad:
      raise ValueError(f"MergeMethod: settings are tuples of {tuple(SETTINGS)} and normalize of {MODES}; got "
                       f"settings={self.settings!r}, normalize={self.normalize!r}")
    if self.sparsify != "none" and "density" not in self.settings:
      raise ValueError(f"MergeMethod: sparsify={self.sparsify!r} reads density; list 'density' in settings")
    if self.rescale and self.sparsify == "none":
      raise ValueError("MergeMethod: rescale divides a sparsifier's survivors by density; it needs a sparsifier")
    if self.per_tensor is not None and (self.sparsify, self.consensus, self.task_vectors) != ("none", "none", False):
      raise ValueError("MergeMethod: a per_tensor method is its own function: no sparsify, consensus or task_vectors")
    object.__setattr__(self, "settings", tuple(s for s in SETTINGS if s in self.settings))
    object.__setattr__(self, "normalize", tuple(m for m in MODES if m in self.normalize))

  def default_normalize(self, mode: str) -> bool:
    return mode in self.normalize


def _merge_tensor(m: MergeMethod, theta_base: jax.Array | None, thetas: Sequence[jax.Array], weights: jax.Array, *,
                  lam: float | jax.Array = 1.0, density: float = 1.0, normalize: bool = False, t=None,
                  keys: Sequence[jax.Array] | None = None, masks: Sequence[jax.Array] | None = None,
                  threshold: str = "auto", mode: str = "mergekit") -> jax.Array:
  """One tensor merged by method `m`: sparsify each tau_i, combine by the consensus, normalize, scale by lam.

  Arithmetic runs in the promoted float dtype (at least float32) of the inputs; the caller checks the arguments.
  """
  if m.per_tensor is not None:
    return m.per_tensor(thetas, weights, t)
  n = len(thetas)
  if m.sparsify == "random":
    if masks is not None and len(masks) != n:
      raise ValueError(f"dare: {len(masks)} masks for {n} models")
    if masks is None and keys is None:
      raise ValueError("dare: give `keys` (one per model) or fixed `masks`")
    if masks is None and len(keys) != n:
      raise ValueError(f"dare: {len(keys)} keys for {n} models")
  keys = [None] * n if keys is None or masks is not None else keys
  masks = [None] * n if masks is None else masks
  if m.task_vectors:
    dt = _compute_dtype(theta_base, *thetas)
    base = theta_base.astype(dt)
    vecs = [x.astype(dt) - base for x in thetas]
  else:
    dt = _compute_dtype(*thetas)
    vecs = [x.astype(dt) for x in thetas]
  sparsify = SPARSIFIERS[m.sparsify]
  vecs = [sparsify(v, density, key=k, mask=mk, rescale=m.rescale, threshold=threshold, mode=mode)
          for v, k, mk in zip(vecs, keys, masks)]
  merged = CONSENSUS[m.consensus](vecs, weights, normalize, mode)
  return base + jnp.asarray(lam, dt) * merged if m.task_vectors else merged


def _slerp_two(thetas: Sequence[jax.Array], weights, t) -> jax.Array:
  """SLERP's entry: the two models interpolated by t (weights are not read)."""
  del weights
  return slerp(thetas[0], thetas[1], t)


# The table. Defaults of `normalize` per mode as in the module docstring (mergekit's: True for linear and ties).
# task_arithmetic and dare_linear do not list 'normalize' among their settings: a merge run's `merge.normalize`
# (default True, written for linear / TIES) leaves them at mergekit's False, as it always has; `merge(...,
# normalize=True)` still divides them by sum_i w_i.
LINEAR = MergeMethod(task_vectors=False, normalize=("mergekit", "cl_jax"), settings=("normalize",))
TASK_ARITHMETIC = MergeMethod(settings=("lam",))
TIES = MergeMethod(sparsify="magnitude", consensus="sign", normalize=("mergekit", "cl_jax"),
                   settings=("lam", "density", "normalize"))
DARE_LINEAR = MergeMethod(sparsify="random", rescale=True, settings=("lam", "density"))
DARE_TIES = MergeMethod(sparsify="random", rescale=True, consensus="sign", normalize=("cl_jax",),
                        settings=("lam", "density", "normalize"))
SLERP = MergeMethod(task_vectors=False, per_tensor=_slerp_two, num_models=2, settings=("t",))

METHODS: dict[str, MergeMethod] = {
    "linear": LINEAR,
    "task_arithmetic": TASK_ARITHMETIC,
    "ties": TIES,
    "dare": DARE_LINEAR,  # an alias: mergekit's dare_linear
    "dare_linear": DARE_LINEAR,
    "dare_ties": DARE_TIES,
    "slerp": SLERP,
}


# The named per-tensor methods: their table entry on one tensor, with arguments checked under their own name.

def task_arithmetic(theta_base: jax.Array, thetas: Sequence[jax.Array], weights: jax.Array,
                    lam: float | jax.Array = 1.0, normalize: bool = False) -> jax.Array:
  """`theta_base + lam * sum_i w_i (theta_i - theta_base) [/ sum_i w_i]` (Ilharco et al. 2023).

  normalize=True divides the weighted sum of task vectors by sum_i w_i (1 if |sum_i w_i| < 1e-8), as
  mergekit's `normalize` does; the default (False) is mergekit's default for task arithmetic.
  """
  _check_models("task_arithmetic", thetas, weights, theta_base)
  return _merge_tensor(TASK_ARITHMETIC, theta_base, thetas, weights, lam=lam, normalize=normalize)


def ties(theta_base: jax.Array, thetas: Sequence[jax.Array], weights: jax.Array, density: float,
         lam: float | jax.Array = 1.0, normalize: bool = True, *, threshold: str = "auto",
         mode: str = "mergekit") -> jax.Array:
  """TIES-Merging (Yadav et al. 2023): theta_base + lam * disjoint_merge(trim(tau_i, density)).

  Trim each tau_i = theta_i - theta_base to its top-`density` magnitudes (per tensor), elect the sign
  per entry from the weighted sum, and merge the weighted entries agreeing with it (see `trim` and
  `disjoint_merge`; `mode` as there). With density=1 and no sign conflicts and normalize=False this is
  task arithmetic.
  """
  _check_mode(mode, "ties")
  _check_density(density, "ties")
  _check_models("ties", thetas, weights, theta_base)
  return _merge_tensor(TIES, theta_base, thetas, weights, lam=lam, density=density, normalize=normalize,
                       threshold=threshold, mode=mode)


def dare_linear(theta_base: jax.Array, thetas: Sequence[jax.Array], weights: jax.Array, density: float,
                lam: float | jax.Array = 1.0, normalize: bool = False, *,
                keys: Sequence[jax.Array] | None = None, masks: Sequence[jax.Array] | None = None) -> jax.Array:
  """DARE + task arithmetic: theta_base + lam * sum_i w_i DARE(tau_i) (Yu et al. 2024).

  DARE(tau) = tau * m / density, m ~ Bernoulli(density) from `keys` (one per model) or the fixed `masks`.
  With `normalize` the sum is divided by sum_i w_i (a weighted mean of the sparsified task vectors; 1 when
  |sum_i w_i| < 1e-8, as mergekit does).
  """
  _check_density(density, "dare_linear")
  _check_models("dare_linear", thetas, weights, theta_base)
  return _merge_tensor(DARE_LINEAR, theta_base, thetas, weights, lam=lam, density=density, normalize=normalize,
                       keys=keys, masks=masks)


def dare_ties(theta_base: jax.Array, thetas: Sequence[jax.Array], weights: jax.Array, density: float,
              lam: float | jax.Array = 1.0, normalize: bool = True, *,
              keys: Sequence[jax.Array] | None = None, masks: Sequence[jax.Array] | None = None,
              mode: str = "mergekit") -> jax.Array:
  """DARE-TIES: TIES sign election and disjoint merge on DARE-sparsified task vectors (Yu et al. 2024)."""
  _check_mode(mode, "dare_ties")
  _check_density(density, "dare_ties")
  _check_models("dare_ties", thetas, weights, theta_base)
  return _merge_tensor(DARE_TIES, theta_base, thetas, weights, lam=lam, density=density, normalize=normalize,
                       keys=keys, masks=masks, mode=mode)


# ------------------------------------------------------------------------------------------------
# Pytree level
# ------------------------------------------------------------------------------------------------

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
  lo = min(math.floor(x), len(anchors) - 2)
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


def depth_schedule(t: float, anchors: Sequence[float] = ()) -> float | dict:
  """A SLERP t spec for `resolve_t` from one factor and optional anchors over depth: `t` alone, or the anchors for
  every path with a layer number (`layer_index`) and `t` for the rest (embeddings, head)."""
  anchors = [float(a) for a in anchors]
  return {_LAYER_RE.pattern: anchors, "default": float(t)} if anchors else float(t)


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
def _merge_fn(m: MergeMethod, paths: tuple, static: tuple, shardings: tuple) -> Callable:
  """One jitted function per (method entry, leaves, static params, shardings): the leaves in one program."""
  st = dict(static)

  def per_leaf(path, ref, base, thetas, weights, lam, t, seed):
    if not _is_float(ref):
      return ref
    if not layer_axes(path) or ref.ndim == 0:
      return one(ref, base, thetas, weights, lam, t, [_leaf_key(seed, path, i) for i in range(len(thetas))])
    # A stacked transformer leaf (`stacked_blocks/...` [L, ...]): each layer slice is the tensor, as `block_{l}/...`
    # is in the per-block layout (TIES's top-k, SLERP's angle and t, DARE's masks are per layer; the same numbers).
    keys = [jnp.stack([_leaf_key(seed, layer_path(path, l), i) for l in range(ref.shape[0])])
            for i in range(len(thetas))]
    return jax.vmap(lambda r, b, th, tl, ks: one(r, b, th, weights, lam, tl, ks))(ref, base, thetas, t, keys)

  def one(ref, base, thetas, weights, lam, t, keys):
    out = _merge_tensor(m, base, thetas, weights, lam=lam, density=st["density"], normalize=st["normalize"], t=t,
                        keys=keys, threshold=st["threshold"], mode=st["mode"])
    return out.astype(ref.dtype)

  def merge_leaves(refs, bases, model_leaves, weights, lam, ts, seed):
    bases = bases if bases is not None else [None] * len(refs)
    return [per_leaf(p, refs[j], bases[j], [ml[j] for ml in model_leaves], weights, lam, ts[j], seed)
            for j, p in enumerate(paths)]

  return jax.jit(merge_leaves, out_shardings=list(shardings))


def _device_ids(sharding) -> tuple:
  return tuple(sorted(d.id for d in sharding.device_set))


_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def merge(method: str, base: Params | None, models: Sequence[Params], *, weights: Sequence[float] | None = None,
          lam: float = 1.0, density: float = 1.0, normalize: bool | None = None, t=None, seed: int = 0,
          threshold: str = "auto", mode: str = "mergekit") -> Params:
  """Merge fine-tuned `models` (params pytrees, sharded or not) into one params pytree.

  method: a name in `METHODS`; its entry says what it reads. 'linear' (weights, normalize; base unused),
  'task_arithmetic' (weights, lam, normalize), 'ties' (weights, density, lam, normalize, threshold), 'dare_linear'
  or its alias 'dare' (weights, density, lam, normalize, seed), 'dare_ties' (weights, density, lam, normalize,
  seed), 'slerp' (exactly two models, t: number, depth gradient list or {regex: ...} dict, see `resolve_t`; base
  unused). Settings a method does not read are ignored.
  mode: 'mergekit' (default) or 'cl_jax', see the module docstring; normalize=None takes the entry's default for
  the mode (mergekit: True for linear and ties, False otherwise; cl_jax: True for linear, ties and dare_ties).
  threshold ('auto' | 'exact' | 'sample') only matters in mode='cl_jax'; mergekit mode always keeps exactly k.
  weights default to 1 per model (so 'linear' is the plain mean). See the per-tensor functions for
  the formulas. Everything is validated before any computation: an unknown method or mode, trees that differ
  (the offending path is named), a setting the method reads failing its check in `SETTINGS` (density outside
  (0, 1], t outside [0, 1], a lam that is not finite), a weight count that is not the model count, or negative
  weights for the sign-electing methods raise ValueError.
  The result has the reference tree's structure, dtypes and shardings (base, or models[0] when base
  is None or unused). Every input leaf is first placed like the reference leaf, so trees may mix sharded
  and single-device leaves (and base and models may be placed differently); leaves on the same devices are
  merged in one jitted program, one program per distinct device set.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
  m = METHODS[method]
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  models = list(models)
  if not models:
    raise ValueError("models: need at least one model to merge")
  if m.task_vectors and base is None:
    raise ValueError(f"base: method {method!r} merges task vectors and needs the base params")
  if m.num_models is not None and len(models) != m.num_models:
    raise ValueError(f"models: {method} merges exactly {_COUNT_WORDS.get(m.num_models, m.num_models)} models, "
                     f"got {len(models)}")
  if weights is None:
    weights = [1.0] * len(models)
  weights = [float(w) for w in weights]
  if len(weights) != len(models):
    raise ValueError(f"weights: got {len(weights)} weights for {len(models)} models")
  if not all(math.isfinite(w) for w in weights):
    raise ValueError(f"weights must be finite, got {weights}")
  if m.consensus == "sign" and any(w < 0 for w in weights):
    raise ValueError(f"weights must be >= 0 for {method} (sign election), got {weights}")
  settings = {"lam": lam, "density": density, "normalize": normalize, "t": t}
  for name in m.settings:
    check_setting(name, settings[name])
  normalize = m.default_normalize(mode) if normalize is None else bool(normalize)
  # A weighted mean of the models themselves has nothing to fall back on when the weights cancel (task vector
  # methods divide by 1 instead, as mergekit does).
  if not m.task_vectors and m.per_tensor is None and normalize and sum(weights) == 0:
    raise ValueError(f"weights sum to 0; {method} cannot normalize by them: {weights}")
  if threshold not in ("auto", "exact", "sample"):
    raise ValueError(f"threshold must be 'auto', 'exact' or 'sample', got {threshold!r}")
  if mode == "mergekit" and threshold == "sample" and m.sparsify == "magnitude":
    raise ValueError("threshold='sample' keeps about, not exactly, k entries; it needs mode='cl_jax'")

  trees = ([base] if m.task_vectors else []) + models
  names = (["base"] if m.task_vectors else []) + [f"models[{i}]" for i in range(len(models))]
  check_compatible(trees, names)
  ref = trees[0]
  flat, treedef = jax.tree.flatten_with_path(ref)
  paths = tuple(path_str(p) for p, _ in flat)

  if "t" in m.settings:
    # A stacked leaf's t is one per layer, resolved on its layers' per-block paths (so depth gradients and
    # patterns such as 'block_3/' apply to it exactly as to the per-block layout).
    layers = {p: [layer_path(p, l) for l in range(np.shape(x)[0])] for p, x in zip(paths, jax.tree.leaves(ref))
              if layer_axes(p) and np.ndim(x)}
    tmap = resolve_t(t, [q for p in paths for q in layers.get(p, [p])])
    ts = [jnp.asarray([tmap[q] for q in layers[p]], jnp.float32) if p in layers else jnp.float32(tmap[p])
          for p in paths]
  else:
    ts = [None] * len(paths)

  static = (("density", float(density)), ("normalize", normalize), ("threshold", threshold), ("mode", mode))
  # Outputs are placed like the reference tree's leaves: elementwise merges of sharded params stay
  # sharded, with no gather to one device. Inputs placed elsewhere are moved there first (jit refuses
  # committed arguments on different devices), and leaves are grouped by device set for the same reason.
  refs = [jnp.asarray(x) for x in jax.tree.leaves(ref)]
  shardings = [x.sharding for x in refs]
  place = lambda tree: [jax.device_put(jnp.asarray(x), s) for x, s in zip(jax.tree.leaves(tree), shardings)]
  bases = place(base) if m.task_vectors else None
  model_leaves = [place(x) for x in models]
  groups: dict[tuple, list[int]] = {}
  for j, s in enumerate(shardings):
    groups.setdefault(_device_ids(s), []).append(j)
  w = jnp.asarray(weights, jnp.float32)
  out = [None] * len(refs)
  for idx in groups.values():
    fn = _merge_fn(m, tuple(paths[j] for j in idx), static, tuple(shardings[j] for j in idx))
    pick = lambda leaves, idx=idx: [leaves[j] for j in idx]
    res = fn(pick(refs), pick(bases) if bases is not None else None, [pick(ml) for ml in model_leaves], w,
             jnp.float32(lam), pick(ts), jnp.uint32(seed))
    for j, r in zip(idx, res):
      out[j] = r
  return jax.tree.unflatten(treedef, out)
