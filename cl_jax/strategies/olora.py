"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP
Findings): one LoRA adapter per task, earlier adapters frozen, and the new adapter's input subspace kept
orthogonal to the earlier ones'.

Params are LoRA params with one adapter slot per task, named `slot_name(t)` ('task_0', 'task_1', ...),
all created up front (`init_olora_params`); unused slots have B = 0 and so add nothing. The model runs the
base plus the sum of all slots (`LoraModel.bind(adapter=slot_names(T))`), which is O-LoRA's inference
rule: the adapters are summed (merged), no task id needed. While training task t the loss is

    L = L_task + lambda1 * sum_{layers} sum_{i<t} sum_{j,k} |(A_i^T A_t)_{jk}|
               + lambda2 * sum_{P in {A_t, B_t} over layers} ||P||_2,

with A: [d_in, r] in this codebase's x @ A layout (the paper writes A: [r, d_in] and A_i A_t^T; same
numbers). The absolute-value (L1) form of the overlap follows the issue and the authors' code; lambda2 is
the optional norm term on the new adapter. The frozen A_i are snapshot into the strategy state by
`after_task`, so the penalty reads them from the state, not from params.

Freezing: the loss transform passes the base and every slot but the current one through
`stop_gradient` (the task index is dynamic inside the jitted step, so slots are selected with `where`),
so gradients reach only slot t whatever optimizer the loop uses. With a stateful optimizer (Adam), give
it `lora.trainable_mask(params, slot_name(t))` or reset its state per task so momentum does not move a
frozen slot.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from cl_jax.models import lora
from cl_jax.strategies.base import LossContext, Strategy


def default_config() -> ml_collections.ConfigDict:
  """Section `olora`: lambda1 (orthogonality weight; Wang et al. use 0.5), lambda2 (norm weight; 0)."""
  return ml_collections.ConfigDict({"lambda1": 0.5, "lambda2": 0.0})


def slot_name(t: int) -> str:
  return f"task_{t}"


def slot_names(num_tasks: int) -> tuple[str, ...]:
  return tuple(slot_name(t) for t in range(num_tasks))


def init_olora_params(base_params, num_tasks: int, rng: jax.Array, spec: lora.LoraSpec) -> dict:
  """LoRA params with one fresh (identity) adapter slot per task."""
  params = lora.lora_params(base_params)
  for t, key in enumerate(jax.random.split(rng, num_tasks)):
    params = lora.add_adapter(params, slot_name(t), key, spec)
  return params


def overlap_l1(a_old: jax.Array, a_new: jax.Array) -> jax.Array:
  """sum_{j,k} |(A_old^T A_new)_{jk}| for A_old: [d, r1], A_new: [d, r2] (zero iff the column spaces are
  orthogonal). Leading axes (a stacked transformer's layer axis, [L, d, r]) are per-layer pairs, summed."""
  return jnp.sum(jnp.abs(jnp.swapaxes(a_old.astype(jnp.float32), -1, -2) @ a_new.astype(jnp.float32)))


def orthogonality_penalty(old_adapters: Sequence[Mapping], new_adapter: Mapping) -> jax.Array:
  """sum over earlier adapters i and shared layers l of overlap_l1(A_i[l], A_new[l])."""
  total = jnp.zeros((), jnp.float32)
  for old in old_adapters:
    for path, layer in new_adapter.items():
      if path in old:
        total = total + overlap_l1(old[path]["A"], layer["A"])
  return total


def safe_norm(p: jax.Array) -> jax.Array:
  """||P||_2 (Frobenius) with gradient 0 at P = 0 instead of NaN: a fresh adapter has B = 0. A stacked adapter
  ([L, d, r], one matrix per layer) gives the sum of its layers' norms, as the per-block layout would."""
  sq = jnp.sum(jnp.square(p.astype(jnp.float32)), axis=tuple(range(max(p.ndim - 2, 0), p.ndim)))
  positive = sq > 0
  return jnp.sum(jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0))


def norm_penalty(adapter: Mapping) -> jax.Array:
  """sum over the adapter's tensors of their Frobenius norm ||P||_2 (O-LoRA's lambda2 term)."""
  return sum(safe_norm(p) for p in jax.tree.leaves(adapter))


def _slot_stack(params, num_tasks, path, leaf):
  return jnp.stack([params["adapters"][slot_name(k)][path][leaf] for k in range(num_tasks)])


