"""The task loop every run goes through, and the classic kind's parts built on it.

`run_tasks(plan, workdir, ...)` is THE loop. It is handed a `Plan`: what differs between kinds of run (the batch
source of each task, the jitted step, the task hooks, the evaluator, a per-evaluation hook such as the LM
regression monitor), and it owns what does not: resuming from the newest intact checkpoint, metrics logging,
evaluation and checkpoint intervals, divergence detection, preemption, progress bars and timing.

For each task t: `begin_task` -> `steps[t]` train steps on batches from `batches(t, ...)` (evaluations every
`eval_every` steps and rolling checkpoints every `checkpoint_every` steps inside the task) -> `after_task` ->
evaluate (the boundary record, e.g. the accuracy-matrix row "after task t") -> a permanent task-boundary
checkpoint. With `eval_before`, the boundary record of "task 0" (before any training) comes first.

Faults:
- SIGTERM / SIGINT: the step in flight finishes, a mid-task checkpoint (with the data iterator's state) is saved,
  the logs are flushed and `Preempted` (exit 75) is raised; rerunning resumes there and ends identically.
- divergence: a non-finite loss or params, or a loss above `divergence_factor` x the early loss, raises
  `DivergenceError` (exit 3) before any checkpoint of the diverged state is written. "Early loss": the larger of
  the first step's loss of the run and of the current task (losses at parameters no update has touched yet, so a
  step that blows up at once cannot inflate the reference).

`build(config)` and `classic_plan(config, setup)` are the classic kind's parts (`cl_jax.kinds.classic` runs them
through the skeleton). Rerunning on the same workdir resumes from the newest checkpoint and ends with the same
`results.json` (all but `timing`, which is wall-clock; it adds up across restarts).
"""
from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from cl_jax import host_memory, sharding
from cl_jax.checkpoint import METRICS, Checkpoints, abstract_like, params_only
from cl_jax.errors import ConfigError, DivergenceError, Preempted, WorkdirError
from cl_jax.workdir import MetricsLog, config_dict, is_writer
from cl_jax.train.step import with_finite_flag  # noqa: F401  (re-exported: the loop's divergence flag)
from cl_jax.train.throughput import throughput_postfix

NonFiniteLossError = DivergenceError  # the old name


# ----------------------------------------------------------------------------- the plan

class Verdict(NamedTuple):
  """What a per-evaluation hook decides: stop the run now; keep this state as the best checkpoint."""
  stop: bool = False
  best: bool = False


@dataclasses.dataclass
class Plan:
  """What one kind of run hands the task loop. Callables run on the host; `train_step` is jitted.

  batches(t, iterator_state) -> source: a Python iterator of host batches (dicts of numpy arrays holding this
      process's rows of each global batch) with `get_state()` (JSON-able, saved in mid-task checkpoints) and
      `iterator_state=None` meaning the task's start. A source may instead (or also) have `next_on_device(n)`
      returning the device batch of n steps (stacked [n, B, ...] when n > 1): it is used when present.
  evaluate(state, t) -> dict: the fields of an eval record after training up to task t (e.g. {"accuracy": row}).
  on_eval(state, step, record) -> Verdict | None: called after every evaluation (mid-task and boundary).
  begin_task(state, t, done) -> state: before training task t (`done` steps of it already run, on resume).
  after_task(state, t) -> state: after the last step of task t, before its boundary evaluation.
  meta() -> dict / load_meta(dict): the hooks' own JSON state (a monitor's history), saved in every checkpoint.
  put_batch(batch, stacked) -> device batch.
  """
  state: Any
  state_sharding: Any
  steps: Sequence[int]
  batches: Callable[[int, Any], Any]
  train_step: Callable
  put_batch: Callable
  evaluate: Callable[[Any, int], dict] | None = None
  multi_step: Callable | None = None
  steps_per_call: int = 1
  # (state, t, k, n) -> (state, metrics {name: [n, ...]}): n steps of task t from its step k, batches drawn on
  # device inside the jitted program (device-resident data); when set, `batches` only supplies get_state().
  train_chunk: Callable | None = None
  begin_task: Callable | None = None
  after_task: Callable | None = None
  on_eval: Callable | None = None
  meta: Callable[[], dict] | None = None
  load_meta: Callable[[dict], None] | None = None
  eval_before: bool = True
  eval_every: int = 0
  checkpoint_every: int = 0
  log_every: int = 10
  divergence_factor: float = 0.0
  names: Sequence[str] | None = None      # task names for progress bars and messages
  record: dict = dataclasses.field(default_factory=dict)  # fields added to every metrics record (e.g. phase)


