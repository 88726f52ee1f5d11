"""The errors a run can end with, the exit code `run.py` / `cl-jax` returns for each, and how a failure is reported.

| code | error                     | meaning                                                                              |
| ---- | ------------------------- | ------------------------------------------------------------------------------------ |
| 0    |                           | the run finished                                                                     |
| 1    |                           | a bug: an exception no rule below covers (its traceback is printed)                  |
| 2    | ConfigError, WorkdirError | bad input (config, workdir, data path): refused before any work, nothing was written |
| 3    | DivergenceError           | the run diverged (non-finite loss or params, or a loss blow-up); the last good       |
|      |                           | checkpoint is intact, or the message says that no checkpoint was written yet         |
| 4    | WorkdirLocked             | the workdir is locked by another live run                                            |
| 69   | PeerLost                  | a peer process of a multi-host run was lost (no heartbeat for                        |
|      |                           | `distributed.heartbeat_timeout_s` seconds, or the coordinator died); checkpoints     |
|      |                           | already written are intact: rerun every process to resume (69 is EX_UNAVAILABLE)     |
| 74   | IOFailure                 | I/O failure mid-run (disk full, workdir unwritable or gone): one line naming the     |
|      |                           | path and the reason; checkpoints written before it are intact: free space or fix the |
|      |                           | path, then rerun to resume (74 is EX_IOERR)                                          |
| 75   | Preempted                 | preempted (SIGTERM / SIGINT), from the first instant of the launch and for every     |
|      |                           | kind (merge too): inside the training loop a checkpoint is saved at the step         |
|      |                           | boundary; rerun the same command to resume (75 is EX_TEMPFAIL)                       |

The table above is `exit_code_table()` (rendered from `EXIT_CODES`); README's "Exit codes" section holds the same
text, and tests/test_exit_codes.py checks all three agree.

Each failure ends with exactly one `error: ...` line on stderr. What libraries print on the way (orbax and absl
log records with their tracebacks, asyncio's "Event loop is closed", exceptions of background threads, library
warnings) goes to `<workdir>/logs/stderr-detail.log` instead (`capture_library_output`); the run's own warnings
(a checkpoint it skips, ...) stay on stderr, one line each. Nothing is written for bad input (exit 2) or a locked
workdir (exit 4): the log is opened only once the run holds its workdir.

This module imports nothing but the standard library: `run.py` and the `cl-jax` command install the preemption
handler from here (`install_signal_handlers`) before jax is imported.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import signal
import sys
import threading
import traceback
import warnings


class CLJaxError(Exception):
  """Base of the errors a run reports as one line (no traceback) with `exit_code`."""
  exit_code = 1


class ConfigError(CLJaxError, ValueError):
  """A config key has a bad value, or does not exist; or an input path is unusable."""
  exit_code = 2


class WorkdirError(CLJaxError, ValueError):
  """The workdir cannot be used (holds another run, is a file, is unwritable)."""
  exit_code = 2


class WorkdirLocked(CLJaxError):
  """Another live run holds the workdir's lock."""
  exit_code = 4


class DivergenceError(CLJaxError, RuntimeError):
  """Non-finite loss or params, or a loss above `train.divergence_factor` x its early value."""
  exit_code = 3


class PeerLost(CLJaxError):
  """Another process of a multi-host run stopped answering (died, or its host did)."""
  exit_code = 69

  @staticmethod
  def describe(heartbeat_timeout_s: int, collective: str = "") -> str:
    """The one line: how the peer was found lost (its heartbeats stopped, or a collective with it broke)."""
    how = (f"broke off a collective ({collective})" if collective else
           f"stopped answering (no heartbeat for distributed.heartbeat_timeout_s={heartbeat_timeout_s}s, or the "
           "coordinator died)")
    return (f"peer process lost: another process of this multi-host run {how}; checkpoints already written are "
            "intact: rerun every process with the same command to resume")


class IOFailure(CLJaxError, OSError):
  """Writing or reading the workdir failed mid-run (no space left, read-only, permission, the path is gone)."""
  exit_code = 74


class Preempted(CLJaxError):
  """SIGTERM or SIGINT arrived; inside the training loop a checkpoint was saved at the next step boundary."""
  exit_code = 75


