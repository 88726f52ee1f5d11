import numpy as np
import pytest

from cl_jax.data import sources


def test_tfds_path_under_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    d = sources.load_tfds("mnist")
  assert d.x_train.shape == (24, 28, 28) and d.x_train.dtype == np.float32
  assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
  assert d.y_train.dtype == np.int32 and d.y_train.shape == (24,)
  assert d.name == "tfds:mnist"


def test_tfds_source_trains_through_the_loop(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from conftest import tiny_config
  from cl_jax import run
  c = tiny_config(steps=3)
  c.data.name = "tfds:mnist"
  c.scenario.num_tasks = 1
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    r = run(c, str(tmp_path / "w"), progress=False)
  assert np.asarray(r.accuracy_matrix).shape == (2, 1)


def test_mnist_npz_source(mnist_path):
  d = sources.load_mnist_npz(mnist_path)
  assert d.x_train.shape == (60000, 28, 28) and d.x_test.shape == (10000, 28, 28)
  assert np.bincount(d.y_train).tolist()[:3] == [5923, 6742, 5958]


def test_digits_split_is_stratified_and_disjoint():
  d = sources.load_digits(seed=0)
  assert len(d.y_train) + len(d.y_test) == 1797
  assert set(np.unique(d.y_test)) == set(range(10))
  rows = {x.tobytes() for x in d.x_train}
  # Digits has a few duplicate images; almost all test images are unseen in train.
  assert sum(x.tobytes() in rows for x in d.x_test) < 5


def test_mnist1d_is_generated_deterministically():
  a, b = sources.load_mnist1d(0), sources.load_mnist1d(0)
  assert a.x_train.shape[1:] == (40,) and np.array_equal(a.x_train, b.x_train)
