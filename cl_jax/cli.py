"""Command line of `run.py` and the `cl-jax` command: `--config file.py[:arg]`, `--config.a.b=value` overrides,
`--workdir`, `--overwrite`, `--no_progress`.

`main(argv)` starts `jax.distributed` on multi-host launches, builds and validates the config, calls
`cl_jax.run(config, workdir)` and turns a `cl_jax.errors.CLJaxError` into one line on stderr and its exit code
(2 bad input, 3 divergence, 4 workdir locked, 75 preempted; see cl_jax/errors.py). No traceback for those.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import os
import re
import sys

from cl_jax.config import ConfigError, normalise, one_line, set_overrides
from cl_jax.kinds import validate
from cl_jax.errors import CLJaxError


def load_config(spec: str):
  """Imports `path.py` and calls its `get_config(arg)` with what follows the first ':'.

  A config in a package folder (one with `__init__.py`, such as `configs/`) may import its siblings
  (`from configs.common import parse_arg`): when that package is not importable from where it lies (a copy of
  `configs/` elsewhere), it is loaded from its folder by path, so nothing is added to `sys.path`.

  A relative `configs/X.py` that does not exist from the current directory is the installed `configs` package's
  X.py (pyproject installs `configs` with cl_jax), so the README's commands work from any directory; a file of
  that name in the current directory always wins.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    installed = _installed_config(path)
    if installed is None:
      raise ConfigError(f"--config {path!r}: no such file (here or in the installed configs package)")
    path = installed
  package = _package_of(path)
  stem = os.path.splitext(os.path.basename(path))[0]
  name = f"{package}.{stem}" if package and stem.isidentifier() else "_cl_jax_config"
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:  # in the file, or in a module it imports (then that module is named)
    elsewhere = e.filename and os.path.realpath(e.filename) != os.path.realpath(path)
    where = f"line {e.lineno} of {e.filename}" if elsewhere else f"line {e.lineno}"
    raise ConfigError(f"--config {path!r}: syntax error at {where}: {e.msg}") from e
  except ImportError as e:
    raise ConfigError(f"--config {path!r}: cannot import: {e}{_where(e, path)}") from e
  except CLJaxError:
    raise
  except Exception as e:  # the file's top level raised: its own bug, reported as bad input, not a traceback
    raise ConfigError(f"--config {path!r}: importing it raised {_raised(e)}{_where(e, path)}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"--config {path!r}: defines no get_config(arg)")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except CLJaxError:
    raise
  except TypeError as e:  # a locked ConfigDict refuses a value of another type (e.g. a float for an int key)
    message = _type_error_message(e, spec)
    if message is None:
      raise ConfigError(f"--config {spec!r}: get_config raised {_raised(e)}{_where(e, path)}") from e
    raise ConfigError(message) from e
  except (ValueError, KeyError, AttributeError) as e:  # a bad arg or key, which the config's own message names
    raise ConfigError(f"--config {spec!r}: {one_line(e)}{_where(e, path)}") from e
  except Exception as e:  # any other bug inside get_config (ZeroDivisionError, an import inside it, ...)
    raise ConfigError(f"--config {spec!r}: get_config raised {_raised(e)}{_where(e, path)}") from e
  import ml_collections
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config {spec!r}: get_config returned {_short(config)}; it must return an "
                      "ml_collections.ConfigDict, e.g. cl_jax.kinds.base_config() or "
                      "cl_jax.kinds.default_config(kind) with its values set")
  return config


def _raised(error: BaseException) -> str:
  """'ZeroDivisionError: division by zero': the exception's type and its message on one line."""
  text = one_line(error)
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _where(error: BaseException, path: str) -> str:
  """' (line N of PATH)': the innermost line of the config file the exception passed through ('' if none).

  The file's own line, not the library's, is the one its author can fix: an error raised deep inside cl_jax while
  get_config runs is located at the config's call into it.
  """
  target = os.path.realpath(path)
  line, tb = None, error.__traceback__
  while tb is not None:
    if os.path.realpath(tb.tb_frame.f_code.co_filename) == target:
      line = tb.tb_lineno
    tb = tb.tb_next
  return "" if line is None else f" (line {line} of {path})"


