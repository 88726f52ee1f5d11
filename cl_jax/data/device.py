"""Device-resident training data: the batch gather and the shuffle run inside the jitted step.

For data that fits in device memory (every classic benchmark here: MNIST is 188 MB as float32) the host input
pipeline is pure overhead: pulling a batch from grain, `device_put` and a step dispatch per iteration cost more
than a small model's step. Here every task's training inputs live on the devices once, for the whole run, and
K steps fuse into one jitted `lax.scan` whose body gathers its own batch.

Layout (`DevicePool`, uploaded once):
  x       [M, ...] the training inputs of every task. Tasks that share one array (permuted and rotated tasks
          all read the same images) hold it once.
  remap   per-task pixel remaps (permutation / rotation, `scenarios.PixelRemap`) stacked to [T, K, P] and
          applied per batch by each example's task id, as the host pipeline does: out[b, p] =
          Σ_k w[task_b, k, p] · x[b, index[task_b, k, p]].
Per task (`TaskTable`, the union of `strategy.train_tasks(t)`, padded to one length so a new task never
recompiles): rows [N] into `x`, labels y [N], task ids [N], and the valid length `size`.

Order. Epoch e of task t visits the examples in the order `argsort(bits(key(seed, t, e)))` over the valid rows:
a uniform permutation that is a pure function of (seed, task, epoch). Step k of the task (k from 0) takes
batch j = k mod (size // B) of epoch k // (size // B) (the last partial batch of an epoch is dropped, as grain's
`drop_remainder` does). So the batch of any step follows from the step number alone: resuming from a checkpoint
needs no iterator state, and a vmapped many-seed run draws each run's order from its own seed.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cl_jax.data.buffers import aligned_concat, spanning_view
from cl_jax.data.scenarios import Scenario

_SALT = 0x5EED_DA7A  # the data-order stream: independent of the parameter init drawn from the same seed
AUTO_FRACTION = 0.25  # 'auto' puts the data on device when it takes at most this share of device memory


class DevicePool(NamedTuple):
  x: jax.Array                     # [M, P] float32, P = prod(input_shape): row gathers of a 2-D array are
                                   # contiguous copies (~6x faster than gathering [28, 28] slices on CPU)
  remap_index: jax.Array | None    # int32 [T, K, P] or None (no task transforms its inputs)
  remap_weights: jax.Array | None  # float32 [T, K, P]


class TaskTable(NamedTuple):
  rows: jax.Array   # int32 [N]: row of `DevicePool.x` (padding rows point at row 0)
  y: jax.Array      # int32 [N]
  task: jax.Array   # int32 [N]
  size: jax.Array   # int32 scalar: the first `size` entries are real


def _unique_arrays(scenario: Scenario) -> tuple[list[np.ndarray], list[int]]:
  """The distinct training arrays (by identity) and, per task, which of them it reads."""
  arrays, which = [], []
  for task in scenario.tasks:
    for i, a in enumerate(arrays):
      if a is task.x_train:
        which.append(i)
        break
    else:
      arrays.append(task.x_train)
      which.append(len(arrays) - 1)
  return arrays, which


def pool_nbytes(scenario: Scenario) -> int:
  """Bytes the device pool would take (float32 inputs; the small index tables are not counted)."""
  arrays, _ = _unique_arrays(scenario)
  return sum(int(np.prod(a.shape)) * 4 for a in arrays)


def device_memory_bytes(device=None) -> int:
  """Memory of one device: the allocator's limit on accelerators, physical RAM on CPU."""
  device = device or jax.local_devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # CPU devices may not implement it
    pass
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  try:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):
    return 0


def check_on_device(value) -> None:
  if _parse_on_device(value) is None:
    raise ValueError(f"data.on_device={value!r}: expected 'auto', 'true' or 'false'")


def _parse_on_device(value):
  if isinstance(value, bool):
    return value
  if isinstance(value, str):
    return {"auto": "auto", "true": True, "on": True, "false": False, "off": False}.get(value.strip().lower())
  return None


def use_device_data(value, scenario: Scenario) -> bool:
  """Resolves `data.on_device`: 'auto' is on when the pool takes at most AUTO_FRACTION of a device's memory."""
  check_on_device(value)
  value = _parse_on_device(value)
  if value == "auto":
    memory = device_memory_bytes()
    return memory > 0 and pool_nbytes(scenario) <= AUTO_FRACTION * memory
  return value


