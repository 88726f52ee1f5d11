"""Launch an experiment: `python run.py --config configs/X.py[:arg] [--config.key=value ...] [--workdir DIR]`.

The same as the `cl-jax` command (`pip install -e .`) and as `cl_jax.run(config, workdir)` in Python. Kept thin
on purpose: parse flags, build and validate the config, call `cl_jax.run`; see cl_jax/errors.py for the exit codes.
The SIGTERM / SIGINT handler goes in first, before jax is imported: a preemption at any instant exits 75.
"""
from __future__ import annotations

import sys

from cl_jax import errors  # the standard library only

if __name__ == "__main__":
  errors.install_signal_handlers()
  errors.capture_library_output()  # for the whole process: orbax's threads still log while it exits
  try:
    from cl_jax.cli import launch  # cheap: jax and the kinds are imported inside main, under the handler
  except errors.Interrupted as e:
    sys.exit(errors.report(e.preempted(), errors.Preempted.exit_code))
  sys.exit(launch(sys.argv[1:]))
