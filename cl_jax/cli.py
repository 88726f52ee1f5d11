"""Command line of `run.py` and the `cl-jax` command: `--config file.py[:arg]`, `--config.a.b=value` overrides,
`--workdir`, `--overwrite`, `--no_progress`.

`main(argv)` loads the config, starts `jax.distributed` on multi-host launches (with `config.distributed`'s
timeouts), validates the config, calls `cl_jax.run(config, workdir)` and turns whatever ends the run into one
`error:` line on stderr and its exit code (`cl_jax.errors.classify`: 2 bad input, 3 divergence, 4 workdir locked,
69 peer lost, 74 I/O failure, 75 preempted; the table is in cl_jax/errors.py). No traceback for those; library
output goes to <workdir>/logs/stderr-detail.log.

Importing this module is cheap (the standard library and `cl_jax.errors`; jax, ml_collections and the kinds are
imported inside `main`), so `run.py` and `cl-jax` install the SIGTERM / SIGINT handler before any heavy import.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import os
import re
import sys

from cl_jax.errors import CLJaxError, ConfigError
from cl_jax import errors


def one_line(error) -> str:
  from cl_jax.config import one_line as one
  return one(error)


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
  config, args = parse_config(argv, prog)
  from cl_jax.kinds import validate
  validate(config)
  return config, args


def parse_config(argv, prog: str = "run.py"):
  """(config, parsed args): loaded, overridden and normalised, not yet validated (the default workdir is set).

  Reads no device: `main` starts `jax.distributed` between this and validation (checking a merge's checkpoints
  opens orbax, which asks JAX for the processes), with the timeouts this config names."""
  from cl_jax.config import normalise, set_overrides
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
  if not args.workdir:
    name = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.workdir = os.path.join("runs", f"{name}-{stamp}")
  return config, args


# `cl-jax <command> ...`: commands beside running a config, each a module with `main(argv) -> exit code`.
COMMANDS = {"prepare": "cl_jax.data.prepare"}


def main(argv, prog: str = "run.py") -> int:
  """`run.py` / `cl-jax`: returns the exit code (0, or the `exit_code` of what ended the run, `errors.classify`).

  SIGTERM / SIGINT raise `Preempted` from here on (and from the first instant under `run.py` / `cl-jax`, which
  install the handler before importing this module's heavy parts); the previous handlers and logging set-up come
  back on return, so calling `main` in-process (a test, a notebook) leaves no trace.
  """
  if argv and argv[0] in COMMANDS:
    import importlib
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
  if argv and argv[0] in GENERATION_COMMANDS:
    return _generation(argv)
  if argv and argv[0] == LM_EVAL_COMMAND:
    return _lm_eval(argv[1:])
  previous = errors.install_signal_handlers()
  captured = errors.capture_library_output()
  try:
    return _main(argv, prog)
  finally:
    if captured:
      errors.release_library_output()
    errors.restore_signal_handlers(previous)


def _main(argv, prog: str) -> int:
  try:
    config, args = parse_config(argv, prog)
    from cl_jax import sharding
    sharding.maybe_initialize_distributed(config)  # multi-host: before anything asks JAX for its devices
    from cl_jax.kinds import validate
    validate(config)
    from cl_jax.runner import run
    results = run(config, args.workdir, overwrite=args.overwrite, progress=not args.no_progress, validated=True)
  except (Exception, KeyboardInterrupt, errors.Interrupted) as e:  # noqa: BLE001 -- each classified; a bug re-raises
    error = errors.classify(e)
    if error is None and isinstance(e, ValueError):  # bad input a runner reports as a plain ValueError
      return _fail(e, 2)
    if error is None and _peer_collective_failure(e):
      error = errors.PeerLost(errors.PeerLost.describe(_heartbeat_timeout(), _first_line(e)))
    if error is None:
      errors.detail_log_traceback(e)
      raise
    if error is not e:
      errors.detail_log_traceback(e)
    return _fail(error, error.exit_code)
  print_results(results)
  return 0


def _first_line(error: BaseException) -> str:
  return " ".join(str(error).split())[:200]


def _peer_collective_failure(error: BaseException) -> bool:
  """A multi-host collective that failed because a peer went away (gloo or the coordination service saw the
  connection drop before the heartbeat timeout did): the same ending as `PeerLost`."""
  if "jax" not in sys.modules:
    return False
  from jax._src import distributed as _dist
  if getattr(_dist.global_state, "client", None) is None:
    return False
  text = str(error).lower()
  return any(k in text for k in ("gloo", "connection closed", "connection reset", "socket closed", "unavailable",
                                 "heartbeat", "coordination service", "barrier", "deadline_exceeded"))


def _heartbeat_timeout() -> int:
  from cl_jax import sharding
  return sharding.LAST_TIMEOUTS.get("heartbeat_timeout_s", sharding.DISTRIBUTED_DEFAULTS["heartbeat_timeout_s"])


# `cl-jax generate ...` / `cl-jax chat ...` (cl_jax.lm.generation): text in, text out from a model directory.
GENERATION_COMMANDS = ("generate", "chat")


def _generation(argv) -> int:
  try:
    from cl_jax.lm.generation import main as generation_main
    return generation_main(argv)
  except CLJaxError as e:
    return _fail(e, e.exit_code)


# `cl-jax lm-eval ...`: lm-evaluation-harness's own command line with the `cl_jax` model registered
# (cl_jax.lm.lm_eval_model); lm-eval 0.4.13 loads no model plugins by entry point.
LM_EVAL_COMMAND = "lm-eval"


def _lm_eval(argv) -> int:
  try:
    from cl_jax.lm.lm_eval_model import main as lm_eval_main
  except ImportError as e:
    return _fail(ConfigError(f"cl-jax lm-eval needs the lm-eval package ({e}): pip install 'cl_jax[eval]'"), 2)
  try:
    return lm_eval_main(argv)
  except CLJaxError as e:
    return _fail(e, e.exit_code)


def console_main() -> None:
  """The `cl-jax` console command (pyproject.toml): the same as `python run.py`."""
  errors.install_signal_handlers()  # first: the imports below take seconds, and a preemption during them is 75
  errors.capture_library_output()  # for the whole process: orbax's threads still log while it exits
  sys.exit(launch(sys.argv[1:], prog="cl-jax"))


# ----------------------------------------------------------------------------- multi-host: a supervised process

SUPERVISED_ENV = "CL_JAX_SUPERVISED"  # set in the supervised child: it runs `main` itself


def launch(argv, prog: str = "run.py") -> int:
  """What `run.py` and `cl-jax` run: `main(argv)` here, or on a multi-host launch (`errors.multihost_launch`) in a
  child process this one supervises (`supervise`), whose exit it reports."""
  from cl_jax import host_memory
  host_memory.configure()  # before JAX's and orbax's threads allocate (each would get a malloc arena of its own)
  try:
    if not errors.multihost_launch() or os.environ.get(SUPERVISED_ENV):
      return main(argv, prog)
    return supervise(argv, prog)
  except errors.Interrupted as e:  # a preemption before `main` took over
    return _fail(e.preempted(), errors.Preempted.exit_code)


def supervised_main() -> None:
  """The supervised child's entry point: `sys.argv` is [prog, *argv]."""
  errors.install_signal_handlers()
  errors.capture_library_output()
  code = main(sys.argv[2:], prog=sys.argv[1])
  if code == errors.PeerLost.exit_code:  # jax's exit handlers would wait for (or abort on) the lost peer
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def supervise(argv, prog: str) -> int:
  """Runs `main(argv)` in a child process and returns its exit code, turning a lost peer into `PeerLost` (69).

  Why a child: when a peer of a multi-host run dies, jax's coordination client aborts the survivors from a C++
  thread (SIGABRT after a check-failure trace; jaxlib 0.10 takes no Python callback for it, see
  `cl_jax.sharding.maybe_initialize_distributed`), which no handler in the dying process can turn into an exit code.
  This process sees the abort and the coordination service's message, prints one `error:` line and exits 69,
  within `distributed.heartbeat_timeout_s` of the peer's death (at once when the coordinator itself died).

  The child's stdout is this one's; its stderr passes through, except the runtime's native log lines
  (`errors.NATIVE_LOG_LINE`, with their continuation lines), which go to the detail log of the workdir. SIGTERM and
  SIGINT are forwarded (the child has its own process group, so a terminal's Ctrl-C reaches it once); the child
  dies with this process (PR_SET_PDEATHSIG); a child killed by a signal is mirrored (this process dies by it too).
  """
  import signal
  import subprocess
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(errors.__file__)))
  path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
  env = dict(os.environ, **{SUPERVISED_ENV: "1", "PYTHONPATH": path})
  child = subprocess.Popen([sys.executable, "-c", "from cl_jax.cli import supervised_main; supervised_main()", prog,
                            *argv], env=env, stderr=subprocess.PIPE, preexec_fn=_die_with_parent, process_group=0)

  def forward(signum, frame):
    del frame
    if child.poll() is None:
      child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in errors.SIGNALS}
  try:
    native, fatal = _relay(child.stderr)
    code = child.wait()
  finally:
    errors.restore_signal_handlers(previous)
  workdir = _flag_value(argv, "--workdir")
  if workdir and os.path.isfile(os.path.join(workdir, "config.json")):  # the run held its workdir: log there
    errors.open_detail_log(workdir, int(os.environ.get("JAX_PROCESS_ID", "0") or 0))
    if native:
      errors.detail_log_write("native runtime output (jax / XLA / gRPC):\n" + "".join(native))
  elif native and not fatal:
    sys.stderr.write("".join(native))  # nowhere to keep them: they are the only record
  if code == -signal.SIGABRT and fatal:
    timeout = _flag_value(argv, "--config.distributed.heartbeat_timeout_s")
    return _fail(errors.PeerLost(errors.PeerLost.describe(int(timeout) if timeout and timeout.isdigit() else
                                                          _default_heartbeat())), errors.PeerLost.exit_code)
  if code < 0:  # killed by a signal: die by it too, so whoever launched this sees the same ending
    if -code != signal.SIGKILL:
      signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
  return code


