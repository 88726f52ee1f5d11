"""Training: the train state, the pure step, schedules, optimizers and the task loop.

`cl_jax.train.run(config, workdir)` is the task loop (cl_jax/train/loop.py), imported lazily so that
`cl_jax.config` can use the schedule and optimizer checks without importing the loop.
"""


def run(config, workdir, **kwargs):
  from cl_jax.train.loop import run as _run
  return _run(config, workdir, **kwargs)
