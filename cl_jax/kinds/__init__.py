"""Kinds of run as parts: one module per kind, one table naming them.

A kind module is what one kind of run has of its own; the rest of a run is the one skeleton (`cl_jax.runner.run`):

  default_config()  the full default config of the kind (locked ConfigDict); `configs/*.py` start from it
  SCHEMA            {'section.key': cl_jax.config.Rule}: the declarative per-key checks
  check_config(c)   the checks that relate several keys or read files (raise ValueError / ConfigError), or None
  PROVIDES          what the kind's data and model give a strategy (labels, task ids, token logits, ...): the
                    strategies a kind allows are computed from it (`cl_jax.strategies.check_allowed`)
  build(c)          everything the run needs before it writes anything: data, model, sharded state, jitted step.
                    Data-dependent bad input (a batch larger than a task) raises here, with the workdir untouched
  run(built, ctx)   the kind's run in the opened workdir (`cl_jax.workdir.RunContext`): its task plan through the
                    one loop (`cl_jax.train.loop.run_tasks`); returns `cl_jax.results.Results`
  report(results, workdir, config)  the kind's summary.md and plots (results.json is written by the skeleton)

Adding a kind is one module and one line in `KINDS`.
"""
from __future__ import annotations

import importlib

from cl_jax.config import as_config_error, check_schema, check_types
from cl_jax.errors import ConfigError

# kind -> its module (imported when a config of that kind is validated or run: an LM run never imports the
# classic data code).
KINDS = {
    "classic": "cl_jax.kinds.classic",
    "lm": "cl_jax.kinds.lm",
    "cit": "cl_jax.kinds.cit",
    "merge": "cl_jax.kinds.merge",
}


def get(kind: str):
  """The module of `kind` (a ConfigError naming the valid kinds when there is none)."""
  if kind not in KINDS:
    raise ConfigError(f"kind={kind!r}: expected one of {list(KINDS)}")
  return importlib.import_module(KINDS[kind])


def kind_of(config) -> str:
  return config.get("kind", "classic") if hasattr(config, "get") else "classic"


def default_config(kind: str = "classic"):
  """The default config of `kind`: the one a config of that kind starts from, and the types it must keep."""
  return get(kind).default_config()


def base_config():
  """The classic kind's default config (what `configs/split_mnist.py` and friends start from)."""
  return default_config("classic")


def validate(config) -> None:
  """Checks every value whose mistake would cost a run, for the config's kind; raises ConfigError naming the key.

  Types against the kind's default config, its declarative SCHEMA, its `check_config`; nothing is written.
  """
  kind = get(kind_of(config))
  as_config_error(check_types, config, kind.default_config())
  check_schema(config, kind.SCHEMA)
  check = getattr(kind, "check_config", None)
  if check is not None:
    as_config_error(check, config)


__all__ = ["KINDS", "get", "kind_of", "default_config", "base_config", "validate"]
