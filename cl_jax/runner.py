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
"""
from __future__ import annotations

import gc

from cl_jax import sharding


def run(config, workdir: str, overwrite: bool = False, progress: bool = True, *, validated: bool = False, **parts):
  """Runs `config` in `workdir` (resuming the run there, if any) and returns its `Results`.

  `config` is normalised in place first (`cl_jax.config.normalise`: 'ewc + replay' is stored as 'ewc+replay').
  `validated=True`: the caller has just run `cl_jax.kinds.validate(config)` (the command line does, to fail before
  choosing a workdir), so it is not run twice.
  """
  sharding.maybe_initialize_distributed()  # before any other JAX call on a multi-host launch
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
    ctx = RunContext(config, workdir, wd.resume, progress, faults.hooks_from_env())
    results = kind.run(built, ctx)
    finish(kind, config, results, workdir, is_writer())
  return results


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
