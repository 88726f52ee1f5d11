"""cl_jax: continual learning in JAX/Flax.

The functional core: models are Flax NNX modules split once into a graphdef and a plain params pytree;
train steps, strategies, Fisher, task vectors and merges all work on those pytrees.

`cl_jax.run(config, workdir)` runs any config (classic, lm, cit, merge: `cl_jax.kinds`) through the one skeleton
(`cl_jax.runner.run`) and returns `cl_jax.Results`; both are imported lazily so that `import cl_jax` stays cheap
and starts no JAX backend.
"""
__version__ = "0.1.0"


def __getattr__(name):
  if name == "run":
    from cl_jax.runner import run
    return run
  if name == "Results":
    from cl_jax.results import Results
    return Results
  raise AttributeError(f"module 'cl_jax' has no attribute {name!r}")
