import ml_collections
import numpy as np
import pytest

from cl_jax.data.scenarios import make_scenario, rotation_remap
from cl_jax.data.sources import LabelledData


def _data(n=200, classes=10, shape=(4, 4), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.random((n, *shape), dtype=np.float32)
  y = np.arange(n) % classes
  return LabelledData(x, y.astype(np.int32), x[:50], y[:50].astype(np.int32), "toy")


def _cfg(**kw):
  c = dict(name="split", kind="class", num_tasks=5, class_order=[], shuffle_classes=False,
           first_task_identity=False, angles=[], max_angle=180.0, seed=0)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_split_class_il_labels_and_growing_mask():
  s = make_scenario(_data(), _cfg(kind="class", class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]))
  assert s.num_outputs == 10 and s.num_heads == 1
  assert s.tasks[0].classes == (9, 8)
  # Labels are positions in the class order: task 1 holds global labels 2, 3.
  assert sorted(np.unique(s.tasks[1].y_train)) == [2, 3]
  # Originals 7 -> 2 and 6 -> 3.
  x_of_7 = s.tasks[1].x_train[s.tasks[1].y_train == 2]
  assert np.array_equal(x_of_7, _data().x_train[_data().y_train == 7])
  m = np.asarray(s.logit_mask(np.array([0, 1, 4]), 1))
  assert m.sum(1).tolist() == [4, 4, 10]  # train on task 1: classes of tasks 0..1; a future task 4: 0..4


def test_split_task_il_multi_head_and_masked_single_head():
  s = make_scenario(_data(), _cfg(kind="task"), multi_head=True)
  assert s.num_heads == 5 and s.num_outputs == 2 and s.mask_table is None
  assert all(sorted(np.unique(t.y_train)) == [0, 1] for t in s.tasks)
  s1 = make_scenario(_data(), _cfg(kind="task"), multi_head=False)
  assert s1.num_heads == 1 and s1.num_outputs == 10
  m = np.asarray(s1.logit_mask(np.array([3]), 0))[0]
  assert np.flatnonzero(m).tolist() == [6, 7]


def test_split_domain_il_local_labels():
  s = make_scenario(_data(), _cfg(kind="domain"))
  assert s.num_outputs == 2 and s.mask_table is None
  assert sorted(np.unique(s.tasks[3].y_train)) == [0, 1]
  assert s.tasks[3].classes == (6, 7)


def test_permuted_tasks_are_fixed_seeded_permutations():
  d = _data()
  s = make_scenario(d, _cfg(name="permuted", kind="domain", num_tasks=3))
  s_again = make_scenario(d, _cfg(name="permuted", kind="domain", num_tasks=3))
  x = d.x_train[:5]
  for t in range(3):
    out = s.tasks[t].inputs(x).reshape(5, -1)
    perm = s.tasks[t].transform.index[0]
    assert sorted(perm.tolist()) == list(range(16))
    assert np.array_equal(out, x.reshape(5, -1)[:, perm])
    assert np.array_equal(out, s_again.tasks[t].inputs(x).reshape(5, -1))
  assert not np.array_equal(s.tasks[0].transform.index, s.tasks[1].transform.index)
  assert np.array_equal(s.tasks[2].y_train, d.y_train)  # domain-IL keeps labels
  sc = make_scenario(d, _cfg(name="permuted", kind="class", num_tasks=3))
  assert sc.num_outputs == 30 and np.array_equal(sc.tasks[2].y_train, d.y_train + 20)


def test_rotation_by_90_degrees_is_exact_and_0_is_identity():
  img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
  assert np.allclose(rotation_remap(4, 4, 0.0)(img), img)
  assert np.allclose(rotation_remap(4, 4, 90.0)(img), np.rot90(img, k=1, axes=(1, 2)), atol=1e-5) or \
      np.allclose(rotation_remap(4, 4, 90.0)(img), np.rot90(img, k=-1, axes=(1, 2)), atol=1e-5)


def test_rotated_scenario_angles():
  s = make_scenario(_data(), _cfg(name="rotated", kind="domain", num_tasks=2, max_angle=360.0))
  x = _data().x_train[:3]
  assert np.allclose(s.tasks[0].inputs(x), x)
  assert np.allclose(s.tasks[1].inputs(x), x[:, ::-1, ::-1], atol=1e-5)  # angles 0 and 180 degrees