@dataclasses.dataclass
class LoopResult:
  state: Any
  boundary: list          # the boundary eval records, in order (classic: their "accuracy" are the matrix rows)
  task_seconds: list
  seconds: float          # wall time of the loop, added up across restarts
  stopped: dict | None    # {"step", "task"} when on_eval stopped the run early
  resumed_from: int | None


def task_start(strategy, optimizer, state_sharding):
  """The `begin_task` hook every kind shares: the task index into the state and, for a strategy that asks for it
  (`reset_optimizer`: O-LoRA, so no momentum of the previous task moves a frozen slot), fresh optimizer state at
  the start of every task after the first (not on a mid-task resume: the checkpoint holds the task's own)."""
  def begin_task(state, t, done):
    state = state._replace(task_index=sharding.put_global(np.int32(t), state_sharding.task_index))
    if strategy.reset_optimizer and t > 0 and done == 0:
      opt = sharding.put_global(jax.device_get(optimizer.init(state.params)), state_sharding.opt_state)
      state = state._replace(opt_state=opt)
    return state
  return begin_task


# ----------------------------------------------------------------------------- preemption

class PreemptionFlag:
  """SIGTERM / SIGINT set a flag the loop checks at every step boundary; the previous handlers come back on exit."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self.previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
      for s in self.SIGNALS:
        self.previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step boundary
    self.signum = signum

  def __exit__(self, *exc):
    for s, handler in self.previous.items():
      signal.signal(s, handler)
    self.previous = {}

  def is_set(self) -> bool:
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # all processes stop at the same step
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def release(state, keep=None) -> None:
  """Deletes the device buffers of `state` (a train state nothing reads again), except those `keep` also holds.

  Dropping the Python references is not enough where a caller still holds the arrays (an LM run's imported params
  are the fresh state's own buffers, `adapt_phase(own_base=True)`): the buffers would stay allocated until that
  caller lets go. Shapes and dtypes stay readable on a deleted array (`abstract_like` still works on it)."""
  kept = {id(x) for x in jax.tree.leaves(keep)} if keep is not None else set()
  for x in jax.tree.leaves(state):
    if isinstance(x, jax.Array) and id(x) not in kept and not x.is_deleted():
      x.delete()


# ----------------------------------------------------------------------------- batches

def fetch_batches(source, n: int, put_batch, stacked: bool):
  """The device batch of the next n steps (stacked [n, ...] when `stacked`): the one place batches are drawn."""
  if hasattr(source, "next_on_device"):
    return source.next_on_device(n)
  group = [next(source) for _ in range(n)]
  if not stacked:
    return put_batch(group[0], False)
  return put_batch({key: np.stack([b[key] for b in group]) for key in group[0]}, True)


# ----------------------------------------------------------------------------- the loop

class _Divergence:
  """Loss and params checks over the logged steps; the reference losses travel in checkpoint meta."""

  def __init__(self, factor: float, state: dict | None):
    self.factor = factor
    self.run_ref = (state or {}).get("run_ref")
    self.task_ref = (state or {}).get("task_ref")

  def state(self) -> dict:
    return {"run_ref": self.run_ref, "task_ref": self.task_ref}

  def new_task(self):
    self.task_ref = None

  def check_chunk(self, losses, finite) -> bool:
    """True (and the references taken) when consecutive steps with these losses [n, ...] and finite flags all pass
    `check`; False, changing nothing, when some step would fail (the caller then checks step by step)."""
    values = np.asarray(losses, np.float64).reshape(len(losses), -1)
    if not len(values):
      return True
    if not np.all(np.isfinite(values)) or (finite is not None and not bool(np.all(finite))):
      return False
    peaks = values.max(axis=1)
    run_ref = float(peaks[0]) if self.run_ref is None else self.run_ref
    task_ref = float(peaks[0]) if self.task_ref is None else self.task_ref
    ref = max(run_ref, task_ref)
    if self.factor > 0 and ref > 0 and bool(np.any(peaks > self.factor * ref)):
      return False
    self.run_ref, self.task_ref = run_ref, task_ref
    return True

  def check(self, step: int, name: str, loss, finite) -> None:
    loss_arr = np.asarray(loss, np.float64)
    if not np.all(np.isfinite(loss_arr)):
      raise DivergenceError(f"loss is {loss_arr.tolist()} at step {step} ({name}): the run diverged; the last good "
                            "checkpoint is intact. Lower optim.lr or set optim.grad_clip, then rerun")
    if finite is not None and not bool(np.all(finite)):
      raise DivergenceError(f"non-finite params after step {step} ({name}): the run diverged; the last good "
                            "checkpoint is intact. Lower optim.lr or set optim.grad_clip, then rerun")
    value = float(np.max(loss_arr))
    if self.run_ref is None:
      self.run_ref = value
    if self.task_ref is None:
      self.task_ref = value
    ref = max(self.run_ref, self.task_ref)
    if self.factor > 0 and ref > 0 and value > self.factor * ref:
      raise DivergenceError(f"loss {value:.4g} at step {step} ({name}) exceeds train.divergence_factor="
                            f"{self.factor:g} x its early value {ref:.4g}: the run diverged; the last good "
                            "checkpoint is intact. Lower optim.lr, set optim.grad_clip, or raise the factor")


def _close(source) -> None:
  """Stops a batch source's reader thread (a prefetching source), if it has one."""
  close = getattr(source, "close", None)
  if close is not None:
    close()


def _metric_column(v) -> list:
  """A metric of n steps [n, ...] as n Python floats (lists of floats on a seed axis: one value per seed)."""
  return np.asarray(v).astype(np.float64).tolist()


def run_identity(workdir: str) -> dict:
  """What makes a checkpoint this run's (`cl_jax.checkpoint`): the sha256 of the workdir's config.json (written
  once when the run started, so every legitimate resume sees the same one; `cl_jax.results.config_sha256`, the
  hash provenance records), the seed, and the code version (git commit, else the package version)."""
  from cl_jax.results import config_sha256, git_commit, package_versions
  from cl_jax.workdir import read_config
  config = read_config(workdir) or {}
  commit = git_commit()
  code = commit["rev"] if commit else f"cl-jax=={package_versions().get('cl-jax')}"
  return {"config_sha256": config_sha256(config) if config else None, "seed": config.get("seed"), "code": code}


def run_tasks(plan: Plan, workdir: str, checkpoints: Checkpoints, resume: bool, progress: bool = True,
              open_log: Callable[[int | None], MetricsLog] | None = None, hooks: Sequence = ()) -> LoopResult:
  """Runs `plan` to its end (or its hook's stop), resuming from the newest intact checkpoint when `resume`.

  `hooks`: `cl_jax.faults.StepHook`s called around every call of the jitted step and after every evaluation
  (test fault injection; none in a plain run, so the loop's path has no test code).
  """
  before_hooks = [h.before for h in hooks if h.before is not None]
  after_hooks = [h.after for h in hooks if h.after is not None]
  eval_hooks = [h.after_eval for h in hooks if h.after_eval is not None]
  t_start = time.time()
  num_tasks = len(plan.steps)
  names = list(plan.names or [f"task {t + 1}/{num_tasks}" for t in range(num_tasks)])
  state = plan.state
  boundary, task_seconds, prior_seconds, clock = [], [], 0.0, {"task_start": time.time()}
  start_task, iterator_state, resume_step, div_state, stopped = 0, None, None, None, None
  if checkpoints.identity is None:  # the run's identity, recorded in every checkpoint and checked on resume
    checkpoints.identity = run_identity(workdir)
  restored = checkpoints.restore(abstract_like(state, plan.state_sharding)) if resume else None
  if restored is not None:
    # The restored state replaces the fresh one the plan was built with: its buffers go now (as the first step's
    # donation would take them in a fresh run), not at the end of the run. Kept, they were a second train state
    # for the whole of a resumed run (float32 AdamW: 3 params' bytes; the imported base among them).
    release(plan.state, restored[0])
    state, meta = restored
    boundary, task_seconds = meta["boundary"], meta["task_seconds"]
    start_task, iterator_state = meta["task"], meta["iterator"]
    prior_seconds, div_state, stopped = meta.get("seconds", 0.0), meta.get("divergence"), meta.get("stopped")
    if iterator_state is not None:  # mid-task: the task's wall time so far counts toward its task_seconds
      clock["task_start"] -= meta.get("task_elapsed", 0.0)
    if plan.load_meta is not None:
      plan.load_meta(meta.get("plan", {}))
    resume_step = int(state.step)
    print(f"Resuming {workdir} from step {resume_step} ({names[min(start_task, num_tasks - 1)]}"
          f"{', start' if iterator_state is None else ', mid-task'}).")
  log = (open_log or (lambda s: MetricsLog(workdir, s, tb_every=plan.log_every)))(resume_step)
  if restored is not None:  # a torn or deleted metrics.jsonl: rewritten from the checkpoint's copy
    log.recover(restored[1].pop(METRICS, None), resume_step)
  checkpoints.log = log  # every checkpoint keeps metrics.jsonl up to its step
  divergence = _Divergence(plan.divergence_factor, div_state)
  seconds = lambda: prior_seconds + time.time() - t_start

  def meta(task, iterator):
    return {"task": task, "iterator": iterator, "boundary": boundary, "task_seconds": task_seconds,
            "seconds": seconds(), "task_elapsed": time.time() - clock["task_start"],
            "divergence": divergence.state(), "stopped": stopped,
            "plan": plan.meta() if plan.meta is not None else {}}

  def save_best(step, state, meta):
    # The best is for evaluation and export, never for a resume: its params alone (`params_only`), a third of a
    # float32 AdamW state's bytes to stage and write; none at all under `checkpoint.keep_best=False`.
    if getattr(checkpoints, "keep_best", True):
      checkpoints.save(step, params_only(state), meta, kind="best")
      settle()

  def settle():
    # `checkpoint.async_save=False`: a save's write (and the buffers it holds) ends before the next step or
    # evaluation allocates its own, so the peak is the larger of the two, not their sum.
    if getattr(checkpoints, "synchronous", False):
      checkpoints.wait()
      host_memory.trim()  # the write's staging and encoding buffers, freed in its threads' arenas

  def evaluate(state, t):
    fields = plan.evaluate(state, t)
    host_memory.trim()  # the evaluation's buffers, and a finished asynchronous write's, back to the kernel
    return fields

  def write_eval(step, t_record, fields, is_boundary):
    rec = {"type": "eval", **plan.record, "step": step, "task": t_record, **fields, "boundary": is_boundary}
    log.write(rec)
    for hook in eval_hooks:
      hook(step)
    verdict = plan.on_eval(state, step, rec) if plan.on_eval is not None else None
    return rec, verdict or Verdict()

  try:
    with PreemptionFlag() as preempt:
      if not boundary and plan.eval_before and plan.evaluate is not None:
        rec, verdict = write_eval(int(state.step), 0, evaluate(state, 0), True)
        boundary.append(rec)
        if verdict.best:
          save_best(int(state.step), state, meta(0, None))
      for t in range(start_task, num_tasks):
        if stopped is not None:
          break
        if t > start_task or iterator_state is None:
          clock["task_start"] = time.time()
        first_step = sum(plan.steps[:t])
        task_steps = plan.steps[t]
        done = int(state.step) - first_step
        if iterator_state is None:
          divergence.new_task()
        source = plan.batches(t, iterator_state)
        iterator_state = None
        if plan.begin_task is not None:
          state = plan.begin_task(state, t, done)
        bar = _progress(progress, task_steps, done, names[t])
        pending = []

        def flush_metrics():
          # One host transfer for every pending chunk, one check and one log write per chunk (a small model's
          # step takes about a millisecond: per-step Python work here would be a visible share of the run).
          rec = None
          for first, metrics in jax.device_get(pending):  # metrics: {name: [n, ...]} for n consecutive steps
            finite = metrics.pop("_finite", None)
            columns = {k: _metric_column(v) for k, v in metrics.items() if not k.startswith("_")}
            records = [{"type": "train", **plan.record, "step": first + i, "task": t + 1,
                        **{k: c[i] for k, c in columns.items()}} for i in range(len(columns["loss"]))]
            if divergence.check_chunk(metrics["loss"], finite):
              log.write_many(records)
            else:  # step by step, to write the records before the diverged step and name it
              for i, r in enumerate(records):
                divergence.check(first + i, names[t], metrics["loss"][i], None if finite is None else finite[i])
                log.write(r)
            rec = records[-1] if records else rec
          if rec is not None and isinstance(rec["loss"], float):
            bar.set_postfix(loss=f"{rec['loss']:.4f}", **throughput_postfix(rec))
          pending.clear()

        def save_mid_task(step_no):
          flush_metrics()  # checks divergence first: a diverged state is never saved
          log.flush()
          checkpoints.save(step_no, state, meta(t, source.get_state()), kind="rolling")
          settle()

        fused = plan.multi_step is not None or plan.train_chunk is not None
        per_call = max(1, plan.steps_per_call if fused else 1)
        k = done
        while k < task_steps:
          n = min(per_call, task_steps - k)
          step_no = first_step + k + n
          for hook in before_hooks:
            state = hook(state, step_no - n + 1, step_no)
          if plan.train_chunk is not None:
            state, metrics = plan.train_chunk(state, t, k, n)
          elif n == 1 and (per_call == 1 or plan.multi_step is None):
            state, metrics = plan.train_step(state, fetch_batches(source, 1, plan.put_batch, False))
            metrics = jax.tree.map(lambda m: m[None], metrics)
          else:  # n steps fused into one jitted lax.scan (a shorter last chunk compiles once more)
            state, metrics = plan.multi_step(state, fetch_batches(source, n, plan.put_batch, True))
          k += n
          pending.append((step_no - n + 1, metrics))
          bar.update(n)
          for hook in after_hooks:
            hook(step_no - n + 1, step_no, lambda: (flush_metrics(), log.flush(), checkpoints.wait()))
          if sum(len(m["loss"]) for _, m in pending) >= plan.log_every:
            flush_metrics()
          if plan.eval_every and k % plan.eval_every == 0 and k < task_steps and plan.evaluate is not None:
            flush_metrics()
            _, verdict = write_eval(step_no, t + 1, evaluate(state, t), False)
            if verdict.best:
              save_best(step_no, state, meta(t, source.get_state()))
            if verdict.stop:
              stopped = {"step": step_no, "task": t + 1}
          if stopped is not None or (plan.checkpoint_every and k % plan.checkpoint_every == 0 and k < task_steps):
            save_mid_task(step_no)
            if stopped is not None:
              break
          # Multi-host: the processes agree on the flag through a collective, so ask only every log_every steps.
          if (jax.process_count() == 1 or k % plan.log_every < n or k == task_steps) and preempt.is_set():
            if not checkpoints.has(step_no):
              save_mid_task(step_no)
            checkpoints.wait()
            log.flush()
            bar.close()
            raise Preempted(f"preempted by signal {preempt.signum} at step {step_no} ({names[t]}); a checkpoint "
                            f"was saved in {workdir}: rerun the same command to resume")
        flush_metrics()
        bar.close()
        _close(source)
        if stopped is not None:
          break
        if plan.after_task is not None:
          state = plan.after_task(state, t)
        fields = evaluate(state, t) if plan.evaluate is not None else {}
        task_seconds.append(time.time() - clock["task_start"])
        rec, verdict = write_eval(int(state.step), t + 1, fields, True)
        boundary.append(rec)
        log.flush()
        if verdict.best:
          save_best(int(state.step), state, meta(t + 1, None))
        if verdict.stop:
          stopped = {"step": int(state.step), "task": t + 1}
        checkpoints.save(int(state.step), state, meta(t + 1, None), kind="task")
        settle()
      checkpoints.wait()
  except BaseException:
    _close(locals().get("source"))
    try:
      checkpoints.wait()  # the last good checkpoint is complete on disk
    finally:
      log.close()
    raise
  log.close()
  return LoopResult(state, boundary, task_seconds, seconds(), stopped, resume_step)


# ----------------------------------------------------------------------------- the classic run

class Setup(NamedTuple):
  """Everything a run is made of, before any step: what `run` uses and what a notebook can poke at."""
  data: Any
  scenario: Any
  model: Any
  learner: Any
  strategy: Any
  mesh: Any
  state: Any
  state_sharding: Any
  replicated: Any
  train_step: Any          # jitted (state, batch) -> (state, metrics), state donated
  multi_step: Any          # jitted (state, batches [K, B, ...]) -> (state, metrics [K]): K steps in one lax.scan
  steps: list              # steps per task
  root_key: jax.Array
  optimizer: Any
  evaluator: Any           # cl_jax.eval.evaluator.AccuracyEvaluator: `row(state, scenario, t)`

  @property
  def eval_fn(self):
    """The evaluator's jitted (params, batch, task_index) -> (hits, count)."""
    return self.evaluator.fn


def build(config) -> Setup:
  """Loads data, builds the scenario, model, strategy, optimizer, mesh, sharded state and jitted step."""
  from cl_jax.data import make_scenario
  from cl_jax.data.sources import load_source
  from cl_jax.models import build_model
  from cl_jax.strategies import Learner, TaskInfo, build_strategy
  from cl_jax.train.optim import build_optimizer
  from cl_jax.train.schedules import build_schedule
  from cl_jax.train.state import build_state
  from cl_jax.train.step import compile_step, task_loss
  data = load_source(config.data)
  scenario = make_scenario(data, config.scenario, multi_head=config.model.multi_head,
                           validation_fraction=config.data.get("validation_fraction", 0.0),
                           eval_split=config.eval.get("split", "test"))
  num_tasks = scenario.num_tasks
  model, params = build_model(config.model, scenario.input_shape, scenario.num_outputs, scenario.num_heads,
                              config.seed)
  if config.model.get("init_from", ""):
    params = init_params(config.model.init_from, params)
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
  check_data_fits(config, scenario, strategy)
  schedule = build_schedule(config.optim, steps[0], num_tasks)
  optimizer = build_optimizer(config.optim, schedule, trainable)

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  state, state_sh = build_state(params, optimizer, strategy.init(params, task_info), jax.random.fold_in(root_key, 1),
                                mesh)
  rep = sharding.replicated(mesh)
  step_fn, multi_step = compile_step(strategy.loss(task_loss(learner)), optimizer, schedule, strategy, state_sh, mesh,
                                     log_norms=config.train.log_norms)
  from cl_jax.eval.evaluator import accuracy_evaluator  # a strategy's `predict` hook replaces the logits (GDumb)
  evaluator = accuracy_evaluator(learner, mesh, config.eval.batch_size, strategy)
  return Setup(data, scenario, model, learner, strategy, mesh, state, state_sh, rep, step_fn, multi_step, steps,
               root_key, optimizer, evaluator)


def init_params(ref: str, like):
  """`model.init_from`: the params `ref` names (`cl_jax.checkpoint.resolve`), checked against the built model's."""
  from cl_jax import merging
  from cl_jax.checkpoint import resolve
  try:
    loaded = resolve(ref, "model.init_from").params()
    merging.check_compatible([jax.device_get(like), loaded], ["the model", f"model.init_from={ref!r}"])
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return jax.tree.map(lambda a, b: np.asarray(a, np.asarray(b).dtype), loaded, like)


def check_data_fits(config, scenario, strategy) -> None:
  """A batch larger than a task's training data: a config error before anything is written."""
  hosts = jax.process_count()
  if config.train.batch_size % hosts:
    raise ConfigError(f"train.batch_size={config.train.batch_size}: not divisible by the {hosts} processes "
                      "(each feeds an equal share of every global batch)")
  for t in range(scenario.num_tasks):
    n = sum(scenario.tasks[i].num_train for i in strategy.train_tasks(t))
    if n < config.train.batch_size:
      raise ConfigError(f"train.batch_size={config.train.batch_size}: larger than the {n} training examples of "
                        f"task {t + 1}; use at most {n}")


def classic_plan(config, setup: Setup) -> Plan:
  """The classic kind's plan: grain batches of `strategy.train_tasks(t)`, accuracy rows, strategy after_task."""
  from cl_jax.data import task_data, train_dataset, train_iterator
  scenario, strategy, mesh = setup.scenario, setup.strategy, setup.mesh

  def batches(t, iterator_state):
    dataset = train_dataset(scenario, strategy.train_tasks(t), config.train.batch_size, config.seed, t)
    from cl_jax.data.device import Prefetch  # grain reads ahead in a thread while the device trains
    return Prefetch(train_iterator(dataset, iterator_state))

  def after_task(state, t):
    new = strategy.after_task(state.strategy_state, state.params, task_data(scenario, t),
                              jax.random.fold_in(setup.root_key, 1000 + t))
    return state._replace(strategy_state=sharding.put_global(new, setup.state_sharding.strategy_state))

  def evaluate(state, t):
    return {"accuracy": setup.evaluator.row(state, scenario, t)}

  return Plan(state=setup.state, state_sharding=setup.state_sharding, steps=setup.steps, batches=batches,
              train_step=setup.train_step, multi_step=setup.multi_step,
              put_batch=lambda b, stacked: sharding.put_batch(b, mesh, stacked=stacked),
              evaluate=evaluate, steps_per_call=config.train.steps_per_call,
              begin_task=task_start(strategy, setup.optimizer, setup.state_sharding),
              after_task=after_task, eval_every=config.eval.every_steps,
              checkpoint_every=config.checkpoint.every_steps, log_every=config.train.log_every_steps,
              divergence_factor=float(config.train.get("divergence_factor", 0.0)))


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
  if list(config.train.get("tasks", [])) and t + 1 not in config.train.tasks:
    return 0  # not trained in this run (train.tasks), still evaluated
  if config.train.epochs_per_task > 0:
    n = sum(scenario.tasks[i].num_train for i in strategy.train_tasks(t))
    return max(1, config.train.epochs_per_task * (n // config.train.batch_size))
  return config.train.steps_per_task


# The one evaluator (cl_jax.eval.evaluator): the accuracy rows of the task loop, the merge runner and the experiments.
from cl_jax.eval.evaluator import make_accuracy_fn as make_eval_fn, task_accuracy as evaluate_task  # noqa: E402


def _progress(enabled: bool, total: int, initial: int, desc: str):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, disable=not enabled or not is_writer(), dynamic_ncols=True,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                         "{rate_fmt}{postfix}]")


__all__ = ["Plan", "Verdict", "LoopResult", "run_tasks", "fetch_batches", "with_finite_flag", "build",
           "classic_plan", "Setup", "evaluate_task", "make_eval_fn", "steps_for_task", "strategy_record",
           "config_dict", "MetricsLog", "WorkdirError", "NonFiniteLossError"]
