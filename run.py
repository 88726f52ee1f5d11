"""Launch an experiment: `python run.py --config configs/X.py[:arg] [--config.key=value ...] [--workdir DIR]`.

Kept thin on purpose: parse flags, build and validate the config, call the runner. Everything it does is an
importable function (`cl_jax.train.run(config, workdir)`), for notebooks.
"""
from __future__ import annotations

import sys

from cl_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
