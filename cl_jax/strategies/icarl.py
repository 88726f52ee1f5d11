"""iCaRL (Rebuffi, Kolesnikov, Sperl & Lampert 2017, "iCaRL: Incremental Classifier and Representation Learning").

Class-incremental only (`scenario.kind='class'`). Three parts:

Exemplars. At the end of each task, with K = `icarl.capacity` and m = K // (classes seen), every old class's exemplar
list is cut to its first m entries and every new class gets m exemplars chosen by herding on L2-normalised features
φ(x) (the model's penultimate layer, `learner.apply(params, x, task, method='features')`): with μ the class mean,

  p_k = argmin_i ‖ μ − (φ(x_i) + Σ_{j<k} φ(x_{p_j})) / k ‖   over examples not chosen yet   (k = 1..m),

so the first exemplars approximate the class mean best; the list order is kept, which is what makes cutting it to
its first m entries the paper's ReduceExemplarSet.

Representation learning. Each step trains on the current batch plus `icarl.batch_size` exemplars drawn uniformly, with
the sum over the classes seen of binary cross-entropies on the sigmoid of the logits:

  ℓ(x) = Σ_{c seen} BCE(σ(z_c(x)), t_c),   t_c = [y = c] for the current task's classes,
                                           t_c = σ(z*_c(x)) for earlier classes (z*: the network at the last task end),

averaged over the examples. The task loss of the chain is replaced (iCaRL's loss is the whole objective), so chain it
only with strategies that add terms outside the classification loss.

Classification (the strategy's `predict` hook): nearest mean of exemplars,

  y* = argmin_c ‖ φ(x)/‖φ(x)‖ − μ_c ‖,   μ_c = normalised mean of the normalised features of class c's exemplars,

with the means computed at each task end from the params then (the params every boundary evaluation scores).

Reference-code fidelity (opt-in; the defaults are the algorithm above). The DER paper's iCaRL rows (Buzzega et al.
2020, Table 2) come from mammoth's `models/icarl.py` (aimagelab/mammoth 5dc82be, "Fix denorm in icarl"), which
differs from the paper's algorithm in four ways, each a key here (results/der_protocol.md measures them):
  `loss_mean=True`           BCE averaged over the seen classes (torch's `binary_cross_entropy_with_logits` mean)
                             instead of summed: the step is 1/(classes seen) as large.
  `features='raw'`           herding, class means and the nearest-mean distance on unnormalised features.
  `replay='dataset'`         the exemplars join the next task's training set (each seen once per epoch, mixed into
                             the batches) instead of `batch_size` drawn every step. Emulated in expectation: the
                             loss is (Σ_batch ℓ + λ Σ_drawn ℓ) / B with λ = E·B / (N·b), E the exemplars held, B the
                             batch size, b = `batch_size` draws, N the size of the task (taken as that of the task
                             before, which is what the state knows), so a task's summed gradient is that of one pass
                             over its N examples and E exemplars in batches of B.
  `exemplar_input='uint8_cast'` the copies of the exemplars that are trained on are `floor(x) / 255`: mammoth adds
                             them to the training set as `tensor.type(torch.uint8)` of the [0, 1] floats, which
                             truncates every pixel below 1 to 0 (MNIST's saturated pixels become 1/255), then reads
                             them back through `ToTensor`. Inputs are assumed in [0, 1]. The nearest-mean classifier's
                             exemplars (mammoth's buffer) stay exact.

State: {'x', 'y', 'task' [K, ...], 'rank' [K] (herding position, -1 = empty slot), 'teacher' (params), 'means'
[C, D], 'has_mean' [C], 'task_size' (examples in the last task trained, for `replay='dataset'`)}. The exemplars are not a `buffer.Buffer` (whose valid slots are its first `size`): cutting
every list to its first m entries frees slots all over the memory, and they stay where they are, because moving the
kept exemplars to the front would change which ones the uniform draw over filled slots picks, and so the published
runs (results/split_mnist).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cl_jax.losses import MASK_VALUE
from cl_jax.strategies.base import LossContext, Strategy

_EXEMPLAR_STREAM = 0x1CA1


def default_config() -> ml_collections.ConfigDict:
  """The `icarl` config section."""
  return ml_collections.ConfigDict(dict(
      capacity=2000,     # K: exemplars over all classes (Rebuffi et al. use 2000 on CIFAR-100)
      batch_size=32,     # exemplars added to every training batch
      # Fidelity to the DER paper's reference code (module docstring); the defaults are Rebuffi et al.'s algorithm.
      loss_mean=False,            # True: BCE averaged over the seen classes instead of summed
      features="normalized",      # 'raw': herding and nearest mean on unnormalised features
      replay="batch",             # 'dataset': exemplars weighted as if they joined the task's training set
      exemplar_input="exact",     # 'uint8_cast': trained-on exemplar copies are floor(x) / 255
  ))


def normalize(f):
  return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def herding(features: np.ndarray, m: int) -> np.ndarray:
  """Indices of m examples chosen by herding (module docstring) from L2-normalised `features` [n, D]."""
  f = np.asarray(features, np.float64)
  mu = f.mean(0)
  chosen, running = [], np.zeros_like(mu)
  available = np.ones(len(f), bool)
  for k in range(1, min(m, len(f)) + 1):
    dist = np.linalg.norm(mu[None] - (running[None] + f) / k, axis=1)
    dist[~available] = np.inf
    i = int(np.argmin(dist))
    chosen.append(i)
    available[i] = False
    running += f[i]
  return np.asarray(chosen, np.int64)


def check_config(config) -> None:
  """Raises ValueError naming the bad `icarl.*` key (or the scenario it cannot run)."""
  ic = config.icarl
  if int(ic.capacity) < 1:
    raise ValueError(f"icarl.capacity={ic.capacity}: expected a positive number of exemplars")
  if int(ic.batch_size) < 1:
    raise ValueError(f"icarl.batch_size={ic.batch_size}: expected a positive batch size")
  for key, allowed in (("features", ("normalized", "raw")), ("replay", ("batch", "dataset")),
                       ("exemplar_input", ("exact", "uint8_cast"))):
    if ic.get(key, allowed[0]) not in allowed:
      raise ValueError(f"icarl.{key}={ic.get(key)!r}: expected one of {', '.join(map(repr, allowed))}")
  kind = config.scenario.get("kind", "class") if "scenario" in config else "class"
  if kind != "class":
    raise ValueError(f"scenario.kind={kind!r}: iCaRL is a class-incremental method; use scenario.kind='class'")


def icarl(config, learner) -> Strategy:
  """iCaRL from `config.icarl`; see the module docstring."""
  check_config(config)
  ic = config.icarl
  capacity, batch_size = int(ic.capacity), int(ic.batch_size)
  loss_mean = bool(ic.get("loss_mean", False))
  raw = ic.get("features", "normalized") == "raw"
  dataset_replay = ic.get("replay", "batch") == "dataset"
  uint8_cast = ic.get("exemplar_input", "exact") == "uint8_cast"
  norm = (lambda f: f) if raw else normalize

  def features(params, x, task):
    return learner.apply(params, x, task, method="features").astype(jnp.float32)

  features_jit = jax.jit(features)

  def init(params, task_info):
    probe = jax.eval_shape(features, params, jnp.zeros((1, *task_info.input_shape), jnp.float32),
                           jnp.zeros((1,), jnp.int32))
    c, d = int(task_info.num_outputs), int(probe.shape[-1])
    return dict(x=jnp.zeros((capacity, *task_info.input_shape), jnp.float32), y=jnp.zeros((capacity,), jnp.int32),
                task=jnp.zeros((capacity,), jnp.int32), rank=jnp.full((capacity,), -1, jnp.int32),
                teacher=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
                means=jnp.zeros((c, d), jnp.float32), has_mean=jnp.zeros((c,), bool), task_size=jnp.float32(1))

  def loss(loss_fn):
    del loss_fn  # iCaRL's objective replaces the classification loss (module docstring)

    def icarl_loss(params, batch, ctx: LossContext):
      st = ctx.strategy_state
      ti = ctx.task_index
      filled = st["rank"] >= 0
      # Exemplars drawn uniformly among the filled slots (weight 0 while there are none).
      p = filled.astype(jnp.float32) / jnp.maximum(jnp.sum(filled), 1)
      idx = jax.random.choice(jax.random.fold_in(ctx.rng, _EXEMPLAR_STREAM), capacity, (batch_size,), p=p)
      xe = st["x"][idx]
      if uint8_cast:   # mammoth's `.type(torch.uint8)` of [0, 1] floats, read back / 255 (module docstring)
        xe = jnp.floor(xe) / 255.0
      x = jnp.concatenate([batch["x"].astype(jnp.float32), xe])
      y = jnp.concatenate([batch["y"].astype(jnp.int32), st["y"][idx]])
      task = jnp.concatenate([batch["task"].astype(jnp.int32), st["task"][idx]])
      weight = jnp.concatenate([jnp.ones(batch["y"].shape[0]), jnp.full((batch_size,), jnp.any(filled), jnp.float32)])
      z = learner.apply(params, x, task).astype(jnp.float32)
      seen = learner.logit_mask(jnp.full_like(task, ti), ti)
      if seen is None:   # the old classes are read off the class-IL mask
        raise ValueError("icarl: needs the class-IL mask of unseen classes (scenario.mask_unseen=True)")
      prev = jnp.maximum(ti - 1, 0)
      old = (ti > 0) & learner.logit_mask(jnp.full_like(task, prev), prev)   # classes of earlier tasks
      teacher = jax.nn.sigmoid(jax.lax.stop_gradient(learner.apply(st["teacher"], x, task).astype(jnp.float32)))
      target = jnp.where(old, teacher, jax.nn.one_hot(y, z.shape[-1]))
      bce = jnp.maximum(z, 0) - z * target + jnp.log1p(jnp.exp(-jnp.abs(z)))   # BCE with logits, stable
      per_example = jnp.sum(jnp.where(seen, bce, 0.0), -1)
      if loss_mean:
        per_example = per_example / jnp.maximum(jnp.sum(seen, -1), 1)
      if dataset_replay:   # λ = E·B / (N·b) per drawn exemplar, the sum over B (module docstring)
        n_batch = batch["y"].shape[0]
        lam = jnp.sum(filled) * n_batch / (st["task_size"] * batch_size)
        weight = jnp.concatenate([jnp.ones(n_batch), jnp.full((batch_size,), lam, jnp.float32)])
        value = jnp.sum(weight * per_example) / n_batch
      else:
        value = jnp.sum(weight * per_example) / jnp.sum(weight)
      return value, {"icarl_loss": value, "_raw_logits": z[:batch["y"].shape[0]]}
    return icarl_loss

  def after_task(state, params, task_data, rng):
    del rng
    y_mem, rank = np.array(state["y"]), np.array(state["rank"])   # writable host copies
    x_mem, t_mem = np.array(state["x"]), np.array(state["task"])
    new_classes = np.unique(task_data.y)
    old_classes = np.unique(y_mem[rank >= 0])
    m = capacity // max(len(set(old_classes.tolist()) | set(new_classes.tolist())), 1)
    rank = np.where(rank < m, rank, -1)                    # ReduceExemplarSet: keep each list's first m
    free = list(np.flatnonzero(rank < 0))
    for c in new_classes:
      xs = np.asarray(task_data.x)[task_data.y == c].astype(np.float32)
      ts = np.asarray(task_data.task)[task_data.y == c].astype(np.int32)
      f = np.asarray(norm(features_jit(params, jnp.asarray(xs), jnp.asarray(ts))))
      for r, i in enumerate(herding(f, m)):
        slot = free.pop(0)
        x_mem[slot], y_mem[slot], t_mem[slot], rank[slot] = xs[i], c, ts[i], r
    # Class means of the exemplars' normalised features, with the params every boundary evaluation scores.
    valid = rank >= 0
    f = np.asarray(norm(features_jit(params, jnp.asarray(x_mem), jnp.asarray(t_mem))))
    means = np.zeros(state["means"].shape, np.float32)
    has_mean = np.zeros(state["has_mean"].shape, bool)
    for c in np.unique(y_mem[valid]):
      mu = f[valid & (y_mem == c)].mean(0)
      means[c], has_mean[c] = (mu if raw else mu / max(np.linalg.norm(mu), 1e-12)), True
    return dict(x=jnp.asarray(x_mem), y=jnp.asarray(y_mem), task=jnp.asarray(t_mem), rank=jnp.asarray(rank),
                teacher=jax.tree.map(lambda p: jnp.array(p, copy=True), params), means=jnp.asarray(means),
                has_mean=jnp.asarray(has_mean), task_size=jnp.float32(len(task_data.y)))

  def predict(state, params, x, task, task_index):
    f = norm(features(params, x, task))
    dist = jnp.sum(jnp.square(f[:, None, :] - state["means"][None]), -1)
    score = jnp.where(state["has_mean"][None], -dist, MASK_VALUE)
    mask = learner.logit_mask(task, task_index)
    return score if mask is None else jnp.where(mask, score, MASK_VALUE)

  return Strategy(init=init, loss=loss, after_task=after_task, name="icarl", predict=predict)
