"""One workdir policy for every kind of run: usability checks, "same run?", the lock, config.json, metrics.

A workdir holds one run:

  config.json         the config (written once, by process 0, when the run starts fresh)
  .lock               {pid, host, start}: held while a run is live; a second live run is refused (WorkdirLocked),
                      a lock whose pid is dead on this host is taken over
  metrics.jsonl       one JSON object per line (strict JSON: non-finite floats are written as null)
  tensorboard/        the same scalars as TensorBoard event files
  checkpoints/        orbax (cl_jax.checkpoint)
  results.json, summary.md, *.png   at the end

Rerunning the same config resumes; "same" compares `cl_jax.config.comparable(config)` (the config without
strategy sections the run does not use), so adding a strategy to the package never blocks resuming an old run;
keys the workdir's config.json lacks count as the same when the new config has them at the kind's default.
On multi-host launches only process 0 writes any of these files (checkpoints are written collectively).
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import re
import shutil
import socket
import struct
import time
import warnings
from typing import Any, Callable

from cl_jax.errors import WorkdirError, WorkdirLocked

LOCK = ".lock"

_TB_WRITERS = itertools.count()  # a distinct event file per log opened in this process


def is_writer() -> bool:
  """True on the process that writes logs and reports (process 0; every process of a single-host run)."""
  import jax
  return jax.process_index() == 0


# ----------------------------------------------------------------------------- checks without writing

def check_usable(workdir: str) -> None:
  """Raises WorkdirError naming the path when `workdir` cannot hold a run; writes nothing."""
  if not workdir:
    raise WorkdirError("workdir is empty: pass --workdir DIR")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {workdir!r} is a file, not a directory")
  existing = path
  while not os.path.exists(existing):
    if os.path.islink(existing):  # a link to nothing (or a loop): creating the folder would fail with "File exists"
      what = "is" if existing == path else f"lies under {existing!r}, which is"
      raise WorkdirError(f"workdir {workdir!r} {what} a symbolic link to {os.readlink(existing)!r}, which leads "
                         "nowhere (its target does not exist, or the links loop); remove the link or create its target")
    parent = os.path.dirname(existing)
    if parent == existing:
      break
    existing = parent
  if os.path.exists(existing) and not os.path.isdir(existing):
    raise WorkdirError(f"workdir {workdir!r} lies under {existing!r}, which is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "is not writable" if existing == path else f"cannot be created: {existing!r} is not writable"
    raise WorkdirError(f"workdir {workdir!r} {what}")


def config_dict(config) -> dict:
  """A ConfigDict as the plain dict config.json holds."""
  if isinstance(config, dict):
    return json.loads(json.dumps(config, sort_keys=True))
  return json.loads(config.to_json_best_effort(sort_keys=True))


def comparable_dict(config) -> dict:
  """What decides "same run": `cl_jax.config.comparable` when present, else the whole config."""
  try:
    from cl_jax.config import comparable
  except ImportError:
    return config_dict(config)
  if isinstance(config, dict):
    import ml_collections
    config = ml_collections.ConfigDict(config)
  return config_dict(comparable(config))


def _diff_keys(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield prefix.rstrip(".")


def _drop_new_defaults(new: dict, old: dict, ref: dict) -> dict:
  """`new` without the keys `old` lacks whose value is the default: a key added to the package later (with a
  default that keeps the old behaviour) does not stop an old workdir from resuming."""
  out = {}
  for k, v in new.items():
    if k not in old:
      if isinstance(ref, dict) and k in ref and ref[k] == v:
        continue
      out[k] = v
    elif isinstance(v, dict) and isinstance(old[k], dict):
      out[k] = _drop_new_defaults(v, old[k], ref.get(k, {}) if isinstance(ref, dict) else {})
    else:
      out[k] = v
  return out


def read_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path}: unreadable ({e}); use --overwrite to discard this workdir") from e


def decide(config, workdir: str, overwrite: bool, check_lock: bool = True, reference=None) -> bool:
  """True when `workdir` holds this run (resume); False for a fresh start. Reads only.

  Raises WorkdirError when it holds another config, or files that are not a cl_jax run, and `overwrite` is off.
  `reference` (the kind's default config): keys a newer package added at their default do not make a run differ.
  """
  check_usable(workdir)
  if check_lock:
    Lock(workdir).check()  # a live run there: refuse now, before the caller builds anything
  if overwrite or not os.path.isdir(workdir):
    return False
  old = read_config(workdir)
  if old is None:
    leftovers = [n for n in os.listdir(workdir) if n != LOCK]
    if leftovers:
      raise WorkdirError(f"workdir {workdir!r} is not empty and holds no cl_jax run (found {sorted(leftovers)[:5]});"
                         " use another --workdir, or --overwrite to replace it")
    return False
  new_c, old_c = comparable_dict(config), comparable_dict(old)
  ref = config_dict(reference) if reference is not None else {}
  new_c = _drop_new_defaults(new_c, old_c, ref)
  if new_c != old_c:
    diff = sorted(_diff_keys(old_c, new_c))
    raise WorkdirError(f"workdir {workdir!r} holds a run with a different config (differs in {diff[:8]}); "
                       "use another --workdir, or --overwrite to discard it")
  return True


def precheck(config, workdir: str, overwrite: bool, reference=None) -> None:
  """`decide` before the run builds anything: process 0 reads, every process learns whether it refused."""
  error = None
  if is_writer():
    try:
      decide(config, workdir, overwrite, reference=reference)
    except (WorkdirError, WorkdirLocked) as e:
      error = e
  if _broadcast_flag(False, error is not None) is None:
    raise error or WorkdirError(f"workdir {workdir!r}: process 0 refused it (see its log)")


# ----------------------------------------------------------------------------- the lock

def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


class Lock:
  """`<workdir>/.lock`, created atomically (O_EXCL). A lock whose pid is dead on this host is stale."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self.held = False

  def acquire(self) -> "Lock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(20):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        if not os.path.exists(self.path):
          continue
        holder = self.check()
        if holder is None and time.time() - os.path.getmtime(self.path) < 5:
          time.sleep(0.5)  # unreadable but fresh: its owner may be writing it right now
          continue
        warnings.warn(f"taking over the stale lock {self.path} of dead pid "
                      f"{None if holder is None else holder.get('pid')}", stacklevel=2)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirLocked(f"could not take the lock {self.path}: another run keeps taking it")

  def check(self) -> dict | None:
    """Raises WorkdirLocked when a live run holds the lock; returns a stale holder's record (or None). Reads only."""
    if not os.path.exists(self.path):
      return None
    holder = self._holder()
    if holder is not None and not self._stale(holder):
      raise WorkdirLocked(
          f"workdir {os.path.dirname(self.path)!r} is in use by a live run (pid {holder.get('pid')} on "
          f"{holder.get('host')}, started {holder.get('start')}); wait for it or use another --workdir "
          f"(if that run is dead, delete {self.path})")
    return holder

  def _holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None  # half-written by a process killed while writing it: stale

  @staticmethod
  def _stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
      return False  # cannot tell whether a pid on another host lives: assume it does
    pid = int(holder.get("pid", -1))
    return pid <= 0 or not _pid_alive(pid)

  def release(self) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class Workdir:
  """A run's claim on its workdir: `open()` locks it, clears it on `overwrite`, writes config.json.

  `resume` is True when the workdir already holds this run. Only process 0 touches the file system; the decision
  is process 0's, broadcast to the others so every process resumes (or not) alike.
  """

  def __init__(self, config, workdir: str, overwrite: bool = False, reference=None):
    self.config, self.path, self.overwrite, self.reference = config, workdir, overwrite, reference
    self.writer = is_writer()
    self.lock = Lock(workdir)
    self.resume = False

  def open(self) -> "Workdir":
    """Takes the lock (raises WorkdirLocked), decides resume vs fresh, prepares the directory."""
    error = None
    if self.writer:
      try:
        check_usable(self.path)
        self.lock.acquire()
        self.resume = decide(self.config, self.path, self.overwrite, check_lock=False,  # the lock is ours
                             reference=self.reference)
        if not self.resume:
          for name in os.listdir(self.path):
            if name != LOCK:
              p = os.path.join(self.path, name)
              shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
          with open(os.path.join(self.path, "config.json"), "w") as f:
            json.dump(config_dict(self.config), f, indent=2, sort_keys=True)
      except (WorkdirError, WorkdirLocked, OSError) as e:
        self.lock.release()
        error = e
    self.resume = _broadcast_flag(self.resume, error is not None)
    if error is not None:
      raise error if not isinstance(error, OSError) else WorkdirError(f"workdir {self.path!r}: {error}")
    if self.resume is None:
      raise WorkdirError(f"workdir {self.path!r}: process 0 refused it (see its log)")
    return self

  def close(self) -> None:
    self.lock.release()

  def __enter__(self):
    return self.open()

  def __exit__(self, *exc):
    self.close()


@dataclasses.dataclass
class RunContext:
  """An opened run, as the skeleton hands it to a kind's `run`: where it writes, whether it resumes, and the
  loop's step hooks (`cl_jax.train.loop.StepHook`: test fault injection, profiling), empty in a plain run."""
  config: Any
  workdir: str
  resume: bool = False
  progress: bool = True
  hooks: tuple = ()


def _broadcast_flag(resume: bool, failed: bool):
  """Process 0's (resume, failed) on every process: None when process 0 failed."""
  import jax
  if jax.process_count() == 1:
    return None if failed else resume
  import numpy as np
  from jax.experimental import multihost_utils
  code = int(multihost_utils.broadcast_one_to_all(np.int32(2 if failed else int(resume))))
  return None if code == 2 else bool(code)


# ----------------------------------------------------------------------------- metrics.jsonl + TensorBoard

def finite_or_none(x):
  """Strict JSON: a non-finite float becomes null (json.dumps would write the invalid tokens NaN / Infinity)."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: finite_or_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite_or_none(v) for v in x]
  return x


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl; a torn last line (a process killed mid-write) is skipped."""
  return _read_metrics(os.path.join(workdir, "metrics.jsonl"))[0]


def _read_metrics(path: str) -> tuple[list[dict], int]:
  """(records, number of lines that are not a JSON record: torn by a kill mid-write, or damaged)."""
  if not os.path.exists(path):
    return [], 0
  out, torn = [], 0
  with open(path, errors="replace") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        torn += 1
        continue
      if isinstance(rec, dict):
        out.append(rec)
      else:
        torn += 1
  return out, torn


class EventFile:
  """A TensorBoard event file (TFRecord framing of `Event` protos), written without TensorFlow or tensorboardX.

  tensorboardX imports torch whenever torch is installed (~2-3 s of a run's start-up on a CPU box), for scalars
  that are a few bytes each, so the three record kinds a run writes are encoded here by hand:
    Event   {wall_time: double = 1, step: int64 = 2, file_version: string = 3, summary: Summary = 5,
             session_log: SessionLog = 7}
    Summary {value: repeated Value = 1};  Value {tag: string = 1, simple_value: float = 2}
    SessionLog {status: enum = 1}  (START = 1: readers drop the earlier events at steps >= its step)
  Each record is  uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)  (little endian;
  masked(c) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2^32, CRC-32C = Castagnoli polynomial 0x82f63b78).
  Events are buffered and reach the file at `flush()` / `close()` (the loop flushes at every checkpoint).
  """

  def __init__(self, logdir: str, purge_step: int | None = None, filename_suffix: str = ""):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}{filename_suffix}")
    self.file = open(self.path, "wb")
    self.buffer = []
    step = 0 if purge_step is None else int(purge_step)
    self._add(_pb_double(1, time.time()) + _pb_varint_field(2, step) + _pb_bytes(3, b"brain.Event:2"))
    if purge_step is not None:
      self._add(_pb_double(1, time.time()) + _pb_varint_field(2, step) + _pb_bytes(7, _pb_varint_field(1, 1)))

  def add_scalars(self, scalars: dict, step: int, walltime: float | None = None) -> None:
    """One event holding every {tag: value} of `scalars` at `step`."""
    values = b"".join(_pb_bytes(1, _pb_bytes(1, _clean_tag(tag).encode()) + b"\x15" + struct.pack("<f", v))
                      for tag, v in scalars.items())
    wall = time.time() if walltime is None else walltime
    self._add(_pb_double(1, wall) + _pb_varint_field(2, int(step)) + _pb_bytes(5, values))

  def _add(self, event: bytes) -> None:
    header = struct.pack("<Q", len(event))
    self.buffer.append(header + struct.pack("<I", _masked_crc(header)) + event + struct.pack("<I", _masked_crc(event)))

  def flush(self) -> None:
    if self.buffer and self.file is not None:
      self.file.write(b"".join(self.buffer))
      self.buffer.clear()
    if self.file is not None:
      self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.flush()
      self.file.close()
      self.file = None


