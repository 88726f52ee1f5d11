"""grain input pipelines over a scenario's tasks: seeded shuffling, batching, per-host slicing, resumable.

A training stream for task t draws from the tasks `strategy.train_tasks(t)` (just t, or 0..t for joint). The
index dataset is shuffled with a seed derived from (seed, t), reshuffled every epoch, and batched with the
*global* batch size; every host then keeps its own slice of each global batch, so the global batch is the same
whatever the number of hosts. The iterator's state (`get_state()`) is saved in checkpoints.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax
import numpy as np

from cl_jax.data.scenarios import Scenario

if TYPE_CHECKING:  # grain is imported when a pipeline is built (it is slow to import)
  import grain


def _gather(scenario: Scenario, task_ids: Sequence[int], offsets: np.ndarray, split: str):
  tasks = [scenario.tasks[t] for t in task_ids]

  def gather(global_idx: np.ndarray) -> dict:
    which = np.searchsorted(offsets, global_idx, side="right") - 1
    xs, ys, ts = [], [], []
    order = []
    for k in np.unique(which):
      sel = np.flatnonzero(which == k)
      local = global_idx[sel] - offsets[k]
      task = tasks[k]
      x = task.x_train if split == "train" else task.x_test
      y = task.y_train if split == "train" else task.y_test
      xs.append(task.inputs(x[local]))
      ys.append(y[local])
      ts.append(np.full(len(sel), task.index, np.int32))
      order.append(sel)
    inv = np.argsort(np.concatenate(order))
    return {"x": np.concatenate(xs)[inv].astype(np.float32), "y": np.concatenate(ys)[inv].astype(np.int32),
            "task": np.concatenate(ts)[inv]}

  return gather


def train_dataset(scenario: Scenario, task_ids: Sequence[int], global_batch_size: int, seed: int,
                  task_index: int) -> grain.MapDataset:
  """An endless MapDataset of this host's slice of each global batch for the given tasks."""
  sizes = [scenario.tasks[t].num_train for t in task_ids]
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  total = int(sum(sizes))
  if total < global_batch_size:
    raise ValueError(f"train.batch_size={global_batch_size}: larger than the {total} training examples of "
                     f"task(s) {list(task_ids)}")
  process_count, process_index = jax.process_count(), jax.process_index()
  if global_batch_size % process_count:
    raise ValueError(f"train.batch_size={global_batch_size}: not divisible by the {process_count} hosts")
  local = global_batch_size // process_count
  gather = _gather(scenario, task_ids, offsets, "train")
  import grain  # here, not at the top: a run whose data lives on device never imports grain (~0.5 s)
  return (grain.MapDataset.range(total)
          .seed(int(seed) * 1009 + task_index)
          .shuffle()
          .repeat(None)
          .batch(global_batch_size, drop_remainder=True)
          .map(lambda idx: gather(np.asarray(idx)[process_index * local:(process_index + 1) * local])))


def train_iterator(dataset: grain.MapDataset, state: dict | None = None):
  it = iter(dataset.to_iter_dataset())
  if state is not None:
    it.set_state(state)
  return it


def test_batches(scenario: Scenario, task_id: int, batch_size: int):
  """The whole test split of one task, in order, in batches (the last one padded; `valid` marks real rows)."""
  task = scenario.tasks[task_id]
  n = len(task.y_test)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    x = task.inputs(task.x_test[start:stop])
    y = task.y_test[start:stop]
    pad = batch_size - (stop - start)
    valid = np.ones(stop - start, bool)
    if pad:
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    yield {"x": x.astype(np.float32), "y": y.astype(np.int32), "task": np.full(batch_size, task_id, np.int32),
           "valid": valid}


def task_data(scenario: Scenario, task_id: int):
  """A task's whole training split on the host (inputs transformed), for strategies' `after_task`."""
  from cl_jax.strategies.base import TaskData
  task = scenario.tasks[task_id]
  return TaskData(task.inputs(task.x_train), task.y_train, np.full(task.num_train, task_id, np.int32), task_id)