EXIT_CODES = (  # (code, the error that ends a run with it, what it means); `exit_code_table` renders it
    (0, "", "the run finished"),
    (1, "", "a bug: an exception no rule below covers (its traceback is printed)"),
    (ConfigError.exit_code, "ConfigError, WorkdirError",
     "bad input (config, workdir, data path): refused before any work, nothing was written"),
    (DivergenceError.exit_code, "DivergenceError",
     "the run diverged (non-finite loss or params, or a loss blow-up); the last good checkpoint is intact, or the "
     "message says that no checkpoint was written yet"),
    (WorkdirLocked.exit_code, "WorkdirLocked", "the workdir is locked by another live run"),
    (PeerLost.exit_code, "PeerLost",
     "a peer process of a multi-host run was lost (no heartbeat for `distributed.heartbeat_timeout_s` seconds, or "
     "the coordinator died); checkpoints already written are intact: rerun every process to resume (69 is "
     "EX_UNAVAILABLE)"),
    (IOFailure.exit_code, "IOFailure",
     "I/O failure mid-run (disk full, workdir unwritable or gone): one line naming the path and the reason; "
     "checkpoints written before it are intact: free space or fix the path, then rerun to resume (74 is EX_IOERR)"),
    (Preempted.exit_code, "Preempted",
     "preempted (SIGTERM / SIGINT), from the first instant of the launch and for every kind (merge too): inside the "
     "training loop a checkpoint is saved at the step boundary; rerun the same command to resume (75 is "
     "EX_TEMPFAIL)"),
)


def exit_code_table(width: int = 84) -> str:
  """`EXIT_CODES` as the Markdown table of this docstring and of README (meanings wrapped at `width` columns)."""
  import textwrap
  rows = [("code", "error", "meaning"), ("---", "---", "---")]
  for code, name, meaning in EXIT_CODES:
    for i, part in enumerate(textwrap.wrap(meaning, width)):
      rows.append((str(code) if i == 0 else "", name if i == 0 else "", part))
  widths = [max(len(r[k]) for r in rows) for k in range(3)]
  fill = lambda r: "| " + " | ".join((c if c != "---" else "-" * w).ljust(w) for c, w in zip(r, widths)) + " |"
  return "\n".join(fill(r) for r in rows)


def report(error: BaseException, code: int) -> int:
  """Prints the one `error:` line of a run that ends with `code` (and where the library output went); returns
  `code`. Bad input (2) names nothing else: nothing was written."""
  where = detail_log_summary() if code != ConfigError.exit_code else ""
  print(f"error: {' '.join(str(error).split())}{where}", file=sys.stderr, flush=True)
  return code


# ----------------------------------------------------------------------------- mapping any exception to a code

