"""Orbax checkpoints: a permanent one at every task boundary plus rolling mid-task ones (and an optional best).

`CheckpointManager`s under `<workdir>/checkpoints/`: `tasks/` keeps every task-boundary checkpoint (one per task,
for analysis and for merging), `rolling/` the last `checkpoint.keep` mid-task ones, `best/` the one a per-
evaluation hook marked best (the LM regression monitor). `tasks/` and `rolling/` hold the whole train state
(params, optimizer, strategy state, rng, step), `best/` the params and step alone (`ParamsOnly`: evaluation and
export read nothing else; a resume never starts from it); how many stay is `Checkpoints.retain`'s. Each has a JSON
`meta` item (data-iterator state, evaluation records so far, where in the
task loop it was taken, accumulated wall time).

Resuming takes the newest intact one of `tasks/` and `rolling/`. A newest checkpoint that cannot be read (a
truncated file, missing metadata, a partial `*.orbax-checkpoint-tmp*` directory left by a killed save) is
reported with a warning naming its path, and the next older one is used. On multi-host runs every process calls
`save` and `restore` (orbax writes collectively; each process reads its own shards).

Every checkpoint proves itself. `save` seals its `meta` with a `_verify` record: a 64-bit digest of every array
(`digest`: one integer pass over the arrays about to be written, on their device, so nothing is read back from
disk; what it detects is in its docstring), the state's layout
(path, shape, dtype of every leaf), the sha256 of the rest of `meta`, and the run's identity (`identity`: the
config's sha256, the seed, the code version). Resuming reads a checkpoint, then checks: the meta item is a
non-empty dict; it is unchanged; the identity is this run's; the layout is this code's; the arrays' digests. A failed check
is handled exactly like a truncated file: one warning line naming the cause (corrupt, another run's, another
layout, unreadable), the checkpoint set aside under `checkpoints/unreadable/`, the next older one tried.

What identity leaves out, so that a legitimate resume passes: the workdir's path (a run may be moved), the devices,
mesh and shardings (the digest does not depend on them: a run may resume on another topology), hosts, times and
package versions. The config hash is of the workdir's config.json, which is written once when the run starts
fresh, so a resume with an equivalent config (`cl_jax.workdir.decide`) always matches it. A different code version
is reported in one line and accepted: a fix committed while a preempted job waits is a normal resume, and the
layout check still refuses a state the code can no longer read. Checkpoints written before digests existed (no
`_verify`, but a non-empty meta) are restored unverified with one note: refusing them would retrain every run
started before this change. `boundary_params` (what merging reads from finished runs) checks the params' digests
too and raises `CheckpointError` on a mismatch.

orbax is imported, and each manager created, on first use: a fresh run reaches its first training step without
either (importing orbax takes ~1 s of a CPU launch).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("tasks", "rolling", "best")
METADATA = "_CHECKPOINT_METADATA"  # orbax writes it last into a step's directory


def _ocp():
  import orbax.checkpoint as ocp
  return ocp


# ----------------------------------------------------------------------------- digests, layout, verification

VERIFY = "_verify"     # the meta key `save` adds (and `restore` removes)
METRICS = "_metrics"   # the meta key holding metrics.jsonl up to the checkpoint's step (see `Checkpoints.log`)
LANES = 1021           # a prime: no power-of-two tensor dimension is a multiple of it
_GOLDEN = 0x9E3779B9   # 2^32 / golden ratio


def _fmix32(h):
  """MurmurHash3's 32-bit finaliser on a uint32 numpy array: a bijection in which every input bit flips each
  output bit with probability ~1/2 (Appleby 2008). Products wrap mod 2^32."""
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def _word_dtype(dtype):
  """How an array's bit pattern is read as unsigned words: (view dtype, widen to uint32 after)."""
  size = np.dtype(dtype).itemsize if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else 4
  return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]


