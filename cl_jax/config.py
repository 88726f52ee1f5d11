"""The base experiment config, its validation, and the part of it that identifies a run.

Every `configs/*.py` starts from `base_config()` (or, for `kind='lm'`, from `cl_jax.lm`'s default config) and
changes what it needs. `validate(config)` covers every kind (classic | lm | merge) and runs before anything is
written: it raises `ConfigError` (exit code 2) whose one-line message starts with the full key and its value and
says what is allowed, e.g. "optim.lr=inf: must be a finite number". The base config is locked, so a misspelt key
(in a config file or a `--config.key=value` override) is an error, not a silently new field.

`comparable(config)` is the config as a plain dict without the strategy-owned sections the run's chain does not
read; a workdir compares it to decide whether it holds the same run, so registering a new strategy (which adds a
default section to `base_config()`) never stops an existing workdir from resuming.

Checks that need the data (a batch larger than a task's training set) run in the runner's build, after the
scenario exists and still before anything is written (`cl_jax.train.loop.check_data_fits`).
"""
from __future__ import annotations

import difflib
import json
import math

import ml_collections

from cl_jax import sharding
from cl_jax.data import scenarios, sources
from cl_jax.errors import CLJaxError, ConfigError
from cl_jax.train import schedules
from cl_jax.train.optim import OPTIMIZERS

# kind -> the module whose `default_config()` / `check_config(config)` define and validate that kind's configs
# (classic: this module's base_config and _check_classic; merge: the base config plus merge_run's section).
KIND_MODULES = {"lm": "cl_jax.lm", "cit": "cl_jax.lm.cit"}
KINDS = ("classic", "merge", *KIND_MODULES)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "classic"  # classic | lm | merge: which runner run.py calls
  c.seed = 0
  c.strategy = "naive"

  # on_device: auto | true | false: training data resident on the devices, batches gathered inside the jitted
  # step (cl_jax/data/device.py); auto = when it fits in a quarter of a device's memory.
  # validation_fraction: a share of every class's training examples held out as a validation split (0 = none);
  # eval.split='validation' measures the accuracy matrix on it (cl_jax/data/scenarios.py).
  c.data = ml_collections.ConfigDict(dict(name="digits", path="", tfds_data_dir="", seed=0, on_device="auto",
                                          validation_fraction=0.0))
  c.scenario = ml_collections.ConfigDict(dict(
      name="split", kind="class", num_tasks=5, class_order=[], shuffle_classes=False,
      first_task_identity=False, angles=[], max_angle=180.0, train_sizes=[], seed=0))
  c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=[400, 400], channels=[32, 64], cnn_hidden=128,
                                           multi_head=True, init_from="", init="lecun"))
  # model.init (mlp): 'lecun' (Flax's default) or 'torch' (PyTorch nn.Linear's default), see models/mlp.py.
  # model.init_from: start from another run's params instead of a random init: "RUN_DIR:task=K" (the task-boundary
  # checkpoint after task K), "RUN_DIR" (its last one) or a params directory (cl_jax.checkpoint.save_params).
  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, b1=0.9, b2=0.999, momentum=0.9, weight_decay=0.0, grad_clip=0.0,
      schedule="constant", scope="task", warmup_fraction=0.0, decay_fraction=0.2, end_lr_fraction=0.0,
      decay_shape="linear"))
  # steps_per_call > 1 fuses that many steps into one jitted lax.scan: same numbers, less dispatch overhead
  # (worth it for small models on CPU); eval and checkpoint intervals must be multiples of it.
  # log_norms=False drops the grad / param / update l2 norms from the metrics: three passes over the params
  # that cost ~25% of a small model's step on CPU (benchmarks/step_throughput.py).
  c.train = ml_collections.ConfigDict(dict(steps_per_task=500, epochs_per_task=0, batch_size=128,
                                           log_every_steps=10, steps_per_call=1, log_norms=True,
                                           divergence_factor=100.0, num_seeds=1, sweep="", tasks=[]))
  # tasks: the 1-based tasks to train ([] = all); the others run 0 steps but are still evaluated, so runs that train
  # different tasks share one scenario (e.g. specialists of [1, k] for merging: task 1 is their common base).
  # num_seeds=N: seeds seed..seed+N-1 as one vmapped program; sweep="ewc.lam=1,10;optim.lr=1e-3,1e-4": a grid of
  # settings, every one run with every seed (cl_jax/train/seeds.py).
  # divergence_factor: stop (exit 3) when a step's loss exceeds this x the early loss (0 disables; see loop.py).
  c.eval = ml_collections.ConfigDict(dict(every_steps=0, batch_size=1000, split="test"))  # split: test | validation
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, keep=2))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  from cl_jax.models.lora import default_config as lora_config
  c.lora = lora_config()  # adapters: targets, rank, alpha, dropout
  from cl_jax.strategies import default_configs  # strategy-owned sections (ewc, replay, ...), from the registry
  for name, default in default_configs().items():
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
        try:
          node[part] = value
        except TypeError as e:  # a locked ConfigDict keeps each field's type
          raise ConfigError(f"{dotted}={value!r}: expected {_type_name(node[part])} "
                            f"({' '.join(str(e).split())})") from e
      else:
        node = node[part]