def _chain(error: BaseException):
  """`error`, then its causes and contexts (each once): what a library that wraps exceptions hides inside."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def classify(error: BaseException) -> CLJaxError | None:
  """The `CLJaxError` an exception stands for, or None (a bug: exit 1 with its traceback).

  A CLJaxError anywhere in the chain wins (orbax re-raises a save's failure wrapped in its own exception); else an
  OSError anywhere in it is an I/O failure (`IOFailure`, exit 74), named by its path and reason. Before this, a
  full disk surfaced as orbax's ValueError and was reported as bad input (exit 2).
  """
  chain = list(_chain(error))
  for e in chain:
    if isinstance(e, CLJaxError):
      return e
    if isinstance(e, Interrupted):
      return e.preempted()
  for e in chain:
    if isinstance(e, OSError) and not isinstance(e, (ConnectionError, TimeoutError)):
      return IOFailure(describe_os_error(e))
  return None


def describe_os_error(e: OSError) -> str:
  """'I/O failure: no space left on device at /w/metrics.jsonl (ENOSPC); ...: free space ...': one line, the path,
  the reason and what to do."""
  name = errno.errorcode.get(e.errno, "") if e.errno else ""
  reason = (e.strerror or str(e) or type(e).__name__).strip().lower()
  where = f" at {e.filename}" if e.filename else ""
  code = f" ({name})" if name else ""
  hint = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space within your quota",
          errno.EROFS: "make the workdir writable", errno.EACCES: "make the workdir writable",
          errno.EPERM: "make the workdir writable"}.get(e.errno, "fix the path")
  return (f"I/O failure: {reason}{where}{code}; checkpoints written before it are intact: {hint}, then rerun the "
          "same command to resume")


# ----------------------------------------------------------------------------- preemption from the first instant

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
  """What the early handler raises where the main thread is: a BaseException, like KeyboardInterrupt, so that no
  library's `except Exception` swallows it; `classify` (and `cl_jax.run`) turn it into `Preempted`."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum

  def preempted(self) -> Preempted:
    name = signal.Signals(self.signum).name
    return Preempted(f"preempted by signal {self.signum} ({name}) outside the training loop (nothing to checkpoint "
                     "there): rerun the same command")


def _raise_preempted(signum, frame):
  del frame
  raise Interrupted(signum)


def install_signal_handlers() -> dict:
  """SIGTERM / SIGINT raise `Interrupted` (reported as `Preempted`, exit 75) wherever the main thread is; returns
  the previous handlers.

  `run.py` and `cl-jax` call it before importing jax, so a preemption during the imports, config loading, data
  loading or compilation, or of a merge run, exits 75 instead of dying by the signal (-15 / 143). The training
  loop (`cl_jax.train.loop.PreemptionFlag`) replaces it while it runs, to stop at a step boundary with a
  checkpoint, and puts it back after. A no-op (returning {}) off the main thread, where Python cannot set handlers.
  """
  if threading.current_thread() is not threading.main_thread():
    return {}
  return {s: signal.signal(s, _raise_preempted) for s in SIGNALS}


def restore_signal_handlers(previous: dict) -> None:
  for s, handler in previous.items():
    signal.signal(s, handler if handler is not None else signal.SIG_DFL)


# ----------------------------------------------------------------------------- multi-host launches

CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")  # where jax finds the coordinator


def multihost_launch(environ=None) -> bool:
  """Whether this process is one of a multi-host launch (`cl_jax.sharding.maybe_initialize_distributed` starts
  `jax.distributed` then); decided from the environment alone, before jax is imported."""
  env = os.environ if environ is None else environ
  return bool(env.get("JAX_COORDINATOR_ADDRESS")) or any(k in env for k in CLUSTER_ENV)


# Lines jax's C++ runtime writes to stderr (absl / glog format `E1207 01:13:06.208 16369 file.cc:1549] ...`, its
# check-failure trace, gRPC details): folded into the detail log by `cl_jax.cli.launch`.
NATIVE_LOG_LINE = r"^([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^ ]+:\d+\]|\*\*\* Check failure stack trace|\s+@ +0x|terminate called )"
# What the coordination service's fatal error (a lost peer) writes before it aborts the process.
PEER_LOST_MARKS = ("distributed service detected fatal errors", "stopped sending heartbeats")


# ----------------------------------------------------------------------------- library output into a detail log

DETAIL_LOG = os.path.join("logs", "stderr-detail.log")  # under the workdir


class _DetailLog(logging.Handler):
  """Library log records, tracebacks of background threads, unraisable exceptions and library warnings: kept in
  memory (the last `limit` entries) until the run holds its workdir, then appended to <workdir>/logs/stderr-detail.log.
  """

  def __init__(self, limit: int = 5000):
    super().__init__(logging.WARNING)
    self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    self.pending, self.limit, self.file, self.path, self.count = [], limit, None, None, 0

  def emit(self, record):
    try:
      self.write(self.format(record))
    except Exception:  # noqa: BLE001 -- a log record that cannot be formatted must not end the run
      self.handleError(record)

  def write(self, text: str) -> None:
    with self.lock:
      self.count += 1
      if self.path is not None and self.file is None:  # created on the first message: a quiet run has no log
        try:
          os.makedirs(os.path.dirname(self.path), exist_ok=True)
          self.file = open(self.path, "a")  # noqa: SIM115 -- open for the rest of the run
        except OSError:  # the disk is full or the workdir unwritable (the run reports that): the temp dir instead
          self._spill()
      if self.file is not None:
        try:
          self.file.write(text.rstrip("\n") + "\n")
          self.file.flush()
          return
        except OSError:
          self._spill()
          if self.file is not None:
            self.file.write(text.rstrip("\n") + "\n")
            self.file.flush()
            return
      self.pending.append(text)
      del self.pending[:-self.limit]

  def _spill(self) -> None:
    import tempfile
    self.file = None
    try:
      fd, self.path = tempfile.mkstemp(prefix="cl_jax-stderr-detail-", suffix=".log")
      self.file = os.fdopen(fd, "a")
    except OSError:
      self.path = None

  def open(self, workdir: str, process: int = 0) -> None:
    """Sends what is kept, and what comes, to the detail log of `workdir` (for process `process`)."""
    with self.lock:
      if self.path is not None:
        return
      self.path = os.path.join(os.path.abspath(workdir), detail_log_name(process))
      pending, self.pending = self.pending, []
    for text in pending:
      self.write(text)
      self.count -= 1

  def close(self):
    with self.lock:
      if self.file is not None:
        self.file.close()
        self.file = None
    super().close()


_detail: _DetailLog | None = None
_saved: dict = {}


def _own_warning(filename: str) -> bool:
  """A warning raised in cl_jax itself (or attributed to its caller: a config file, a script)."""
  lib = os.path.dirname(os.path.abspath(__file__))
  path = os.path.abspath(filename or "")
  return path.startswith(lib + os.sep) or "site-packages" not in path and "dist-packages" not in path


def _show_warning(message, category, filename, lineno, file=None, line=None):
  if _own_warning(filename) or _detail is None:
    print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)
  else:
    _detail.write(f"warning ({filename}:{lineno}): {category.__name__}: {message}")


