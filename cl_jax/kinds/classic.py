"""The classic kind: a sequence of labelled tasks (Split / Permuted / Rotated; class-, task-, domain-incremental).

Its parts: the default config and schema below; `build` (data, scenario, model, strategy chain, sharded state and
the jitted step: `cl_jax.train.loop.build`), its plan (grain batches of `strategy.train_tasks(t)`, the accuracy
row as the evaluation: `cl_jax.train.loop.classic_plan`, batches drawn on device when the data fits), and with
`train.num_seeds` / `train.sweep` every seed and setting as one vmapped program (`cl_jax.train.seeds`). The
accuracy matrix R (row 0 before any training) is the record; ACC / BWT / FWT / forgetting come from it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
import numpy as np

from cl_jax import sharding
from cl_jax.config import COMMON_SCHEMA, integer, number, one_of
from cl_jax.errors import ConfigError
from cl_jax.train.optim import OPTIMIZERS

# What a classic task sequence gives a strategy (cl_jax.strategies.CAPABILITIES): labelled examples of fixed shape,
# class logits, task ids, every hook of the step and the evaluator, `prepare` and `train_tasks`; no token logits,
# no mixture.
PROVIDES = frozenset({"class_labels", "class_logits", "task_ids", "per_example", "input_buffer", "step_hooks",
                      "predict", "model_rewrite", "reset_optimizer", "train_tasks"})


def default_config() -> ml_collections.ConfigDict:
  """The classic kind's full default config (locked: a misspelt key is an error)."""
  c = ml_collections.ConfigDict()
  c.kind = "classic"  # which kind of run (cl_jax.kinds.KINDS)
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
      first_task_identity=False, angles=[], max_angle=180.0, train_sizes=[], seed=0, mask_unseen=True))
  # scenario.mask_unseen (class-IL): mask the logits of classes not seen yet; False trains every output unit from the
  # start (mammoth's protocol, experiments/der_protocol.py). See cl_jax/data/scenarios.py.
  c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=[400, 400], channels=[32, 64], cnn_hidden=128,
                                           multi_head=True, init_from="", init="lecun"))
  # model.init (mlp): 'lecun' (Flax's default), 'torch' (PyTorch nn.Linear's default) or 'xavier' (Glorot uniform,
  # bias 0), see models/mlp.py.
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
  c.distributed = sharding.distributed_config()  # multi-host timeouts (cl_jax/sharding.py)
  from cl_jax.models.lora import default_config as lora_config
  c.lora = lora_config()  # adapters: targets, rank, alpha, dropout
  from cl_jax.strategies import default_configs  # strategy-owned sections (ewc, replay, ...), from the registry
  for name, default in default_configs().items():
    c[name] = default()
  c.lock()
  return c



SCHEMA = {
    **COMMON_SCHEMA,
    "model.name": one_of("mlp", "cnn"),
    "optim.name": one_of(OPTIMIZERS),
    "train.batch_size": integer(1),
    "train.steps_per_call": integer(1),
    "train.epochs_per_task": integer(0),
    "eval.every_steps": integer(0),
    "eval.batch_size": integer(1),
    "eval.split": one_of("test", "validation"),
    "data.validation_fraction": number(0.0, 1.0, high_open=True),
}


def check_config(c) -> None:
  """What one key's rule cannot say: the strategy chain, the data source, the scenario, keys that must agree."""
  from cl_jax.data import scenarios, sources
  from cl_jax.data.device import check_on_device
  from cl_jax.models.mlp import INITS
  from cl_jax import strategies
  from cl_jax.strategies import check_strategy_config, parse_strategy_spec
  from cl_jax.train import schedules, seeds
  parse_strategy_spec(c.strategy)
  if hasattr(strategies, "check_allowed"):  # TEMP until the needs table lands
    strategies.check_allowed(c.strategy, PROVIDES, "classic", config=c)
  sources.check_source(c.data)
  check_on_device(c.data.on_device)
  seeds.check_config(c)
  num_classes = {"digits": 10, "mnist": 10, "mnist1d": 10}.get(c.data.name)
  scenarios.check_scenario(c.scenario, num_classes)
  tasks = list(c.train.tasks)
  if any(not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= c.scenario.num_tasks for t in tasks) or (
      len(set(tasks)) != len(tasks)):
    raise ConfigError(f"train.tasks={tasks}: must be distinct task numbers in [1, scenario.num_tasks="
                      f"{c.scenario.num_tasks}] ([] trains every task)")
  scenarios.check_validation(c.data.validation_fraction, c.eval.split)
  if c.model.get("init", "lecun") not in INITS or (c.model.get("init", "lecun") != "lecun" and c.model.name != "mlp"):
    raise ConfigError(f"model.init={c.model.get('init')!r}: expected one of {INITS} "
                      "(all but 'lecun' need model.name='mlp')")
  if c.model.get("init_from", ""):
    from cl_jax.checkpoint import resolve
    try:
      resolve(c.model.init_from, "model.init_from")  # the run and its checkpoint exist (reads no arrays)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if any((not isinstance(h, int)) or h < 1 for h in c.model.hidden):
    raise ConfigError(f"model.hidden={list(c.model.hidden)}: must be positive integers")
  schedules.check_schedule(c.optim)
  if c.train.epochs_per_task == 0 and (not isinstance(c.train.steps_per_task, int) or c.train.steps_per_task < 1):
    raise ConfigError(f"train.steps_per_task={c.train.steps_per_task!r}: must be a positive integer")
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