def _short(value, limit: int = 60) -> str:
  """`value`'s type and a repr cut to `limit` characters, for a message about what came back."""
  text = repr(value)
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return "None" if value is None else f"a {type(value).__name__} ({text})"


_OVERRIDE_RE = re.compile(r"Could not override field '(?P<field>[^']+)'.*?of original type <class '(?P<got>\w+)'> "
                          r"and cannot be casted to type <class '(?P<want>\w+)'>", re.S)
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "list": "a list"}


def _type_error_message(error: TypeError, spec: str) -> str | None:
  """ml_collections names only the field's last part; find its full key from the section being set.

  None when the TypeError is not a locked field refusing a value of another type (a bug of the file itself).
  """
  text = " ".join(str(error).split())
  m = _OVERRIDE_RE.search(text)
  if not m:
    return None
  want = _TYPE_NAMES.get(m["want"], f"a {m['want']}")
  return f"{_full_key(error, m['field'])}: expected {want}, got a {m['got']} (set in --config {spec!r})"


def _full_key(error: BaseException, field: str) -> str:
  """The dotted key of `field` in the section whose assignment raised, found from the config in the caller's frame."""
  import ml_collections
  frames, tb = [], error.__traceback__
  while tb is not None:
    frames.append(tb.tb_frame)
    tb = tb.tb_next
  sections = [f.f_locals["self"] for f in frames if isinstance(f.f_locals.get("self"), ml_collections.ConfigDict)]
  if not sections:
    return field
  roots = [v for f in frames for v in f.f_locals.values() if isinstance(v, ml_collections.ConfigDict)]
  for root in roots:
    prefix = _path_to(root, sections[-1])
    if prefix is not None:
      return f"{prefix}{field}"
  return field


def _path_to(node, target, prefix: str = ""):
  if node is target:
    return prefix
  for key in node.keys():
    child = node[key]
    if hasattr(child, "keys"):
      found = _path_to(child, target, f"{prefix}{key}.")
      if found is not None:
        return found
  return None


def _installed_config(path: str) -> str | None:
  """`configs/<rest>` as a file of the importable `configs` package; None for another path or no such file."""
  parts = os.path.normpath(path).split(os.sep)
  if os.path.isabs(path) or len(parts) < 2 or parts[0] != "configs":
    return None
  try:
    found = importlib.util.find_spec("configs")
  except (ImportError, ValueError):
    return None
  for folder in (found.submodule_search_locations or []) if found is not None else []:
    candidate = os.path.join(folder, *parts[1:])
    if os.path.isfile(candidate):
      return candidate
  return None


def _package_of(path: str) -> str | None:
  """The package a config file lies in (its folder has `__init__.py`), made importable; None if it has none."""
  folder = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(folder)
  if not (os.path.isfile(os.path.join(folder, "__init__.py")) and name.isidentifier()):
    return None

  def here(locations) -> bool:
    return any(os.path.abspath(p) == folder for p in (locations or []))

  loaded = sys.modules.get(name)
  if loaded is not None:
    return name if here(getattr(loaded, "__path__", None)) else None
  try:
    found = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    found = None
  if found is not None and here(found.submodule_search_locations):
    return name
  if found is not None:
    return None  # another package of that name is installed: do not shadow it
  spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                submodule_search_locations=[folder])
  package = importlib.util.module_from_spec(spec)
  sys.modules[name] = package
  spec.loader.exec_module(package)
  return name


