"""Launch an experiment: `python run.py --config configs/X.py[:arg] [--config.key=value ...] [--workdir DIR]`.

The same as the `cl-jax` command (`pip install -e .`) and as `cl_jax.run(config, workdir)` in Python. Kept thin
on purpose: parse flags, build and validate the config, call `cl_jax.run`; see cl_jax/cli.py for the exit codes.
"""
from __future__ import annotations

import sys

from cl_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
