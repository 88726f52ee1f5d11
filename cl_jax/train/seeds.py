"""Many runs as one program: N seeds (and a hyperparameter grid) of a classic run, vmapped and jitted together.

  python run.py --config configs/split_mnist.py --config.train.num_seeds=10
  python run.py --config configs/split_mnist.py:strategy=ewc --config.train.num_seeds=5 \
      --config.train.sweep="ewc.lam=10,100,1000"

`train.num_seeds = N` runs the seeds `seed, seed+1, ..., seed+N-1`. Each run has its own parameter init, data
order, replay buffer, optimizer and strategy state, exactly as the single run of that seed would (same init,
same batches; results equal within float32 reduction-order tolerance, `tests/test_many_seeds.py`).

`train.sweep` adds a hyperparameter grid: `"key=v1,v2,..."`, several keys separated by `;` form their product
(`"ewc.lam=10,100;optim.lr=1e-3,1e-4"`: 4 settings). Every setting runs every seed. A key may be any value of a
strategy's config section or of `optim` (values typed like the config's own); it must not change the shapes of
the train state (a replay capacity, a model width) or the data. Each setting gets its own strategy and optimizer,
built from the config with its values; inside the one jitted program every setting's runs are one `vmap`.

The train state gains a leading run axis (runs are ordered setting-major: setting g, seed i is run g·N + i); the
data stays on the devices once (`cl_jax.data.device`), and each run's batches are gathered from its own seed's
order inside the jitted step. One jitted program advances every run by K steps: `vmap` over the runs on
accelerators, a `lax.map` on CPU (see `use_vmap`); evaluation is vmapped. Checkpoints hold the stacked state, so a many-run
workdir resumes like any other. `after_task` (a Fisher, a buffer fill) runs per run, with that run's key.

results.json: `runs` (every run: seed, setting, its accuracy matrix, ACC/BWT/FWT/forgetting), `settings` (per
setting: mean, std and a 95% Student-t interval of each metric, and the mean accuracy matrix); the top-level
matrix and metrics are the first setting's means.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax.errors import ConfigError
from cl_jax.sharding import put_global

# Sections a sweep may vary: the strategy sections and the optimizer. Everything else fixes the data, the model
# or the schedule of the run, which every run of one program shares.
SWEEPABLE_SECTIONS = ("optim",)
METRICS = ("acc", "bwt", "fwt", "forgetting")


class Setting(NamedTuple):
  overrides: dict          # {'ewc.lam': 100.0}; {} without a sweep
  seeds: tuple             # the seeds this setting runs


def parse_sweep(config) -> list[dict]:
  """`train.sweep` -> the grid's settings as override dicts ([{}] when empty); raises ConfigError."""
  text = str(config.train.get("sweep", "") or "").strip()
  if not text:
    return [{}]
  from cl_jax.strategies import REGISTRY
  strategy_sections = {s for e in REGISTRY.values() for s in e.default_config}
  axes = []
  for part in filter(None, (p.strip() for p in text.split(";"))):
    if "=" not in part:
      raise ConfigError(f"train.sweep={text!r}: expected 'section.key=v1,v2,...' (';' between keys), got {part!r}")
    key, values = (s.strip() for s in part.split("=", 1))
    section, _, name = key.partition(".")
    if section not in strategy_sections and section not in SWEEPABLE_SECTIONS:
      raise ConfigError(f"train.sweep={text!r}: {key!r} cannot be swept; a sweep varies a strategy's section "
                        f"({sorted(strategy_sections)}) or optim")
    if section not in config or name not in config[section]:
      raise ConfigError(f"train.sweep={text!r}: unknown config key {key!r}")
    current = config[section][name]
    parsed = [_typed(v.strip(), current, key, text) for v in values.split(",") if v.strip()]
    if not parsed:
      raise ConfigError(f"train.sweep={text!r}: no values for {key!r}")
    axes.append([(key, v) for v in parsed])
  return [dict(combo) for combo in itertools.product(*axes)]


