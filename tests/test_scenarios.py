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
