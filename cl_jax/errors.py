"""The errors a run can end with, and the exit code `run.py` / `cl-jax` returns for each.

| exit code | meaning                                                                     |
|-----------|-----------------------------------------------------------------------------|
| 0         | the run finished                                                            |
| 2         | bad input (config, workdir, data path): nothing was written                 |
| 3         | the run diverged (non-finite loss or params, or a loss blow-up); the last   |
|           | good checkpoint is intact                                                   |
| 4         | the workdir is locked by another live run                                   |
| 75        | preempted (SIGTERM / SIGINT): a checkpoint was saved at the step boundary;  |
|           | rerun the same command to resume (75 is EX_TEMPFAIL: "try again")           |
"""
from __future__ import annotations


class CLJaxError(Exception):
  """Base of the errors a run reports as one line (no traceback) with `exit_code`."""
  exit_code = 1


class ConfigError(CLJaxError, ValueError):
  """A config key has a bad value, or does not exist; or an input path is unusable."""
  exit_code = 2


class WorkdirError(CLJaxError, ValueError):
  """The workdir cannot be used (holds another run, is a file, is unwritable)."""
  exit_code = 2


class WorkdirLocked(CLJaxError):
  """Another live run holds the workdir's lock."""
  exit_code = 4


class DivergenceError(CLJaxError, RuntimeError):
  """Non-finite loss or params, or a loss above `train.divergence_factor` x its early value."""
  exit_code = 3


class Preempted(CLJaxError):
  """SIGTERM or SIGINT arrived; a checkpoint was saved at the next step boundary."""
  exit_code = 75
