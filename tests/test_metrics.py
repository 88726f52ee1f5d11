import numpy as np
import pytest

from cl_jax.eval import metrics

# Rows: before training, after task 1, 2, 3. Columns: tasks 1..3.
R = np.array([[0.10, 0.20, 0.30],
              [0.90, 0.25, 0.10],
              [0.50, 0.95, 0.40],
              [0.40, 0.60, 0.90]])


def test_acc_bwt_fwt_forgetting_by_hand():
  assert metrics.acc(R) == pytest.approx((0.40 + 0.60 + 0.90) / 3)
  # BWT = mean over tasks 1..T-1 of R[T,i] - R[i,i]
  assert metrics.bwt(R) == pytest.approx(((0.40 - 0.90) + (0.60 - 0.95)) / 2)
  # FWT = mean over tasks 2..T of R[i-1,i] - R[0,i]
  assert metrics.fwt(R) == pytest.approx(((0.25 - 0.20) + (0.40 - 0.30)) / 2)
  # forgetting: best earlier accuracy minus final, tasks 1..T-1
  assert metrics.forgetting(R) == pytest.approx(((0.90 - 0.40) + (0.95 - 0.60)) / 2)


def test_forgetting_uses_the_best_row_not_the_diagonal():
  r = R.copy()
  r[2, 0] = 0.99  # task 1 improved after task 2, then dropped
  assert metrics.forgetting(r) == pytest.approx(((0.99 - 0.40) + (0.95 - 0.60)) / 2)
  assert metrics.bwt(r) == pytest.approx(metrics.bwt(R))


def test_no_forgetting_matrix():
  r = np.array([[0.1, 0.1], [0.9, 0.5], [0.9, 0.8]])
  assert metrics.bwt(r) == 0 and metrics.forgetting(r) == 0
  assert metrics.fwt(r) == pytest.approx(0.4)


def test_bad_shape_is_refused():
  with pytest.raises(ValueError, match="T\\+1, T"):
    metrics.summarize(np.zeros((3, 3)))