def freeze_all_but(params, task_index: jax.Array, num_tasks: int):
  """The same values, with gradients stopped everywhere except adapter slot `task_index` (dynamic)."""
  adapters = {}
  for k in range(num_tasks):
    live = jnp.asarray(task_index) == k
    adapters[slot_name(k)] = jax.tree.map(
        lambda p, live=live: jnp.where(live, p, jax.lax.stop_gradient(p)), params["adapters"][slot_name(k)])
  others = {n: jax.lax.stop_gradient(a) for n, a in params["adapters"].items() if n not in adapters}
  return {"base": jax.lax.stop_gradient(params["base"]), "adapters": {**others, **adapters}}


def check_config(config) -> None:
  """Called by config validation before the workdir is touched (see cl_jax.config)."""
  cfg = config.olora
  for key in ("lambda1", "lambda2"):
    if not float(cfg[key]) >= 0:
      raise ValueError(f"olora.{key}={cfg[key]!r}: expected a non-negative weight")


def olora(config, learner=None) -> Strategy:
  """Builds O-LoRA from `config.olora.{lambda1, lambda2}` and the adapter shape `config.lora`; in the task loop
  `prepare` makes the params (`init_olora_params`), outside it hand params made by that function."""
  del learner
  check_config(config)
  lambda1, lambda2 = float(config.olora.lambda1), float(config.olora.lambda2)
  spec = lora.spec_from_config(config.lora)

  def num_slots(params):
    if not (isinstance(params, Mapping) and "adapters" in params and slot_name(0) in params["adapters"]):
      raise ValueError("olora: params must be LoRA params with adapter slots 'task_0', 'task_1', ... "
                       "(build them with cl_jax.strategies.olora.init_olora_params)")
    n = 0
    while slot_name(n) in params["adapters"]:
      n += 1
    return n

  def init(params, task_info):
    n = num_slots(params)
    if task_info.num_tasks > n:
      raise ValueError(f"olora: {task_info.num_tasks} tasks but only {n} adapter slots in params")
    first = params["adapters"][slot_name(0)]
    return {"A_old": {p: jnp.zeros((n, *l["A"].shape), jnp.float32) for p, l in first.items()}}

  def loss(loss_fn):
    def wrapped(params, batch, ctx: LossContext):
      n = num_slots(params)
      t = jnp.asarray(ctx.task_index, jnp.int32)
      frozen = freeze_all_but(params, t, n)
      task_loss, aux = loss_fn(frozen, batch, ctx)
      earlier = (jnp.arange(n) < t).astype(jnp.float32)
      ortho = jnp.zeros((), jnp.float32)
      norm = jnp.zeros((), jnp.float32)
      for path, a_old in ctx.strategy_state["A_old"].items():
        a_new = _slot_stack(frozen, n, path, "A")[t].astype(jnp.float32)
        b_new = _slot_stack(frozen, n, path, "B")[t].astype(jnp.float32)
        # per earlier slot k (and per layer of a stacked adapter [L, d, r]): sum |A_k^T A_t|
        overlap = jnp.einsum("k...dr,...ds->k...rs", a_old, a_new)
        per_old = jnp.sum(jnp.abs(overlap), axis=tuple(range(1, overlap.ndim)))
        ortho = ortho + jnp.sum(earlier * per_old)
        norm = norm + safe_norm(a_new) + safe_norm(b_new)
      total = task_loss + lambda1 * ortho + lambda2 * norm
      return total, {**aux, "olora_ortho": ortho, "olora_norm": norm}
    return wrapped

  def after_task(state, params, task_data, rng):
    del rng
    t = int(task_data.task_index)
    new = params["adapters"][slot_name(t)]
    return {"A_old": {p: a.at[t].set(new[p]["A"].astype(jnp.float32)) for p, a in state["A_old"].items()}}

  def prepare(model, params, task_info, rng):
    """In the task loop: one adapter slot per task on the frozen base; the model sums every slot."""
    lora_model = lora.LoraModel(model, spec)
    names = slot_names(task_info.num_tasks)
    lora_params = init_olora_params(params, task_info.num_tasks, rng, spec)
    return lora_model.bind(names), lora_params, lora.trainable_mask(lora_params, names)

  # reset_optimizer: Adam's moments from slot t would otherwise keep moving it after it is frozen.
  return Strategy(init=init, loss=loss, after_task=after_task, name="olora", prepare=prepare,
                  reset_optimizer=True)


olora.check_config = check_config


__all__ = ["olora", "default_config", "check_config", "slot_name", "slot_names", "init_olora_params", "overlap_l1",
           "orthogonality_penalty", "norm_penalty", "safe_norm", "freeze_all_but"]