def _words_device(x):
  """The bit pattern of `x` as a flat uint32 vector (8-byte dtypes two words per element; narrower ones zero-
  extended; a typed PRNG key by its key data)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.reshape(-1).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, _word_dtype(x.dtype)).reshape(-1).astype(jnp.uint32)


@jax.jit
def _lanes_device(leaves):
  """[len(leaves), LANES] uint32: lane j of a leaf = sum of its words at positions i = j (mod LANES), mod 2^32."""
  out = []
  for x in leaves:
    w = _words_device(x)
    pad = -w.size % LANES
    out.append(jnp.sum(jnp.pad(w, (0, pad)).reshape(-1, LANES), axis=0, dtype=jnp.uint32))
  return jnp.stack(out) if out else jnp.zeros((0, LANES), jnp.uint32)


def _lanes_host(x) -> np.ndarray:
  """`_lanes_device` of one array in host memory (a CPU device's buffer is read in place, not copied)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  a = np.asarray(x).reshape(-1)
  if a.dtype == np.bool_:
    w = a.astype(np.uint32)
  else:
    w = a.view(np.dtype(_word_dtype(a.dtype)))
  lanes = np.zeros(LANES, np.uint32)
  m = w.size - w.size % LANES
  if m:
    lanes += w[:m].reshape(-1, LANES).sum(axis=0, dtype=np.uint32)
  lanes[: w.size - m] += w[m:].astype(np.uint32)
  return lanes


def _on_host(x) -> bool:
  return getattr(x, "is_fully_addressable", True) and all(d.platform == "cpu" for d in getattr(
      x, "devices", lambda: ())())


def _combine(lanes: np.ndarray) -> str:
  """64 bits of one array from its lane sums s_j:  h_j = fmix32(s_j + j * 0x9E3779B9),
  a = sum_j h_j,  b = sum_j (2j + 1) h_j  (mod 2^32)."""
  j = np.arange(LANES, dtype=np.uint32)
  h = _fmix32(lanes.astype(np.uint32) + j * np.uint32(_GOLDEN))
  a = int(h.sum(dtype=np.uint32))
  b = int((h * (np.uint32(2) * j + np.uint32(1))).sum(dtype=np.uint32))
  return f"{a:08x}{b:08x}"


def _key_name(k) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaves(tree) -> tuple[list, list]:
  """(paths 'params/dense/kernel', leaves): a NamedTuple field and the dict key orbax restores it as name alike."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return ["/".join(_key_name(k) for k in path) for path, _ in flat], [x for _, x in flat]


def _dtype_name(x) -> str:
  return str(x.dtype)


def layout(tree) -> list:
  """[path, shape, dtype] of every leaf of a state (arrays or ShapeDtypeStructs)."""
  paths, leaves = _leaves(tree)
  return [[p, list(x.shape), _dtype_name(x)] for p, x in zip(paths, leaves)]


def digest(tree) -> dict:
  """{path: 16 hex digits} of every array of `tree`: a content digest of its bit pattern.

  Each array's words w_i (its bytes read as uint32; 2- and 1-byte dtypes zero-extended, 8-byte ones as two words)
  are summed into LANES = 1021 lanes, s_j = sum_{i = j mod 1021} w_i (mod 2^32), and the lanes mixed into 64 bits
  (`_combine`). One pass over the data, all integer sums: on an accelerator one jitted program for every array
  (only the lanes, 4 KB an array, come to the host); on a CPU device numpy reads the arrays' buffers in place
  (XLA:CPU runs integer element-wise work scalar, ~12x slower than this; benchmarks/checkpoint_digest.py).

  What it detects: any change to one word (any bits of one float32) for certain; any change confined to fewer than
  1021 consecutive words (4 KiB of float32: a run of flipped bytes, a torn or overwritten block) changes each lane
  it touches by a non-zero amount, and is missed only if the mixed sums collide (~2^-64). Wider changes are missed
  only when, in every lane, they cancel mod 2^32: random damage essentially never; a swap of two words exactly a
  multiple of 1021 apart would be (no power-of-two tensor dimension is such a multiple). Not a cryptographic
  hash: a deliberate forgery is out of scope. Integer sums wrap and are associative, so the digest does not depend
  on reduction order, sharding, mesh or backend: a state saved on 8 devices verifies restored on 1.
  """
  paths, leaves = _leaves(tree)
  host = [i for i, x in enumerate(leaves) if _on_host(x)]
  lanes = [None] * len(leaves)
  for i in host:
    lanes[i] = _lanes_host(leaves[i])
  rest = [i for i in range(len(leaves)) if lanes[i] is None]
  if rest:
    for i, row in zip(rest, np.asarray(jax.device_get(_lanes_device([leaves[i] for i in rest])))):
      lanes[i] = row
  return {p: _combine(lane) for p, lane in zip(paths, lanes)}


def _meta_sha256(meta: dict) -> str:
  """sha256 of `meta` (without `_verify`) as canonical JSON, as it reads back from the checkpoint."""
  body = {k: v for k, v in meta.items() if k != VERIFY}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Rejected(Exception):
  """A checkpoint that failed verification; `cause` is one of corrupt | foreign | layout | unreadable."""

  def __init__(self, cause: str, detail: str):
    super().__init__(detail)
    self.cause, self.detail = cause, detail


class CheckpointError(RuntimeError):
  """An explicitly named checkpoint (not a resume's newest-intact search) failed verification."""


_CAUSE_TEXT = {
    "corrupt": "is corrupt",
    "foreign": "belongs to another run",
    "layout": "holds another state layout (written by another code version or model; not damaged)",
    "unreadable": "is unreadable",
}


def _first_layout_difference(saved: list, expected: list) -> str:
  saved_d = {p: (tuple(s), d) for p, s, d in saved}
  expected_d = {p: (tuple(s), d) for p, s, d in expected}
  for p in sorted(set(saved_d) | set(expected_d)):
    a, b = saved_d.get(p), expected_d.get(p)
    if a != b:
      show = lambda v: "absent" if v is None else f"{v[1] or ''}{list(v[0])}"
      return f"{p}: saved {show(a)}, expected {show(b)}"
  return "leaf order differs"


def _saved_layout(step_dir: str) -> list | None:
  """A checkpoint's layout as `save` recorded it, else as orbax's tree metadata has it (dtypes None), else None."""
  try:
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
      recorded = json.load(f)[VERIFY]["layout"]
    if recorded:
      return recorded
  except (OSError, ValueError, KeyError, TypeError):
    pass
  return _orbax_layout(step_dir)


def _orbax_layout(step_dir: str) -> list | None:
  """[path, shape, None] of a checkpoint's state from orbax's own tree metadata (for checkpoints without `_verify`),
  or None when it cannot be read."""
  try:
    with open(os.path.join(step_dir, "state", "_METADATA")) as f:
      tree = json.load(f)["tree_metadata"]
    return [["/".join(str(k["key"]) for k in v["key_metadata"]), list(v["value_metadata"]["write_shape"]), None]
            for v in tree.values() if v["value_metadata"].get("write_shape") is not None]  # not empty nodes
  except (OSError, ValueError, KeyError, TypeError):
    return None


class Checkpoints:
  """The checkpoints of one run (or one phase of it) under `<workdir>/checkpoints/`.

  `identity`: the run's identity (`{"config_sha256", "seed", "code"}`; see the module docstring), recorded by
  every save and checked by every restore; None checks none (reading another run's checkpoints on purpose).
  `log`: the run's `cl_jax.workdir.MetricsLog`; when set, every save keeps metrics.jsonl as written so far in the
  checkpoint's meta (`_metrics`), from which a resume rewrites a torn or deleted metrics.jsonl.
  """
  keep_best, synchronous, _pin = True, False, ()  # retention beyond `keep` and write order: `retain`

  def __init__(self, workdir: str, keep: int = 2, identity: dict | None = None):
    self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._warn_partial()
    self._keep = {"tasks": None, "rolling": keep, "best": 1}
    self._managers = {}
    self.identity = identity
    self.log = None

  def _get(self, kind: str):
    if kind not in self._managers:
      options = self._options(kind)
      self._managers[kind] = _ocp().CheckpointManager(os.path.join(self.root, kind), options=options)
    return self._managers[kind]

  # --------------------------------------------------------------------------- retention (issue 22 item 3)

  def retain(self, keep_tasks: int = 0, keep_best: bool = True, pin: tuple = (), async_save: bool = True
             ) -> "Checkpoints":
    """How many checkpoints stay on disk, beyond `keep` (the newest rolling ones): `keep_tasks` the newest task-
    boundary ones (0: every one, for analysis and merging; a resume reads only the newest), `keep_best` whether a
    per-evaluation hook's best is saved at all (params only: `params_only`), `pin` boundary steps never deleted (an
    LM run's step 0: the base its test split compares with). `async_save=False` asks the task loop to wait for
    each write before going on (`synchronous`); so does a CPU backend whatever `async_save` says
    (`host_is_device`). Call before the first save."""
    if self._managers:
      raise RuntimeError("Checkpoints.retain: call it before the first save or restore")
    self._keep["tasks"] = int(keep_tasks) or None
    self._pin = tuple(int(s) for s in pin)
    self.keep_best = bool(keep_best)
    self.synchronous = not async_save or host_is_device()
    return self

  def _options(self, kind: str):
    """orbax options of one manager: the newest `_keep[kind]` (None: all), plus the pinned task-boundary steps."""
    ocp = _ocp()
    keep, pin = self._keep[kind], self._pin
    if kind != "tasks" or keep is None or not pin:
      return ocp.CheckpointManagerOptions(create=True, max_to_keep=keep)
    from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
    return ocp.CheckpointManagerOptions(create=True, preservation_policy=pp.AnyPreservationPolicy(
        [pp.LatestN(keep), pp.CustomSteps(list(pin))]))

  def restore_params(self, abstract_state, kind: str, step: int):
    """`ParamsOnly(step, params)` of one saved (full) train state, read alone: a partial restore that never
    allocates the optimizer or strategy state (what evaluating or exporting a saved model needs)."""
    ocp = _ocp()
    abstract = params_only(abstract_state)
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.restore(os.path.join(self.path(kind, step), "state"), args=ocp.args.PyTreeRestore(
          abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))

  @property
  def tasks(self):
    return self._get("tasks")

  @property
  def rolling(self):
    return self._get("rolling")

  @property
  def best(self):
    return self._get("best")

  def _steps(self, kind: str) -> list:
    """The steps saved under `kind`, without creating a manager (or importing orbax) where there are none."""
    if kind not in self._managers and not os.path.isdir(os.path.join(self.root, kind)):
      return []
    return list(self._get(kind).all_steps())

  def _manager(self, kind: str):
    kind = {"task": "tasks", "boundary": "tasks"}.get(kind, kind)
    if kind not in KINDS:
      raise ValueError(f"checkpoint kind {kind!r}: expected one of {KINDS}")
    return getattr(self, kind)

  def _warn_partial(self) -> None:
    for kind in KINDS:
      d = os.path.join(self.root, kind)
      if not os.path.isdir(d):
        continue
      for name in sorted(os.listdir(d)):
        if ".orbax-checkpoint-tmp" in name:
          path = os.path.join(d, name)
          warnings.warn(f"ignoring the partial checkpoint {path} (a save that did not finish); removing it",
                        stacklevel=3)
          if jax.process_index() == 0:
            shutil.rmtree(path, ignore_errors=True)

  def save(self, step: int, state, meta: dict, boundary: bool | None = None, kind: str = "rolling") -> None:
    """Saves asynchronously; `kind` is 'tasks' (or 'task'), 'rolling' or 'best' (`boundary=True` means 'tasks')."""
    if boundary is not None:
      kind = "tasks" if boundary else "rolling"
    ocp = _ocp()
    manager = self._manager(kind)
    if step in manager.all_steps():
      return  # already saved (a preemption right after a periodic checkpoint)
    if jax.process_count() > 1:
      # Each manager finalises its async save behind a cross-process barrier of the same name; two managers
      # finalising at once (a rolling save still in flight when the task-boundary one starts) collide on it
      # ("Barrier ... is already ongoing"). One save in flight at a time across managers avoids that.
      self.wait()
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(self.seal(state, meta))), force=True)

  def seal(self, state, meta: dict) -> dict:
    """`meta` plus metrics.jsonl so far (when a log is set) and the `_verify` record (see the module docstring)."""
    meta = dict(meta)
    snapshot = self.log.snapshot() if self.log is not None else None
    if snapshot is not None:
      meta[METRICS] = snapshot
    meta = json.loads(json.dumps(meta))  # as it will read back (tuples as lists): what the sha256 is taken of
    meta[VERIFY] = {"version": 1, "identity": self.identity, "layout": layout(state), "arrays": digest(state),
                    "meta_sha256": _meta_sha256(meta)}
    return meta

  def has(self, step: int) -> bool:
    return any(step in self._steps(kind) for kind in ("tasks", "rolling"))

  def candidates(self) -> list[tuple[int, str]]:
    """(step, kind) of every checkpoint to resume from, newest first; a task-boundary one wins a tie."""
    found = [(s, "tasks") for s in self._steps("tasks")] + [(s, "rolling") for s in self._steps("rolling")]
    return sorted(found, key=lambda f: (f[0], f[1] == "tasks"), reverse=True)

  def latest(self) -> tuple[Any, int] | None:
    """(manager, step) of the newest checkpoint (intact or not); a task-boundary one wins a tie."""
    c = self.candidates()
    return (self._manager(c[0][1]), c[0][0]) if c else None

  def path(self, kind: str, step: int) -> str:
    return os.path.join(self.root, {"task": "tasks"}.get(kind, kind), str(step))

  def restore(self, abstract_state, manager=None, step=None, kind: str | None = None):
    """(state, meta) restored into the shardings of `abstract_state` (a pytree of ShapeDtypeStructs), or None.

    Without `manager`/`kind`: the newest checkpoint that passes verification, falling back past the others with
    one warning line each (they are set aside under `checkpoints/unreadable/`). `kind='best'`: the best one;
    a named checkpoint that fails verification raises `CheckpointError`.
    """
    if manager is None and kind is None and not self.candidates():
      return None  # a fresh workdir: nothing to restore (and no orbax import)
    if manager is not None or kind is not None:
      manager = manager or self._manager(kind)
      step = manager.latest_step() if step is None else step
      if step is None:
        return None
      try:
        return self._read(manager, step, abstract_state, str(manager.directory / str(step)))
      except Rejected as e:
        raise CheckpointError(f"checkpoint {manager.directory / str(step)} {_CAUSE_TEXT[e.cause]} ({e.detail})"
                              ) from None
    broken = []
    try:
      for step, kind in self.candidates():
        path = self.path(kind, step)
        try:
          if not os.path.isfile(os.path.join(path, METADATA)):
            raise Rejected("unreadable", f"no {METADATA}: an unfinished or damaged save")
          return self._read(self._manager(kind), step, abstract_state, path)
        except Exception as e:  # noqa: BLE001 — any checkpoint that fails: fall back to an older one
          if not isinstance(e, Rejected):
            e = Rejected("unreadable", f"{type(e).__name__}: {' '.join(str(e).split())[:160]}")
            saved = _saved_layout(path)  # a state the code cannot read: another layout, or damage?
            expected = layout(abstract_state)
            if saved is not None and saved[0][2] is None:  # orbax's own record: shapes only
              expected = [[p, sh, None] for p, sh, _ in expected]
            if saved is not None and sorted(map(str, saved)) != sorted(map(str, expected)):
              e = Rejected("layout", _first_layout_difference(saved, expected))
          warnings.warn(f"checkpoint {path} {_CAUSE_TEXT[e.cause]} ({e.detail}); set aside in "
                        f"{os.path.join(self.root, 'unreadable')}, falling back to an older checkpoint", stacklevel=2)
          broken.append((step, kind))
      return None
    finally:
      self._set_aside(broken)

  def _read(self, manager, step: int, abstract_state, path: str):
    """(state, meta) of one checkpoint, verified; raises `Rejected` naming the cause."""
    ocp = _ocp()
    # One read of both items (a second orbax call would cost more than the checks it could skip); a layout orbax
    # cannot restore raises here and is named by `restore`'s handler.
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    state, meta = restored.state, restored.meta
    if not isinstance(meta, dict) or not meta:
      raise Rejected("corrupt", f"its meta item is {json.dumps(meta)[:40]}, not the run's record")
    if state is None:
      raise Rejected("unreadable", "no state item")
    record = meta.pop(VERIFY, None)
    if record is None:
      warnings.warn(f"checkpoint {path} was written before checkpoints carried digests: restored unverified",
                    stacklevel=3)
    else:
      self._check_record(record, meta, abstract_state)
    if record is not None:
      got, want = digest(state), record.get("arrays", {})
      bad = [p for p in want if got.get(p) != want[p]]
      if bad or set(got) != set(want):
        more = f" and {len(bad) - 1} other array(s)" if len(bad) > 1 else ""
        raise Rejected("corrupt", f"array digest mismatch in {bad[0] if bad else 'its leaf set'}{more}: "
                       "the data changed after it was written")
    return state, meta

  def _check_record(self, record: dict, meta: dict, abstract_state) -> None:
    """The checks that need no array: meta unchanged, this run's identity, this code's layout."""
    if record.get("meta_sha256") != _meta_sha256(meta):
      raise Rejected("corrupt", "its meta item changed after it was written (sha256 mismatch)")
    theirs, ours = record.get("identity"), self.identity
    if theirs is not None and ours is not None:
      differ = [k for k in ("seed", "config_sha256")
                if None not in (theirs.get(k), ours.get(k)) and theirs.get(k) != ours.get(k)]
      if differ:
        show = lambda d: ", ".join(f"{k} {str(d.get(k))[:12]}" for k in differ)
        raise Rejected("foreign", f"written by a run with {show(theirs)}; this run has {show(ours)}")
      if theirs.get("code") != ours.get("code"):
        warnings.warn(f"resuming from a checkpoint written by code {str(theirs.get('code'))[:12]}, this run's code "
                      f"is {str(ours.get('code'))[:12]}: the results will mix the two versions", stacklevel=4)
    expected = layout(abstract_state)
    if record.get("layout") != expected:
      raise Rejected("layout", _first_layout_difference(record.get("layout") or [], expected))

  def _set_aside(self, broken) -> None:
    """Moves unreadable checkpoints to `checkpoints/unreadable/` (kept for inspection), so the resumed run can
    save its own checkpoints at those steps again."""
    if not broken:
      return
    if jax.process_index() == 0:
      aside = os.path.join(self.root, "unreadable")
      os.makedirs(aside, exist_ok=True)
      for step, kind in broken:
        target = os.path.join(aside, f"{kind}-{step}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(self.path(kind, step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("cl_jax checkpoints set aside")
    for m in (self.tasks, self.rolling):
      m.reload()

  def wait(self) -> None:
    for m in list(self._managers.values()):
      m.wait_until_finished()

  def close(self) -> None:
    for m in list(self._managers.values()):
      m.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def host_is_device() -> bool:
  """Whether the arrays live in host memory (the CPU backend). There an asynchronous save cannot stage a copy:
  orbax's "transfer to host" of a CPU array is a zero-copy numpy view of the state's own buffers, which the next
  train step then cannot donate (an external reference), so XLA allocates a second whole state beside the one
  being written, and the write's encoding buffers come on top: on the 135M LM run (float32 AdamW) the whole run's
  peak, a step overlapping a write, was 6,840 MB asynchronous and 4,185 MB synchronous (results/lm_memory.md). On
  an accelerator the staging is a real device-to-host copy and the step donates as usual: saves stay asynchronous."""
  return all(d.platform == "cpu" for d in jax.devices())


class ParamsOnly(NamedTuple):
  """A params-only checkpoint's item (the `best` one): enough to evaluate or export a model, not to resume (no
  optimizer or strategy state: for float32 AdamW a third of the full state's bytes)."""
  step: Any
  params: Any


def params_only(state) -> ParamsOnly:
  """`ParamsOnly` of a train state (arrays or ShapeDtypeStructs: the abstract item to restore it into)."""
  return state if isinstance(state, ParamsOnly) else ParamsOnly(state.step, state.params)


def retention(checkpoint_config) -> dict:
  """`Checkpoints.retain`'s arguments from a config's `checkpoint` section (defaults where a kind has no key)."""
  get = lambda k, d: checkpoint_config.get(k, d) if hasattr(checkpoint_config, "get") else d
  return {"keep_tasks": int(get("keep_tasks", 0)), "keep_best": bool(get("keep_best", True)),
          "async_save": bool(get("async_save", True))}


def abstract_like(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


# ----------------------------------------------------------------------------- reading finished runs; params alone
# (added by H3 for the merge runner and LoRA adapters: the one place that knows the layout above)

def boundary_steps(workdir: str) -> dict[int, int]:
  """{task (1-based, tasks finished): step} of a finished run's task-boundary checkpoints."""
  ocp = _ocp()
  tasks_dir = os.path.join(os.path.abspath(workdir), "checkpoints", "tasks")
  if not os.path.isdir(tasks_dir):
    return {}
  manager = ocp.CheckpointManager(tasks_dir)
  try:
    out = {}
    for step in manager.all_steps():
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      out[int(meta["task"])] = int(step)
    return out
  finally:
    manager.close()


def boundary_params(workdir: str, task: int | None = None):
  """The params of a finished run after task `task` (1-based; None: its last task-boundary checkpoint), as host
  arrays in the saved structure (no abstract state needed): what merging and analysis read."""
  ocp = _ocp()
  steps = boundary_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir}: no task-boundary checkpoint")
  task = max(steps) if task is None else task
  if task not in steps:
    raise FileNotFoundError(f"{workdir}: no task-boundary checkpoint of task {task} (tasks {sorted(steps)})")
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints", "tasks"))
  try:
    restored = manager.restore(steps[task], args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                   meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  state = restored.state
  params = state["params"] if isinstance(state, dict) else state.params
  want = (restored.meta or {}).get(VERIFY, {}).get("arrays")
  if want:  # a checkpoint written with digests: the params must still match theirs
    # Only arrays with a recorded digest are compared (a params tree restored without its abstract structure
    # names its leaves as the saved state did; an unmatched name is left unverified rather than refused).
    bad = [p for p, d in digest(params).items() if want.get(f"params/{p}", d) != d]
    if bad:
      raise CheckpointError(f"checkpoint {manager.directory / str(steps[task])} is corrupt (array digest mismatch in "
                            f"params/{bad[0]}{f' and {len(bad) - 1} other array(s)' if len(bad) > 1 else ''}: "
                            "the data changed after it was written)")
  return params


def save_params(path: str, params, overwrite: bool = False) -> str:
  """A params pytree alone (a merged model, an adapter) as an orbax directory at `path`."""
  ocp = _ocp()
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=overwrite)
  return path


def load_params(path: str, like=None):
  """Params saved by `save_params`; into the structure / shardings of `like` (arrays or ShapeDtypeStructs) if given."""
  ocp = _ocp()
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    if like is None:
      return ckptr.restore(path)
    abstract = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
                            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
    return ckptr.restore(path, abstract)


# ----------------------------------------------------------------------------- references to a run's params

# "RUN_DIR:task=K" (the task-boundary checkpoint after task K), "RUN_DIR" (its last one) or a params directory:
# how `model.init_from` and a merge run's `merge.base` / `merge.models` name params.
REF_RE = re.compile(r"^(?P<path>.+?)(?::task=(?P<task>\d+))?$")


@dataclasses.dataclass
class Reference:
  """A resolved checkpoint reference: `params()` loads it; `run_config` is the producing run's config (or None)."""
  ref: str
  what: str
  path: str
  task: int | None = None
  run_config: dict | None = None

  def params(self):
    if self.run_config is None:
      return load_params(self.path)
    return boundary_params(self.path, self.task)


def resolve(ref: str, what: str) -> Reference:
  """Checks a reference (the directory exists; a run has the named task-boundary checkpoint); reads nothing big."""
  m = REF_RE.match(ref or "")
  if not ref or m is None:
    raise ValueError(f"{what}: empty checkpoint reference")
  path = os.path.abspath(m.group("path"))
  task = int(m.group("task")) if m.group("task") else None
  if not os.path.isdir(path):
    raise ValueError(f"{what}={ref!r}: no such checkpoint or run directory {path}")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    if task is not None:
      raise ValueError(f"{what}={ref!r}: ':task=' needs a cl_jax run directory (with config.json)")
    return Reference(ref, what, path)
  with open(cfg_path) as f:
    run_config = json.load(f)
  steps = boundary_steps(path)
  finished = sorted(t for t in steps if t >= 1)
  if not finished:
    raise ValueError(f"{what}={ref!r}: run {path} has no task-boundary checkpoint")
  if task is not None and task not in steps:
    raise ValueError(f"{what}={ref!r}: task={task}, but the run has boundary checkpoints for tasks "
                     f"{finished[0]}..{finished[-1]}")
  return Reference(ref, what, path, task, run_config)
