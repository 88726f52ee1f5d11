"""Orbax checkpoints: a permanent one at every task boundary plus rolling mid-task ones.

Two `CheckpointManager`s under `<workdir>/checkpoints/`: `tasks/` keeps every task-boundary checkpoint (one per
task, for analysis and for merging), `rolling/` keeps the last `checkpoint.keep` mid-task ones. Each holds the
whole train state (params, optimizer, strategy state, rng, step) and a JSON `meta` item (data-iterator state,
accuracy-matrix rows so far, where in the task loop it was taken). Resuming takes the newest of both.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  def __init__(self, workdir: str, keep: int = 2):
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.tasks = ocp.CheckpointManager(os.path.join(root, "tasks"),
                                       options=ocp.CheckpointManagerOptions(create=True))
    self.rolling = ocp.CheckpointManager(os.path.join(root, "rolling"),
                                         options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, step: int, state, meta: dict, boundary: bool) -> None:
    manager = self.tasks if boundary else self.rolling
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)

  def latest(self) -> tuple[Any, int] | None:
    """(manager, step) of the newest checkpoint; a task-boundary one wins a tie."""
    found = [(m.latest_step(), i, m) for i, m in enumerate((self.rolling, self.tasks)) if m.latest_step() is not None]
    if not found:
      return None
    step, _, manager = max(found, key=lambda f: (f[0], f[1]))
    return manager, step

  def restore(self, abstract_state, manager=None, step=None):
    """Restores (state, meta) into the shardings of `abstract_state` (a pytree of ShapeDtypeStructs)."""
    if manager is None:
      latest = self.latest()
      if latest is None:
        return None
      manager, step = latest
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def wait(self) -> None:
    self.tasks.wait_until_finished()
    self.rolling.wait_until_finished()

  def close(self) -> None:
    self.tasks.close()
    self.rolling.close()


def abstract_like(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