def test_num_tasks_must_divide_classes():
  with pytest.raises(ValueError, match="scenario.num_tasks=3"):
    make_scenario(_data(), _cfg(num_tasks=3))


# ------------------------------------------------------------------------------------------- validation split


def _indexed_data(n=300, classes=10):
  """x[i] = i in every pixel, so an example's index can be read back from any split."""
  x = np.repeat(np.arange(n, dtype=np.float32)[:, None, None], 4, 1).repeat(4, 2)
  y = (np.arange(n) * 7 % classes).astype(np.int32)
  return LabelledData(x, y, x[:50] + 1000, y[:50], "toy")


def _ids(x):
  return set(np.asarray(x)[:, 0, 0].astype(int).tolist())


@pytest.mark.parametrize("name", ["split", "permuted"])
def test_validation_split_is_disjoint_from_training_and_per_class(name):
  data = _indexed_data()
  cfg = _cfg(name=name, num_tasks=5 if name == "split" else 2)
  s = make_scenario(data, cfg, validation_fraction=0.2)
  for t in s.tasks:
    train, val = _ids(t.x_train), _ids(t.x_val)
    assert not train & val
    assert len(t.y_val) == len(t.x_val) and len(val) > 0
    # round(0.2 * 30) = 6 of every class's 30 examples; the rest stay in training
    counts = np.bincount(np.asarray(t.y_val))
    assert set(counts[counts > 0].tolist()) == {6}
    assert len(train) + len(val) == (60 if name == "split" else 300)
  if name == "permuted":   # tasks share one split of the shared data
    assert s.tasks[0].x_val is s.tasks[1].x_val and s.tasks[0].x_train is s.tasks[1].x_train
  every = set().union(*(_ids(t.x_train) | _ids(t.x_val) for t in s.tasks))
  assert every == set(range(300))
  # Test data untouched unless eval.split='validation'
  np.testing.assert_array_equal(s.tasks[0].x_test, make_scenario(data, cfg).tasks[0].x_test)


def test_validation_split_is_deterministic_and_independent_of_order_and_seed():
  data = _indexed_data()
  a = make_scenario(data, _cfg(), validation_fraction=0.1)
  b = make_scenario(data, _cfg(), validation_fraction=0.1)
  # A different class order / shuffling seed groups classes differently; each class's held-out examples stay.
  c = make_scenario(data, _cfg(class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], seed=3), validation_fraction=0.1)
  val = lambda s: set().union(*(_ids(t.x_val) for t in s.tasks))
  assert [_ids(t.x_val) for t in a.tasks] == [_ids(t.x_val) for t in b.tasks]
  assert val(a) == val(c) and len(val(a)) == 30
  assert make_scenario(data, _cfg()).tasks[0].x_val is None


def test_eval_split_validation_measures_on_the_validation_examples():
  data = _indexed_data()
  s = make_scenario(data, _cfg(), validation_fraction=0.2, eval_split="validation")
  for t in s.tasks:
    np.testing.assert_array_equal(t.x_test, t.x_val)
    np.testing.assert_array_equal(t.y_test, t.y_val)
    assert max(_ids(t.x_test)) < 1000   # no test example
  with pytest.raises(ValueError, match="data.validation_fraction"):
    make_scenario(data, _cfg(), eval_split="validation")
  with pytest.raises(ValueError, match="data.validation_fraction=1.0"):
    make_scenario(data, _cfg(), validation_fraction=1.0)
  with pytest.raises(ValueError, match="eval.split='dev'"):
    make_scenario(data, _cfg(), validation_fraction=0.1, eval_split="dev")


