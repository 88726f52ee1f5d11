"""cl_jax: continual learning in JAX/Flax.

The functional core: models are Flax NNX modules split once into a graphdef and a plain params pytree;
train steps, strategies, Fisher, task vectors and merges all work on those pytrees.

`cl_jax.run(config, workdir)` runs any config (classic, lm, merge) and returns `cl_jax.Results`; both are
imported lazily so that `import cl_jax` stays cheap and starts no JAX backend.
"""
__version__ = "0.1.0"


def run(config, workdir, overwrite=False, progress=True):
  """Runs `config` in `workdir`; see `cl_jax.runner.run`."""
  from cl_jax.runner import run as _run
  return _run(config, workdir, overwrite=overwrite, progress=progress)


def __getattr__(name):
  if name == "Results":
    from cl_jax.results import Results
    return Results
  raise AttributeError(f"module 'cl_jax' has no attribute {name!r}")