def parse_value(text: str, current, key: str = ""):
  """A command-line string as the type of the field it overrides; ConfigError naming `key` when it is not one.

  bool: true/false/1/0/yes/no. int: an integer literal (not 2.5, not 'abc'). float: any number, ints included
  ('1e-3', '3', 'inf' parses but validation refuses non-finite values). str: the text as is. list: a Python list or
  tuple literal ('[64, 32]'). Other fields (None, sections): a Python literal if the text is one, else the text.
  """
  where = f"{key}={text!r}" if key else repr(text)
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"{where}: expected true or false")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    value = text
  if isinstance(current, int):
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise ConfigError(f"{where}: expected an integer")
  if isinstance(current, float):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    try:
      return float(text)  # 'inf', 'nan': parsed here, refused by validation with the key named
    except ValueError:
      raise ConfigError(f"{where}: expected a number") from None
  if isinstance(current, (list, tuple)):
    if isinstance(value, (list, tuple)):
      return list(value)
    raise ConfigError(f"{where}: expected a list, e.g. [64, 32]")
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


class _Once(argparse.Action):
  """An option given at most once: argparse's default keeps the last of two silently, which would run a config
  other than the one the first flag named."""

  def __call__(self, parser, namespace, values, option_string=None):
    previous = getattr(namespace, self.dest, None)
    if previous is not None:
      raise ConfigError(f"{self.option_strings[0]} {values!r}: given twice (first {previous!r}); pass one config "
                        f"file and change its values with --config.KEY=VALUE")
    setattr(namespace, self.dest, values)


def build_config(argv, prog: str = "run.py"):
  """(validated config, parsed args) from the command line; raises ConfigError before anything is written."""
  overrides, rest = split_args(argv)
  parser = argparse.ArgumentParser(prog=prog, description=__doc__)
  parser.add_argument("--config", required=True, action=_Once, help="configs/X.py[:arg]")
  parser.add_argument("--workdir", default="", help="output folder (default: a new one under runs/)")
  parser.add_argument("--overwrite", action="store_true", help="discard a workdir holding another run")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  args = parser.parse_args(rest)
  config = load_config(args.config)
  typed = {key: parse_value(text, _lookup(config, key), key) for key, text in overrides.items()}
  set_overrides(config, typed)
  normalise(config)
  validate(config)
  if not args.workdir:
    name = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.workdir = os.path.join("runs", f"{name}-{stamp}")
  return config, args


def main(argv, prog: str = "run.py") -> int:
  """`run.py` / `cl-jax`: returns the exit code (0, or the `exit_code` of the CLJaxError that ended the run)."""
  if argv and argv[0] in GENERATION_COMMANDS:
    return _generation(argv)
  from cl_jax import sharding
  try:
    sharding.maybe_initialize_distributed()  # multi-host: before anything asks JAX for its devices
    config, args = build_config(argv, prog)
    from cl_jax.runner import run
    results = run(config, args.workdir, overwrite=args.overwrite, progress=not args.no_progress, validated=True)
  except CLJaxError as e:
    return _fail(e, e.exit_code)
  except ValueError as e:  # bad input a runner reports as a plain ValueError: still bad input, still no write
    return _fail(e, 2)
  print_results(results)
  return 0


# `cl-jax generate ...` / `cl-jax chat ...` (cl_jax.lm.generation): text in, text out from a model directory.
GENERATION_COMMANDS = ("generate", "chat")


def _generation(argv) -> int:
  try:
    from cl_jax.lm.generation import main as generation_main
    return generation_main(argv)
  except CLJaxError as e:
    return _fail(e, e.exit_code)


def console_main() -> None:
  """The `cl-jax` console command (pyproject.toml): the same as `python run.py`."""
  sys.exit(main(sys.argv[1:], prog="cl-jax"))


def _fail(error: Exception, code: int) -> int:
  print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
  return code


def print_results(results) -> None:
  from cl_jax.workdir import is_writer
  summary = getattr(results, "summary", None)
  if summary is None or not is_writer():
    return  # on a multi-host launch only process 0 prints, as only it writes the outputs
  print()
  print(summary())
  print(f"\nOutputs in {results.workdir}/ (results.json, summary.md, metrics.jsonl, plots, checkpoints/)")
