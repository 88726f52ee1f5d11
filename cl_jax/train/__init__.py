"""Training: the train state, the pure step, schedules, optimizers and the task loop.

`cl_jax/train/loop.py` holds the one task loop (`Plan`, `run_tasks`) every kind of run goes through, and the
classic run on it. `cl_jax.run(config, workdir)` is the entry point for every kind; `cl_jax.train.run` is the
classic run directly, imported lazily so that `cl_jax.config` can use the schedule and optimizer checks without
importing the loop.
"""


def run(config, workdir, **kwargs):
  from cl_jax.train.loop import run as _run
  return _run(config, workdir, **kwargs)
