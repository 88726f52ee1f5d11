"""O-LoRA through the task loop: base frozen (no optimizer state), one slot trained per task, optimizer reset."""
import jax
import numpy as np

from conftest import tiny_config
from cl_jax import sharding
from cl_jax.data import train_dataset
from cl_jax import run
from cl_jax.train.loop import build


def _olora_config(steps=20):
  c = tiny_config("olora", kind="task", steps=steps)
  c.lora.rank = 4
  c.lora.targets = "dense_*,head"  # the task-IL heads must learn too ('all-linear' leaves the head frozen)
  c.optim.lr = 3e-3
  return c


def test_only_the_current_slot_moves_and_the_base_has_no_optimizer_state():
  s = build(_olora_config())
  state = s.state
  before = jax.tree.map(np.asarray, state.params)
  it = iter(train_dataset(s.scenario, [0], 32, 0, 0).to_iter_dataset())
  for _ in range(5):
    state, m = s.train_step(state, sharding.put_batch(next(it), s.mesh))
  after = jax.tree.map(np.asarray, state.params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["base"]), jax.tree.leaves(after["base"])))
  moved = {name: not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["adapters"][name]),
                                                             jax.tree.leaves(after["adapters"][name])))
           for name in before["adapters"]}
  assert moved == {"task_0": True, "task_1": False, "task_2": False, "task_3": False, "task_4": False}
  # Adam moments exist for adapter leaves only: their total size is 2x the adapters' size.
  adapter_size = sum(x.size for x in jax.tree.leaves(state.params["adapters"]))
  moment_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) >= 1)
  assert moment_size == 2 * adapter_size


def test_olora_run_keeps_earlier_tasks_better_than_naive(tmp_path):
  olora = run(_olora_config(steps=40), str(tmp_path / "olora"), progress=False)
  naive = run(tiny_config("naive", kind="task", steps=40), str(tmp_path / "naive"), progress=False)
  assert np.asarray(olora.accuracy_matrix).shape == (6, 5)
  assert olora.acc > 0.8
  assert olora.bwt > naive.bwt
