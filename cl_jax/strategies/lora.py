"""LoRA as a strategy: one adapter on the frozen base, trained through every task (Hu et al. 2021, "LoRA").

`prepare` wraps the model in `cl_jax.models.lora.LoraModel` with one adapter named `ADAPTER` (identity at the
start: B = 0) and hands the optimizer a trainable mask of that adapter only, so the base params get no update and
no optimizer state: the base model's outputs are unchanged bit for bit whatever the adapter learns. Settings are
the base config's `lora` section (targets, rank, alpha, dropout), the same on a classic and a language-model run.
Chain it with a loss transform (`lora+distill`) to regularise the adapted model.
"""
from __future__ import annotations

from cl_jax.models import lora as lora_lib
from cl_jax.strategies.base import Strategy

ADAPTER = "adapter"


def check_config(config) -> None:
  """Raises ValueError naming the bad `lora.*` key (LoraSpec's checks, before anything is written)."""
  lora_lib.spec_from_config(config.lora)


def base_params(params):
  """The base model's params inside prepared params (what an adapted run exports as its base)."""
  return params["base"]


def merged_params(params, config):
  """The adapted model as plain params: every adapter folded into the base, W + (alpha / r) Σ_k A_k B_k (one adapter
  for `lora`; O-LoRA's slots, whose inference rule is exactly their sum)."""
  spec = lora_lib.spec_from_config(config.lora)
  for name in lora_lib.adapter_names(params):
    params = lora_lib.merge_adapter(params, name, spec)
  return params["base"]


def lora(config, learner=None) -> Strategy:
  """A single LoRA adapter on the frozen base; see the module docstring."""
  del learner
  spec = lora_lib.spec_from_config(config.lora)

  def prepare(model, params, task_info, rng):
    del task_info
    lora_model = lora_lib.LoraModel(model, spec)
    wrapped = lora_model.add_adapter(lora_lib.lora_params(params), ADAPTER, rng)
    return lora_model.bind(ADAPTER), wrapped, lora_lib.trainable_mask(wrapped, ADAPTER)

  return Strategy(name="lora", prepare=prepare)


lora.check_config = check_config
lora.config_sections = ("lora",)

__all__ = ["lora", "check_config", "ADAPTER", "base_params", "merged_params"]