def _typed(text: str, current, key: str, sweep: str):
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false"):
        raise ValueError(text)
      return text.lower() == "true"
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
  except ValueError:
    pass
  raise ConfigError(f"train.sweep={sweep!r}: {key}={text!r} is not a valid {type(current).__name__}")


def settings(config) -> list[Setting]:
  n = int(config.train.get("num_seeds", 1))
  seeds = tuple(int(config.seed) + i for i in range(n))
  return [Setting(o, seeds) for o in parse_sweep(config)]


def num_runs(config) -> int:
  return sum(len(s.seeds) for s in settings(config))


def check_config(config) -> None:
  """`train.num_seeds` and `train.sweep`: raises ConfigError naming the key (before anything is written)."""
  n = config.train.get("num_seeds", 1)
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ConfigError(f"train.num_seeds={n!r}: must be a positive integer")
  from cl_jax.config import SEED_LIMIT
  if isinstance(config.seed, int) and config.seed + n > SEED_LIMIT:  # PRNGKey wraps past 2**32: seed 0 again
    raise ConfigError(f"train.num_seeds={n}: the seeds {config.seed}..{config.seed + n - 1} pass the PRNG's limit "
                      f"{SEED_LIMIT - 1} (a seed past it repeats seed 0's key); lower seed or num_seeds")
  grid = settings(config)
  for setting in grid:
    setting_config(config, setting.overrides)  # a value the strategy's own check rejects fails here


def setting_config(config, overrides: dict):
  """The config of one setting: `config` with the sweep's values set, checked by the strategies' checks."""
  if not overrides:
    return config
  c = copy.deepcopy(config)
  with c.unlocked():
    for key, value in overrides.items():
      section, name = key.split(".", 1)
      c[section][name] = value
  from cl_jax.strategies import REGISTRY, parse_strategy_spec
  for name in parse_strategy_spec(c.strategy):
    check = REGISTRY[name].check_config
    if check is not None:
      try:
        check(c)
      except ValueError as e:
        raise ConfigError(f"train.sweep: {e}") from e
  return c


# ----------------------------------------------------------------------------- building the runs

class Runs(NamedTuple):
  """The pieces of a many-run program (what `plan` hands the task loop)."""
  settings: list           # [Setting]
  seeds: np.ndarray        # int32 [R]: the seed of every run
  strategies: list         # one Strategy per setting
  optimizers: list         # one optax transformation per setting
  train_steps: list        # one unjitted train_step per setting
  state: Any               # TrainState with a leading run axis [R, ...]
  state_sharding: Any


