"""The CIT kind: continual instruction tuning, instruction sets trained one after another, scored by greedy
decoding (`cl_jax.lm.cit`: data, router, evaluation; its default config and cross-key checks)."""
from __future__ import annotations

from cl_jax.config import COMMON_SCHEMA, integer, number, one_of
from cl_jax.lm import cit

# What instruction tuning gives a strategy (`cl_jax.lm.cit.CIT_PROVIDES`): token logits of a masked-response
# next-token loss on packed rows, the step's hooks, a model a strategy may rewrite, a prompt router.
PROVIDES = cit.CIT_PROVIDES

default_config = cit.default_config
check_config = cit.check_config
SCHEMA = {
    **COMMON_SCHEMA,
    "cit.steps_per_task": integer(1),
    "cit.batch_size": integer(1),
    "cit.eval_examples": integer(1),
    "cit.max_new_tokens": integer(1),
    "cit.metric": one_of(tuple(cit.METRICS)),
    "cit.eval_split": one_of("validation", "test"),
    "sft.seq_len": integer(16),
    "replay.fraction": number(0.0, 1.0, high_open=True),
}
build = cit.build
report = cit.report


def run(built, ctx):
  """Trains the instruction sets through the one loop; returns `Results(kind='cit')`."""
  return cit.execute(built, ctx)
