"""One LoRA adapter per task on the frozen base, each trained alone, and a router that picks one at inference.

The parameter-isolation end of adapter-based continual learning: task t trains its own adapter slot
(`olora.slot_name(t)`, created up front by `olora.init_olora_params`) on the frozen base, and while it does, the
model runs the base plus slot t only -- earlier slots are neither trained nor applied, so nothing learned before
can be overwritten (zero forgetting *given the right adapter*). The price moves to inference: an input must be
sent to its task's adapter. With a task label that is a lookup (task-incremental); without one a router chooses
(`cl_jax.routing`; the continual-instruction-tuning loop routes prompts by nearest set prototype, see
`cl_jax.lm.cit.route_prompts`), and end-to-end quality is bounded by routing accuracy.

Against O-LoRA (`olora`, the same slots): O-LoRA applies the *sum* of all slots, needs no router, and keeps slots
apart with an orthogonality penalty; here the slots never meet, so no penalty is needed.

Freezing: inside the loss the base is `stop_gradient`-ed and every slot but the current one is replaced by zeros
(a dynamic `where` on the task index inside the jitted step), so gradients reach only slot t; the optimizer state
is reset per task (`reset_optimizer`) so Adam's moments never move a finished slot.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cl_jax.models import lora
from cl_jax.strategies import olora as _olora
from cl_jax.strategies.base import LossContext, Strategy


def only_slot(params, task_index, num_tasks: int):
  """LoRA params in which only adapter slot `task_index` (dynamic) is live: the base has its gradient stopped and
  every other slot is zero (A = B = 0 adds nothing to the summed model, and gets no gradient)."""
  adapters = {}
  for k in range(num_tasks):
    live = jnp.asarray(task_index) == k
    adapters[_olora.slot_name(k)] = jax.tree.map(lambda p, live=live: jnp.where(live, p, jnp.zeros_like(p)),
                                                 params["adapters"][_olora.slot_name(k)])
  return {"base": jax.lax.stop_gradient(params["base"]), "adapters": adapters}


def slot_params(params, t: int, spec: lora.LoraSpec):
  """Plain model params for task t's adapter: the base with slot t folded in (W + (alpha / r) A B)."""
  return lora.merge_adapter({"base": params["base"], "adapters": {
      _olora.slot_name(t): params["adapters"][_olora.slot_name(t)]}}, _olora.slot_name(t), spec)["base"]


def check_config(config) -> None:
  """Raises ValueError naming the bad `lora.*` key, or a run kind without a router, before anything is written."""
  kind = config.get("kind", "classic")
  if kind != "cit":
    # The classic and LM evaluators apply one model to every task; without routing, per-task slots would be
    # evaluated summed, which is O-LoRA without its penalty, not this method.
    raise ValueError(f"strategy 'lora_per_task' on kind={kind!r}: it needs a router at inference and runs on "
                     "kind='cit' (configs/cit.py); for summed adapter slots use 'olora'")
  lora.spec_from_config(config.lora)


def lora_per_task(config, learner=None) -> Strategy:
  """Builds per-task LoRA from the adapter shape `config.lora` (module docstring)."""
  del learner
  check_config(config)
  spec = lora.spec_from_config(config.lora)

  def loss(loss_fn):
    def wrapped(params, batch, ctx: LossContext):
      n = len(params["adapters"])
      return loss_fn(only_slot(params, jnp.asarray(ctx.task_index, jnp.int32), n), batch, ctx)
    return wrapped

  def prepare(model, params, task_info, rng):
    """In the task loop: one identity slot per task on the frozen base; only the slots are trainable."""
    names = _olora.slot_names(task_info.num_tasks)
    lora_params = _olora.init_olora_params(params, task_info.num_tasks, rng, spec)
    return lora.LoraModel(model, spec).bind(names), lora_params, lora.trainable_mask(lora_params, names)

  return Strategy(loss=loss, name="lora_per_task", prepare=prepare, reset_optimizer=True)


lora_per_task.check_config = check_config
lora_per_task.config_sections = ("lora",)

__all__ = ["lora_per_task", "only_slot", "slot_params", "check_config"]
