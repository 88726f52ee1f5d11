"""Fault injection for tests: real crashes, divergence and preemption at a chosen step, as the loop's step hooks.

The test suite (and anyone checking a deployment) sets these in the environment of a run, often a `run.py`
subprocess; the skeleton (`cl_jax.runner.run`) reads them once at the start of a run into
`cl_jax.train.loop.StepHook`s. A run without them has no hook: nothing of this module is in the loop's path.

  CL_JAX_TEST_KILL_AT_STEP=k[:P]    SIGKILL this process right after global step k (metrics and pending checkpoints
                                    flushed first, every process of a multi-host run at the same step); with :P only
                                    process P dies, at once and alone (a lost peer: the others exit 69); k=0 with :P:
                                    as soon as the run holds its workdir, before its first step
  CL_JAX_TEST_NAN_AT_STEP=k         the params become NaN before step k: its loss is non-finite (divergence, exit 3)
  CL_JAX_TEST_SIGNAL_AT_STEP=k[:INT]  this process sends itself SIGTERM (or SIGINT) right after step k (preemption);
                                    k=0: as soon as the run holds its workdir, before its kind runs (any kind, merge too)
  CL_JAX_TEST_CRASH_AT_EVAL=k       raise `SimulatedCrash` when the evaluation of step k has been recorded, before
                                    its checkpoint (a crash between an evaluation and its checkpoint)
  CL_JAX_TEST_DISK_FULL_AT_STEP=k   after step k (its metrics and checkpoints flushed), every file opened for writing
                                    under the workdir fails with ENOSPC, as on a full disk (I/O failure, exit 74)
"""
from __future__ import annotations

import os
import signal
from typing import Callable, NamedTuple

KILL_ENV = "CL_JAX_TEST_KILL_AT_STEP"
NAN_ENV = "CL_JAX_TEST_NAN_AT_STEP"
SIGNAL_ENV = "CL_JAX_TEST_SIGNAL_AT_STEP"
CRASH_ENV = "CL_JAX_TEST_CRASH_AT_EVAL"
DISK_FULL_ENV = "CL_JAX_TEST_DISK_FULL_AT_STEP"


class SimulatedCrash(RuntimeError):
  pass


class StepHook(NamedTuple):
  """Called by the loop around each call of the jitted step (a call runs the steps first..last):

  before(state, first, last) -> state   before the call
  after(first, last, settle)            after it; `settle()` flushes metrics, the log and pending checkpoints
  after_eval(step)                      after an evaluation's record is written, before its checkpoint
  start()                               by the skeleton, once the run holds its workdir, before its kind runs
  """
  before: Callable | None = None
  after: Callable | None = None
  after_eval: Callable | None = None
  start: Callable | None = None


def _step(name: str) -> int | None:
  value = os.environ.get(name, "")
  return int(value.partition(":")[0]) if value.strip() else None


def kill_at(step: int, process: int | None = None) -> StepHook:
  def after(first, last, settle):
    if first <= step <= last:  # a crash right after this call, before its evaluation or checkpoint
      import jax
      if process is not None:  # one process dies alone, mid-run: its peers must notice (cl_jax.errors.PeerLost)
        if jax.process_index() == process:
          os.kill(os.getpid(), signal.SIGKILL)
        return
      settle()
      if jax.process_count() > 1:  # every process crashes at this step; none may see a peer die first,
        from jax.experimental import multihost_utils  # mid-commit (that aborts it instead)
        multihost_utils.sync_global_devices(f"test kill at step {step}")
      os.kill(os.getpid(), signal.SIGKILL)

  def start():
    if step == 0 and process is not None:
      import jax
      if jax.process_index() == process:
        os.kill(os.getpid(), signal.SIGKILL)
  return StepHook(after=after, start=start)


def nan_at(step: int) -> StepHook:
  def before(state, first, last):
    if first <= step <= last:
      import jax
      import jax.numpy as jnp
      return state._replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    return state
  return StepHook(before=before)


def signal_at(step: int, signum: int = signal.SIGTERM) -> StepHook:
  def after(first, last, settle):
    del settle
    if first <= step <= last:
      signal.raise_signal(signum)

  def start():
    if step == 0:
      signal.raise_signal(signum)
  return StepHook(after=after, start=start)


_undo: list = []


def disk_full_at(step: int, workdir: str) -> StepHook:
  def after(first, last, settle):
    if first <= step <= last:
      settle()  # everything up to this step is on disk: the checkpoints before the failure are complete
      fill_disk(workdir)
  return StepHook(after=after)


def fill_disk(workdir: str) -> None:
  """From now on, opening a file for writing under `workdir` raises OSError(ENOSPC) (Python's `open`, which the
  metrics log, results.json and orbax's JSON items go through; tensorstore's array writes are C++ and are not
  reached, but a checkpoint needs both). `undo()` restores `open` (for a fault injected in-process)."""
  import builtins
  import errno
  import io
  root = os.path.abspath(workdir) + os.sep
  real_open = builtins.open

  def full_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
      path = os.path.abspath(os.fsdecode(file))
      if path.startswith(root):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real_open(file, mode, *args, **kwargs)

  builtins.open = io.open = full_open
  _undo.append(lambda: setattr(builtins, "open", real_open) or setattr(io, "open", real_open))


def undo() -> None:
  """Reverts `fill_disk` (newest first)."""
  while _undo:
    _undo.pop()()


def crash_at_eval(step: int) -> StepHook:
  def after_eval(at):
    if at == step:
      raise SimulatedCrash(f"{CRASH_ENV}={step}")
  return StepHook(after_eval=after_eval)


def hooks_from_env(workdir: str = "") -> tuple[StepHook, ...]:
  """The hooks the environment asks for (none in a plain run)."""
  hooks = []
  if (k := _step(KILL_ENV)) is not None:
    process = os.environ[KILL_ENV].partition(":")[2].strip()
    hooks.append(kill_at(k, int(process) if process else None))
  if (k := _step(NAN_ENV)) is not None:
    hooks.append(nan_at(k))
  if (k := _step(SIGNAL_ENV)) is not None:
    name = os.environ[SIGNAL_ENV].partition(":")[2]
    hooks.append(signal_at(k, signal.SIGINT if name == "INT" else signal.SIGTERM))
  if (k := _step(CRASH_ENV)) is not None:
    hooks.append(crash_at_eval(k))
  if (k := _step(DISK_FULL_ENV)) is not None:
    hooks.append(disk_full_at(k, workdir))
  return tuple(hooks)