class Built(NamedTuple):
  """A classic run before it writes anything: one setting's setup and plan, or every seed's as one program."""
  config: Any       # the config of the run's setting (a one-setting sweep's values set)
  setup: Any        # cl_jax.train.loop.Setup
  plan: Any         # cl_jax.train.loop.Plan
  runs: Any = None  # cl_jax.train.seeds.Runs when several seeds / settings run as one program
  overrides: dict | None = None


def build(config) -> Built:
  """Data, model, strategy, sharded state, jitted step and the task plan; data-dependent checks raise here."""
  from cl_jax.data.device import maybe_device_plan
  from cl_jax.train import seeds
  from cl_jax.train.loop import build as build_setup, classic_plan
  if seeds.num_runs(config) > 1:  # every seed / sweep setting as one vmapped program
    setup = build_setup(config)
    seeds.check_device_data(config, setup.scenario)
    run_plan, runs = seeds.plan(config, setup, classic_plan(config, setup))
    return Built(config, setup, run_plan, runs)
  # One run: a one-setting sweep ("ewc.lam=1") still sets its values. The workdir keeps the config as given, so
  # resuming and comparing runs see the same config the user wrote.
  (setting,) = seeds.settings(config)
  config = seeds.setting_config(config, setting.overrides)
  setup = build_setup(config)
  return Built(config, setup, maybe_device_plan(classic_plan(config, setup), config, setup), None,
               setting.overrides)


def run(built: Built, ctx):
  """Trains the task sequence through the one loop and returns `Results(kind='classic')`."""
  from cl_jax.checkpoint import Checkpoints
  from cl_jax.eval.metrics import summarize
  from cl_jax.models import param_count
  from cl_jax.results import Results
  from cl_jax.train import seeds
  from cl_jax.train.loop import run_tasks, strategy_record
  config, setup, runs = built.config, built.setup, built.runs
  scenario, data = setup.scenario, setup.data
  what = (f"{len(runs.seeds)} runs in one program ({len(runs.settings)} setting(s) x {len(runs.settings[0].seeds)}"
          " seeds), " if runs is not None else "")
  print(f"{config.strategy} on {scenario.name}/{scenario.kind} ({data.name}): {scenario.num_tasks} tasks, "
        f"{param_count(setup.state.params):,} params, {what}mesh {dict(setup.mesh.shape)}")
  with Checkpoints(ctx.workdir, keep=config.checkpoint.keep) as checkpoints:
    out = run_tasks(built.plan, ctx.workdir, checkpoints, ctx.resume, ctx.progress, hooks=ctx.hooks)
  mean = f" (mean of {len(runs.seeds)} runs)" if runs is not None else ""
  for t, rec in enumerate(out.boundary[1:]):
    if out.resumed_from is None or int(rec["step"]) > out.resumed_from:
      print(f"after task {t + 1}{mean}: " + " ".join(f"{100 * a:5.1f}" for a in rec["accuracy"]))
  extra = {"strategy": config.strategy, "scenario": f"{scenario.name}/{scenario.kind}", "data": data.name,
           "num_params": param_count(setup.state.params), "steps_per_task": setup.steps}
  if runs is None:
    r = np.asarray([rec["accuracy"] for rec in out.boundary])
    summary = summarize(r)
  else:
    record = seeds.results_record(runs, np.asarray([rec["accuracy_runs"] for rec in out.boundary]))  # [T+1, R, T]
    first = record["settings"][0]
    r = np.asarray(first["accuracy_matrix_mean"])  # top level: the first setting's mean matrix and metrics
    summary = {k: first[k]["mean"] for k in seeds.METRICS}
    extra.update({"num_runs": len(runs.seeds), **record})
  extra["timing"] = {"task_seconds": out.task_seconds, "total_seconds": out.seconds}
  extra.update(strategy_record(config))
  if built.overrides:
    extra["overrides"] = built.overrides
  return Results("classic", ctx.workdir, r, **summary, extra=extra)


def report(results, workdir: str, config) -> None:
  """summary.md, the accuracy-matrix heat map and accuracy curves."""
  from cl_jax import report as reports
  e = results.extra
  name, kind = e["scenario"].split("/")
  title = f"{config.strategy} — {name} {kind}-IL ({e['data']})"
  if "settings" in e:  # several seeds as one program: the report shows the first setting's mean
    title += f", mean of {len(e['settings'][0]['seeds'])} seeds"
  reports.write_report(workdir, results.as_dict(), title)