def _default_heartbeat() -> int:
  from cl_jax.sharding import DISTRIBUTED_DEFAULTS
  return DISTRIBUTED_DEFAULTS["heartbeat_timeout_s"]


def _die_with_parent() -> None:
  """In the child, before exec: SIGKILL it when its supervisor dies (Linux; elsewhere a no-op)."""
  try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
  except (OSError, AttributeError):
    pass


def _flag_value(argv, flag: str) -> str | None:
  for i, a in enumerate(argv):
    if a == flag and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(flag + "="):
      return a[len(flag) + 1:]
  return None


OWN_LINE = ("error:", "warning:", "Traceback (most recent call last)", "Resuming")


def _relay(stream) -> tuple[list, bool]:
  """Copies the child's stderr to ours, holding back native runtime lines (and the lines that continue them, up to
  the next line of our own); returns (the held-back lines, whether they report a lost peer)."""
  native_re = re.compile(errors.NATIVE_LOG_LINE)
  fd, out = stream.fileno(), sys.stderr
  native, in_native, pending = [], False, ""
  while True:
    chunk = os.read(fd, 65536)
    if not chunk:
      break
    pending += chunk.decode("utf-8", "replace")
    *lines, pending = pending.split("\n")
    for line in lines:
      line += "\n"
      if native_re.match(line):
        in_native = True
      elif in_native and (line.startswith(OWN_LINE) or "\r" in line):
        in_native = False
      if in_native:
        native.append(line)
      else:
        out.write(line)
    if pending and not in_native and "\r" in pending:  # a progress bar redrawing its line: show it now
      cut = pending.rindex("\r") + 1
      out.write(pending[:cut])
      pending = pending[cut:]
    out.flush()
  if pending:
    if in_native:
      native.append(pending)
    else:
      out.write(pending)
  out.flush()
  text = "".join(native)
  return native, any(mark in text for mark in errors.PEER_LOST_MARKS)


def _fail(error: BaseException, code: int) -> int:
  return errors.report(error, code)


def print_results(results) -> None:
  from cl_jax.workdir import is_writer
  summary = getattr(results, "summary", None)
  if summary is None or not is_writer():
    return  # on a multi-host launch only process 0 prints, as only it writes the outputs
  print()
  print(summary())
  print(f"\nOutputs in {results.workdir}/ (results.json, summary.md, metrics.jsonl, plots, checkpoints/)")