class DeviceData:
  """A scenario's training data on the devices, and the fused K-step programs that train on it.

  `seed` is the run's data seed (`config.seed`); `train_tasks(t)` lists the tasks task t trains on (a
  strategy's `train_tasks`); `batch_size` is the global batch.
  """

  def __init__(self, scenario: Scenario, train_tasks: Callable[[int], Sequence[int]], batch_size: int,
               replicated=None):
    arrays, which = _unique_arrays(scenario)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])[:-1]]).astype(np.int64)
    self.batch_size = int(batch_size)
    self.num_tasks = scenario.num_tasks
    self.input_shape = tuple(scenario.input_shape)
    x = (pool_array(arrays) if len(arrays) > 1
         else np.asarray(arrays[0], np.float32).reshape(len(arrays[0]), -1))
    put = (lambda a: _put_global(a, replicated)) if replicated is not None else jnp.asarray
    remaps = [task.transform for task in scenario.tasks]
    if any(r is not None for r in remaps):
      index, weights = _stack_remaps(remaps, int(np.prod(scenario.input_shape)))
      self.pool = DevicePool(put(np.asarray(x, np.float32)), put(index), put(weights))
    else:
      self.pool = DevicePool(put(np.asarray(x, np.float32)), None, None)
    # Per task: the union of the tasks it trains on, in task order (as the grain pipeline concatenates them).
    tables = []
    for t in range(scenario.num_tasks):
      ids = list(train_tasks(t))
      rows = np.concatenate([offsets[which[i]] + np.arange(scenario.tasks[i].num_train) for i in ids])
      y = np.concatenate([scenario.tasks[i].y_train for i in ids])
      task = np.concatenate([np.full(scenario.tasks[i].num_train, scenario.tasks[i].index) for i in ids])
      tables.append((rows, y, task))
    self.sizes = [len(rows) for rows, _, _ in tables]
    too_small = [t for t, n in enumerate(self.sizes) if n < self.batch_size]
    if too_small:
      t = too_small[0]
      raise ValueError(f"train.batch_size={batch_size}: larger than the {self.sizes[t]} training examples of "
                       f"task(s) {list(train_tasks(t))}")
    self.max_size = max(self.sizes)
    self.min_batches = min(n // self.batch_size for n in self.sizes)
    pad = lambda a: np.concatenate([a, np.zeros(self.max_size - len(a), a.dtype)]).astype(np.int32)
    self._host_tables = [TaskTable(pad(r), pad(y), pad(k), np.int32(len(r))) for r, y, k in tables]
    self._put = put
    self._tables: dict[int, TaskTable] = {}

  def table(self, t: int) -> TaskTable:
    """Task t's index table on the devices (uploaded on first use, a few hundred KB)."""
    if t not in self._tables:
      self._tables = {t: jax.tree.map(self._put, self._host_tables[t])}
    return self._tables[t]

  def epochs_spanned(self, num_steps: int) -> int:
    """How many epochs K consecutive steps can touch, on any task (static: sizes the shuffles of a chunk)."""
    return (num_steps - 1) // self.min_batches + 2

  def batches(self, seed, task_id, first_step, num_steps: int, table: TaskTable | None = None):
    """The `num_steps` batches of task `task_id` from its step `first_step` on, stacked [K, B, ...] (eager)."""
    table = self.table(task_id) if table is None else table
    return _batches(self.pool, table, seed, task_id, first_step, num_steps, self.max_size, self.batch_size,
                    self.epochs_spanned(num_steps), self.input_shape)

  def chunk_fn(self, train_step: Callable, num_steps: int, batch_sharding=None) -> Callable:
    """`chunk(state, pool, table, seed, task_id, first_step) -> (state, metrics {name: [K]})`, unjitted.

    K = `num_steps` consecutive train steps of one task as one `lax.scan`, each gathering its own batch on
    device; `first_step` is the step within the task (traced: one compilation serves every chunk of a run).
    The caller jits it (with shardings, donating the state) or vmaps it over runs (`cl_jax.train.seeds`).
    """
    batch_size, max_size, epochs = self.batch_size, self.max_size, self.epochs_spanned(num_steps)
    shape = self.input_shape

    def chunk(state, pool: DevicePool, table: TaskTable, seed, task_id, first_step):
      idx = chunk_indices(seed, task_id, first_step, num_steps, table.size, max_size, batch_size, epochs)

      def body(state, step_idx):
        batch = gather_batch(pool, table, step_idx, shape)
        if batch_sharding is not None:  # the pool is replicated; the step's batch is split over the mesh
          batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return train_step(state, batch)

      return jax.lax.scan(body, state, idx)

    return chunk


class TestTables(NamedTuple):
  rows: jax.Array   # int32 [num_batches, B]: rows of the test pool, every task's test split back to back
  y: jax.Array      # int32 [num_batches, B]
  task: jax.Array   # int32 [num_batches, B]: the task of each example (padding: task 0)
  valid: jax.Array  # bool [num_batches, B]: False on the padding of the last batch
  counts: jax.Array  # int32 [T]: test examples per task


class DeviceTestData:
  """Every task's test split on the devices, and one jitted program that scores all of them.

  The test splits are packed back to back into batches of `batch_size` (only the last batch is padded), each
  example carrying its task id; hits are summed per task. Same numbers as evaluating task by task with
  `pipeline.test_batches` (same logits, same masks), in one dispatch: `accuracy(learner, params, task_index)
  -> float32 [T]`, the accuracy-matrix row after training up to `task_index`. `accuracy_fn(learner)` gives the
  unjitted function for vmapping over runs.
  """

  def __init__(self, scenario: Scenario, batch_size: int, replicated=None, batch_sharding=None):
    self.batch_sharding = batch_sharding
    put = (lambda a: _put_global(a, replicated)) if replicated is not None else jnp.asarray
    arrays, which = [], []
    for task in scenario.tasks:
      found = [i for i, a in enumerate(arrays) if a is task.x_test]
      if not found:
        arrays.append(task.x_test)
      which.append(found[0] if found else len(arrays) - 1)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])[:-1]]).astype(np.int64)
    self.input_shape = tuple(scenario.input_shape)
    x = pool_array(arrays)
    remaps = [task.transform for task in scenario.tasks]
    if any(r is not None for r in remaps):
      index, weights = _stack_remaps(remaps, int(np.prod(scenario.input_shape)))
      self.pool = DevicePool(put(x), put(index), put(weights))
    else:
      self.pool = DevicePool(put(x), None, None)
    rows = np.concatenate([offsets[which[t]] + np.arange(len(task.y_test)) for t, task in enumerate(scenario.tasks)])
    y = np.concatenate([task.y_test for task in scenario.tasks])
    task_ids = np.concatenate([np.full(len(task.y_test), t) for t, task in enumerate(scenario.tasks)])
    n = len(rows)
    nb = -(-n // batch_size)
    pad = lambda a: np.concatenate([a, np.zeros(nb * batch_size - n, a.dtype)]).reshape(nb, batch_size)
    valid = pad(np.ones(n, bool))
    self.tables = TestTables(put(pad(rows.astype(np.int32))), put(pad(y.astype(np.int32))),
                             put(pad(task_ids.astype(np.int32))), put(valid),
                             put(np.asarray([len(t.y_test) for t in scenario.tasks], np.int32)))
    self.num_tasks = scenario.num_tasks
    self._jitted = {}

  def accuracy_fn(self, learner) -> Callable:
    """`accuracy(params, pool, tables, task_index) -> float32 [T]` (unjitted)."""
    num_tasks, shape, batch_sh = self.num_tasks, self.input_shape, self.batch_sharding

    def accuracy(params, pool: DevicePool, tables: TestTables, task_index):
      def one_batch(hits, batch):
        rows, y, task, valid = batch
        x = gather_batch(pool, TaskTable(rows, y, task, jnp.int32(0)), jnp.arange(rows.shape[0]), shape)["x"]
        if batch_sh is not None:
          x = jax.lax.with_sharding_constraint(x, batch_sh)
        logits = learner.logits(params, x, task, task_index)
        hit = (jnp.argmax(logits, -1) == y) & valid
        return hits + jax.ops.segment_sum(hit.astype(jnp.int32), task, num_segments=num_tasks), None

      hits, _ = jax.lax.scan(one_batch, jnp.zeros((num_tasks,), jnp.int32),
                             (tables.rows, tables.y, tables.task, tables.valid))
      return hits.astype(jnp.float32) / jnp.maximum(tables.counts, 1).astype(jnp.float32)

    return accuracy

  def accuracy(self, learner, params, task_index: int) -> np.ndarray:
    """The accuracy of every task [T] after training up to `task_index` (one jitted call; cached per learner)."""
    fn = self._jitted.get(id(learner))
    if fn is None:
      fn = self._jitted[id(learner)] = (learner, jax.jit(self.accuracy_fn(learner)))
    return np.asarray(fn[1](params, self.pool, self.tables, jnp.int32(task_index)))


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _batches(pool, table, seed, task_id, first_step, num_steps, max_size, batch_size, epochs, input_shape):
  idx = chunk_indices(seed, task_id, first_step, num_steps, table.size, max_size, batch_size, epochs)
  return jax.vmap(lambda i: gather_batch(pool, table, i, input_shape))(idx)


def epoch_order(seed, task_id, epoch, size, max_size: int) -> jax.Array:
  """int32 [max_size]: the first `size` entries are epoch `epoch`'s order of task `task_id`'s examples."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(_SALT), seed), task_id),
                           epoch)
  bits = jax.random.bits(key, (max_size,), jnp.uint32)
  # Padding sorts last: stable argsort keeps a valid entry that drew the maximum ahead of every padding one.
  bits = jnp.where(jnp.arange(max_size) < size, bits, jnp.uint32(0xFFFFFFFF))
  return jnp.argsort(bits, stable=True).astype(jnp.int32)


def chunk_indices(seed, task_id, first_step, num_steps: int, size, max_size: int, batch_size: int,
                  epochs: int) -> jax.Array:
  """int32 [K, B]: positions in the task table of the batches of steps first_step .. first_step + K - 1."""
  per_epoch = jnp.maximum(size // batch_size, 1)
  first_epoch = first_step // per_epoch
  orders = jax.vmap(lambda e: epoch_order(seed, task_id, first_epoch + e, size, max_size))(jnp.arange(epochs))
  steps = first_step + jnp.arange(num_steps)
  e = steps // per_epoch - first_epoch
  start = (steps % per_epoch) * batch_size
  cols = start[:, None] + jnp.arange(batch_size)[None, :]
  return orders[e[:, None], cols]


def gather_batch(pool: DevicePool, table: TaskTable, idx, input_shape) -> dict:
  """The batch {'x' [B, *input_shape], 'y', 'task'} at positions `idx` [B] of a task table, remapped per
  example's task."""
  rows = table.rows[idx]
  task = table.task[idx]
  x = pool.x[rows]  # [B, P]
  if pool.remap_index is not None:
    index, weights = pool.remap_index[task], pool.remap_weights[task]  # [B, K, P]
    picked = jnp.take_along_axis(x[:, None, :], index, axis=-1)
    x = jnp.sum(picked * weights, axis=1)
  return {"x": x.reshape(x.shape[0], *input_shape), "y": table.y[idx], "task": task}


def _stack_remaps(remaps, num_pixels: int) -> tuple[np.ndarray, np.ndarray]:
  """[T, K, P] index and weight tables; a task without a remap gets the identity (padded to the common K)."""
  k = max(r.index.shape[0] for r in remaps if r is not None)
  index = np.zeros((len(remaps), k, num_pixels), np.int32)
  weights = np.zeros((len(remaps), k, num_pixels), np.float32)
  for t, r in enumerate(remaps):
    if r is None:
      index[t, 0], weights[t, 0] = np.arange(num_pixels), 1.0
    else:
      index[t, :r.index.shape[0]], weights[t, :r.index.shape[0]] = r.index, r.weights
  return index, weights


def chunk_lengths(task_steps: int, done: int, boundaries: Sequence[int], max_chunk: int) -> list[int]:
  """Splits steps done..task_steps of a task into chunks that end on every multiple of each boundary interval
  (evaluation, checkpoint) and are at most `max_chunk` long; lengths repeat so few programs compile."""
  stops = {task_steps}
  for every in boundaries:
    if every:
      stops.update(range(every, task_steps, every))
  out, k = [], done
  for stop in sorted(s for s in stops if s > done):
    while k < stop:
      n = min(max_chunk, stop - k)
      out.append(n)
      k += n
  return out


def default_chunk(task_steps: int, boundaries: Sequence[int], cap: int = 500) -> int:
  """A chunk length that divides the task and every boundary interval (one compiled program), at most `cap`."""
  g = task_steps
  for every in boundaries:
    if every:
      g = math.gcd(g, every)
  if g <= cap:
    return g
  for d in range(cap, 0, -1):
    if g % d == 0:
      return d
  return 1


__all__ = ["DevicePool", "TaskTable", "DeviceData", "epoch_order", "chunk_indices", "gather_batch",
           "use_device_data", "check_on_device", "pool_nbytes", "chunk_lengths", "default_chunk"]


# ----------------------------------------------------------------------------- the classic plan on device

class StepSource:
  """The batch source of a device-resident task: nothing to iterate, the step number says which batch comes.

  Its `get_state()` goes into mid-task checkpoints like a grain iterator's state; resuming needs none of it.
  """

  def __init__(self, task_id: int):
    self.task_id = task_id

  def get_state(self) -> dict:
    return {"device_resident": True, "task": self.task_id}

  def __iter__(self):
    return self

  def __next__(self):
    raise RuntimeError("device-resident batches are drawn inside the jitted chunk (Plan.train_chunk)")


def device_plan(plan, config, setup):
  """`plan` (the classic one) with its training batches and test sets on the devices.

  Training runs in chunks of K fused steps (`Plan.train_chunk`); K divides every task's steps and the
  evaluation and checkpoint intervals, so one program serves the whole run and intervals land on chunk ends.
  Evaluation of every task is one jitted call (`DeviceTestData`).
  """
  import dataclasses
  from cl_jax import sharding
  mesh, rep = setup.mesh, setup.replicated
  batch_sh = sharding.batch_sharding(mesh) if mesh.size > 1 else None
  data = DeviceData(setup.scenario, setup.strategy.train_tasks, config.train.batch_size, rep)
  eval_batch = -(-config.eval.batch_size // mesh.size) * mesh.size
  test = DeviceTestData(setup.scenario, eval_batch, rep, batch_sh)
  boundaries = [config.eval.every_steps, config.checkpoint.every_steps]
  k = math.gcd(*setup.steps)
  cap = max(1, int(config.train.steps_per_call)) if config.train.steps_per_call > 1 else 500
  k = default_chunk(k, boundaries, cap)
  step = setup.raw_train_step if hasattr(setup, "raw_train_step") else setup.train_step
  programs = {}
  seed = np.int32(config.seed)

  from cl_jax.strategies.base import evaluation_learner, evaluation_params  # `predict` hooks (GDumb)
  eval_learner = evaluation_learner(setup.learner, setup.strategy)

  def train_chunk(state, t, first, n):
    fn = programs.get(n)
    if fn is None:
      fn = programs[n] = jax.jit(data.chunk_fn(step, n, batch_sh), donate_argnums=0,
                                 out_shardings=(setup.state_sharding, rep))
    return fn(state, data.pool, data.table(t), seed, np.int32(t), np.int32(first))

  def evaluate(state, t):
    return {"accuracy": [float(a) for a in test.accuracy(eval_learner, evaluation_params(setup.strategy, state), t)]}

  return dataclasses.replace(plan, batches=lambda t, iterator_state: StepSource(t), train_chunk=train_chunk,
                             steps_per_call=k, evaluate=evaluate)


def maybe_device_plan(plan, config, setup):
  """`device_plan(plan, ...)` when `data.on_device` resolves to on for this scenario, else `plan` unchanged."""
  if use_device_data(config.data.on_device, setup.scenario):
    return device_plan(plan, config, setup)
  return plan


# ----------------------------------------------------------------------------- host data that does not fit

class Prefetch:
  """A background thread keeps `depth` batches of a host iterator (grain) ready while the device trains.

  `get_state()` is the wrapped iterator's state after the last batch handed out (not after the ones read
  ahead), so a checkpoint resumes exactly where training stopped. An error in the reader surfaces at `next()`.
  """

  def __init__(self, iterator, depth: int = 4):
    import queue
    import threading
    self._state = iterator.get_state()
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=_prefetch_worker, args=(iterator, self._queue, self._stop),
                                    daemon=True, name="cl_jax-prefetch")
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    batch, self._state = item
    return batch

  def get_state(self):
    return self._state

  def close(self):
    self._stop.set()

  def __del__(self):
    self._stop.set()


def _prefetch_worker(iterator, q, stop) -> None:
  import queue
  try:
    while not stop.is_set():
      item = (next(iterator), iterator.get_state())
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
  except BaseException as e:  # StopIteration included: the consumer sees it at its next()
    q.put(e)


def pool_array(arrays: list) -> np.ndarray:
  """The tasks' arrays as one float32 [N, features] host array that `jax.device_put` aliases on CPU: the buffer
  they already are slices of (a split scenario's, no copy), else a fresh aligned concatenation."""
  flat = [np.asarray(a, np.float32).reshape(len(a), -1) for a in arrays]
  span = spanning_view(flat)
  return span if span is not None else aligned_concat(flat)


def _put_global(array, sharding):
  """Host values every process holds alike -> a global array (multi-host safe; `sharding.put_global`)."""
  from cl_jax.sharding import put_global
  return put_global(array, sharding)
