"""Orbax checkpoints: a permanent one at every task boundary plus rolling mid-task ones (and an optional best).

`CheckpointManager`s under `<workdir>/checkpoints/`: `tasks/` keeps every task-boundary checkpoint (one per task,
for analysis and for merging), `rolling/` the last `checkpoint.keep` mid-task ones, `best/` the one a per-
evaluation hook marked best (the LM regression monitor). `tasks/` and `rolling/` hold the whole train state
(params, optimizer, strategy state, rng, step), `best/` the params and step alone (`ParamsOnly`: evaluation and
export read nothing else; a resume never starts from it); how many stay is `Checkpoints.retain`'s. Each has a JSON
`meta` item (data-iterator state, evaluation records so far, where in the
task loop it was taken, accumulated wall time).

Resuming takes the newest intact one of `tasks/` and `rolling/`. A newest checkpoint that cannot be read (a
truncated file, missing metadata, a partial `*.orbax-checkpoint-tmp*` directory left by a killed save) is
reported with a warning naming its path, and the next older one is used. On multi-host runs every process calls
`save` and `restore` (orbax writes collectively; each process reads its own shards).

orbax is imported, and each manager created, on first use: a fresh run reaches its first training step without
either (importing orbax takes ~1 s of a CPU launch).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from typing import Any, NamedTuple

import jax

KINDS = ("tasks", "rolling", "best")
METADATA = "_CHECKPOINT_METADATA"  # orbax writes it last into a step's directory


def _ocp():
  import orbax.checkpoint as ocp
  return ocp


class Checkpoints:
  keep_best, synchronous, _pin = True, False, ()  # retention beyond `keep` and write order: `retain`

  def __init__(self, workdir: str, keep: int = 2):
    self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._warn_partial()
    self._keep = {"tasks": None, "rolling": keep, "best": 1}
    self._managers = {}

  def _get(self, kind: str):
    if kind not in self._managers:
      options = self._options(kind)
      self._managers[kind] = _ocp().CheckpointManager(os.path.join(self.root, kind), options=options)
    return self._managers[kind]

  # --------------------------------------------------------------------------- retention (issue 22 item 3)

  def retain(self, keep_tasks: int = 0, keep_best: bool = True, pin: tuple = (), async_save: bool = True
             ) -> "Checkpoints":
    """How many checkpoints stay on disk, beyond `keep` (the newest rolling ones): `keep_tasks` the newest task-
    boundary ones (0: every one, for analysis and merging; a resume reads only the newest), `keep_best` whether a
    per-evaluation hook's best is saved at all (params only: `params_only`), `pin` boundary steps never deleted (an
    LM run's step 0: the base its test split compares with). `async_save=False` asks the task loop to wait for
    each write before going on (`synchronous`). Call before the first save."""
    if self._managers:
      raise RuntimeError("Checkpoints.retain: call it before the first save or restore")
    self._keep["tasks"] = int(keep_tasks) or None
    self._pin = tuple(int(s) for s in pin)
    self.keep_best = bool(keep_best)
    self.synchronous = not async_save
    return self

  def _options(self, kind: str):
    """orbax options of one manager: the newest `_keep[kind]` (None: all), plus the pinned task-boundary steps."""
    ocp = _ocp()
    keep, pin = self._keep[kind], self._pin
    if kind != "tasks" or keep is None or not pin:
      return ocp.CheckpointManagerOptions(create=True, max_to_keep=keep)
    from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
    return ocp.CheckpointManagerOptions(create=True, preservation_policy=pp.AnyPreservationPolicy(
        [pp.LatestN(keep), pp.CustomSteps(list(pin))]))

  def restore_params(self, abstract_state, kind: str, step: int):
    """`ParamsOnly(step, params)` of one saved (full) train state, read alone: a partial restore that never
    allocates the optimizer or strategy state (what evaluating or exporting a saved model needs)."""
    ocp = _ocp()
    abstract = params_only(abstract_state)
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.restore(os.path.join(self.path(kind, step), "state"), args=ocp.args.PyTreeRestore(
          abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))

  @property
  def tasks(self):
    return self._get("tasks")

  @property
  def rolling(self):
    return self._get("rolling")

  @property
  def best(self):
    return self._get("best")

  def _steps(self, kind: str) -> list:
    """The steps saved under `kind`, without creating a manager (or importing orbax) where there are none."""
    if kind not in self._managers and not os.path.isdir(os.path.join(self.root, kind)):
      return []
    return list(self._get(kind).all_steps())

  def _manager(self, kind: str):
    kind = {"task": "tasks", "boundary": "tasks"}.get(kind, kind)
    if kind not in KINDS:
      raise ValueError(f"checkpoint kind {kind!r}: expected one of {KINDS}")
    return getattr(self, kind)

  def _warn_partial(self) -> None:
    for kind in KINDS:
      d = os.path.join(self.root, kind)
      if not os.path.isdir(d):
        continue
      for name in sorted(os.listdir(d)):
        if ".orbax-checkpoint-tmp" in name:
          path = os.path.join(d, name)
          warnings.warn(f"ignoring the partial checkpoint {path} (a save that did not finish); removing it",
                        stacklevel=3)
          if jax.process_index() == 0:
            shutil.rmtree(path, ignore_errors=True)

  def save(self, step: int, state, meta: dict, boundary: bool | None = None, kind: str = "rolling") -> None:
    """Saves asynchronously; `kind` is 'tasks' (or 'task'), 'rolling' or 'best' (`boundary=True` means 'tasks')."""
    if boundary is not None:
      kind = "tasks" if boundary else "rolling"
    ocp = _ocp()
    manager = self._manager(kind)
    if step in manager.all_steps():
      return  # already saved (a preemption right after a periodic checkpoint)
    if jax.process_count() > 1:
      # Each manager finalises its async save behind a cross-process barrier of the same name; two managers
      # finalising at once (a rolling save still in flight when the task-boundary one starts) collide on it
      # ("Barrier ... is already ongoing"). One save in flight at a time across managers avoids that.
      self.wait()
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)

  def has(self, step: int) -> bool:
    return any(step in self._steps(kind) for kind in ("tasks", "rolling"))

  def candidates(self) -> list[tuple[int, str]]:
    """(step, kind) of every checkpoint to resume from, newest first; a task-boundary one wins a tie."""
    found = [(s, "tasks") for s in self._steps("tasks")] + [(s, "rolling") for s in self._steps("rolling")]
    return sorted(found, key=lambda f: (f[0], f[1] == "tasks"), reverse=True)

  def latest(self) -> tuple[Any, int] | None:
    """(manager, step) of the newest checkpoint (intact or not); a task-boundary one wins a tie."""
    c = self.candidates()
    return (self._manager(c[0][1]), c[0][0]) if c else None

  def path(self, kind: str, step: int) -> str:
    return os.path.join(self.root, {"task": "tasks"}.get(kind, kind), str(step))

  def restore(self, abstract_state, manager=None, step=None, kind: str | None = None):
    """(state, meta) restored into the shardings of `abstract_state` (a pytree of ShapeDtypeStructs), or None.

    Without `manager`/`kind`: the newest intact checkpoint, falling back past unreadable ones with a warning.
    `kind='best'`: the best one.
    """
    if manager is None and kind is None and not self.candidates():
      return None  # a fresh workdir: nothing to restore (and no orbax import)
    ocp = _ocp()
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if manager is not None or kind is not None:
      manager = manager or self._manager(kind)
      step = manager.latest_step() if step is None else step
      if step is None:
        return None
      restored = manager.restore(step, args=args)
      return restored.state, restored.meta
    broken = []
    try:
      for step, kind in self.candidates():
        if not os.path.isfile(os.path.join(self.path(kind, step), METADATA)):
          warnings.warn(f"checkpoint {self.path(kind, step)} has no {METADATA} (an unfinished or damaged save); "
                        "falling back to an older checkpoint", stacklevel=2)
          broken.append((step, kind))
          continue
        try:
          restored = self._manager(kind).restore(step, args=args)
          if not isinstance(restored.meta, dict) or restored.state is None:
            raise ValueError("no meta item")
          return restored.state, restored.meta
        except Exception as e:  # noqa: BLE001 — any unreadable checkpoint: fall back to an older one
          reason = " ".join(str(e).split())[:160]
          warnings.warn(f"checkpoint {self.path(kind, step)} is unreadable ({type(e).__name__}: {reason}); "
                        "falling back to an older checkpoint", stacklevel=2)
          broken.append((step, kind))
      return None
    finally:
      self._set_aside(broken)

  def _set_aside(self, broken) -> None:
    """Moves unreadable checkpoints to `checkpoints/unreadable/` (kept for inspection), so the resumed run can
    save its own checkpoints at those steps again."""
    if not broken:
      return
    if jax.process_index() == 0:
      aside = os.path.join(self.root, "unreadable")
      os.makedirs(aside, exist_ok=True)
      for step, kind in broken:
        target = os.path.join(aside, f"{kind}-{step}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(self.path(kind, step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("cl_jax checkpoints set aside")
    for m in (self.tasks, self.rolling):
      m.reload()

  def wait(self) -> None:
    for m in list(self._managers.values()):
      m.wait_until_finished()

  def close(self) -> None:
    for m in list(self._managers.values()):
      m.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class ParamsOnly(NamedTuple):
  """A params-only checkpoint's item (the `best` one): enough to evaluate or export a model, not to resume (no
  optimizer or strategy state: for float32 AdamW a third of the full state's bytes)."""
  step: Any
  params: Any


