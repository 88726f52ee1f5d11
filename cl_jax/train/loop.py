"""The task loop: `run(config, workdir) -> Results`, what `run.py` and a notebook call.

For each task t: train `train.steps_per_task` steps (or `train.epochs_per_task` epochs) on the data of
`strategy.train_tasks(t)`, run the strategy's `after_task`, evaluate every task (the accuracy-matrix row
"after task t"), and save a permanent checkpoint. Row 0 of the matrix is measured before any training.
Rolling checkpoints every `checkpoint.every_steps`; rerunning on the same workdir resumes from the newest one
and ends with the same `results.json` (all but the `timing` key, which is wall-clock).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax import report, sharding
from cl_jax.checkpoint import Checkpoints, abstract_like
from cl_jax.config import ConfigError, validate
from cl_jax.data import make_scenario, task_data, test_batches, train_dataset, train_iterator
from cl_jax.data.sources import load_source
from cl_jax.eval.metrics import summarize
from cl_jax.models import build_model, param_count
from cl_jax.strategies import Learner, TaskInfo, build_strategy
from cl_jax.train.optim import build_optimizer
from cl_jax.train.schedules import build_schedule
from cl_jax.train.state import TrainState
from cl_jax.train.step import compile_train_step, make_train_step, task_loss

# Test hook: SIGKILL this process right after the given global step (a real crash, mid-task).
KILL_ENV = "CL_JAX_TEST_KILL_AT_STEP"


class NonFiniteLossError(RuntimeError):
  pass


class WorkdirError(ValueError):
  pass


@dataclasses.dataclass
class Results:
  accuracy_matrix: np.ndarray
  acc: float
  bwt: float
  fwt: float
  forgetting: float
  workdir: str
  extra: dict

  def as_dict(self) -> dict:
    return {"accuracy_matrix": np.asarray(self.accuracy_matrix).tolist(), "acc": self.acc, "bwt": self.bwt,
            "fwt": self.fwt, "forgetting": self.forgetting, **self.extra}


def config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def prepare_workdir(config, workdir: str, overwrite: bool) -> bool:
  """Refuses a workdir that holds another config; returns True when it holds this one (resume)."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old == config_dict(config) and not overwrite:
      return True
    if not overwrite:
      diff = sorted(_diff_keys(old, config_dict(config)))
      raise WorkdirError(f"workdir {workdir!r} holds a run with a different config (differs in {diff[:8]}); "
                         "use another --workdir, or --overwrite to discard it")
    shutil.rmtree(workdir)
  elif os.path.isdir(workdir) and os.listdir(workdir) and not overwrite:
    raise WorkdirError(f"workdir {workdir!r} is not empty and holds no cl_jax run; use --overwrite to replace it")
  elif overwrite and os.path.isdir(workdir):
    shutil.rmtree(workdir)
  return False