def _thread_exception(args):
  if _detail is None:
    return _saved["threading"](args)
  text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
  _detail.write(f"exception in thread {getattr(args.thread, 'name', '?')}:\n{text}")


def _unraisable(unraisable):
  if _detail is None:
    return _saved["unraisable"](unraisable)
  exc = unraisable.exc_value
  text = "".join(traceback.format_exception(type(exc), exc, unraisable.exc_traceback)) if exc else ""
  _detail.write(f"{unraisable.err_msg or 'exception ignored'}: {unraisable.object!r}\n{text}")


def capture_library_output() -> bool:
  """Routes what libraries print (see the module docstring) into the detail log; False if it already was.

  `run.py` and `cl-jax` call it once for the whole process (orbax's threads still log during interpreter exit);
  `cli.main` calls it too and releases it on return only if it was the one that set it up.

  A handler on the root logger takes every library record of level WARNING and above (with its traceback): once it
  is there, `logging.warning` no longer installs the stderr handler orbax's first log call would otherwise get.
  """
  global _detail
  if _detail is not None:
    return False
  _detail = _DetailLog()
  root = logging.getLogger()
  for h in list(root.handlers):  # a stderr handler a library's first logging call installed (logging.lastResort's kin)
    if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__):
      root.removeHandler(h)
  root.addHandler(_detail)
  _saved.update(threading=threading.excepthook, unraisable=sys.unraisablehook, showwarning=warnings.showwarning)
  threading.excepthook = _thread_exception
  sys.unraisablehook = _unraisable
  warnings.showwarning = _show_warning
  return True


def release_library_output() -> None:
  """Undoes `capture_library_output` (the CLI called in-process: a test, a notebook) and closes the log."""
  global _detail
  if _detail is None:
    return
  logging.getLogger().removeHandler(_detail)
  _detail.close()
  threading.excepthook = _saved.pop("threading")
  sys.unraisablehook = _saved.pop("unraisable")
  warnings.showwarning = _saved.pop("showwarning")
  _detail = None


def detail_log_name(process: int = 0) -> str:
  """logs/stderr-detail.log (process 0), logs/stderr-detail.p<i>.log (process i of a multi-host run)."""
  return DETAIL_LOG if process == 0 else DETAIL_LOG.replace(".log", f".p{process}.log")


def open_detail_log(workdir: str, process: int = 0) -> None:
  """From now on (the run holds `workdir`), library output is appended to `detail_log_name(process)` under it."""
  if _detail is not None:
    _detail.open(workdir, process)


def detail_log_write(text: str) -> None:
  if _detail is not None:
    _detail.write(text)


def detail_log_summary() -> str:
  """' (N library messages in PATH)' when the detail log holds something, else ''."""
  if _detail is None or not _detail.count:
    return ""
  if _detail.path is None:
    return ""
  where = _detail.path
  return f" ({_detail.count} library message{'s' if _detail.count > 1 else ''} in {where})"


def detail_log_traceback(error: BaseException) -> None:
  """The full traceback of the error a run ends with, for the detail log (stderr gets one line)."""
  if _detail is not None:
    buf = io.StringIO()
    traceback.print_exception(type(error), error, error.__traceback__, file=buf)
    _detail.write(f"the run ended with:\n{buf.getvalue()}")
