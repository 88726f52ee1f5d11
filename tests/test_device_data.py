"""Device-resident data: the order is a pure function of (seed, task, step), chunks compose, runs match grain's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config


@pytest.fixture(scope="module")
def digits_scenarios():
  from cl_jax.kinds import base_config
  from cl_jax.data import load_source, make_scenario
  c = base_config()
  data = load_source(c.data)
  out = {}
  for name, tasks in (("split", 5), ("permuted", 3), ("rotated", 2)):
    c.scenario.name, c.scenario.num_tasks = name, tasks
    out[name] = make_scenario(data, c.scenario)
  return out


def test_epoch_is_a_permutation_of_the_valid_rows():
  from cl_jax.data.device import epoch_order
  order = np.asarray(epoch_order(7, 2, 3, 100, 130))
  assert sorted(order[:100].tolist()) == list(range(100))
  assert sorted(order[100:].tolist()) == list(range(100, 130))
  other = np.asarray(epoch_order(7, 2, 4, 100, 130))
  assert not np.array_equal(order[:100], other[:100])   # a new epoch reshuffles


def test_batches_depend_only_on_seed_task_and_step(digits_scenarios):
  from cl_jax.data.device import DeviceData
  dd = DeviceData(digits_scenarios["split"], lambda t: (t,), 32)
  whole = dd.batches(3, 1, 0, 20)            # crosses epochs: 288 examples / 32 = 9 batches per epoch
  tail = dd.batches(3, 1, 7, 13)             # the same steps, drawn from step 7 on
  for key in ("x", "y", "task"):
    np.testing.assert_array_equal(np.asarray(whole[key][7:]), np.asarray(tail[key]))
  other_seed = dd.batches(4, 1, 0, 20)
  assert not np.array_equal(np.asarray(whole["y"]), np.asarray(other_seed["y"]))
  # One epoch visits 9 * 32 distinct examples of task 1 and nothing else.
  task = digits_scenarios["split"].tasks[1]
  assert set(np.asarray(whole["task"]).ravel().tolist()) == {1}
  xs = np.asarray(whole["x"][:9]).reshape(9 * 32, -1)
  assert len({row.tobytes() for row in xs}) == 9 * 32
  pool = {row.tobytes() for row in task.x_train.reshape(task.num_train, -1)}
  assert all(row.tobytes() in pool for row in xs)


@pytest.mark.parametrize("name", ["permuted", "rotated"])
def test_remaps_on_device_match_the_host_transform(digits_scenarios, name):
  from cl_jax.data.device import DeviceData
  scenario = digits_scenarios[name]
  dd = DeviceData(scenario, lambda t: tuple(range(t + 1)), 16)   # joint: examples of several tasks per batch
  last = scenario.num_tasks - 1
  batch = jax.tree.map(np.asarray, dd.batches(0, last, 0, 4))
  table = dd._host_tables[last]
  # Recover which example each row is from the table, then apply the host-side remap of its task.
  from cl_jax.data.device import chunk_indices
  idx = np.asarray(chunk_indices(0, last, 0, 4, table.size, dd.max_size, 16, dd.epochs_spanned(4)))
  rows, tasks = table.rows[idx], table.task[idx]
  assert len(set(tasks.ravel().tolist())) > 1
  for k in range(4):
    for b in range(16):
      t = scenario.tasks[tasks[k, b]]
      ref = t.inputs(t.x_train[rows[k, b]][None])[0]
      np.testing.assert_allclose(batch["x"][k, b], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(batch["y"][k], table.y[idx[k]])


def test_chunks_compose_like_one_scan():
  """Training steps 0..10 in one chunk equals 0..5 then 5..10 (what resuming from step 5 does)."""
  from cl_jax.data.device import DeviceData
  from cl_jax.train.loop import build
  setup = build(tiny_config(steps=10))
  dd = DeviceData(setup.scenario, setup.strategy.train_tasks, 32)
  step = getattr(setup, "raw_train_step", setup.train_step)
  copy = lambda s: jax.tree.map(jnp.array, s)
  one = jax.jit(dd.chunk_fn(step, 10))
  a, ma = one(copy(setup.state), dd.pool, dd.table(2), 0, 2, 0)
  half = jax.jit(dd.chunk_fn(step, 5))
  b, mb1 = half(copy(setup.state), dd.pool, dd.table(2), 0, 2, 0)
  b, mb2 = half(b, dd.pool, dd.table(2), 0, 2, 5)
  np.testing.assert_allclose(np.asarray(ma["loss"]), np.concatenate([mb1["loss"], mb2["loss"]]), rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6),
               a.params, b.params)
  assert int(a.step) == 10


@pytest.mark.parametrize("scenario", ["split", "permuted"])
def test_test_sets_on_device_score_like_the_host_evaluator(scenario):
  from cl_jax.data.device import DeviceTestData
  from cl_jax.train.loop import build, evaluate_task
  setup = build(tiny_config(**{"scenario.name": scenario, "scenario.num_tasks": 5 if scenario == "split" else 2}))
  test = DeviceTestData(setup.scenario, 100)
  ours = test.accuracy(setup.learner, setup.state.params, 1)
  ref = [evaluate_task(setup.eval_fn, setup.state.params, setup.scenario, i, 1, 100, setup.mesh)
         for i in range(setup.scenario.num_tasks)]
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  assert max(ref) > 0


def test_chunk_lengths_end_on_every_boundary():
  from cl_jax.data.device import chunk_lengths, default_chunk
  assert chunk_lengths(200, 0, [50, 100], 1000) == [50, 50, 50, 50]
  assert chunk_lengths(200, 30, [50, 0], 1000) == [20, 50, 50, 50]
  assert default_chunk(2000, [500, 1000]) == 500
  assert default_chunk(200, [50, 100]) == 50
  assert default_chunk(2000, [0, 0]) == 500


def test_on_device_setting():
  from cl_jax.data.device import check_on_device, use_device_data
  for bad in ("yes please", 3, None):
    with pytest.raises(ValueError, match="data.on_device"):
      check_on_device(bad)
  assert use_device_data("false", None) is False


def test_prefetch_hands_out_the_same_batches_and_a_resumable_state():
  from cl_jax.data import train_dataset, train_iterator
  from cl_jax.data.device import Prefetch
  from cl_jax.train.loop import build
  setup = build(tiny_config())
  dataset = train_dataset(setup.scenario, (1,), 32, 0, 1)
  plain = train_iterator(dataset)
  ahead = Prefetch(train_iterator(dataset), depth=3)
  for _ in range(4):
    np.testing.assert_array_equal(next(plain)["y"], next(ahead)["y"])
  state = ahead.get_state()   # after 4 batches handed out, although more were read ahead
  ahead.close()
  resumed = train_iterator(dataset, state)
  np.testing.assert_array_equal(next(resumed)["y"], next(plain)["y"])


def test_on_device_trains_like_grain(tmp_path):
  """Same config, batches from the device sampler or from grain: the same accuracy ballpark (task-IL digits)."""
  from cl_jax import run
  device = run(tiny_config(kind="task", steps=40, **{"data.on_device": "true"}), str(tmp_path / "d"), progress=False)
  grain = run(tiny_config(kind="task", steps=40, **{"data.on_device": "false"}), str(tmp_path / "g"), progress=False)
  assert device.acc > 0.85 and grain.acc > 0.85
  assert abs(device.acc - grain.acc) < 0.05
  # Row 0 (before training) is the same init scored by both evaluators.
  np.testing.assert_allclose(device.accuracy_matrix[0], grain.accuracy_matrix[0], atol=1e-6)