def _type_name(value) -> str:
  if isinstance(value, bool):
    return "true or false"
  return {int: "an integer", float: "a number", str: "a string", list: "a list", tuple: "a list"}.get(
      type(value), f"a {type(value).__name__}")


def unknown_key_message(prefix: str, key: str, valid) -> str:
  full = f"{prefix}.{key}" if prefix else key
  near = difflib.get_close_matches(key, valid, n=1)
  hint = f" (did you mean {near[0]!r}?)" if near else ""
  where = f"in {prefix!r} " if prefix else ""
  return f"unknown config key {full!r}{hint}; valid keys {where}are: {sorted(valid)}"


def comparable(config) -> dict:
  """The config as a JSON-style dict, without the strategy-owned sections that `config.strategy` does not read.

  Accepts a ConfigDict or a dict loaded from a workdir's config.json. Two runs are the same run when their
  `comparable` dicts are equal: a section that only an unused strategy reads (e.g. `si` in a naive run, or one
  that did not exist when the workdir was written) does not take part. A strategy name that is not registered
  keeps its section of the same name (the comparison stays strict about what it cannot interpret).
  """
  if isinstance(config, ml_collections.ConfigDict):
    d = json.loads(config.to_json_best_effort(sort_keys=True))
  else:
    d = json.loads(json.dumps(dict(config), sort_keys=True, default=str))
  from cl_jax.strategies import REGISTRY, default_configs
  spec = d.get("strategy")
  names = [n.strip() for n in spec.split("+")] if isinstance(spec, str) else []
  used = set()
  for name in names:
    used.update(REGISTRY[name].config_sections if name in REGISTRY else (name,))
  owned = set(default_configs())
  d = {k: v for k, v in d.items() if k not in owned or k in used}
  # LM stage sections at their defaults (off) are the same run as a config.json written before they existed.
  for name, default in _stage_defaults().items():
    if d.get(name, default) == default:
      d.pop(name, None)
  return d


def _stage_defaults() -> dict:
  from cl_jax.lm.long_context import default_long_context_config
  from cl_jax.lm.vocab import default_vocab_config
  return {"vocab": json.loads(default_vocab_config().to_json(sort_keys=True)),
          "long_context": json.loads(default_long_context_config().to_json(sort_keys=True))}


def validate(c) -> None:
  """Checks every value whose mistake would cost a run, for every kind; raises ConfigError naming the full key.

  classic: the sections of `base_config()` and the `check_config` of every strategy in the chain.
  lm, cit: `check_config` of their module (KIND_MODULES); merge: `cl_jax.merge_run.check_config`.
  Every kind: each leaf has the type of the kind's default config (an int where an int is expected, a number
  where a float is; ints are accepted for floats), and every float is finite.
  """
  try:
    _validate(c)
  except CLJaxError:
    raise
  except (ValueError, KeyError, AttributeError, TypeError) as e:
    raise ConfigError(_one_line(e)) from e


def _one_line(e: Exception) -> str:
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(str(text).split())


def reference_config(kind: str):
  """The default config a `kind`'s configs start from: the types every leaf must keep."""
  if kind in KIND_MODULES:
    return _kind_module(kind).default_config()
  c = base_config()
  if kind == "merge":
    from cl_jax.merge_run import default_config as merge_default
    with c.unlocked():
      c.merge = merge_default()
  return c


def check_types(config, reference, prefix: str = "") -> None:
  """Every leaf of `config` that `reference` also has must have its type; every float must be finite.

  bool keys take bools; int keys ints (not bools, not 2.0); float keys ints or floats; str keys strings; list keys
  lists whose items have the type of the reference's items (when it has any). Keys `reference` lacks are skipped.
  """
  for key in config.keys():
    full = f"{prefix}{key}"
    value = config[key]
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"{full}={value!r}: must be a finite number")
    if reference is None or key not in reference:
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        check_types(value, None, f"{full}.")
      continue
    ref = reference[key]
    if isinstance(ref, (ml_collections.ConfigDict, dict)):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"{full}={value!r}: expected a section (a ConfigDict), with keys {sorted(ref.keys())}")
      check_types(value, ref, f"{full}.")
    elif isinstance(ref, (list, tuple)):
      if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{full}={value!r}: expected a list")
      for i, item in enumerate(value):
        if isinstance(item, float) and not math.isfinite(item):
          raise ConfigError(f"{full}[{i}]={item!r}: must be a finite number")
        if ref and all(type(r) is type(ref[0]) for r in ref):
          problem = _type_problem(item, ref[0])
          if problem:
            raise ConfigError(f"{full}={list(value)!r}: item {i} is {item!r}; {problem}")
    else:
      problem = _type_problem(value, ref)
      if problem:
        raise ConfigError(f"{full}={value!r}: {problem}")


