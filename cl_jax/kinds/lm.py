"""The LM kind: continual pre-training of a causal language model (`cl_jax.lm.runner`: pre-train or import a base,
adapt it on a data mixture with a strategy chain, guarded by the regression monitor; test metrics against the
base). Its default config, schema and cross-key checks are `cl_jax.lm.config`'s."""
from __future__ import annotations

from cl_jax.lm import config as lm_config
from cl_jax.lm import runner

# What continual pre-training gives a strategy (`cl_jax.lm.config.LM_PROVIDES`): token logits of a next-token loss
# on token rows, per-sequence losses, the step's hooks, a model a strategy may rewrite; no class labels (the
# mixture is the LM's replay of general text).
PROVIDES = lm_config.LM_PROVIDES

default_config = lm_config.default_config
check_config = lm_config.check_config
SCHEMA = lm_config.SCHEMA
build = runner.build
report = runner.report


def run(built, ctx):
  """Pre-train (or restore) the base, run the stages, adapt under the monitor; returns `Results(kind='lm')`."""
  return runner.execute(built, ctx)