def build_runs(config, setup) -> Runs:
  """Stacked train state and per-setting steps over `setup` (the single run's build: data, model, mesh)."""
  from cl_jax.models import model_initializer
  from cl_jax.strategies import Learner, TaskInfo, build_strategy
  from cl_jax.train.loop import with_finite_flag
  from cl_jax.train.optim import build_optimizer
  from cl_jax.train.schedules import build_schedule
  from cl_jax.train.state import TrainState
  from cl_jax.train.step import make_train_step, task_loss
  scenario = setup.scenario
  if setup.strategy.prepare is not None:
    raise ConfigError(f"train.num_seeds / train.sweep: strategy {config.strategy!r} changes the model "
                      "(prepare) and cannot run as many runs in one program; run its seeds one by one")
  grid = settings(config)
  _, init_params = model_initializer(config.model, scenario.input_shape, scenario.num_outputs, scenario.num_heads)
  task_info = TaskInfo(scenario.num_tasks, scenario.num_outputs, scenario.input_shape)
  learner = Learner(setup.model.apply, scenario.logit_mask)
  strategies, optimizers, steps, states, seeds = [], [], [], [], []
  for setting in grid:
    c = setting_config(config, setting.overrides)
    strategy = build_strategy(c.strategy, c, learner)
    schedule = build_schedule(c.optim, setup.steps[0], scenario.num_tasks)
    optimizer = build_optimizer(c.optim, schedule, None)
    strategies.append(strategy)
    optimizers.append(optimizer)
    steps.append(with_finite_flag(make_train_step(strategy.loss(task_loss(learner)), optimizer, schedule,
                                                  log_norms=c.train.log_norms, strategy=strategy)))
    for seed in setting.seeds:  # exactly the single run's init of this seed (loop.build)
      params = init_params(seed)
      root = jax.random.PRNGKey(seed)
      states.append(TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params),
                               strategy_state=strategy.init(params, task_info), rng=jax.random.fold_in(root, 1),
                               task_index=np.int32(0)))
      seeds.append(seed)
  shapes = [jax.tree.map(lambda a: (np.shape(a), str(np.asarray(a).dtype)), s) for s in states]
  if any(s != shapes[0] for s in shapes[1:]):
    raise ConfigError(f"train.sweep={config.train.sweep!r}: the settings' train states differ in shape; a sweep "
                      "may not change shapes (buffer sizes, model widths)")
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)
  stacked = stacked._replace(step=np.int32(0), task_index=np.int32(0))  # shared by the runs (see RUN_AXES)
  sharding = run_sharding(stacked, setup.mesh, len(states))
  return Runs(grid, np.asarray(seeds, np.int32), strategies, optimizers, steps,
              put_global(stacked, sharding), sharding)