def _diff_keys(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield prefix.rstrip(".")


class MetricsLog:
  """metrics.jsonl (one JSON object per line) plus TensorBoard event files via tensorboardX."""

  def __init__(self, workdir: str, resume_step: int | None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(self.path):
      # Drop what was logged after the checkpoint we resume from: the rerun logs it again, identically.
      with open(self.path) as f:
        keep = [line for line in f if json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(keep)
    self.file = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard files are optional
      self.tb = None

  def write(self, record: dict) -> None:
    self.file.write(json.dumps(record) + "\n")
    if self.tb is not None:
      prefix = record["type"]
      for k, v in record.items():
        if isinstance(v, float):
          self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])
        elif k == "accuracy" and isinstance(v, list):
          for i, a in enumerate(v):
            self.tb.add_scalar(f"{prefix}/accuracy_task{i + 1}", a, record["step"])

  def flush(self):
    self.file.flush()
    if self.tb is not None:
      self.tb.flush()

  def close(self):
    self.file.close()
    if self.tb is not None:
      self.tb.close()


def run(config, workdir: str, overwrite: bool = False, progress: bool = True) -> Results:
  """Runs the experiment `config` describes in `workdir`; see the module docstring."""
  validate(config)
  resume = prepare_workdir(config, workdir, overwrite)
  sharding.maybe_initialize_distributed()
  t_start = time.time()

  setup = build(config)
  data, scenario, strategy, mesh, root_key = setup.data, setup.scenario, setup.strategy, setup.mesh, setup.root_key
  state, state_sh, rep, step_fn, eval_fn, steps = (setup.state, setup.state_sharding, setup.replicated,
                                                   setup.train_step, setup.eval_fn, setup.steps)
  multi_step_fn = setup.multi_step
  num_tasks, params = scenario.num_tasks, setup.state.params
  eval_batch = -(-config.eval.batch_size // mesh.size) * mesh.size

  # Where to start: fresh, or the newest checkpoint.
  os.makedirs(workdir, exist_ok=True)
  checkpoints = Checkpoints(workdir, keep=config.checkpoint.keep)
  rows: list[list[float]] = []
  task_seconds: list[float] = []
  start_task, iterator_state, resume_step = 0, None, None
  latest = checkpoints.latest() if resume else None
  if latest is not None:
    state, meta = checkpoints.restore(abstract_like(state, state_sh), *latest)
    rows, task_seconds = meta["rows"], meta["task_seconds"]
    start_task, iterator_state = meta["task"], meta["iterator"]
    resume_step = int(state.step)
    print(f"Resuming {workdir} from step {resume_step} (task {start_task + 1}"
          f"{', start' if iterator_state is None else ', mid-task'}).")
  else:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict(config), f, indent=2, sort_keys=True)
  log = MetricsLog(workdir, resume_step)

  def evaluate_all(task_index: int) -> list[float]:
    return [evaluate_task(eval_fn, state.params, scenario, i, task_index, eval_batch, mesh)
            for i in range(num_tasks)]

  if not rows:
    rows.append(evaluate_all(0))
    log.write({"type": "eval", "step": 0, "task": 0, "accuracy": rows[0], "boundary": True})

  kill_at = int(os.environ.get(KILL_ENV, "-1"))
  print(f"{config.strategy} on {scenario.name}/{scenario.kind} ({data.name}): {num_tasks} tasks, "
        f"{param_count(params):,} params, mesh {dict(mesh.shape)}")
  for t in range(start_task, num_tasks):
    t0 = time.time()
    task_steps = steps[t]
    first_step = sum(steps[:t])
    state = state._replace(task_index=jax.device_put(jnp.int32(t), rep))
    dataset = train_dataset(scenario, strategy.train_tasks(t), config.train.batch_size, config.seed, t)
    it = train_iterator(dataset, iterator_state)
    iterator_state = None
    done = int(state.step) - first_step
    if strategy.reset_optimizer and t > 0 and done == 0:
      state = state._replace(opt_state=jax.device_put(setup.optimizer.init(state.params), state_sh.opt_state))
    bar = _progress(progress, task_steps, done, f"task {t + 1}/{num_tasks}")
    pending = []

    def flush_metrics():
      last_loss = None
      for first, metrics in jax.device_get(pending):  # metrics: {name: [n]} for n consecutive steps
        for i in range(len(metrics["loss"])):
          rec = {"type": "train", "step": first + i, "task": t + 1,
                 **{name: float(v[i]) for name, v in metrics.items()}}
          if not np.isfinite(rec["loss"]):
            raise NonFiniteLossError(
                f"loss is {rec['loss']} at step {first + i} (task {t + 1}); stopping. The last good checkpoint "
                f"is kept in {workdir}/checkpoints; lower optim.lr or set optim.grad_clip.")
          log.write(rec)
          last_loss = rec["loss"]
      if last_loss is not None:
        bar.set_postfix(loss=f"{last_loss:.4f}")
      pending.clear()

    per_call = config.train.steps_per_call
    for k in range(done, task_steps, per_call):
      n = min(per_call, task_steps - k)
      if per_call == 1:
        state, metrics = step_fn(state, sharding.put_batch(next(it), mesh))
        metrics = jax.tree.map(lambda m: m[None], metrics)
      else:  # n steps fused into one jitted lax.scan (a shorter last chunk compiles once more)
        group = [next(it) for _ in range(n)]
        stacked = {key: np.stack([b[key] for b in group]) for key in group[0]}
        state, metrics = multi_step_fn(state, sharding.put_batch(stacked, mesh, stacked=True))
      step_no = first_step + k + n
      pending.append((step_no - n + 1, metrics))
      bar.update(n)
      if sum(len(m["loss"]) for _, m in pending) >= config.train.log_every_steps:
        flush_metrics()
      if config.eval.every_steps and (k + n) % config.eval.every_steps == 0 and k + n < task_steps:
        flush_metrics()
        log.write({"type": "eval", "step": step_no, "task": t + 1, "accuracy": evaluate_all(t),
                   "boundary": False})
      if config.checkpoint.every_steps and (k + n) % config.checkpoint.every_steps == 0 and k + n < task_steps:
        flush_metrics()
        log.flush()
        checkpoints.save(step_no, state, {"task": t, "iterator": it.get_state(), "rows": rows,
                                          "task_seconds": task_seconds}, boundary=False)
      if step_no - n < kill_at <= step_no:
        flush_metrics()
        log.flush()
        checkpoints.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    flush_metrics()
    bar.close()

    new_sstate = strategy.after_task(state.strategy_state, state.params, task_data(scenario, t),
                                     jax.random.fold_in(root_key, 1000 + t))
    state = state._replace(strategy_state=jax.device_put(new_sstate, state_sh.strategy_state))
    rows.append(evaluate_all(t))
    task_seconds.append(time.time() - t0)
    log.write({"type": "eval", "step": int(state.step), "task": t + 1, "accuracy": rows[-1], "boundary": True})
    log.flush()
    checkpoints.save(int(state.step), state, {"task": t + 1, "iterator": None, "rows": rows,
                                              "task_seconds": task_seconds}, boundary=True)
    print(f"after task {t + 1}: " + " ".join(f"{100 * a:5.1f}" for a in rows[-1]))

  checkpoints.wait()
  checkpoints.close()
  log.close()
  r = np.asarray(rows)
  extra = {"strategy": config.strategy, "scenario": f"{scenario.name}/{scenario.kind}", "data": data.name,
           "num_params": param_count(params), "steps_per_task": steps,
           "timing": {"task_seconds": task_seconds, "total_seconds": time.time() - t_start}}
  extra.update(strategy_record(config))
  results = Results(r, **summarize(r), workdir=workdir, extra=extra)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results.as_dict(), f, indent=2)
  report.write_report(workdir, results.as_dict(), f"{config.strategy} — {scenario.name} {scenario.kind}-IL "
                                                  f"({data.name})")
  return results


