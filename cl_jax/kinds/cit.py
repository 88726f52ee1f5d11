"""The CIT kind: continual instruction tuning, instruction sets trained one after another, scored by greedy
decoding (`cl_jax.lm.cit`: data, router, evaluation; its default config, schema and cross-key checks)."""
from __future__ import annotations

from cl_jax.lm import cit

# What instruction tuning gives a strategy (`cl_jax.lm.cit.CIT_PROVIDES`): token logits of a masked-response
# next-token loss on packed rows, the step's hooks, a model a strategy may rewrite, a prompt router.
PROVIDES = cit.CIT_PROVIDES

default_config = cit.default_config
check_config = cit.check_config
SCHEMA = cit.SCHEMA
build = cit.build
report = cit.report


def run(built, ctx):
  """Trains the instruction sets through the one loop; returns `Results(kind='cit')`."""
  return cit.execute(built, ctx)