def params_only(state) -> ParamsOnly:
  """`ParamsOnly` of a train state (arrays or ShapeDtypeStructs: the abstract item to restore it into)."""
  return state if isinstance(state, ParamsOnly) else ParamsOnly(state.step, state.params)


def retention(checkpoint_config) -> dict:
  """`Checkpoints.retain`'s arguments from a config's `checkpoint` section (defaults where a kind has no key)."""
  get = lambda k, d: checkpoint_config.get(k, d) if hasattr(checkpoint_config, "get") else d
  return {"keep_tasks": int(get("keep_tasks", 0)), "keep_best": bool(get("keep_best", True)),
          "async_save": bool(get("async_save", True))}


def abstract_like(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


# ----------------------------------------------------------------------------- reading finished runs; params alone
# (added by H3 for the merge runner and LoRA adapters: the one place that knows the layout above)

def boundary_steps(workdir: str) -> dict[int, int]:
  """{task (1-based, tasks finished): step} of a finished run's task-boundary checkpoints."""
  ocp = _ocp()
  tasks_dir = os.path.join(os.path.abspath(workdir), "checkpoints", "tasks")
  if not os.path.isdir(tasks_dir):
    return {}
  manager = ocp.CheckpointManager(tasks_dir)
  try:
    out = {}
    for step in manager.all_steps():
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      out[int(meta["task"])] = int(step)
    return out
  finally:
    manager.close()


def boundary_params(workdir: str, task: int | None = None):
  """The params of a finished run after task `task` (1-based; None: its last task-boundary checkpoint), as host
  arrays in the saved structure (no abstract state needed): what merging and analysis read."""
  ocp = _ocp()
  steps = boundary_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir}: no task-boundary checkpoint")
  task = max(steps) if task is None else task
  if task not in steps:
    raise FileNotFoundError(f"{workdir}: no task-boundary checkpoint of task {task} (tasks {sorted(steps)})")
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints", "tasks"))
  try:
    state = manager.restore(steps[task], args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  finally:
    manager.close()
  return state["params"] if isinstance(state, dict) else state.params


def save_params(path: str, params, overwrite: bool = False) -> str:
  """A params pytree alone (a merged model, an adapter) as an orbax directory at `path`."""
  ocp = _ocp()
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=overwrite)
  return path