def _type_problem(value, ref) -> str:
  """What is wrong with `value` where the default is `ref` ('' when nothing is)."""
  if ref is None:
    return ""
  if isinstance(ref, bool):
    return "" if isinstance(value, bool) else "expected true or false"
  if isinstance(ref, int):
    return "" if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
  if isinstance(ref, float):
    return "" if isinstance(value, (int, float)) and not isinstance(value, bool) else "expected a number"
  if isinstance(ref, str):
    return "" if isinstance(value, str) else "expected a string"
  return ""


def _validate(c) -> None:
  kind = c.get("kind", "classic")
  if kind not in KINDS:
    raise ConfigError(f"kind={kind!r}: expected one of {list(KINDS)}")
  check_types(c, reference_config(kind))
  if kind in KIND_MODULES:
    _kind_module(kind).check_config(c)
  elif kind == "merge":
    _check_merge(c)
  else:
    _check_classic(c)


def _kind_module(kind: str):
  import importlib
  try:
    return importlib.import_module(KIND_MODULES[kind])
  except ModuleNotFoundError as e:
    raise ConfigError(f"kind={kind!r}: its module {KIND_MODULES[kind]} is not in this checkout ({e})") from e


def _check_merge(c) -> None:
  from cl_jax import merge_run
  check = getattr(merge_run, "check_config", None)
  if check is not None:
    check(c)
  else:  # what merge_run.run checks before loading anything
    merge_run.check_settings(c.merge)


# What a classic run gives a strategy (cl_jax.strategies.CAPABILITIES): labelled examples of fixed shape, class logits,
# task ids, every hook of the step and the evaluator, `prepare` and `train_tasks`; no token logits, no mixture.
CLASSIC_PROVIDES = frozenset({"class_labels", "class_logits", "task_ids", "per_example", "input_buffer", "step_hooks",
                              "predict", "model_rewrite", "reset_optimizer", "train_tasks"})


def _check_classic(c) -> None:
  from cl_jax.strategies import check_allowed, check_strategy_config
  check_allowed(c.strategy, CLASSIC_PROVIDES, "classic", config=c)
  if not isinstance(c.seed, int) or c.seed < 0:
    raise ConfigError(f"seed={c.seed!r}: must be a non-negative integer")
  sources.check_source(c.data)
  from cl_jax.data.device import check_on_device
  check_on_device(c.data.on_device)
  from cl_jax.train.seeds import check_config as check_runs
  check_runs(c)
  num_classes = {"digits": 10, "mnist": 10, "mnist1d": 10}.get(c.data.name)
  scenarios.check_scenario(c.scenario, num_classes)
  tasks = list(c.train.tasks)
  if any(not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= c.scenario.num_tasks for t in tasks) or (
      len(set(tasks)) != len(tasks)):
    raise ConfigError(f"train.tasks={tasks}: must be distinct task numbers in [1, scenario.num_tasks="
                      f"{c.scenario.num_tasks}] ([] trains every task)")
  scenarios.check_validation(c.data.validation_fraction, c.eval.split)
  if c.model.name not in ("mlp", "cnn"):
    raise ConfigError(f"model.name={c.model.name!r}: expected 'mlp' or 'cnn'")
  from cl_jax.models.mlp import INITS
  if c.model.get("init", "lecun") not in INITS or (c.model.get("init", "lecun") != "lecun" and c.model.name != "mlp"):
    raise ConfigError(f"model.init={c.model.get('init')!r}: expected one of {INITS} ('torch' for model.name='mlp')")
  if c.model.get("init_from", ""):
    from cl_jax.merge_run import resolve
    try:
      resolve(c.model.init_from, "model.init_from")  # the run and its checkpoint exist (reads no arrays)
    except ValueError as e:
      raise ConfigError(str(e)) from None
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
  if not c.train.divergence_factor >= 0:
    raise ConfigError(f"train.divergence_factor={c.train.divergence_factor}: must be >= 0 (0 disables the check)")
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
  check_strategy_config(c)