def _crc32c_table() -> list:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC32C = _crc32c_table()


def _masked_crc(data: bytes) -> int:
  crc, table = 0xFFFFFFFF, _CRC32C
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _pb_varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64: a negative value is its two's complement (ten bytes)
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _pb_varint_field(field: int, n: int) -> bytes:
  return _pb_varint(field << 3) + _pb_varint(n)


def _pb_double(field: int, x: float) -> bytes:
  return _pb_varint(field << 3 | 1) + struct.pack("<d", x)


def _pb_bytes(field: int, data: bytes) -> bytes:
  return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data


def _clean_tag(tag: str) -> str:
  """TensorBoard's tag alphabet: anything outside [-/\\w.] becomes '_' (as tensorboardX does)."""
  return re.sub(r"[^-/\w\.]", "_", tag)


_STRICT_JSON = json.JSONEncoder(allow_nan=False)  # what json.dumps(..., allow_nan=False) uses


class MetricsLog:
  """metrics.jsonl plus TensorBoard event files, written by process 0 only (a no-op elsewhere).

  Opening it makes the log consistent with where the run starts: with `resume_step=None` (a fresh start, also a
  rerun of a run killed before its first checkpoint) the log starts empty; when resuming at step s it keeps the
  records with `step <= s` (or those `keep(record)` accepts) and drops the rest, which the rerun writes again, so a
  killed-and-resumed run's metrics.jsonl is byte-identical to an uninterrupted one's. TensorBoard gets a purge at
  step s + 1 (a SessionLog START), so its readers drop the earlier events past s instead of showing steps twice.

  `tb_every`: train records reach TensorBoard only at steps divisible by it (metrics.jsonl keeps every step).
  `write_many` writes a chunk's records in one call (the task loop's per-chunk flush).

  Metrics are never lost: `snapshot()` is the file's text as written so far (kept in memory, so nothing is read
  back), which every checkpoint stores (`cl_jax.checkpoint.Checkpoints.log`); on resume, `recover(text)` compares
  it with what the file kept up to the restored step and, when the file was deleted, torn mid-line or is missing
  records, rewrites it from the checkpoint's copy with one warning line saying so.
  """

  def __init__(self, workdir: str, resume_step: int | None = None, keep: Callable[[dict], bool] | None = None,
               tensorboard: bool = True, tb_every: int = 1):
    self.workdir = workdir
    self.tb_every = max(1, int(tb_every))
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.writer = is_writer()
    self.file = self.tb = None
    if not self.writer:
      return
    if keep is None:
      keep = (lambda rec: False) if resume_step is None else (lambda rec: rec.get("step", 0) <= resume_step)
    self._existed = os.path.exists(self.path)
    records, self._torn = _read_metrics(self.path)
    self._lines = [self._line(r) for r in records if keep(r)]
    with open(self.path, "w") as f:
      f.writelines(self._lines)
    self.file = open(self.path, "a")
    kept = self._lines
    if tensorboard:
      tb_dir = os.path.join(workdir, "tensorboard")
      if resume_step is None and not kept and os.path.isdir(tb_dir):
        shutil.rmtree(tb_dir)  # a fresh start: no events of an earlier attempt
      # Event files are named by the second and host they were opened in; two logs opened within one second
      # (pre-training then adaptation of a short LM run) would share one name, so each gets its own suffix.
      self.tb = EventFile(tb_dir, purge_step=None if resume_step is None else resume_step + 1,
                          filename_suffix=f".{os.getpid()}.{next(_TB_WRITERS)}")

  @staticmethod
  def _line(record: dict) -> str:
    try:  # one shared encoder: json.dumps with an option builds a new one per call (a record per training step)
      return _STRICT_JSON.encode(record) + "\n"
    except ValueError:  # a non-finite float: null, as finite_or_none writes it
      return _STRICT_JSON.encode(finite_or_none(record)) + "\n"

  def snapshot(self) -> str | None:
    """metrics.jsonl's text as written so far (None on a process that writes no log)."""
    return "".join(self._lines) if self.writer and self.file is not None else None

  def recover(self, text: str | None, step: int) -> bool:
    """Rewrites metrics.jsonl from `text` (a checkpoint's copy up to its step `step`) when what the file kept
    differs from it, with one warning line naming what was wrong; True when it did."""
    if text is None or not self.writer or self.file is None or text == self.snapshot():
      return False
    lines = text.splitlines(keepends=True)
    if not self._existed:
      what = "was missing"
    elif self._torn:
      what = f"was torn ({self._torn} unreadable line(s))"
    else:
      what = "differed from the checkpoint's record"
    missing = max(0, len(lines) - self.snapshot().count("\n"))
    warnings.warn(f"{self.path} {what}: rewritten from the checkpoint of step {step} ({len(lines)} records up to "
                  f"there; {missing} had been lost)", stacklevel=2)
    self.file.close()
    with open(self.path, "w") as f:
      f.write(text)
    self.file = open(self.path, "a")
    self._lines = lines
    return True

  def write(self, record: dict) -> None:
    self.write_many([record])

  def write_many(self, records: list) -> None:
    """Appends `records` to metrics.jsonl (one write) and their scalars to TensorBoard (train ones every tb_every)."""
    if not self.writer or not records:
      return
    text = "".join(map(self._line, records))
    self._lines.append(text)
    self.file.write(text)
    if self.tb is None:
      return
    for record in records:
      if record.get("type") == "train" and record.get("step", 0) % self.tb_every:
        continue
      prefix = record["type"] if "phase" not in record else f"{record['phase']}/{record['type']}"
      scalars = {}
      for k, v in record.items():
        if isinstance(v, float) and math.isfinite(v):
          scalars[f"{prefix}/{k}"] = v
        elif k == "accuracy" and isinstance(v, list):
          for i, a in enumerate(v):
            scalars[f"{prefix}/accuracy_task{i + 1}"] = a
      if scalars:
        self.tb.add_scalars(scalars, record["step"])

  def flush(self):
    if self.file is not None:
      self.file.flush()
      os.fsync(self.file.fileno())
    if self.tb is not None:
      self.tb.flush()

  def close(self):
    if self.file is not None:
      self.file.close()
      self.file = None
    if self.tb is not None:
      self.tb.close()
      self.tb = None


def write_json(workdir: str, name: str, obj) -> None:
  """Writes `<workdir>/name` (strict JSON) on process 0, atomically (a reader never sees half a file)."""
  if not is_writer():
    return
  path = os.path.join(workdir, name)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(finite_or_none(obj), f, indent=2, allow_nan=False)
  os.replace(tmp, path)
