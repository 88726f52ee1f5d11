"""`cl_jax.run(config, workdir)`: the one run skeleton. Every run (classic, many seeds, language model, instruction
tuning, merge) takes these steps, written once here; a kind (`cl_jax.kinds`) supplies only its own parts:

  kind = kinds.get(config.kind)       one table names the kinds
  kinds.validate(config)              types, the kind's declarative SCHEMA, its cross-key checks: nothing written
  check_usable + precheck             one workdir policy for every kind: a live run's lock, another run's config
                                      or foreign files refuse the workdir here, before any work (multi-host:
                                      process 0 decides, every process learns it)
  built = kind.build(config, **parts) data, model, sharded state, jitted step (strategy hooks included); bad
                                      input that needs the data still raises here, workdir untouched
  with Workdir(...) as wd:            the lock, config.json, resume or fresh
    results = kind.run(built, ctx)    its task plan through the one loop (`cl_jax.train.loop.run_tasks`)
    finish(results)                   results.json with provenance (process 0), the kind's summary.md and plots

`parts` are things a caller already holds and the kind would otherwise load (e.g. `data=` for an LM or CIT run
whose corpora a test or notebook loaded once). Fault injection for tests (`cl_jax.faults`) is read here, once,
into the loop's step hooks.

How it ends (`cl_jax.errors`, the exit codes): SIGTERM / SIGINT raise `Preempted` wherever this skeleton is (the
loop replaces that handler with its own, which stops at a step boundary with a checkpoint); once the workdir is
held, library output goes to <workdir>/logs/stderr-detail.log; a divergence before the first checkpoint says so.
"""
from __future__ import annotations

import gc
import os

from cl_jax import errors, sharding


def run(config, workdir: str, overwrite: bool = False, progress: bool = True, *, validated: bool = False, **parts):
  """Runs `config` in `workdir` (resuming the run there, if any) and returns its `Results`.

  `config` is normalised in place first (`cl_jax.config.normalise`: 'ewc + replay' is stored as 'ewc+replay').
  `validated=True`: the caller has just run `cl_jax.kinds.validate(config)` (the command line does, to fail before
  choosing a workdir), so it is not run twice.
  """
  from cl_jax import host_memory
  host_memory.configure()  # run.py / cl-jax did it at start; in Python, effective when the run comes first
  previous = errors.install_signal_handlers()  # no-op change when run.py / cl-jax installed them already
  try:
    return _run(config, workdir, overwrite, progress, validated, **parts)
  except errors.Interrupted as e:  # the handler's BaseException, as the documented error
    raise e.preempted() from None
  finally:
    errors.restore_signal_handlers(previous)


def _run(config, workdir: str, overwrite: bool, progress: bool, validated: bool, **parts):
  sharding.maybe_initialize_distributed(config)  # before any other JAX call on a multi-host launch
  from cl_jax import compilation_cache, faults, kinds
  from cl_jax.config import normalise
  from cl_jax.workdir import RunContext, Workdir, check_usable, is_writer, precheck
  compilation_cache.enable()
  kind = kinds.get(kinds.kind_of(config))
  normalise(config)  # even when validated: config.json and the "same run" check see one spelling of the chain
  if not validated:
    kinds.validate(config)
  reference = kind.default_config()
  check_usable(workdir)
  precheck(config, workdir, overwrite, reference=reference)
  # A previous run in this process (a notebook, an experiment script) can leave its buffers in reference cycles;
  # freeing them now lets this run reuse that memory instead of faulting in fresh pages (Split MNIST's second
  # run in one process: 1.0-1.1 s of host CPU without it, 0.7-0.8 s with it; benchmarks/loop_overhead.py).
  gc.collect()
  built = kind.build(config, **parts)
  with Workdir(config, workdir, overwrite, reference=reference) as wd:
    import jax
    errors.open_detail_log(workdir, jax.process_index())
    hooks = faults.hooks_from_env(workdir)
    for hook in hooks:
      if hook.start is not None:
        hook.start()
    ctx = RunContext(config, workdir, wd.resume, progress, hooks)
    try:
      results = kind.run(built, ctx)
    except errors.DivergenceError as e:
      if has_checkpoint(workdir):
        raise
      raise errors.DivergenceError(no_checkpoint_yet(str(e))) from e
    finish(kind, config, results, workdir, is_writer())
  return results


def has_checkpoint(workdir: str) -> bool:
  """Whether the workdir holds a complete task-boundary or rolling checkpoint (orbax writes its metadata last)."""
  from cl_jax.checkpoint import METADATA
  root = os.path.join(workdir, "checkpoints")
  return any(os.path.isfile(os.path.join(root, kind, step, METADATA))
             for kind in ("tasks", "rolling") if os.path.isdir(os.path.join(root, kind))
             for step in os.listdir(os.path.join(root, kind)) if step.isdigit())


def no_checkpoint_yet(message: str) -> str:
  """The loop's divergence message, corrected for a run that diverged before its first checkpoint."""
  claim = "the last good checkpoint is intact"
  fix = "no checkpoint was written yet (a rerun starts from the beginning)"
  return message.replace(claim, fix) if claim in message else f"{message.rstrip('. ')}; {fix}"


def finish(kind, config, results, workdir: str, writer: bool) -> None:
  """results.json (with the run's provenance) and the kind's own summary.md and plots, written by process 0."""
  if not writer:
    return
  from cl_jax.results import provenance
  from cl_jax.workdir import write_json
  results.provenance = provenance(config)
  write_json(workdir, "results.json", results.as_dict())
  report = getattr(kind, "report", None)
  if report is not None:
    report(results, workdir, config)
