"""Config tooling every kind shares: overrides, type checks against a default, declarative schemas, "same run".

This module knows no kind. Each kind (`cl_jax.kinds`) owns its default config and its schema; `cl_jax.kinds.validate`
runs, for the config's kind: `check_types` against the kind's default (an int where an int is expected, every
float finite), `check_schema` over its `SCHEMA` (one rule per key, e.g. `"train.batch_size": integer(1)`), then
the few checks that relate several keys or need the file system. A problem is a `ConfigError` (exit code 2) whose
one-line message starts with the full key and its value and says what is allowed, e.g.
"optim.lr=inf: must be a finite number". Default configs are locked, so a misspelt key (in a config file or a
`--config.key=value` override) is an error, not a silently new field.

`normalise(config)` rewrites a value with several spellings into its one spelling (a strategy chain without spaces,
'ewc + replay' -> 'ewc+replay') before the config is validated and written.

`comparable(config)` is the config as a plain dict without the strategy-owned sections the run's chain does not
read; a workdir compares it to decide whether it holds the same run, so registering a new strategy (which adds a
default section to every kind's default config) never stops an existing workdir from resuming.
"""
from __future__ import annotations

import difflib
import json
import math
from typing import Any, Callable, NamedTuple

import ml_collections

from cl_jax.errors import CLJaxError, ConfigError


def set_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Applies {'a.b': value} overrides, naming the valid keys when one does not exist."""
  for dotted, value in overrides.items():
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      # An unlocked section takes new keys (an LM's `data.sources.<name>`); the others name theirs.
      adds = i == len(parts) - 1 and isinstance(node, ml_collections.ConfigDict) and not node.is_locked
      if part not in keys and not adds:
        prefix = ".".join(parts[:i])
        raise ConfigError(unknown_key_message(prefix, part, keys))
      if i == len(parts) - 1:
        if part in keys and isinstance(node[part], ml_collections.ConfigDict):
          raise ConfigError(section_override_message(dotted, value, node[part]))
        try:
          node[part] = value
        except TypeError as e:  # a locked ConfigDict keeps each field's type
          raise ConfigError(f"{dotted}={value!r}: expected {_type_name(node[part])} "
                            f"({' '.join(str(e).split())})") from e
      else:
        node = node[part]


def section_override_message(dotted: str, value, section: ml_collections.ConfigDict) -> str:
  """Why a whole section cannot be set at once: replacing it would drop the keys not given (and their types), so
  each key is set on its own; the example uses a key and value from `value` when it names one of the section's."""
  keys = list(section.keys())
  given = [k for k in value if k in keys] if isinstance(value, dict) else []
  key = given[0] if given else keys[0] if keys else "KEY"
  example = value[key] if given else section[key] if keys else "VALUE"
  shown = json.dumps(example) if isinstance(example, (bool, list, tuple)) or example is None else example
  return (f"{dotted}={value!r}: is a section and cannot be set whole; set its keys one by one, e.g. "
          f"--config.{dotted}.{key}={shown}; its keys are: {sorted(keys)}")


def _type_name(value) -> str:
  if isinstance(value, bool):
    return "true or false"
  return {int: "an integer", float: "a number", str: "a string", list: "a list", tuple: "a list"}.get(
      type(value), f"a {type(value).__name__}")


def unknown_key_message(prefix: str, key: str, valid) -> str:
  full = f"{prefix}.{key}" if prefix else key
  near = difflib.get_close_matches(key, valid, n=1)
  hint = f" (did you mean {near[0]!r}?)" if near else ""
  where = f"in {prefix!r} " if prefix else ""
  return f"unknown config key {full!r}{hint}; valid keys {where}are: {sorted(valid)}"


def normalise(config) -> None:
  """Rewrites, in place, the values that have several spellings into their one spelling: the strategy chain without
  spaces around its names ('ewc + replay' -> 'ewc+replay'). Runs before validation and before config.json is
  written, so a workdir holds the spelling every later run compares against."""
  from cl_jax.strategies import normalise_strategy_spec
  if "strategy" in config:
    spec = normalise_strategy_spec(config["strategy"])
    if spec != config["strategy"]:
      config["strategy"] = spec


def comparable(config) -> dict:
  """The config as a JSON-style dict, without the strategy-owned sections that `config.strategy` does not read.

  Accepts a ConfigDict or a dict loaded from a workdir's config.json. Two runs are the same run when their
  `comparable` dicts are equal: a section that only an unused strategy reads (e.g. `si` in a naive run, or one
  that did not exist when the workdir was written) does not take part. A strategy name that is not registered
  keeps its section of the same name (the comparison stays strict about what it cannot interpret). Sections a
  kind added later at their default (an LM's `vocab`, `long_context`) are dropped by the workdir's comparison
  against the kind's default config (`cl_jax.workdir.decide`), not here.
  """
  if isinstance(config, ml_collections.ConfigDict):
    d = json.loads(config.to_json_best_effort(sort_keys=True))
  else:
    d = json.loads(json.dumps(dict(config), sort_keys=True, default=str))
  from cl_jax.strategies import REGISTRY, default_configs, normalise_strategy_spec
  spec = d.get("strategy")
  if isinstance(spec, str):  # a workdir written before chains were normalised compares as its normal spelling
    d["strategy"] = spec = normalise_strategy_spec(spec)
  names = spec.split("+") if isinstance(spec, str) else []
  used = set()
  for name in names:
    used.update(REGISTRY[name].config_sections if name in REGISTRY else (name,))
  owned = set(default_configs())
  return {k: v for k, v in d.items() if k not in owned or k in used}