class Setup(NamedTuple):
  """Everything a run is made of, before any step: what `run` uses and what a notebook can poke at."""
  data: Any
  scenario: Any
  model: Any
  learner: Learner
  strategy: Any
  mesh: Any
  state: TrainState
  state_sharding: Any
  replicated: Any
  train_step: Any          # jitted (state, batch) -> (state, metrics), state donated
  multi_step: Any          # jitted (state, batches [K, B, ...]) -> (state, metrics [K]): K steps in one lax.scan
  eval_fn: Any             # jitted (params, batch, task_index) -> (hits, count)
  steps: list              # steps per task
  root_key: jax.Array
  optimizer: Any


def build(config) -> Setup:
  """Loads data, builds the scenario, model, strategy, optimizer, mesh, sharded state and jitted step."""
  data = load_source(config.data)
  scenario = make_scenario(data, config.scenario, multi_head=config.model.multi_head)
  num_tasks = scenario.num_tasks
  model, params = build_model(config.model, scenario.input_shape, scenario.num_outputs, scenario.num_heads,
                              config.seed)
  learner = Learner(model.apply, scenario.logit_mask)
  strategy = build_strategy(config.strategy, config, learner)
  task_info = TaskInfo(num_tasks, scenario.num_outputs, scenario.input_shape)
  root_key = jax.random.PRNGKey(config.seed)
  trainable = None
  if strategy.prepare is not None:  # a strategy that changes the model (O-LoRA): rebuild around it
    apply, params, trainable = strategy.prepare(model, params, task_info, jax.random.fold_in(root_key, 2))
    learner = Learner(apply, scenario.logit_mask)
    strategy = build_strategy(config.strategy, config, learner)

  steps = [steps_for_task(config, scenario, strategy, t) for t in range(num_tasks)]
  if len(set(steps)) > 1 and config.optim.scope == "global":
    raise ConfigError("optim.scope='global' needs the same number of steps per task "
                      "(use train.steps_per_task rather than epochs with a growing joint dataset)")
  schedule = build_schedule(config.optim, steps[0], num_tasks)
  optimizer = build_optimizer(config.optim, schedule, trainable)

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  state = TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                     strategy_state=strategy.init(params, task_info),
                     rng=jax.random.fold_in(root_key, 1), task_index=jnp.int32(0))
  rep = sharding.replicated(mesh)
  state_sh = sharding.state_sharding(state, mesh)._replace(step=rep, rng=rep, task_index=rep)
  state = jax.device_put(state, state_sh)
  train_step = make_train_step(strategy.loss(task_loss(learner)), optimizer, schedule,
                               log_norms=config.train.log_norms)
  step_fn = compile_train_step(train_step, state_sh, sharding.batch_sharding(mesh), rep)
  multi_step = compile_train_step(lambda s, b: jax.lax.scan(train_step, s, b), state_sh,
                                  sharding.batch_sharding(mesh, stacked=True), rep)
  eval_fn = make_eval_fn(learner, rep, sharding.batch_sharding(mesh))
  return Setup(data, scenario, model, learner, strategy, mesh, state, state_sh, rep, step_fn, multi_step, eval_fn,
               steps, root_key, optimizer)