def load_params(path: str, like=None):
  """Params saved by `save_params`; into the structure / shardings of `like` (arrays or ShapeDtypeStructs) if given."""
  ocp = _ocp()
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    if like is None:
      return ckptr.restore(path)
    abstract = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
                            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
    return ckptr.restore(path, abstract)


# ----------------------------------------------------------------------------- references to a run's params

# "RUN_DIR:task=K" (the task-boundary checkpoint after task K), "RUN_DIR" (its last one) or a params directory:
# how `model.init_from` and a merge run's `merge.base` / `merge.models` name params.
REF_RE = re.compile(r"^(?P<path>.+?)(?::task=(?P<task>\d+))?$")


@dataclasses.dataclass
class Reference:
  """A resolved checkpoint reference: `params()` loads it; `run_config` is the producing run's config (or None)."""
  ref: str
  what: str
  path: str
  task: int | None = None
  run_config: dict | None = None

  def params(self):
    if self.run_config is None:
      return load_params(self.path)
    return boundary_params(self.path, self.task)


def resolve(ref: str, what: str) -> Reference:
  """Checks a reference (the directory exists; a run has the named task-boundary checkpoint); reads nothing big."""
  m = REF_RE.match(ref or "")
  if not ref or m is None:
    raise ValueError(f"{what}: empty checkpoint reference")
  path = os.path.abspath(m.group("path"))
  task = int(m.group("task")) if m.group("task") else None
  if not os.path.isdir(path):
    raise ValueError(f"{what}={ref!r}: no such checkpoint or run directory {path}")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    if task is not None:
      raise ValueError(f"{what}={ref!r}: ':task=' needs a cl_jax run directory (with config.json)")
    return Reference(ref, what, path)
  with open(cfg_path) as f:
    run_config = json.load(f)
  steps = boundary_steps(path)
  finished = sorted(t for t in steps if t >= 1)
  if not finished:
    raise ValueError(f"{what}={ref!r}: run {path} has no task-boundary checkpoint")
  if task is not None and task not in steps:
    raise ValueError(f"{what}={ref!r}: task={task}, but the run has boundary checkpoints for tasks "
                     f"{finished[0]}..{finished[-1]}")
  return Reference(ref, what, path, task, run_config)