def run_sharding(stacked, mesh, num_runs: int):
  """Runs are independent: with R divisible by the devices, the run axis is split over them; else replicated."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from cl_jax.sharding import BATCH_AXES
  spec = P(BATCH_AXES) if mesh.size > 1 and num_runs % mesh.size == 0 else P()
  sh = jax.tree.map(lambda _: NamedSharding(mesh, spec), stacked)
  return sh._replace(step=NamedSharding(mesh, P()), task_index=NamedSharding(mesh, P()))


# The vmap axes of a stacked TrainState: the step counter and the task index are one scalar for all runs (they
# advance together, and the task loop reads them as the run's step), everything else has the run axis first.
def run_axes():
  from cl_jax.train.state import TrainState
  return TrainState(step=None, params=0, opt_state=0, strategy_state=0, rng=0, task_index=None)


def _split(tree, bounds):
  """The runs lo..hi of each setting (a TrainState keeps its shared step and task index whole)."""
  cut = lambda lo, hi: jax.tree.map(lambda a: a[lo:hi], tree)
  if hasattr(tree, "task_index"):
    cut = lambda lo, hi: jax.tree.map(lambda a: a[lo:hi], tree._replace(step=None, task_index=None))._replace(
        step=tree.step, task_index=tree.task_index)
  return [cut(lo, hi) for lo, hi in bounds]


def _concat(trees, axis=0):
  """Joins the settings' runs again (a TrainState's shared step and task index are taken from the first)."""
  if len(trees) == 1:
    return trees[0]
  if hasattr(trees[0], "task_index"):
    inner = [t._replace(step=None, task_index=None) for t in trees]
    joined = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis), *inner)
    return joined._replace(step=trees[0].step, task_index=trees[0].task_index)
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis), *trees)


def use_vmap() -> bool:
  """How the runs of one setting share the program: `vmap` (batched matmuls) on accelerators; on CPU a `lax.map`
  over runs, each run's K-step scan in turn: every matmul keeps a single run's shape (XLA:CPU threads a plain
  matmul over the cores better than a batched one; on the loaded 2-core test machine a vmapped chunk of 10 runs
  took 1.1-1.9x the time of 10 single-run chunks), and the program still saves each run's start-up, dispatch,
  logging, evaluation and checkpoint overhead. `CL_JAX_RUNS=vmap|map` overrides."""
  mode = os.environ.get("CL_JAX_RUNS", "").strip().lower()
  if mode in ("vmap", "map"):
    return mode == "vmap"
  return jax.default_backend() != "cpu"


def over_runs(chunk, state, pool, table, seeds, t, first):
  """`chunk` (one run's K steps) applied to every run of `state` (stacked; shared step and task index)."""
  axes = run_axes()
  if use_vmap():
    return jax.vmap(chunk, in_axes=(axes, None, None, 0, None, None), out_axes=(axes, 0))(
        state, pool, table, seeds, t, first)
  shared = state._replace(step=None, task_index=None)

  def one(args):
    own, seed = args
    new, metrics = chunk(own._replace(step=state.step, task_index=state.task_index), pool, table, seed, t, first)
    return new._replace(step=None, task_index=None), (new.step, metrics)

  new, (steps, metrics) = jax.lax.map(one, (shared, seeds))
  return new._replace(step=steps[0], task_index=state.task_index), metrics


def plan(config, setup, base_plan):
  """The classic plan of `setup` turned into one over all runs (see the module docstring)."""
  import dataclasses
  from cl_jax.data import task_data
  from cl_jax.data.device import DeviceData, DeviceTestData, StepSource, default_chunk
  runs = build_runs(config, setup)
  rep = setup.replicated
  data = DeviceData(setup.scenario, setup.strategy.train_tasks, config.train.batch_size, rep)
  test = DeviceTestData(setup.scenario, config.eval.batch_size, rep)
  per_call = config.train.steps_per_call if config.train.steps_per_call > 1 else 500
  chunk = default_chunk(math.gcd(*setup.steps), [config.eval.every_steps, config.checkpoint.every_steps], per_call)
  sizes = [len(s.seeds) for s in runs.settings]
  bounds = [(sum(sizes[:g]), sum(sizes[:g + 1])) for g in range(len(sizes))]
  seeds = put_global(runs.seeds, rep)
  programs = {}

  def program(n):
    chunks = [data.chunk_fn(step, n) for step in runs.train_steps]

    def many(state, pool, table, seeds, t, first):
      outs = [over_runs(fn, part, pool, table, s, t, first)
              for fn, part, s in zip(chunks, _split(state, bounds), _split(seeds, bounds))]
      new_state = _concat([o[0] for o in outs])
      metrics = jax.tree.map(lambda m: jnp.swapaxes(m, 0, 1), _concat([o[1] for o in outs]))  # [n, R]
      return new_state, metrics

    return jax.jit(many, donate_argnums=0, out_shardings=(runs.state_sharding, rep))

  def train_chunk(state, t, first, n):
    if n not in programs:
      programs[n] = program(n)
    return programs[n](state, data.pool, data.table(t), seeds, np.int32(t), np.int32(first))

  from cl_jax.strategies.base import evaluation_learner, evaluation_params  # a strategy's `predict` (GDumb)
  if len(runs.strategies) > 1 and getattr(runs.strategies[0], "predict", None) is not None:
    raise ConfigError(f"train.sweep: strategy {config.strategy!r} predicts with its own classifier, which a sweep "
                      "cannot share across settings; run one setting per program")
  accuracy = jax.jit(jax.vmap(test.accuracy_fn(evaluation_learner(setup.learner, runs.strategies[0])),
                              in_axes=(0, None, None, None)))

  def evaluate(state, t):
    params = evaluation_params(runs.strategies[0], state._replace(step=None, task_index=None))
    rows = np.asarray(accuracy(params, test.pool, test.tables, np.int32(t)), np.float64)  # [R, T]
    # "accuracy" stays a row (the mean over runs: TensorBoard, plots); every run's row is in "accuracy_runs".
    return {"accuracy": rows.mean(axis=0).tolist(), "accuracy_runs": rows.tolist()}

  def begin_task(state, t, done):
    state = state._replace(task_index=put_global(np.int32(t), runs.state_sharding.task_index))
    if any(s.reset_optimizer for s in runs.strategies) and t > 0 and done == 0:
      parts = [jax.vmap(opt.init)(p.params) for opt, p in zip(runs.optimizers, _split(state, bounds))]
      state = state._replace(opt_state=put_global(jax.device_get(_concat(parts)), runs.state_sharding.opt_state))
    return state

  def after_task(state, t):
    td = task_data(setup.scenario, t)
    out = []
    for g, (lo, hi) in enumerate(bounds):
      for r in range(lo, hi):
        one = jax.tree.map(lambda a: a[r], (state.strategy_state, state.params))
        key = jax.random.fold_in(jax.random.PRNGKey(int(runs.seeds[r])), 1000 + t)
        out.append(runs.strategies[g].after_task(one[0], one[1], td, key))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *out)
    return state._replace(strategy_state=put_global(stacked, runs.state_sharding.strategy_state))

  return dataclasses.replace(base_plan, state=runs.state, state_sharding=runs.state_sharding,
                             batches=lambda t, iterator_state: StepSource(t), train_chunk=train_chunk,
                             steps_per_call=chunk, evaluate=evaluate, begin_task=begin_task,
                             after_task=after_task), runs