def one_line(e: Exception) -> str:
  """An exception's message on one line (a KeyError's without its quotes)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(str(text).split())


def as_config_error(check: Callable, *args) -> None:
  """Runs `check(*args)`, turning a ValueError / KeyError / TypeError into a one-line ConfigError."""
  try:
    check(*args)
  except CLJaxError:
    raise
  except (ValueError, KeyError, AttributeError, TypeError) as e:
    raise ConfigError(one_line(e)) from e


def check_types(config, reference, prefix: str = "") -> None:
  """Every leaf of `config` that `reference` also has must have its type; every float must be finite.

  bool keys take bools; int keys ints (not bools, not 2.0); float keys ints or floats; str keys strings; list keys
  lists whose items have the type of the reference's items (when it has any). Keys `reference` lacks are skipped.
  """
  for key in config.keys():
    full = f"{prefix}{key}"
    value = config[key]
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"{full}={value!r}: must be a finite number")
    if reference is None or key not in reference:
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        check_types(value, None, f"{full}.")
      continue
    ref = reference[key]
    if isinstance(ref, (ml_collections.ConfigDict, dict)):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"{full}={value!r}: expected a section (a ConfigDict), with keys {sorted(ref.keys())}")
      check_types(value, ref, f"{full}.")
    elif isinstance(ref, (list, tuple)):
      if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{full}={value!r}: expected a list")
      for i, item in enumerate(value):
        if isinstance(item, float) and not math.isfinite(item):
          raise ConfigError(f"{full}[{i}]={item!r}: must be a finite number")
        if ref and all(type(r) is type(ref[0]) for r in ref):
          problem = _type_problem(item, ref[0])
          if problem:
            raise ConfigError(f"{full}={list(value)!r}: item {i} is {item!r}; {problem}")
    else:
      problem = _type_problem(value, ref)
      if problem:
        raise ConfigError(f"{full}={value!r}: {problem}")


def _type_problem(value, ref) -> str:
  """What is wrong with `value` where the default is `ref` ('' when nothing is)."""
  if ref is None:
    return ""
  if isinstance(ref, bool):
    return "" if isinstance(value, bool) else "expected true or false"
  if isinstance(ref, int):
    return "" if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
  if isinstance(ref, float):
    return "" if isinstance(value, (int, float)) and not isinstance(value, bool) else "expected a number"
  if isinstance(ref, str):
    return "" if isinstance(value, str) else "expected a string"
  return ""


# ----------------------------------------------------------------------------- declarative schemas

class Rule(NamedTuple):
  """One key's constraint: `problem(value)` is '' when the value is allowed, else what is wrong with it."""
  problem: Callable[[Any], str]


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def integer(minimum: int | None = None, maximum: int | None = None) -> Rule:
  """An integer in [minimum, maximum] (either bound optional)."""
  def problem(v):
    if not _is_int(v) or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
      if minimum is not None and maximum is not None:
        return f"must be an integer in [{minimum}, {maximum}]"
      if minimum is not None:
        return "must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}"
      return f"must be an integer <= {maximum}"
    return ""
  return Rule(problem)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Rule:
  """A finite number in the interval from `low` to `high` (each end closed unless `*_open`)."""
  lo = "(" if low_open else "["
  hi = ")" if high_open else "]"
  where = f"in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"

  def problem(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return f"must be a finite number {where}"
    if low is not None and (v < low or (low_open and v == low)):
      return f"must be {where}"
    if high is not None and (v > high or (high_open and v == high)):
      return f"must be {where}"
    return ""
  return Rule(problem)


def one_of(*choices) -> Rule:
  """One of `choices` (a single sequence argument is taken as the choices)."""
  if len(choices) == 1 and isinstance(choices[0], (list, tuple)):
    choices = tuple(choices[0])

  def problem(v):
    return "" if v in choices else f"expected one of {list(choices)}"
  return Rule(problem)


def check_schema(config, schema: dict[str, Rule]) -> None:
  """Applies every rule of `schema` ({'section.key': Rule}) to `config`; keys the config lacks are skipped."""
  for dotted, rule in schema.items():
    node, present = config, True
    for part in dotted.split("."):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
        present = False
        break
      node = node[part]
    if not present:
      continue
    problem = rule.problem(node)
    if problem:
      shown = list(node) if isinstance(node, (list, tuple)) else node
      raise ConfigError(f"{dotted}={shown!r}: {problem}")


# Rules every kind shares (a kind's SCHEMA starts from these).
# A seed is 32 bits: jax.random.PRNGKey keeps the low 32 bits of a larger one (2**32 is seed 0's key) and
# overflows past 2**63, and the data order folds the seed in as a uint32.
SEED_LIMIT = 2**32

COMMON_SCHEMA = {
    "seed": integer(0, SEED_LIMIT - 1),
    "train.log_every_steps": integer(1),
    "train.divergence_factor": number(0),
    "checkpoint.keep": integer(1),
    "checkpoint.every_steps": integer(0),
    "distributed.init_timeout_s": integer(1),
    "distributed.heartbeat_timeout_s": integer(1),
    "distributed.shutdown_timeout_s": integer(1),
}


