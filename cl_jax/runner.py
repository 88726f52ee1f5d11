"""`cl_jax.run(config, workdir)`: the one entry point of every run (run.py, notebooks, experiments).

Order: start `jax.distributed` on multi-host launches (before any other JAX call) -> validate the config (every
kind) -> check the workdir is usable without writing to it -> hand over to the kind's runner, which builds
(data-dependent checks still write nothing), takes the workdir's lock, writes config.json and runs:

  classic  cl_jax.train.loop.run   (the task loop)
  lm       cl_jax.lm.run           (continual pre-training on the same task loop)
  merge    cl_jax.merge_run.run    (merge finished runs' checkpoints, evaluate every task)
  cit      cl_jax.lm.cit.run       (continual instruction tuning: instruction sets on the same task loop)

Every runner has the signature (config, workdir, overwrite, progress) and returns `cl_jax.results.Results`.
"""
from __future__ import annotations

from cl_jax import sharding
from cl_jax.errors import ConfigError

KINDS = ("classic", "lm", "merge", "cit")


def runner_for(kind: str):
  """The run function of a config kind (imported lazily: an LM run never imports the classic data code)."""
  if kind == "classic":
    from cl_jax.train.loop import run as kind_run
  elif kind == "lm":
    from cl_jax.lm import run as kind_run
  elif kind == "merge":
    from cl_jax.merge_run import run as kind_run
  elif kind == "cit":
    from cl_jax.lm.cit import run as kind_run
  else:
    raise ConfigError(f"kind={kind!r}: expected one of {list(KINDS)}")
  return kind_run


def run(config, workdir: str, overwrite: bool = False, progress: bool = True):
  """Runs `config` in `workdir` (resuming the run there, if any) and returns its `Results`."""
  sharding.maybe_initialize_distributed()
  from cl_jax import compilation_cache
  compilation_cache.enable()
  from cl_jax.config import validate
  from cl_jax.results import Results
  from cl_jax.workdir import check_usable
  validate(config)
  kind = config.get("kind", "classic")
  kind_run = runner_for(kind)
  check_usable(workdir)
  results = kind_run(config, workdir, overwrite=overwrite, progress=progress)
  if not isinstance(results, Results):  # a runner not yet ported to the one results type
    results = Results.load(workdir)
  return results
