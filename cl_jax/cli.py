"""Command line of run.py: `--config file.py[:arg]`, `--config.a.b=value` overrides, `--workdir`, `--overwrite`."""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import os
import sys

from cl_jax.config import ConfigError, set_overrides, validate


def load_config(spec: str):
  """Imports `path.py` and calls its `get_config(arg)` with what follows the first ':'."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config {path!r}: no such file")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)  # so configs can import their siblings as `configs.common`
  module_spec = importlib.util.spec_from_file_location("_cl_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config {path!r}: defines no get_config(arg)")
  try:
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as e:
    raise ConfigError(str(e)) from e


def parse_value(text: str, current):
  """A command-line string as the type of the field it overrides."""
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"expected true or false, got {text!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, str):
    return text
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, (list, tuple)) and isinstance(value, tuple):
    return list(value)
  return value


def split_args(argv):
  overrides, rest = {}, []
  for a in argv:
    if a.startswith("--config."):
      key, eq, value = a[len("--config."):].partition("=")
      if not eq:
        raise ConfigError(f"{a}: overrides take the form --config.key=value")
      overrides[key] = value
    else:
      rest.append(a)
  return overrides, rest


def _lookup(config, dotted):
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError):
      return None
  return node


def build_config(argv):
  overrides, rest = split_args(argv)
  parser = argparse.ArgumentParser(prog="run.py", description=__doc__)
  parser.add_argument("--config", required=True, help="configs/X.py[:arg]")
  parser.add_argument("--workdir", default="", help="output folder (default: a new one under runs/)")
  parser.add_argument("--overwrite", action="store_true", help="discard a workdir holding another run")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  args = parser.parse_args(rest)
  config = load_config(args.config)
  typed = {}
  for key, text in overrides.items():
    try:
      typed[key] = parse_value(text, _lookup(config, key))
    except ConfigError as e:
      raise ConfigError(f"--config.{key}: {e}") from e
  try:
    set_overrides(config, typed)
  except TypeError as e:
    raise ConfigError(f"bad override type: {e}") from e
  validate(config)
  if not args.workdir:
    name = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.workdir = os.path.join("runs", f"{name}-{stamp}")
  return config, args


def main(argv) -> int:
  try:
    config, args = build_config(argv)
    if config.kind == "lm":
      from cl_jax.lm.cpt import run as runner
    elif config.kind == "merge":
      from cl_jax.merge_run import run as runner
    else:
      from cl_jax.train import run as runner
    results = runner(config, args.workdir, overwrite=args.overwrite, progress=not args.no_progress)
  except ValueError as e:  # ConfigError, WorkdirError and bad data: a clear message, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  print_results(results)
  return 0


def print_results(results) -> None:
  if not hasattr(results, "accuracy_matrix"):
    return
  from cl_jax import report
  print()
  print(report.matrix_table(results.accuracy_matrix))
  print()
  print(report.metrics_table(results.as_dict()))
  print(f"\nOutputs in {results.workdir}/: results.json, summary.md, accuracy_matrix.png, accuracy_curves.png, "
        "metrics.jsonl, tensorboard/, checkpoints/")
