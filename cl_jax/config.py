"""The base experiment config and its validation.

Every `configs/*.py` starts from `base_config()` and changes what it needs; `validate(config)` runs before
anything is written and raises `ConfigError` naming the key and the reason. The base config is locked, so a
misspelt key (in a config file or a `--config.key=value` override) is an error, not a silently new field.
"""
from __future__ import annotations

import difflib

import ml_collections

from cl_jax import sharding
from cl_jax.data import scenarios, sources
from cl_jax.train import schedules
from cl_jax.train.optim import OPTIMIZERS


class ConfigError(ValueError):
  """A config key has a bad value, or does not exist."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "classic"  # classic | lm | merge: which runner run.py calls
  c.seed = 0
  c.strategy = "naive"

  c.data = ml_collections.ConfigDict(dict(name="digits", path="", tfds_data_dir="", seed=0))
  c.scenario = ml_collections.ConfigDict(dict(
      name="split", kind="class", num_tasks=5, class_order=[], shuffle_classes=False,
      first_task_identity=False, angles=[], max_angle=180.0, seed=0))
  c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=[400, 400], channels=[32, 64], cnn_hidden=128,
                                           multi_head=True))
  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, b1=0.9, b2=0.999, momentum=0.9, weight_decay=0.0, grad_clip=0.0,
      schedule="constant", scope="task", warmup_fraction=0.0, decay_fraction=0.2, end_lr_fraction=0.0,
      decay_shape="linear"))
  # steps_per_call > 1 fuses that many steps into one jitted lax.scan: same numbers, less dispatch overhead
  # (worth it for small models on CPU); eval and checkpoint intervals must be multiples of it.
  # log_norms=False drops the grad / param / update l2 norms from the metrics: three passes over the params
  # that cost ~25% of a small model's step on CPU (benchmarks/step_throughput.py).
  c.train = ml_collections.ConfigDict(dict(steps_per_task=500, epochs_per_task=0, batch_size=128,
                                           log_every_steps=10, steps_per_call=1, log_norms=True))
  c.eval = ml_collections.ConfigDict(dict(every_steps=0, batch_size=1000))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, keep=2))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  from cl_jax.models.lora import default_config as lora_config
  c.lora = lora_config()  # adapters: targets, rank, alpha, dropout
  from cl_jax.strategies import DEFAULT_CONFIGS  # strategy-owned sections (ewc, replay, ...)
  for name, default in DEFAULT_CONFIGS.items():
    c[name] = default()
  c.lock()
  return c


def set_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Applies {'a.b': value} overrides, naming the valid keys when one does not exist."""
  for dotted, value in overrides.items():
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if part not in keys:
        prefix = ".".join(parts[:i])
        raise ConfigError(unknown_key_message(prefix, part, keys))
      if i == len(parts) - 1:
        node[part] = value
      else:
        node = node[part]


def unknown_key_message(prefix: str, key: str, valid) -> str:
  full = f"{prefix}.{key}" if prefix else key
  near = difflib.get_close_matches(key, valid, n=1)
  hint = f" (did you mean {near[0]!r}?)" if near else ""
  where = f"in {prefix!r} " if prefix else ""
  return f"unknown config key {full!r}{hint}; valid keys {where}are: {sorted(valid)}"


def validate(c) -> None:
  """Checks every value whose mistake would cost a run; raises ConfigError naming the key."""
  try:
    _validate(c)
  except ConfigError:
    raise
  except (ValueError, KeyError, AttributeError, TypeError) as e:
    raise ConfigError(str(e)) from e


def _validate(c) -> None:
  if c.kind != "classic":
    return  # lm / merge runners validate their own sections
  from cl_jax.strategies import parse_strategy_spec
  parse_strategy_spec(c.strategy)
  if not isinstance(c.seed, int) or c.seed < 0:
    raise ConfigError(f"seed={c.seed!r}: must be a non-negative integer")
  sources.check_source(c.data)
  num_classes = {"digits": 10, "mnist": 10, "mnist1d": 10}.get(c.data.name)
  scenarios.check_scenario(c.scenario, num_classes)
  if c.model.name not in ("mlp", "cnn"):
    raise ConfigError(f"model.name={c.model.name!r}: expected 'mlp' or 'cnn'")
  if any((not isinstance(h, int)) or h < 1 for h in c.model.hidden):
    raise ConfigError(f"model.hidden={list(c.model.hidden)}: must be positive integers")
  if c.optim.name not in OPTIMIZERS:
    raise ConfigError(f"optim.name={c.optim.name!r}: expected one of {OPTIMIZERS}")
  schedules.check_schedule(c.optim)
  for key in ("steps_per_task", "batch_size", "log_every_steps", "steps_per_call"):
    if key == "steps_per_task" and c.train.epochs_per_task > 0:
      continue
    if not isinstance(c.train[key], int) or c.train[key] < 1:
      raise ConfigError(f"train.{key}={c.train[key]!r}: must be a positive integer")
  if c.train.epochs_per_task < 0:
    raise ConfigError(f"train.epochs_per_task={c.train.epochs_per_task}: must be >= 0 (0 = use steps_per_task)")
  if c.eval.every_steps < 0 or c.eval.batch_size < 1:
    raise ConfigError(f"eval.every_steps={c.eval.every_steps}, eval.batch_size={c.eval.batch_size}: "
                      "need every_steps >= 0 and batch_size >= 1")
  if c.checkpoint.every_steps < 0 or c.checkpoint.keep < 1:
    raise ConfigError(f"checkpoint.every_steps={c.checkpoint.every_steps}, checkpoint.keep={c.checkpoint.keep}: "
                      "need every_steps >= 0 and keep >= 1")
  k = c.train.steps_per_call
  for key in ("eval.every_steps", "checkpoint.every_steps"):
    section, name = key.split(".")
    if k > 1 and c[section][name] % k:
      raise ConfigError(f"{key}={c[section][name]}: must be a multiple of train.steps_per_call={k}")
  data, fsdp = sharding.mesh_shape(c.mesh.data, c.mesh.fsdp)
  if c.train.batch_size % (data * fsdp):
    raise ConfigError(f"train.batch_size={c.train.batch_size}: not divisible by the {data * fsdp} devices of "
                      f"the mesh (mesh.data={data}, mesh.fsdp={fsdp})")
  from cl_jax.strategies import REGISTRY
  for name in parse_strategy_spec(c.strategy):
    check = getattr(REGISTRY[name], "check_config", None)
    if check is not None:
      check(c)