def strategy_record(config) -> dict:
  """The strategy-owned config sections the run used (e.g. EWC's lambda and Fisher kind), for results.json."""
  from cl_jax.strategies import REGISTRY, parse_strategy_spec
  used = {}
  for name in parse_strategy_spec(config.strategy):
    for section in getattr(REGISTRY[name], "config_sections", (name,)):
      if section in config:
        used[section] = config_dict(config[section])
  return {"strategy_config": used} if used else {}


def steps_for_task(config, scenario, strategy, t: int) -> int:
  if config.train.epochs_per_task > 0:
    n = sum(scenario.tasks[i].num_train for i in strategy.train_tasks(t))
    return max(1, config.train.epochs_per_task * (n // config.train.batch_size))
  return config.train.steps_per_task


def make_eval_fn(learner: Learner, rep, batch_sh):
  def correct(params, batch, task_index):
    logits = learner.logits(params, batch["x"], batch["task"], task_index)
    hit = (jnp.argmax(logits, -1) == batch["y"]) & batch["valid"]
    return jnp.sum(hit), jnp.sum(batch["valid"])

  return jax.jit(correct, in_shardings=(None, batch_sh, rep), out_shardings=rep)


def evaluate_task(eval_fn, params, scenario, task_id: int, task_index: int, batch_size: int, mesh) -> float:
  """Test accuracy on one task with the logit mask of having trained up to `task_index`."""
  hits, total = 0, 0
  ti = jnp.int32(task_index)
  for batch in test_batches(scenario, task_id, batch_size):
    h, n = eval_fn(params, sharding.put_batch(batch, mesh), ti)
    hits, total = hits + h, total + n
  return float(hits) / max(float(total), 1.0)


def _progress(enabled: bool, total: int, initial: int, desc: str):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                         "{rate_fmt}{postfix}]")