def test_run_on_the_validation_split(tmp_path):
  """Through cl_jax.run: the same training (validation carved out), the accuracy matrix measured on validation
  data; a bad combination is a config error naming the key."""
  import cl_jax
  from conftest import tiny_config
  from cl_jax.config import ConfigError
  from cl_jax.kinds import validate
  overrides = {"scenario.num_tasks": 2, "data.validation_fraction": 0.2, "optim.lr": 1e-2}
  on_test = cl_jax.run(tiny_config("naive", steps=10, **overrides), str(tmp_path / "t"), progress=False)
  on_val = cl_jax.run(tiny_config("naive", steps=10, **overrides, **{"eval.split": "validation"}),
                      str(tmp_path / "v"), progress=False)
  rt, rv = np.asarray(on_test.accuracy_matrix), np.asarray(on_val.accuracy_matrix)
  assert rt.shape == rv.shape == (3, 2)
  assert not np.allclose(rt, rv)       # measured on other examples
  assert rv[1, 0] > 0.6                # ... of the task it learned
  with pytest.raises(ConfigError, match="eval.split"):
    validate(tiny_config("naive", **{"eval.split": "validation"}))


def test_split_tasks_are_slices_of_one_buffer_that_the_cpu_pool_aliases():
  """Each split task holds exactly its classes' examples in their original order (as boolean masks pick them),
  as read-only consecutive slices of one aligned buffer; the device pool is that buffer, uploaded without a copy."""
  import jax
  from cl_jax.data.device import DeviceData, pool_array
  data = _data(n=300, classes=10, shape=(5, 3))
  order = [3, 9, 0, 4, 7, 1, 8, 2, 6, 5]
  s = make_scenario(data, _cfg(kind="class", class_order=order))
  for t, task in enumerate(s.tasks):
    keep = np.isin(data.y_train, order[2 * t:2 * t + 2])
    assert np.array_equal(task.x_train, data.x_train[keep])                    # same rows, same order
    assert task.y_train.tolist() == [2 * t + order[2 * t:2 * t + 2].index(c) for c in data.y_train[keep]]
    assert np.array_equal(task.x_test, data.x_test[np.isin(data.y_test, order[2 * t:2 * t + 2])])
    assert not task.x_train.flags.writeable
  pool = pool_array([task.x_train for task in s.tasks])
  assert pool.ctypes.data == s.tasks[0].x_train.ctypes.data and pool.ctypes.data % 64 == 0   # no copy on the host
  from cl_jax.data.scenarios import validation_mask                                 # with a validation split too
  sv = make_scenario(data, _cfg(kind="class", class_order=order), validation_fraction=0.2)
  val = validation_mask(data.y_train, 0.2)
  for t, task in enumerate(sv.tasks):
    group = order[2 * t:2 * t + 2]
    assert np.array_equal(task.x_train, data.x_train[~val & np.isin(data.y_train, group)])
    assert np.array_equal(task.x_val, data.x_train[val & np.isin(data.y_train, group)])
  assert np.array_equal(pool, np.concatenate([t.x_train for t in s.tasks]).reshape(300, 15))
  device = DeviceData(s, lambda t: [t], 8, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  if jax.devices()[0].platform == "cpu":                                           # and none on upload
    assert device.pool.x.unsafe_buffer_pointer() == pool.ctypes.data


def test_pool_array_copies_arrays_that_do_not_share_a_buffer():
  from cl_jax.data.buffers import spanning_view
  from cl_jax.data.device import pool_array
  a, b = np.ones((4, 3), np.float32), np.zeros((2, 3), np.float32)
  assert spanning_view([a, b]) is None
  whole = np.arange(30, dtype=np.float32).reshape(10, 3)
  assert spanning_view([whole[:4], whole[5:]]) is None                               # a gap
  assert spanning_view([whole[4:], whole[:4]]) is None                               # out of order
  assert np.array_equal(spanning_view([whole[:4], whole[4:7]]), whole[:7])
  joined = pool_array([a, b])
  assert np.array_equal(joined, np.concatenate([a, b])) and joined.ctypes.data % 64 == 0


def test_class_il_without_the_mask_of_unseen_classes():
  """`scenario.mask_unseen=False` (the DER paper's code): every output unit is trained and scored from task 1 on;
  a single-head task-IL scenario keeps its own-task mask."""
  s = make_scenario(_data(), _cfg(kind="class", mask_unseen=False))
  assert s.logit_mask(np.array([0, 4]), 0) is None and s.num_outputs == 10
  s_task = make_scenario(_data(), _cfg(kind="task", mask_unseen=False), multi_head=False)
  assert np.asarray(s_task.logit_mask(np.array([1]), 0)).sum() == 2