# ----------------------------------------------------------------------------- results

def t_quantile_975(dof: int) -> float:
  """The 0.975 quantile of Student's t with `dof` degrees of freedom (for a two-sided 95% interval)."""
  try:
    from scipy.stats import t
    return float(t.ppf(0.975, dof))
  except ImportError:  # a table for small dof, the normal quantile beyond
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
    return table.get(dof, 1.96 if dof > 30 else table[min(k for k in table if k >= dof)])


def aggregate(values) -> dict:
  """mean, sample std and the half-width of a 95% Student-t interval of the mean (None for one value)."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if len(v) == 0:
    return {"mean": None, "std": None, "ci95": None, "n": 0}
  std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
  ci = t_quantile_975(len(v) - 1) * std / math.sqrt(len(v)) if len(v) > 1 else None
  return {"mean": float(np.mean(v)), "std": std, "ci95": ci, "n": int(len(v))}


def results_record(runs: Runs, matrices: np.ndarray) -> dict:
  """`matrices` [T+1, R, T] (boundary rows per run) -> {'runs': [...], 'settings': [...]} for results.json."""
  from cl_jax.eval.metrics import summarize
  per_run = []
  r = 0
  for g, setting in enumerate(runs.settings):
    for seed in setting.seeds:
      m = matrices[:, r, :]
      per_run.append({"seed": int(seed), "setting": g, "overrides": setting.overrides,
                      "accuracy_matrix": m.tolist(), **summarize(m)})
      r += 1
  out_settings = []
  for g, setting in enumerate(runs.settings):
    mine = [p for p in per_run if p["setting"] == g]
    out_settings.append({"overrides": setting.overrides, "seeds": list(setting.seeds),
                         "accuracy_matrix_mean": np.mean([p["accuracy_matrix"] for p in mine], axis=0).tolist(),
                         **{k: aggregate([p[k] for p in mine]) for k in METRICS}})
  return {"runs": per_run, "settings": out_settings}


def check_device_data(config, scenario) -> None:
  """Several runs as one program draw their batches on device: refuse data that cannot live there."""
  from cl_jax.data.device import pool_nbytes, use_device_data
  if not use_device_data(config.data.on_device, scenario) and config.data.on_device != "auto":
    raise ConfigError("data.on_device=false: train.num_seeds / train.sweep run every seed in one program, which "
                      "draws batches on device; set data.on_device=auto or true")
  if not use_device_data("auto", scenario):
    raise ConfigError(f"train.num_seeds={config.train.num_seeds}: the training data ({pool_nbytes(scenario) >> 20} "
                      "MiB) does not fit comfortably in device memory; run the seeds one by one")
